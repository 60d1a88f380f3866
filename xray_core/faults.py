"""Named crash points: the project's one fault-injection mechanism.

``XRAY_FAULT_KILL_AT=<point>[:<n>[:<action>]]`` acts the n-th time (default 1st) the process reaches
``crash_point("<point>")``, and every time after. Unset (always, outside the fault tests), a crash
point is one environment lookup. Actions:

- ``KILL`` (default): SIGKILL, not an exception: nothing gets to clean up, exactly as when the
  machine kills a run (the crash-safety tests run the cycle in a subprocess);
- ``TERM``: SIGTERM, as a cancellation or a service stop sends;
- ``RAISE``: raise :class:`InjectedFault` in this process, so a test in the same process can check
  that a transaction rolls back (the registry tests). Production code has no ``fail_...=True``
  arguments for this: the point is in the code once, and the test arms it.
"""

from __future__ import annotations

import os
import signal

ENV = "XRAY_FAULT_KILL_AT"
ACTIONS = ("KILL", "TERM", "RAISE")
_hits: dict[str, int] = {}
_armed: list[str] = [""]  # the spec the hit counts belong to: a new spec starts counting afresh


class InjectedFault(RuntimeError):
    """Raised at a crash point armed with the RAISE action; never raised unless a test asks."""


def crash_point(name: str) -> None:
    """Act as ``XRAY_FAULT_KILL_AT`` asks when it names this point; otherwise do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if spec != _armed[0]:  # a test process may arm several specs in turn
        _hits.clear()
        _armed[0] = spec
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, action = rest.partition(":")
    action = action.upper() or "KILL"
    if action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: the action must be one of {', '.join(ACTIONS)} (default KILL)")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] < int(nth or 1):
        return
    if action == "RAISE":
        raise InjectedFault(f"injected failure at crash point {name}")
    os.kill(os.getpid(), signal.SIGTERM if action == "TERM" else signal.SIGKILL)


__all__ = ["ACTIONS", "ENV", "InjectedFault", "crash_point"]
