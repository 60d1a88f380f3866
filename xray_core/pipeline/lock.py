"""One retrain at a time: an OS file lock on ``XRAY_HOME/retrain.lock`` (any process, any executor)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from db.schema import as_utc
from xray_core.errors import RetrainBusyError
from xray_core.settings import Settings


@contextlib.contextmanager
def retrain_lock(settings: Settings, *, wait_seconds: float = 0.0) -> Iterator[datetime | None]:
    """An exclusive lock on ``XRAY_HOME/retrain.lock`` held for a whole retrain.

    A second retrain (flow, ad-hoc run or CLI, any process) waits up to ``wait_seconds`` and then
    fails with :class:`RetrainBusyError`, so two retrains never interleave. The OS releases the lock
    when the holder dies, so a crashed run never blocks the next one.

    The holder's line ("pid N since <UTC time>") is erased when it finishes normally, so a line found
    on entry means the previous holder was killed: the context yields its start time (else None), and
    the retrain closes what that run left half done (see ``cycle.close_interrupted``).
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / "retrain.lock"
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    raise RetrainBusyError(f"another retrain is running ({holder}); wait for it to finish, "
                                           "or retry later") from None
                time.sleep(0.5)
        fh.seek(0)
        previous = _started(fh.read())
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='microseconds')}")
        fh.flush()
        try:
            yield previous
        finally:
            # Finished, or failed with any Python exception (the recipe has recorded that failure): only a
            # kill, which runs no cleanup, leaves the line for the next holder to find.
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _started(line: str) -> datetime | None:
    """The start time in a previous holder's line, or None (empty: it finished; unreadable: old format)."""
    _, _, when = line.strip().partition(" since ")
    try:
        started = datetime.fromisoformat(when)
    except ValueError:
        return None
    return as_utc(started)
