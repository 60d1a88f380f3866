"""The retrain recipe, top to bottom: ingest → split → embed → audit → train → evaluate → decide →
(review) → promote → report (the flow diagram in the README, and ``docs/architecture.md``).

:func:`recipe` is the order of the steps and nothing else; each step below it is a plain function over
typed values (:mod:`xray_core.results`) whose options (retries on transient I/O, progress, Dask
fan-out) are declared with ``@step`` above it (:mod:`xray_core.pipeline.executor`). The run around
the recipe (the lock, the failure report, the report files) is :func:`xray_core.pipeline.cycle.run_retrain`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xray_core.data.incoming import Batch, IncomingScan, batch_line, pending_phrase, run_record
from xray_core.data.ingest import IngestSummary
from xray_core.data.snapshot import SplitData, load_split_data, save_snapshot
from xray_core.errors import NotEnoughDataError
from xray_core.evaluate.breach import BreachCheck, settled_actions
from xray_core.faults import crash_point
from xray_core.pipeline import steps, unchanged
from xray_core.pipeline.breach import measure_breaches, restore_reference
from xray_core.pipeline.embed import EmbedProgress, embed_step
from xray_core.pipeline.executor import Executor, step
from xray_core.pipeline.lock import HeldLock
from xray_core.pipeline.reference import reference_evaluation
from xray_core.pipeline.rescore import for_result
from xray_core.pipeline.review import nothing_new_since_pending_review, review_request, reviewed
from xray_core.registry.reference import count_test_set_reuse
from xray_core.report.format import outcome_message
from xray_core.results import (
    EmbedResult,
    Evaluation,
    Recorded,
    RunResult,
    Snapshot,
    TrainResult,
    Verdict,
    run_state,
)
from xray_core.settings import Settings


@dataclass(frozen=True)
class RetrainRequest:
    """What one run is asked to do (flow parameters and CLI flags map onto this)."""

    sources: tuple[str, ...] = ()  # folders <root>/<label>/<image> to ingest first
    manifests: tuple[str, ...] = ()  # manifest CSVs to ingest first
    # folder of batch folders scanned every run (xray_core.data.incoming); missing or empty: "nothing new"
    incoming: str | None = None
    trigger: str = "cli"  # schedule | manual | cli | demo | test: recorded in the audit row
    # train even when nothing changed since the champion or the last decision not to promote
    force: bool = False
    flow_run_id: str | None = None
    run_name: str | None = None
    # (known name, the export's column) for ``manifests`` (``--columns``; see xray_core.data.columns)
    columns: tuple[tuple[str, str], ...] = ()


def recipe(
    settings: Settings,
    request: RetrainRequest,
    run: Executor,
    result: RunResult,
    folder: Path,
    lock: HeldLock | None = None,
) -> None:
    """One retrain's steps in order, each run by ``run`` (an executor), filling ``result`` as they end.

    Ends ``Skipped`` (nothing new, or not enough data) or with the decision recorded; an exception
    propagates with ``result`` holding what the run reached (the caller reports it). ``lock``: the
    retrain lock the caller holds, given up while the run waits for a reviewer.
    """
    for path, manifest in arrivals(request):
        columns = dict(request.columns) if manifest in request.manifests else None
        result.ingests.append(run.step(ingest)(settings, path, manifest, columns=columns))
    if request.incoming:
        found = run.step(scan_incoming)(settings, request.incoming)
        taken = {b.name: run.step(take_batch)(settings, b, request.flow_run_id) for b in found.of("ready")}
        result.ingests += taken.values()
        note_incoming(result, found, taken)
    crash_point("retrain.after_ingest")
    if any(i.added for i in result.ingests) and unchanged.current_champion(settings) is not None:
        result.drift = run.step(check_arrivals)(settings, request.flow_run_id, str(folder / "drift-check"))
    try:
        snapshot = run.step(freeze_split)(settings, str(folder))
    except NotEnoughDataError as exc:
        return skip(settings, result, f"not enough data to train: {exc}")
    data = snapshot.load()
    result.split_counts = data.counts()
    result.near_duplicates, result.label_history = catalogue_notes(settings)
    if not request.force and (reason := nothing_new(settings, data)):
        return skip(settings, result, reason)

    result.embed = run.step(embed)(settings, snapshot)
    result.backbone_random_init = result.embed.backbone_random_init
    result.audit = run.step(audit)(settings, snapshot)
    result.train = run.step(train)(settings, snapshot, request.flow_run_id)
    crash_point("retrain.after_train")
    result.challenger_eval = run.step(evaluate_challenger)(
        settings, result.train, snapshot, request.flow_run_id
    )
    crash_point("retrain.after_evaluate")
    champion = unchanged.current_champion(settings)
    result.champion_eval = (
        run.step(evaluate_champion)(settings, champion, snapshot, request.flow_run_id) if champion else None
    )
    reference = reference_evaluation(settings, run, result.champion_eval, snapshot, request.flow_run_id)
    result.breach_checks = run.step(measure_breaches)(settings, result.drift, champion, result.train.version,
                                                      snapshot)  # the reference at a drifted site
    verdict = run.step(decide)(settings, result.challenger_eval, result.champion_eval, snapshot, result.audit,
                               reference, result.breach_checks)
    result.breach_checks = settled_actions(result.breach_checks, verdict.checks)  # what a lift did
    recorded = record(settings, request, run, result, verdict, lock)
    restore_reference(settings, run, result, request.trigger, request.flow_run_id)  # XRAY_REFERENCE_BREACH
    result.test_set_reuse = count_test_set_reuse(settings, result.challenger_eval.test_set_fingerprint)
    result.registry = for_result(run.step(rescore)(settings, snapshot, request.flow_run_id))
    result.status, result.state = "completed", run_state("completed", recorded.decision)
    result.state_message = outcome_message(result)


# --------------------------------------------------------------------------- the steps, in order


@step("ingest", retry_transient_io=True, progress="ingest")
def ingest(
    settings: Settings,
    path: str,
    manifest: str | None,
    *,
    progress: Callable[[int, int], None] | None = None,
    columns: dict[str, str] | None = None,
) -> IngestSummary:
    """Ingest one folder or manifest into the catalogue (bad files to quarantine, with reasons);
    ``columns``: the manifest's names for known columns (``--columns``)."""
    from xray_core.data.ingest import ingest_source

    return ingest_source(
        Path(path), manifest=Path(manifest) if manifest else None, settings=settings, progress=progress,
        columns=columns,
    )


