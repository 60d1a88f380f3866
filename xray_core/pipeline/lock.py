"""One retrain at a time: an OS file lock on ``XRAY_HOME/retrain.lock`` (any process, any executor)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO

from db.schema import as_utc
from xray_core.errors import RetrainBusyError
from xray_core.settings import Settings


class HeldLock:
    """The retrain lock as held by one run.

    ``previous``: the start time of a holder that was killed before it finished (its line was still
    in the file), else None. :meth:`unlock` lets other retrains run while this one waits for a person
    (a review may take days).
    """

    def __init__(self, fh: IO[str], previous: datetime | None) -> None:
        self._fh = fh
        self.previous = previous
        self.held = True

    def unlock(self) -> None:
        """Erase the holder's line and release the lock, for the rest of the run (once; later calls do
        nothing). A run waiting for its reviewer calls this: the lock is not taken again after the answer.

        What a run does after a review does not need it: the decision is recorded with compare-and-set
        (stale if the champion moved meanwhile), re-scoring adds evaluation rows from this run's own
        frozen split and cached features, and the report goes to this run's folder. Not taking it
        again means an answer is recorded at once, never queued behind a nightly retrain. The line is
        erased as on a normal finish, so the next holder does not take this run for a killed one (and
        close its candidate while it waits for its reviewer).
        """
        if not self.held:
            return
        self.held = False
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.flush()
        fcntl.flock(self._fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def hold_retrain_lock(settings: Settings, *, wait_seconds: float = 0.0) -> Iterator[HeldLock]:
    """An exclusive lock on ``XRAY_HOME/retrain.lock`` held for a whole retrain.

    A second retrain (flow, ad-hoc run or CLI, any process) waits up to ``wait_seconds`` and then
    fails with :class:`RetrainBusyError`, so two retrains never interleave. The OS releases the lock
    when the holder dies, so a crashed run never blocks the next one.

    The holder's line ("pid N since <UTC time>") is erased when it finishes normally, so a line found
    on entry means the previous holder was killed: :attr:`HeldLock.previous` is its start time (else
    None), and the retrain closes what that run left half done (see ``cycle.close_interrupted``).
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
        held = HeldLock(fh, previous)
        try:
            yield held
        finally:
            # Finished, or failed with any Python exception (the recipe has recorded that failure): only a
            # kill, which runs no cleanup, leaves the line for the next holder to find. A lock released
            # for a review may be another run's by now: its line is not touched.
            held.unlock()


@contextlib.contextmanager
def retrain_lock(settings: Settings, *, wait_seconds: float = 0.0) -> Iterator[datetime | None]:
    """:func:`hold_retrain_lock` for callers that only need the killed holder's start time (or None)."""
    with hold_retrain_lock(settings, wait_seconds=wait_seconds) as held:
        yield held.previous


def _started(line: str) -> datetime | None:
    """The start time in a previous holder's line, or None (empty: it finished; unreadable: old format)."""
    _, _, when = line.strip().partition(" since ")
    try:
        started = datetime.fromisoformat(when)
    except ValueError:
        return None
    return as_utc(started)
