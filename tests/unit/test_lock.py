"""The retrain lock: only a killed holder leaves its line for the next one to find."""

from __future__ import annotations

import pytest

from xray_core.errors import RetrainBusyError
from xray_core.pipeline.lock import hold_retrain_lock, retrain_lock
from xray_core.settings import load_settings


def test_a_holder_that_ends_with_an_exception_leaves_nothing_behind(xray_env):
    settings = load_settings()
    with pytest.raises(ValueError):
        with retrain_lock(settings) as previous:
            assert previous is None
            raise ValueError("a step failed; the recipe recorded it")
    with pytest.raises(KeyboardInterrupt):
        with retrain_lock(settings):
            raise KeyboardInterrupt
    with retrain_lock(settings) as previous:
        assert previous is None
    assert (settings.home / "retrain.lock").read_text() == ""


def test_a_killed_holders_line_is_found_by_the_next_one(xray_env):
    settings = load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    # What a SIGKILLed holder leaves: its line, never erased (no cleanup runs).
    (settings.home / "retrain.lock").write_text("pid 4242 since 2026-11-30T21:00:00.123456+00:00")
    with retrain_lock(settings) as previous:
        assert previous is not None and previous.isoformat() == "2026-11-30T21:00:00.123456+00:00"
    with retrain_lock(settings) as previous:
        assert previous is None


def test_a_lock_given_up_for_a_review_leaves_the_next_holders_line_alone(xray_env):
    """A run waiting for its reviewer gives the lock up (HeldLock.unlock); a nightly takes it meanwhile,
    is not told of a killed run, and keeps its line when the waiting run ends first."""
    import os

    settings = load_settings()
    waiting = hold_retrain_lock(settings)
    lock = waiting.__enter__()
    lock.unlock()
    assert (settings.home / "retrain.lock").read_text() == ""
    nightly = retrain_lock(settings)
    assert nightly.__enter__() is None  # not taken for a killed run
    waiting.__exit__(None, None, None)  # the reviewed run ends while the nightly still runs
    assert (settings.home / "retrain.lock").read_text().startswith(f"pid {os.getpid()} since ")
    with pytest.raises(RetrainBusyError):  # and the nightly still holds the lock
        with retrain_lock(settings):
            pass
    nightly.__exit__(None, None, None)
    assert (settings.home / "retrain.lock").read_text() == ""
