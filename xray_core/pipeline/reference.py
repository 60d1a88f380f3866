"""The locked reference in the recipe (the bio-creep guard; :mod:`xray_core.registry.reference`).

The reference is scored on the run's test split like the champion (:func:`evaluate_reference`), or not
at all when it is the champion: the champion's evaluation and paired comparison are reused. The guard
(:func:`xray_core.pipeline.guards.reference_summary`, applied by ``apply_guards``) turns "promote"
into "keep" when the challenger is not shown non-inferior to the reference within
``XRAY_REFERENCE_MARGIN`` on the same test films, with the same metric as ``XRAY_PROMOTION_METRIC``.
"""

from __future__ import annotations

from xray_core.pipeline import steps
from xray_core.pipeline.executor import Executor, step
from xray_core.results import Evaluation, Snapshot
from xray_core.settings import Settings


@step("evaluate-reference")
def evaluate_reference(settings: Settings, version: int, snapshot: Snapshot,
                       flow_run_id: str | None) -> Evaluation:
    """Score the locked reference on the same test split as the challenger (when it is not the champion)."""
    return Evaluation(**steps.evaluate_step(settings, version, snapshot.load(), flow_run_id=flow_run_id))


def reference_evaluation(settings: Settings, run: Executor, champion: Evaluation | None, snapshot: Snapshot,
                         flow_run_id: str | None) -> Evaluation | None:
    """The locked reference's evaluation on this run's test split: the champion's own when the reference
    is the champion (not scored twice), None before the first champion."""
    from xray_core.registry.reference import reference_version

    version = reference_version(settings)
    if version is None:
        return None
    if champion is not None and champion.version == version:
        return champion
    return run.step(evaluate_reference)(settings, version, snapshot, flow_run_id)


__all__ = ["evaluate_reference", "reference_evaluation"]
