"""Named crash points for fault-injection tests.

``XRAY_FAULT_KILL_AT=<point>[:<n>[:TERM]]`` makes the process SIGKILL (or SIGTERM) itself the n-th
time (default 1st) it reaches ``crash_point("<point>")``. Unset (always, outside the crash-safety tests), a crash point is a
dictionary lookup. SIGKILL, not an exception: nothing gets to clean up, exactly as when the machine
kills a run.
"""

from __future__ import annotations

import os
import signal

ENV = "XRAY_FAULT_KILL_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, signame = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        # SIGKILL by default; ``:TERM`` sends SIGTERM, as a cancellation or a service stop does.
        os.kill(os.getpid(), signal.SIGTERM if signame == "TERM" else signal.SIGKILL)