@step("scan-incoming", retry_transient_io=True)
def scan_incoming(settings: Settings, folder: str) -> IncomingScan:
    """Each batch folder of the incoming folder: ready (complete, new), waiting, refused or taken before."""
    from xray_core.data.incoming import scan

    return scan(settings, folder)


@step("ingest-batch", retry_transient_io=True, progress="ingest")
def take_batch(
    settings: Settings,
    batch: Batch,
    flow_run_id: str | None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> IngestSummary:
    """Ingest one ready batch of the incoming folder and record it as taken (once, by name and digest)."""
    from xray_core.data.incoming import take_batch as take

    return take(settings, batch, flow_run_id=flow_run_id, progress=progress)


@step("drift")
def check_arrivals(settings: Settings, flow_run_id: str | None, folder: str | None = None) -> dict[str, Any]:
    """Drift and out-of-distribution checks of what arrived since the last check, against the
    champion's reference (recorded in ``drift_checks``; the report in ``folder``, inside the run's own
    report folder). Best effort: a check that cannot run says why and never fails the retrain."""
    from xray_core.pipeline.monitor import run_monitor

    try:
        out = run_monitor(settings, flow_run_id=flow_run_id, kind="retrain",
                          folder=Path(folder) if folder else None)
    except Exception as exc:  # noqa: BLE001 - see docstring
        return {"flagged": False, "summary": f"not checked: {type(exc).__name__}: {exc}", "warnings": []}
    checks = out.get("checks") or []
    warnings = [f"{c['subject']}: {c['verdict']}" for c in checks if c.get("drift")]
    flagged = [c for c in checks if c.get("ood_flagged")]
    if flagged and not warnings:
        warnings = [
            f"{c['subject']}: {c['ood_flagged']} of {c['n']} films look unlike the champion's training data"
            + (f"; {c['ood_coarse']}" if c.get("ood_coarse") else "")
            for c in flagged[:1]
        ]
    return {
        "flagged": bool(out.get("drift")),
        "summary": out.get("summary"),
        "warnings": warnings,
        "checks": [
            {**{k: c.get(k) for k in ("subject", "n", "ood_flagged", "ood_coarse", "mmd_p", "ks_p", "verdict",
                                      "drift", "performance", "realised")},
             **({"site": c["site"]} if c.get("site") is not None else {})}  # one site's batch (the breach)
            for c in checks
        ],
        "report": out.get("report"),
        **({"earlier": out["earlier"]} if out.get("earlier") else {}),  # estimates realised now
    }


@step("snapshot")
def freeze_split(settings: Settings, run_dir: str) -> Snapshot:
    """Freeze the current patient-grouped split for this run (``<run dir>/split.json``)."""
    return Snapshot(save_snapshot(Path(run_dir) / "split.json", load_split_data(settings)))


@step("embed", retry_transient_io=True, progress="embed", dask_fan_out=True)
def embed(
    settings: Settings,
    snapshot: Snapshot,
    *,
    progress: EmbedProgress | None = None,
    fan_out: Callable[[Snapshot], dict[str, Any]] | None = None,
) -> EmbedResult:
    """Embed every (image, view) pair of the frozen split that the feature cache lacks.

    ``fan_out`` (given by an executor when ``XRAY_EMBED_DASK_WORKERS`` > 0) spreads the pairs over Dask
    workers; its shards report once, when all are done."""
    if fan_out is None:
        return EmbedResult.from_stats(embed_step(settings, snapshot.load(), progress))
    stats = fan_out(snapshot)
    if progress is not None:
        progress(stats["images"], stats["images"])
    return EmbedResult.from_stats(stats)


@step("audit")
def audit(settings: Settings, snapshot: Snapshot) -> dict[str, Any]:
    """The shortcut audit (label × site, metadata probe, site probe) over the run's split."""
    from xray_core.pipeline.guards import audit_step

    return audit_step(settings, snapshot.load())


@step("train", progress="train")
def train(
    settings: Settings,
    snapshot: Snapshot,
    flow_run_id: str | None,
    *,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the challenger head on cached features and register it as a candidate."""
    return TrainResult(
        **steps.train_step(settings, snapshot.load(), flow_run_id=flow_run_id, progress=progress)
    )


@step("evaluate-challenger")
def evaluate_challenger(
    settings: Settings, trained: TrainResult, snapshot: Snapshot, flow_run_id: str | None
) -> Evaluation:
    """Score the challenger on the run's test split (its test probabilities travel with the result)."""
    return Evaluation(
        **steps.evaluate_step(settings, trained.version, snapshot.load(), flow_run_id=flow_run_id)
    )


@step("evaluate-champion")
def evaluate_champion(
    settings: Settings, version: int, snapshot: Snapshot, flow_run_id: str | None
) -> Evaluation:
    """Score the champion on the same test split as the challenger."""
    return Evaluation(**steps.evaluate_step(settings, version, snapshot.load(), flow_run_id=flow_run_id))


@step("decide")
def decide(
    settings: Settings,
    challenger: Evaluation,
    champion: Evaluation | None,
    snapshot: Snapshot,
    audit: dict[str, Any] | None,
    reference: Evaluation | None = None,
    breaches: Sequence[BreachCheck] = (),
) -> Verdict:
    """Apply the promotion policy to the two evaluations, with the per-site guardrail, the locked reference
    (its evaluation: the champion's when it is the champion; ``breaches``: at a drifted site), the audit."""
    return Verdict.from_dict(steps.decide_step(
        settings, challenger.as_dict(), champion.as_dict() if champion else None, snapshot.load(), audit,
        reference.as_dict() if reference else None, breaches))


@step("promote")
def promote(
    settings: Settings,
    challenger: Evaluation,
    champion: Evaluation | None,
    verdict: Verdict,
    trigger: str,
    flow_run_id: str | None,
    audit: dict[str, Any] | None,
    actor: str | None = None,
    breach: list[dict[str, Any]] | None = None,
) -> Recorded:
    """Record the decision; promote only if the champion is still the one that was evaluated
    (compare-and-set: otherwise the decision is recorded ``stale``). ``actor``: the reviewer, when a
    person decided."""
    flags = None if audit is None else {k: audit.get(k) for k in ("flagged", "warnings", "policy", "sites")}
    row = steps.promote_step(
        settings,
        challenger=challenger.version,
        decision=verdict.as_dict(),
        trigger=trigger,
        champion_eval=champion.as_dict() if champion else None,
        challenger_eval=challenger.as_dict(),
        flow_run_id=flow_run_id,
        record_stale_unless_champion=champion.version if champion else None,
        audit=flags,
        actor=actor,
        breach=breach,
    )
    decision = row.get("decision", verdict.decision)
    rationale = (row.get("rationale") or verdict.rationale) if decision == "stale" else verdict.rationale
    return Recorded(decision=decision, rationale=rationale, champion_after=row["champion_after"])


@step("rescore")
def rescore(settings: Settings, snapshot: Snapshot, flow_run_id: str | None) -> list[dict[str, Any]]:
    """Score the registry's other models on this run's test set from cached features, so tables compare.

    Best effort: the decision is already recorded, so a model that cannot be re-scored is listed with
    the reason and never fails the run.
    """
    from xray_core.pipeline.rescore import rescore_models

    try:
        return rescore_models(settings, snapshot.load(), flow_run_id=flow_run_id)
    except Exception as exc:  # noqa: BLE001 - see docstring
        return [{"status": "skipped", "reason": f"re-scoring failed: {type(exc).__name__}: {exc}"}]


# --------------------------------------------------------------------------- helpers of the recipe


def arrivals(request: RetrainRequest) -> list[tuple[str, str | None]]:
    """(folder, manifest) to ingest first, in order: the sources, then the manifests (the incoming
    folder's batches come after them, batch by batch)."""
    jobs: list[tuple[str, str | None]] = [(src, None) for src in request.sources]
    return jobs + [(str(Path(m).parent), m) for m in request.manifests]


def note_incoming(result: RunResult, found: IncomingScan, taken: dict[str, IngestSummary]) -> None:
    """The run's ``incoming`` record and one note per batch taken, waiting or refused (a missing or empty
    folder is a quiet night: one note, not an error)."""
    result.incoming = run_record(found, taken)
    if found.note:
        result.notes.append(found.note)
    result.notes += [batch_line(row) for row in result.incoming["batches"]]
    if found.batches and not result.incoming["batches"]:
        result.notes.append(f"nothing new in {found.folder} ({len(found.batches)} batch folder(s), all "
                            "taken by earlier runs)")


def record(settings: Settings, request: RetrainRequest, run: Executor, result: RunResult, verdict: Verdict,
           lock: HeldLock | None) -> Recorded:
    """Record the decision (the ``promote`` step: compare-and-set), after a reviewer's answer when
    ``XRAY_REVIEW`` asks for one (:func:`ask_reviewer`); fills ``result.decision`` and
    ``champion_after``. The audit row names the reviewer as its actor."""
    assert result.challenger_eval is not None  # only called once evaluated
    result.decision = verdict  # a failure while recording still reports what was decided
    verdict = result.decision = ask_reviewer(settings, request, run, result, verdict, lock)
    recorded = run.step(promote)(settings, result.challenger_eval, result.champion_eval, verdict,
                                 request.trigger, request.flow_run_id, result.audit,
                                 actor=(verdict.review or {}).get("reviewer"),
                                 breach=[b.audit_row() for b in result.breach_checks])
    result.decision = replace(verdict, decision=recorded.decision, rationale=recorded.rationale)
    result.champion_after = recorded.champion_after
    return recorded


def ask_reviewer(settings: Settings, request: RetrainRequest, run: Executor, result: RunResult,
                 verdict: Verdict, lock: HeldLock | None) -> Verdict:
    """The verdict to record: ``verdict`` itself, or, when ``XRAY_REVIEW`` asks a person about it, the
    verdict after the reviewer's answer (:func:`xray_core.pipeline.review.reviewed`).

    The retrain lock is given up just before the executor starts waiting (a review may take days, and
    nightly retrains must go on meanwhile); an approval is therefore promoted with compare-and-set
    against the champion this run evaluated, ``stale`` if another run or a person moved it since.
    """
    assert result.challenger_eval is not None  # only called once evaluated
    ask = review_request(settings, verdict, result.challenger_eval, result.champion_eval,
                         flow_run_id=request.flow_run_id, run_name=request.run_name,
                         breaches=[b.detail for b in result.breach_checks if b.breached])
    if ask is None:
        return verdict
    answer = run.review(ask, before_waiting=lock.unlock if lock is not None else None)
    return reviewed(verdict, ask, answer)


def nothing_new(settings: Settings, data: SplitData) -> str | None:
    """Why training would only repeat the champion, the last decision not to promote, or a review still
    waiting for its answer (None: train)."""
    return (
        unchanged.nothing_new_since_champion(settings, data)
        or unchanged.nothing_new_since_last_decision(settings, data)
        or nothing_new_since_pending_review(settings, data)
    )


def catalogue_notes(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(near-duplicate pairs, label history) of the catalogue, for the report."""
    from xray_core.data.catalogue import catalogue_summary

    summary = catalogue_summary(settings)
    return summary["near_duplicates"], summary["label_history"]


def skip(settings: Settings, result: RunResult, reason: str) -> None:
    """End the run ``Skipped``: the notes so far and the reason are its message."""
    result.status, result.state = "skipped", run_state("skipped", None)
    pending = pending_phrase(result.incoming)  # batches waiting or refused lead, not "nothing new"
    result.state_message = "; ".join([*([pending] if pending else []), *result.notes, reason])
    result.champion_after = unchanged.current_champion(settings)

