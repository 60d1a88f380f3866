"""One retrain at a time: an OS file lock on ``XRAY_HOME/retrain.lock`` (any process, any executor)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

from xray_core.errors import RetrainBusyError
from xray_core.settings import Settings


@contextlib.contextmanager
def retrain_lock(settings: Settings, *, wait_seconds: float = 0.0) -> Iterator[None]:
    """An exclusive lock on ``XRAY_HOME/retrain.lock`` held for a whole retrain.

    A second retrain (flow, ad-hoc run or CLI, any process) waits up to ``wait_seconds`` and then
    fails with :class:`RetrainBusyError`, so two retrains never interleave. The OS releases the lock
    when the holder dies, so a crashed run never blocks the next one.
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
                    raise RetrainBusyError(
                        f"another retrain is running ({holder}); wait for it to finish, or retry later") from None
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
