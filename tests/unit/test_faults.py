"""xray_core.faults: one crash-point mechanism, armed by XRAY_FAULT_KILL_AT (KILL, TERM or RAISE)."""

from __future__ import annotations

import os
import signal

import pytest

from xray_core import faults


def test_an_unarmed_or_other_point_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.crash_point("a")
    monkeypatch.setenv(faults.ENV, "b:1:RAISE")
    faults.crash_point("a")


def test_raise_acts_on_the_nth_hit_and_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "a:3:RAISE")
    faults.crash_point("a")
    faults.crash_point("a")
    for _ in range(2):
        with pytest.raises(faults.InjectedFault, match="crash point a"):
            faults.crash_point("a")


def test_a_new_spec_counts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "a:1:RAISE")
    with pytest.raises(faults.InjectedFault):
        faults.crash_point("a")
    monkeypatch.setenv(faults.ENV, "a:2:RAISE")  # the hit above belongs to the old spec
    faults.crash_point("a")
    with pytest.raises(faults.InjectedFault):
        faults.crash_point("a")


@pytest.mark.parametrize("spec, sent", [("a", signal.SIGKILL), ("a:1:KILL", signal.SIGKILL),
                                        ("a:1:TERM", signal.SIGTERM), ("a:1:term", signal.SIGTERM)])
def test_kill_and_term_signal_this_process(monkeypatch: pytest.MonkeyPatch, spec: str, sent: int) -> None:
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    monkeypatch.setenv(faults.ENV, spec)
    faults.crash_point("a")
    assert signals == [(os.getpid(), sent)]


def test_an_unknown_action_is_refused_not_taken_for_a_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: pytest.fail("signalled"))
    monkeypatch.setenv(faults.ENV, "a:1:EXPLODE")
    with pytest.raises(ValueError, match="must be one of KILL, TERM, RAISE"):
        faults.crash_point("a")
