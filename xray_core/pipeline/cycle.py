"""One whole retrain, written once: the recipe, run by an executor.

ingest (sources, manifests, the incoming folder) → freeze the split → skip if nothing is new → embed
→ train → evaluate challenger and champion on the same test set → decide → record (compare-and-set)
→ re-score the registry on the current test set → write report.md, report.html and result.json.

An *executor* runs each step: :class:`DirectExecutor` calls it (``xray retrain --local``, tests);
``flows/retrain.py`` wraps each step in a Prefect task. Both produce the same files and audit rows,
because this is the only place the order of steps, the outcome and its state name are decided.

Every run ends in one named outcome (:data:`~xray_core.evaluate.promotion.RUN_STATES`): ``Promoted``, ``Kept``, ``Skipped``,
``Insufficient evidence`` or ``Failed``, with a one-line message. A failure, a cancellation or a
termination signal (BaseException) records a ``failed`` audit row and a report before it propagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from xray_core.errors import NotEnoughDataError, TerminatedBySignal
from xray_core.evaluate.promotion import DECISION_STATES
from xray_core.faults import crash_point
from xray_core.io.oserrors import path_error
from xray_core.pipeline import steps
from xray_core.pipeline.embed import embed_step
from xray_core.pipeline.lock import retrain_lock
from xray_core.data.snapshot import SplitData, load_snapshot, load_split_data, save_snapshot
from xray_core.settings import Settings

T = TypeVar("T")

SKIPPED, FAILED = "Skipped", "Failed"


class Executor(Protocol):
    """Runs one named step of the recipe; may report progress for long ones."""

    def run(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

    def progress(self, name: str) -> Callable[..., None] | None: ...


class DirectExecutor:
    """Plain calls: ``xray retrain --local``, tests and benchmarks. ``progress`` maps a step name to a
    callback (the CLI's progress bar), or nothing."""

    def __init__(self, progress: dict[str, Callable[..., None]] | None = None) -> None:
        self._progress = progress or {}

    def run(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def progress(self, name: str) -> Callable[..., None] | None:
        return self._progress.get(name)


@dataclass(frozen=True)
class RetrainRequest:
    """What one run is asked to do (flow parameters and CLI flags map onto this)."""

    sources: tuple[str, ...] = ()  # folders <root>/<label>/<image> to ingest first
    manifests: tuple[str, ...] = ()  # manifest CSVs to ingest first
    incoming: str | None = None  # folder scanned every run; missing or empty means "nothing new", not failure
    trigger: str = "cli"  # schedule | manual | cli | demo | test: recorded in the audit row
    force: bool = False  # train even when nothing changed since the champion or the last decision not to promote
    flow_run_id: str | None = None
    run_name: str | None = None


def run_dir_for(settings: Settings, run_id: str | None) -> Path:
    """``reports/<UTC stamp>-<run id[:8]>``: one folder per run, sortable by time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = settings.reports_dir / f"{stamp}-{(run_id or 'local')[:8]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def incoming_status(folder: str | None) -> tuple[bool, str | None]:
    """(worth ingesting, note): a missing or empty incoming folder is a quiet night, not an error."""
    if not folder:
        return False, None
    path = Path(folder)
    if not path.exists():
        return False, f"nothing new in {folder} (the folder does not exist)"
    if not path.is_dir():
        return False, f"nothing new in {folder} (not a folder)"
    try:
        next(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    except StopIteration:
        return False, f"nothing new in {folder} (the folder is empty)"
    return True, None


def _ingest(settings: Settings, path: str, manifest: str | None, progress: Callable | None) -> dict[str, Any]:
    from xray_core.data.ingest import ingest_source

    return ingest_source(Path(path), manifest=Path(manifest) if manifest else None, settings=settings,
                         progress=progress).as_dict()


def check_arrivals(settings: Settings, flow_run_id: str | None) -> dict[str, Any]:
    """Drift and out-of-distribution checks of what arrived since the last check, against the
    champion's reference (recorded in ``drift_checks``). Best effort: a check that cannot run says why
    and never fails the retrain."""
    from xray_core.pipeline.monitor import run_monitor

    try:
        out = run_monitor(settings, flow_run_id=flow_run_id, kind="retrain")
    except Exception as exc:  # noqa: BLE001 - see docstring
        return {"flagged": False, "summary": f"not checked: {type(exc).__name__}: {exc}", "warnings": []}
    checks = out.get("checks") or []
    warnings = [f"{c['subject']}: {c['verdict']}" for c in checks if c.get("drift")]
    flagged = [c for c in checks if c.get("ood_flagged")]
    if flagged and not warnings:
        warnings = [f"{c['subject']}: {c['ood_flagged']} of {c['n']} films look unlike the champion's training data"
                    for c in flagged[:1]]
    return {"flagged": bool(out.get("drift")), "summary": out.get("summary"), "warnings": warnings,
            "checks": [{k: c.get(k) for k in ("subject", "n", "ood_flagged", "mmd_p", "ks_p", "verdict", "drift")}
                       for c in checks], "report": out.get("report")}


def freeze_split(settings: Settings, run_dir: str) -> str:
    """Freeze the current patient-grouped split for this run; return the snapshot's path."""
    return str(save_snapshot(Path(run_dir) / "split.json", load_split_data(settings)))


def embed_snapshot(settings: Settings, snapshot: str, progress: Callable | None = None) -> dict[str, Any]:
    """Embed every (image, view) pair of the frozen split that the feature cache lacks."""
    return embed_step(settings, load_snapshot(Path(snapshot)), progress)


def train_snapshot(settings: Settings, snapshot: str, flow_run_id: str | None,
                   progress: Callable | None = None) -> dict[str, Any]:
    """Train the challenger head on cached features and register it as a candidate."""
    return steps.train_step(settings, load_snapshot(Path(snapshot)), flow_run_id=flow_run_id, progress=progress)


def evaluate_snapshot(settings: Settings, version: int, snapshot: str, flow_run_id: str | None) -> dict[str, Any]:
    """Score one version on the run's test split (its test probabilities travel with the result)."""
    return steps.evaluate_step(settings, version, load_snapshot(Path(snapshot)), flow_run_id=flow_run_id)


def decide_snapshot(settings: Settings, challenger: dict[str, Any], champion: dict[str, Any] | None,
                    snapshot: str, audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply the promotion policy to the two evaluations, with the per-site guardrail and the audit."""
    return steps.decide_step(settings, challenger, champion, load_snapshot(Path(snapshot)), audit)


def audit_snapshot(settings: Settings, snapshot: str) -> dict[str, Any]:
    """The shortcut audit (label × site, metadata probe, site probe) over the run's split."""
    from xray_core.pipeline.guards import audit_step

    return audit_step(settings, load_snapshot(Path(snapshot)))


def record_outcome(settings: Settings, challenger: dict[str, Any], champion: dict[str, Any] | None,
                   decision: dict[str, Any], trigger: str, flow_run_id: str | None,
                   audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record the decision; promote only if the champion is still the one that was evaluated."""
    flags = None if audit is None else {k: audit.get(k) for k in ("flagged", "warnings", "policy", "sites")}
    return steps.promote_step(settings, challenger=challenger["version"], decision=decision, trigger=trigger,
                              champion_eval=champion, challenger_eval=challenger, flow_run_id=flow_run_id,
                              expect_champion=champion["version"] if champion else None, audit=flags)


def rescore_registry(settings: Settings, snapshot: str, flow_run_id: str | None) -> list[dict[str, Any]]:
    """Score the registry's other models on this run's test set from cached features, so tables compare.

    Best effort: the decision is already recorded, so a model that cannot be re-scored is listed with
    the reason and never fails the run.
    """
    from xray_core.pipeline.rescore import rescore_models

    try:
        return rescore_models(settings, load_snapshot(Path(snapshot)), flow_run_id=flow_run_id)
    except Exception as exc:  # noqa: BLE001 - see docstring
        return [{"status": "skipped", "reason": f"re-scoring failed: {type(exc).__name__}: {exc}"}]


def write_reports(settings: Settings, result: dict[str, Any], run_dir: str) -> dict[str, str]:
    """report.html, report.md and result.json in the run's folder (readable with XRAY_FILE_MODE);
    returns their paths and the artifact description, and records the paths in ``result``."""
    from xray_core.report.files import write_run_reports

    written = write_run_reports(settings, result, Path(run_dir))
    paths = {"report": str(written.markdown_path), "report_html": str(written.html_path),
             "result_json": str(written.result_path), "description": written.description}
    result.update(report_path=paths["report"], report_html=paths["report_html"])
    return paths


def summary_line(result: dict[str, Any]) -> str:
    """``<State>: <message>``: the CLI's first line, the flow state's message, the artifact description."""
    return f"{result['state']}: {result['state_message']}"


def _outcome_message(result: dict[str, Any]) -> str:
    dec, version, after = result["decision"], result["version"], result.get("champion_after")
    before = (result.get("champion_eval") or {}).get("version")
    if dec["decision"] == "stale":
        return f"v{version} not promoted: {dec['rationale']}"
    if dec["decision"] == "blocked":
        head = f"v{version} not promoted: blocked by the shortcut audit"
    elif dec["decision"] == "promote":
        head = f"v{version} replaces v{before}" if before else f"v{version} is the first champion"
    elif before:
        head = f"champion v{after} stays; challenger v{version} not promoted"
    else:
        head = f"no champion yet; challenger v{version} not promoted"
    return f"{head}. {dec['rationale']}"


def run_cycle(settings: Settings, request: RetrainRequest, executor: Executor | None = None, *,
              wait_seconds: float = 0.0, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one retrain; return its full result (state, state_message, evaluations, decision, report paths).

    Holds ``XRAY_HOME/retrain.lock`` for the whole run (a second retrain waits ``wait_seconds``, then
    fails with :class:`~xray_core.errors.RetrainBusyError`). On any exception, KeyboardInterrupt and a
    termination signal included, a ``failed`` audit row and a failure report are written, the champion
    is unchanged, and the exception propagates.
    """
    run = executor or DirectExecutor()
    with retrain_lock(settings, wait_seconds=wait_seconds) as killed_run_started:
        folder = run_dir or run_dir_for(settings, request.flow_run_id)
        result: dict[str, Any] = {
            "flow_run_id": request.flow_run_id, "run_name": request.run_name, "trigger": request.trigger,
            "backbone_weights": settings.backbone_weights,
            "backbone_random_init": settings.backbone_weights == "random", "ingests": [], "notes": [],
            "run_dir": str(folder)}
        try:
            closed = close_interrupted(settings, killed_run_started, request.trigger)
            if closed:
                result["notes"].append(f"closed candidate(s) {', '.join(f'v{v}' for v in closed)} left by a "
                                       "retrain that was killed before its decision")
            _run_steps(settings, request, run, result, str(folder))
            _report_outcome(settings, run, result, str(folder))
        except BaseException as exc:
            _record_failure(settings, request, result, exc, str(folder))
            try:
                exc.xray_result = result  # type: ignore[attr-defined]  # the flow publishes it as artifacts
            except AttributeError:  # pragma: no cover - exceptions with __slots__
                pass
            raise
        return result


def _report_outcome(settings: Settings, run: Executor, result: dict[str, Any], folder: str) -> None:
    """Write the reports of a run whose outcome is already recorded.

    The decision row and the champion switch are committed before this: a report that cannot be
    written (a full disk, a read-only reports folder) must not turn the run into a plain failure while
    the champion changed. The run keeps its state (and the CLI its exit code 0); its message and
    ``report_error`` say the report is missing. A signal or Ctrl-C still propagates (BaseException).
    """
    try:
        result.update(run.run("report", write_reports, settings, result, folder))
    except Exception as exc:  # noqa: BLE001 - see docstring
        mapped = path_error(exc)  # a read-only or too long path: one line, the path cut
        error = str(mapped) if mapped else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        result["report_error"] = error
        result["state_message"] = (f"{result['state_message']} (the report could not be written: {error}; "
                                   "the outcome stands, see xray models --history)")
        result["summary"] = summary_line(result)


def close_interrupted(settings: Settings, since: Any, trigger: str) -> list[int]:
    """Candidates a killed retrain left without a decision (created after it started): recorded as
    ``failed`` ("interrupted") and closed, so none stays a candidate forever. Returns their versions."""
    if since is None:
        return []
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Model, Promotion
    from xray_core.data.catalogue import open_catalogue
    from xray_core.registry.versions import record_decision

    with session_scope(open_catalogue(settings)) as s:
        decided = select(Promotion.to_version).where(Promotion.to_version.is_not(None))
        versions = [m.id for m in s.scalars(select(Model).where(Model.status == "candidate",
                                                                Model.id.not_in(decided)))
                    if m.created_at is not None and _aware(m.created_at) >= since]
    for version in versions:
        record_decision(settings, challenger=version, decision="failed", trigger=trigger, metrics={},
                        rationale=(f"interrupted: the retrain that trained v{version} (started "
                                   f"{since.isoformat()}) was killed before its decision; closed by the next run"))
    return versions


def _aware(when: Any) -> Any:
    from datetime import timezone

    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _run_steps(settings: Settings, request: RetrainRequest, run: Executor, result: dict[str, Any], folder: str) -> None:
    worth, note = incoming_status(request.incoming)
    if note:
        result["notes"].append(note)
    jobs = [(src, None) for src in request.sources] + [(str(Path(m).parent), m) for m in request.manifests]
    jobs += [(request.incoming, None)] if worth else []
    for path, manifest in jobs:
        result["ingests"].append(run.run("ingest", _ingest, settings, path, manifest, run.progress("ingest")))
    crash_point("retrain.after_ingest")
    if any(i.get("added") for i in result["ingests"]) and steps.current_champion(settings) is not None:
        result["drift"] = run.run("drift", check_arrivals, settings, request.flow_run_id)
    try:
        snapshot = run.run("snapshot", freeze_split, settings, folder)
    except NotEnoughDataError as exc:
        _skip(result, "; ".join([*result["notes"], f"not enough data to train: {exc}"]), settings)
        return
    data: SplitData = load_snapshot(Path(snapshot))
    result["split_counts"] = data.counts()
    summary = _catalogue(settings)
    result["near_duplicates"], result["label_history"] = summary["near_duplicates"], summary["label_history"]
    reason = None if request.force else (steps.nothing_new_since_champion(settings, data)
                                         or steps.nothing_new_since_last_decision(settings, data))
    if reason:
        _skip(result, "; ".join([*result["notes"], reason]), settings)
        return
    result["embed"] = run.run("embed", embed_snapshot, settings, snapshot, run.progress("embed"))
    result["backbone_fingerprint"] = result["embed"]["backbone_fingerprint"]
    result["backbone_random_init"] = result["embed"]["backbone_random_init"]
    result["audit"] = run.run("audit", audit_snapshot, settings, snapshot)
    trained = run.run("train", train_snapshot, settings, snapshot, request.flow_run_id, run.progress("train"))
    result["train"], result["version"] = trained, trained["version"]
    crash_point("retrain.after_train")
    challenger = run.run("evaluate-challenger", evaluate_snapshot, settings, trained["version"], snapshot,
                         request.flow_run_id)
    crash_point("retrain.after_evaluate")
    champion_version = steps.current_champion(settings)
    champion = (run.run("evaluate-champion", evaluate_snapshot, settings, champion_version, snapshot,
                        request.flow_run_id) if champion_version else None)
    result["challenger_eval"], result["champion_eval"] = challenger, champion
    decision = run.run("decide", decide_snapshot, settings, challenger, champion, snapshot, result["audit"])
    result["decision"] = {k: decision.get(k) for k in ("decision", "promote", "rationale", "checks", "evidence",
                                                        "site_drops")}
    row = run.run("promote", record_outcome, settings, challenger, champion, decision, request.trigger,
                    request.flow_run_id, result["audit"])
    result["decision"]["decision"] = row.get("decision", decision["decision"])  # "stale" if the champion moved
    if result["decision"]["decision"] == "stale":
        result["decision"]["rationale"] = row.get("rationale") or result["decision"]["rationale"]
    result["champion_after"] = row["champion_after"]
    result["registry"] = run.run("rescore", rescore_registry, settings, snapshot, request.flow_run_id)
    result["status"] = "completed"
    result["state"] = DECISION_STATES.get(result["decision"]["decision"], "Kept")
    result["state_message"] = _outcome_message(result)
    result["summary"] = summary_line(result)


def _catalogue(settings: Settings) -> dict[str, Any]:
    from xray_core.data.catalogue import catalogue_summary

    return catalogue_summary(settings)


def _skip(result: dict[str, Any], why: str, settings: Settings) -> None:
    result.update(status="skipped", state=SKIPPED, state_message=why,
                  champion_after=steps.current_champion(settings))
    result["summary"] = summary_line(result)


def _record_failure(settings: Settings, request: RetrainRequest, result: dict[str, Any], exc: BaseException,
                    folder: str) -> None:
    """Audit row and failure report for a run that did not reach a decision (best effort: never masks ``exc``)."""
    from xray_core.registry.versions import record_decision

    kind = "cancelled" if not isinstance(exc, Exception) else "failed"
    if isinstance(exc, TerminatedBySignal):
        error = "terminated by a signal (SIGTERM)"
    else:  # a path the user must fix: one line, cut to ~200 characters (not 10,000 in the audit row)
        mapped = path_error(exc)
        error = str(mapped) if mapped else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    already = "champion_after" in result and result.get("decision") is not None  # the decision row exists
    if already:
        message = (f"run {kind} after its decision ({result['decision']['decision']}; champion "
                   f"{'v' + str(result['champion_after']) if result['champion_after'] else 'none'}): {error}")
    else:
        message = f"run {kind} before a decision ({error}); champion unchanged"
    result.update(status="failed", state=FAILED, error=error, state_message=message)
    result["summary"] = summary_line(result)
    try:
        if not already:
            record_decision(settings, challenger=result.get("version"), decision="failed", trigger=request.trigger,
                            flow_run_id=request.flow_run_id, metrics={},
                            rationale=f"run {kind} before a decision; champion unchanged. {error}")
        result["audit_recorded"] = True  # what the CLI's "terminated; the audit row says ..." line relies on
        result.update(write_reports(settings, result, folder))
    except Exception:  # noqa: BLE001 - the original failure is what the caller must see
        pass


def headline_result(result: dict[str, Any]) -> dict[str, Any]:
    """What the flow and the CLI return: the headline numbers, not the full metric dicts (those are in the report)."""
    keep = ("flow_run_id", "status", "state", "state_message", "summary", "trigger", "ingests", "split_counts",
            "embed", "champion_after", "report", "report_html", "description", "notes",
            "backbone_random_init", "report_error")
    out = {k: result.get(k) for k in keep}
    out["decision"] = result.get("decision")
    out["drift"] = result.get("drift")
    audit = result.get("audit") or {}
    out["audit"] = {k: audit.get(k) for k in ("flagged", "warnings", "policy", "sites")} if audit else None
    out["train"] = {k: (result.get("train") or {}).get(k)
                    for k in ("version", "threshold", "best_epoch", "epochs_run", "smoke_test")}
    for name in ("challenger_eval", "champion_eval"):
        ev = result.get(name)
        out[name] = None if ev is None else {
            "version": ev["version"], "test_set_fingerprint": ev["test_set_fingerprint"], "n_images": ev["n_images"],
            **{k: ev["metrics"].get(k) for k in ("accuracy", "balanced_accuracy", "macro_auroc")},
            "intervals": {k: ev["metrics"].get("intervals", {}).get(k) for k in ("macro_auroc", "balanced_accuracy")}}
    return out
