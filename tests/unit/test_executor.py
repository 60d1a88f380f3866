"""The recipe's step options are declared beside each step, in one table every executor reads."""

from __future__ import annotations

import pytest

from xray_core.pipeline import breach, cycle, recipe, reference
from xray_core.pipeline.executor import STEPS, DirectExecutor, StepOptions, options_of, step

# What the executors used to pick by name (RETRIED = {"ingest", "embed"}, progress by step name, the
# Dask takeover of "embed"): now each step's own declaration.
EXPECTED = {
    recipe.ingest: StepOptions("ingest", retry_transient_io=True, progress="ingest"),
    recipe.check_arrivals: StepOptions("drift"),
    recipe.freeze_split: StepOptions("snapshot"),
    recipe.embed: StepOptions("embed", retry_transient_io=True, progress="embed", dask_fan_out=True),
    recipe.audit: StepOptions("audit"),
    recipe.train: StepOptions("train", progress="train"),
    recipe.evaluate_challenger: StepOptions("evaluate-challenger"),
    recipe.evaluate_champion: StepOptions("evaluate-champion"),
    reference.evaluate_reference: StepOptions("evaluate-reference"),
    breach.measure_breaches: StepOptions("breach"),
    breach.rollback_to_reference: StepOptions("restore-reference"),
    recipe.decide: StepOptions("decide"),
    recipe.promote: StepOptions("promote"),
    recipe.rescore: StepOptions("rescore"),
    cycle.write_reports: StepOptions("report"),
}


def test_every_step_declares_its_task_name_and_options():
    for fn, options in EXPECTED.items():
        assert options_of(fn) == options, fn.__name__
    assert len({o.name for o in STEPS.values()}) == len(STEPS)  # task names are unique


def test_a_function_that_is_not_a_step_is_refused_with_the_steps_named():
    with pytest.raises(TypeError, match=r"is not a step of the recipe: declare it with @step.*embed"):
        DirectExecutor().step(len)


def test_direct_executor_passes_the_progress_reporter_a_step_asks_for():
    calls: list[tuple] = []

    @step("test-progress", progress="embed")
    def counts(n: int, *, progress=None) -> int:  # progress: a callback or None
        if progress is not None:
            progress(n, n)
        return n

    try:
        assert DirectExecutor({"embed": lambda done, total: calls.append((done, total))}).step(counts)(3) == 3
        assert DirectExecutor({"train": lambda *a: calls.append(a)}).step(counts)(4) == 4  # not its key
        assert calls == [(3, 3)]
    finally:
        del STEPS[counts]
