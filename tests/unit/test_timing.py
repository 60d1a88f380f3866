"""TimedExecutor: one cost record per step call, with the step's own name, and the step's result."""

from __future__ import annotations

import numpy as np
import pytest

from xray_core.pipeline.executor import STEPS, step
from xray_core.pipeline.timing import TimedExecutor


@pytest.fixture
def steps():
    @step("test-allocate")
    def allocate(mb: int) -> int:
        block = np.ones(mb * 1024 * 1024 // 8)  # touched: resident, not only reserved
        return int(block.size)

    @step("test-fail")
    def fail() -> None:
        raise ValueError("broken step")

    yield allocate, fail
    del STEPS[allocate], STEPS[fail]


def test_each_call_is_recorded_under_its_step_name_and_returns_the_steps_value(steps):
    allocate, _ = steps
    run = TimedExecutor()
    assert run.step(allocate)(1) == 1024 * 1024 // 8
    run.step(allocate)(2)
    assert [r.step for r in run.records] == ["test-allocate", "test-allocate"]
    assert all(r.seconds >= 0 and r.cpu_seconds >= 0 and not r.failed for r in run.records)
    totals = run.totals()["test-allocate"]
    assert totals["calls"] == 2
    assert totals["seconds"] == pytest.approx(sum(r.seconds for r in run.records), abs=1e-3)


def test_a_steps_peak_memory_is_its_own_where_linux_allows(steps):
    allocate, _ = steps
    run = TimedExecutor()
    run.step(allocate)(200)
    run.step(allocate)(1)
    big, small = run.records
    if big.peak_is_lifetime:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert big.peak_rss_mb - small.peak_rss_mb > 150  # the 200 MB block counted only in its own step


def test_a_failing_step_is_recorded_as_failed_and_its_exception_propagates(steps):
    _, fail = steps
    run = TimedExecutor()
    with pytest.raises(ValueError, match="broken step"):
        run.step(fail)()
    assert [(r.step, r.failed) for r in run.records] == [("test-fail", True)]


def test_a_function_that_is_not_a_step_is_refused():
    with pytest.raises(TypeError, match="not a step of the recipe"):
        TimedExecutor().step(len)
