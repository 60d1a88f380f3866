"""One whole retrain: the lock, the :func:`~xray_core.pipeline.recipe.recipe`, the reports, and what a
failure leaves behind.

An *executor* runs each step (:mod:`xray_core.pipeline.executor`): direct calls for ``xray retrain
--local`` and tests, Prefect tasks in ``flows/retrain.py``. Both produce the same files and audit rows,
because this is the only place a run is reported and its failure recorded.

Every run ends in one named outcome (:data:`~xray_core.evaluate.promotion.RUN_STATES`): ``Promoted``,
``Kept``, ``Blocked``, ``Skipped``, ``Insufficient evidence`` or ``Failed``, with a one-line message. A
failure, a cancellation or a termination signal (BaseException) records a ``failed`` audit row and a
report before it propagates.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xray_core.errors import TerminatedBySignal
from xray_core.io.oserrors import path_error
from xray_core.pipeline.executor import DirectExecutor, Executor, step
from xray_core.pipeline.lock import hold_retrain_lock
from xray_core.pipeline.recipe import RetrainRequest, recipe
from xray_core.results import ReportFiles, RunResult, run_state
from xray_core.settings import Settings


def run_retrain(
    settings: Settings,
    request: RetrainRequest,
    executor: Executor | None = None,
    *,
    wait_seconds: float = 0.0,
    run_dir: Path | None = None,
) -> RunResult:
    """Run one retrain; return its :class:`~xray_core.results.RunResult` (state, message, evaluations,
    decision, report paths).

    Holds ``XRAY_HOME/retrain.lock`` for the whole run (a second retrain waits ``wait_seconds``, then
    fails with :class:`~xray_core.errors.RetrainBusyError`), except from the moment it starts waiting
    for a reviewer (``XRAY_REVIEW``; see :func:`~xray_core.pipeline.recipe.ask_reviewer`). On any
    exception, KeyboardInterrupt and a termination signal included, a ``failed`` audit row and a failure
    report are written, the champion is unchanged, and the exception propagates carrying the result as
    ``xray_result`` (the flow publishes it as artifacts, the CLI prints what its audit row says).
    """
    run = executor or DirectExecutor()
    with hold_retrain_lock(settings, wait_seconds=wait_seconds) as lock:
        folder = run_dir or run_dir_for(settings, request.flow_run_id)
        result = RunResult(
            flow_run_id=request.flow_run_id,
            run_name=request.run_name,
            trigger=request.trigger,
            backbone_weights=settings.backbone_weights,
            backbone_random_init=settings.backbone_weights == "random",
            run_dir=str(folder),
        )
        try:
            closed = close_interrupted(settings, lock.previous, request.trigger)
            if closed:
                result.notes.append(
                    f"closed candidate(s) {', '.join(f'v{v}' for v in closed)} left by a "
                    "retrain that was killed before its decision"
                )
            recipe(settings, request, run, result, folder, lock)
            _report_outcome(settings, run, result, folder)
        except BaseException as exc:
            _record_failure(settings, request, result, exc, folder)
            try:
                exc.xray_result = result  # type: ignore[attr-defined]  # read by the flow and the CLI
            except AttributeError:  # pragma: no cover - exceptions with __slots__
                pass
            raise
        return result


def run_dir_for(settings: Settings, run_id: str | None) -> Path:
    """``reports/<UTC stamp>-<run id[:8]>``: one folder per run, sortable by time."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = settings.reports_dir / f"{stamp}-{(run_id or 'local')[:8]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@step("report")
def write_reports(settings: Settings, result: RunResult, run_dir: Path) -> ReportFiles:
    """report.html, report.md and result.json in the run's folder (readable with XRAY_FILE_MODE)."""
    from xray_core.report.files import write_run_reports

    written = write_run_reports(settings, result, Path(run_dir))
    return ReportFiles(
        markdown=str(written.markdown_path),
        html=str(written.html_path),
        result_json=str(written.result_path),
        description=written.description,
        html_contents=written.html_contents,
    )


def _report_outcome(settings: Settings, run: Executor, result: RunResult, folder: Path) -> None:
    """Write the reports of a run whose outcome is already recorded.

    The decision row and the champion switch are committed before this: a report that cannot be
    written (a full disk, a read-only reports folder) must not turn the run into a plain failure while
    the champion changed. The run keeps its state (and the CLI its exit code 0); its message and
    ``report_error`` say the report is missing. A signal or Ctrl-C still propagates (BaseException).
    """
    try:
        result.report = run.step(write_reports)(settings, result, folder)
    except Exception as exc:  # noqa: BLE001 - see docstring
        mapped = path_error(exc)  # a read-only or too long path: one line, the path cut
        error = str(mapped) if mapped else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        result.report_error = error
        result.state_message = (
            f"{result.state_message} (the report could not be written: {error}; "
            "the outcome stands, see xray models --history)"
        )


def close_interrupted(settings: Settings, since: Any, trigger: str) -> list[int]:
    """Candidates a killed retrain left without a decision (created after it started): recorded as
    ``failed`` ("interrupted") and closed, so none stays a candidate forever. Returns their versions."""
    if since is None:
        return []
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Model, Promotion, as_utc
    from xray_core.data.catalogue import open_catalogue
    from xray_core.registry.versions import record_decision

    with session_scope(open_catalogue(settings)) as s:
        decided = select(Promotion.to_version).where(Promotion.to_version.is_not(None))
        versions = [
            m.id
            for m in s.scalars(select(Model).where(Model.status == "candidate", Model.id.not_in(decided)))
            if m.created_at is not None and as_utc(m.created_at) >= since
        ]
    for version in versions:
        record_decision(
            settings,
            challenger=version,
            decision="failed",
            trigger=trigger,
            metrics={},
            rationale=(
                f"interrupted: the retrain that trained v{version} (started "
                f"{since.isoformat()}) was killed before its decision; closed by the next run"
            ),
        )
    return versions


def _record_failure(
    settings: Settings, request: RetrainRequest, result: RunResult, exc: BaseException, folder: Path
) -> None:
    """Audit row and failure report for a run that did not reach a decision (best effort: never
    masks ``exc``)."""
    from xray_core.registry.versions import record_decision
    from xray_core.results import NOT_REACHED

    kind = "cancelled" if not isinstance(exc, Exception) else "failed"
    if isinstance(exc, TerminatedBySignal):
        error = "terminated by a signal (SIGTERM)"
    else:  # a path the user must fix: one line, cut to ~200 characters (not 10,000 in the audit row)
        mapped = path_error(exc)
        error = (
            str(mapped) if mapped else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        )
    decided, after = result.decision, result.champion_after
    already = decided is not None and after is not NOT_REACHED  # the decision row exists
    if decided is not None and already:
        message = (
            f"run {kind} after its decision ({decided.decision}; champion "
            f"{'v' + str(after) if after else 'none'}): {error}"
        )
    else:
        message = f"run {kind} before a decision ({error}); champion unchanged"
    result.status, result.error, result.state_message = "failed", error, message
    result.state = run_state("failed", None)
    try:
        if not already:
            record_decision(
                settings,
                challenger=result.version,
                decision="failed",
                trigger=request.trigger,
                flow_run_id=request.flow_run_id,
                metrics={},
                rationale=f"run {kind} before a decision; champion unchanged. {error}",
            )
        result.audit_recorded = True  # what the CLI's "terminated; the audit row says ..." line relies on
        result.report = write_reports(settings, result, folder)
    except Exception:  # noqa: BLE001 - the original failure is what the caller must see
        pass
