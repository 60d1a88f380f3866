"""The retrain lock: only a killed holder leaves its line for the next one to find."""

from __future__ import annotations

import pytest

from xray_core.pipeline.lock import retrain_lock
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
