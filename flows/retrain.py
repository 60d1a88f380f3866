"""The retrain flow: the recipe of :mod:`xray_core.pipeline.recipe`, each step a Prefect task.

The flow ends in a state named after the decision (``Promoted``, ``Kept``, ``Skipped``, ``Blocked``,
``Insufficient evidence``; a failure is ``Failed``, a path outside the allowed roots ``Refused``) with
the one-line rationale as its message, so the runs list and ``prefect deployment run --watch`` show
what happened, and carries it as a tag (``decision:promoted``, ..., :func:`flows.common.tag_decision`).
Artifacts are keyed, so the UI keeps their history; each description starts with the decision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, ParamSpec, TypeVar, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.common import (
    epoch_reporter,
    failed_for_user_error,
    progress_reporter,
    refused,
    tag_decision,
    transient_io,
)
from flows.events import emit_reference_breach, emit_retrain_drift, emit_retrain_outcome
from flows.review import wait_for_review
from xray_core.errors import PathRefusedError
from xray_core.io.allowed_roots import confine_parameters
from xray_core.io.fsutil import utf8_safe
from xray_core.pipeline.cycle import run_retrain
from xray_core.pipeline.executor import ProgressKey, options_of
from xray_core.pipeline.recipe import RetrainRequest
from xray_core.pipeline.review import ReviewAnswer, ReviewRequest
from xray_core.registry.listing import list_models
from xray_core.report.drift import drift_description
from xray_core.report.format import cut_words
from xray_core.report.markdown import (
    artifact_description,
    comparison_words,
    drift_markdown,
    metrics_rows,
    registry_rows,
    retrain_markdown,
)
from xray_core.results import RunResult, Snapshot
from xray_core.settings import Settings, get_settings

P = ParamSpec("P")
T = TypeVar("T")
Trigger = Literal["schedule", "manual", "cli", "demo", "test", "event"]


def progress_artifact(key: ProgressKey) -> Callable[..., None]:
    """The progress artifact a step with ``progress=key`` updates (keyed: the UI keeps its history)."""
    if key == "embed":
        return progress_reporter("retrain-embedding", "feature cache: images embedded")
    if key == "train":
        return epoch_reporter("retrain-training", "head training: epochs")
    return progress_reporter("ingest-progress", "ingest: files processed")


class PrefectExecutor:
    """Runs each step of the recipe as a Prefect task named after it, with the options the step
    declares (:func:`xray_core.pipeline.executor.step`): retried once on transient I/O
    (:func:`flows.common.transient_io`), a progress artifact, and the embedding fanned out over Dask
    (:func:`flows.embed.run_parallel_embed`) when ``XRAY_EMBED_DASK_WORKERS`` > 0. A review pauses the
    run with a form in the UI (:mod:`flows.review`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def step(self, fn: Callable[P, T]) -> Callable[P, T]:
        options = options_of(fn)
        prefect_options: dict[str, Any] = {"name": options.name, "cache_policy": NO_CACHE}
        if options.retry_transient_io:
            prefect_options.update(retries=1, retry_delay_seconds=5, retry_condition_fn=transient_io)
        injected: dict[str, Any] = {}
        if options.progress:
            injected["progress"] = progress_artifact(options.progress)
        if options.dask_fan_out and self.settings.embed_dask_workers > 0:
            injected["fan_out"] = self._dask_fan_out
        return cast(Callable[P, T], functools.partial(task(fn, **prefect_options), **injected))

    def review(self, ask: ReviewRequest, *, before_waiting: Callable[[], None] | None = None) -> ReviewAnswer:
        """Pause the run with the review form until a reviewer answers (:func:`flows.review.wait_for_review`).
        """
        return wait_for_review(ask, before_waiting)

    def _dask_fan_out(self, snapshot: Snapshot) -> dict[str, Any]:
        from flows.embed import run_parallel_embed

        return run_parallel_embed(self.settings, str(snapshot.path))


def publish_artifacts(settings: Settings, run: RunResult) -> None:
    """The report, drift, metrics and registry tables as keyed artifacts; descriptions lead with the
    decision (cut at a word: :func:`~xray_core.report.format.cut_words`)."""
    # utf8_safe: a run folder under a home whose name is not UTF-8 shows as \xNN, never a lone surrogate.
    description = utf8_safe(artifact_description(run))
    create_markdown_artifact(markdown=utf8_safe(retrain_markdown(run)), key="retrain-report",
                             description=description)
    drift = drift_markdown(run)  # only a run that checked its new films against the champion
    if drift is not None and run.drift is not None:
        create_markdown_artifact(markdown=utf8_safe(drift), key="drift-report",
                                 description=utf8_safe(drift_description(run.drift)))
    if run.challenger_eval is not None:
        flips = run.decision.negative_flips if run.decision else None
        create_table_artifact(table=metrics_rows(run.challenger_eval, run.champion_eval, flips=flips),
                              key="retrain-metrics",
                              description=f"{cut_words(description, 120)} · 95% intervals, "
                                          f"{comparison_words(run)}")
    current = run.challenger_eval.test_set_fingerprint if run.challenger_eval else None
    create_table_artifact(table=registry_rows(list_models(settings, current_test_set=current)),
                          key="model-registry",
                          description=f"model versions after this run · {cut_words(description, 120)}")


@flow(name="retrain", log_prints=False)
def retrain(sources: list[str] | None = None, manifests: list[str] | None = None, incoming: str | None = None,
            use_incoming: bool = True, trigger: Trigger = "manual", wait_seconds: float = 0.0,
            force: bool = False, columns: dict[str, str] | None = None) -> State:
    """Ingest new data, train a challenger, compare it with the champion on the same test set, decide.

    ``sources``: folders (``<root>/<label>/<image>``) to ingest first; ``manifests``: manifest CSVs;
    ``incoming``: a folder of batch folders scanned every run (default XRAY_INCOMING when
    ``use_incoming``): each complete batch (READY, or settled) is taken once, others wait or are refused
    in one line (:mod:`xray_core.data.incoming`); a missing or empty one means "nothing new", not a
    failure. Only one retrain runs at a time: a second one waits ``wait_seconds`` and then fails with a
    clear message. When nothing changed since the
    champion was trained, the run is ``Skipped`` unless ``force``. ``columns``: the ``manifests``' names
    for known columns, e.g. ``{"patient_id": "patientid"}`` (``xray retrain --columns``).
    Every path must be absolute and inside
    the allowed roots (see SECURITY.md); otherwise the run ends ``Refused`` before anything is read.
    """
    settings = get_settings()
    logger = get_run_logger()
    try:
        paths = confine_parameters(settings, read={"sources": sources, "manifests": manifests,
                                                   "incoming": incoming or None})
    except PathRefusedError as exc:
        return tag_decision(refused(exc))
    sources, manifests, incoming = paths["sources"], paths["manifests"], paths["incoming"]
    folder = incoming or (str(settings.incoming_dir) if use_incoming and settings.incoming_dir else None)
    request = RetrainRequest(sources=tuple(sources or ()), manifests=tuple(manifests or ()), incoming=folder,
                             trigger=trigger, force=force, flow_run_id=flow_run.id, run_name=flow_run.name,
                             columns=tuple((columns or {}).items()))
    try:
        result = run_retrain(settings, request, PrefectExecutor(settings), wait_seconds=wait_seconds)
    except BaseException as exc:
        failed = getattr(exc, "xray_result", None)
        if failed:
            try:
                publish_artifacts(settings, failed)
            except Exception as also:  # noqa: BLE001 - the run's own failure is what must surface
                logger.warning("could not publish the failed run's artifacts: %s: %s",
                               type(also).__name__, also)
        failed_state = failed_for_user_error(exc)  # the CLI's one line as the Failed state's message
        if failed_state is not None:
            return tag_decision(failed_state)
        if isinstance(exc, Exception):  # not a cancellation or Ctrl-C: those end Cancelled, untagged
            tag_decision(Failed())
        raise
    publish_artifacts(settings, result)
    emit_retrain_outcome(result)
    emit_retrain_drift(result)
    emit_reference_breach(result)
    logger.info(result.state_line)
    final: State = Completed(name=result.state, message=result.state_message[:1000], data=result.digest())
    return tag_decision(final)
