"""The sequestered test set's audit (issue 26): the champion against the locked reference on patients that
no routine decision has ever seen.

Every retrain decides on the routine test split, so after many decisions the champion may fit that split
(adaptive overfitting), and a chain of "not worse than the last" decisions may drift below the first
validated model (bio-creep). ``XRAY_SEQUESTER_FRACTION`` of the new patients go to the ``sequestered``
split instead (:mod:`xray_core.data.split`), which the snapshot, the skip checks, re-scoring and the
monitor reference never read (they read train, val and test by name). ``xray audit`` and the
``audit/monthly`` deployment score both models here, on the identical sequestered films, and record a
``sequester_audits`` row. The paired, patient-clustered difference (champion minus reference, in
``XRAY_PROMOTION_METRIC``) is judged as the locked-reference check of every challenger
(:func:`~xray_core.evaluate.promotion.reference_check`): ok when its lower bound is above
``-XRAY_REFERENCE_MARGIN``. Otherwise the champion is **degraded** when the difference itself is below
``-XRAY_REFERENCE_MARGIN`` (a measured drop), and the audit is inconclusive when only the interval
reaches there (too few sequestered films to rule a drop out).

No ``evaluations`` row is written: the registry's listing and re-scoring read those, and sequestered
numbers must not reach a routine view. Nothing is audited (status ``skipped``, no row) before the first
champion or while no sequestered film has a label the champion knows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from db import session_scope
from db.schema import SEQUESTERED, SequesterAudit
from xray_core.data.catalogue import Row, open_catalogue, split_image_rows
from xray_core.data.snapshot import label_indices, set_fingerprint
from xray_core.results import Evaluation
from xray_core.settings import Settings

ROLE = "sequestered"  # the fingerprint's role: never equal to a routine test set's


def sequestered_rows(settings: Settings) -> list[Row]:
    """The films of the sequestered patients, by id."""
    with session_scope(open_catalogue(settings)) as s:
        return split_image_rows(s, SEQUESTERED)


def score(settings: Settings, version: int, rows: list[Row]) -> Evaluation:
    """``version`` scored on ``rows`` (those of its labels), as an Evaluation; stores nothing."""
    from xray_core.evaluate.metrics import compute_metrics
    from xray_core.pipeline.steps import model_test_probs

    probs, model = model_test_probs(settings, version, rows)
    keep = [r.label in model.labels for r in rows]
    kept = [r for r, k in zip(rows, keep) if k]
    probs = probs[np.array(keep, dtype=bool)]
    metrics = compute_metrics(label_indices(kept, model.labels), probs, model.labels,
                              threshold=model.threshold, negative_label=settings.negative_label,
                              target_specificity=settings.target_specificity)
    return Evaluation(version=version, test_set_fingerprint=set_fingerprint(kept, role=ROLE),
                      n_images=len(kept), metrics=metrics, labels=list(model.labels),
                      probabilities=np.round(probs.astype(np.float64), 8).tolist(),
                      shas=[r.sha256 for r in kept], sites=[], views=[])


def paired(settings: Settings, first: Evaluation, second: Evaluation, rows: list[Row]) -> dict[str, Any]:
    """``first`` minus ``second`` in ``XRAY_PROMOTION_METRIC`` on the same ``rows`` (those of their labels,
    which are the same), with the paired, patient-clustered bootstrap interval of every decision."""
    from xray_core.evaluate.intervals import paired_bootstrap_difference

    kept = [r for r in rows if r.label in first.labels]
    return paired_bootstrap_difference(
        label_indices(kept, first.labels), np.asarray(first.probabilities, dtype=np.float64),
        np.asarray(second.probabilities, dtype=np.float64), first.labels,
        np.array([r.patient_id for r in kept]), metric=settings.promotion_metric,
        thresholds=(first.metrics.get("threshold"), second.metrics.get("threshold")),
        negative_label=settings.negative_label, n_samples=settings.bootstrap_samples,
        seed=settings.bootstrap_seed, target_specificity=settings.target_specificity,
        memory_mb=settings.memory_mb)


def judge(settings: Settings, champion: Evaluation, reference: Evaluation, rows: list[Row]) -> dict[str, Any]:
    """Compare two evaluations of the same sequestered ``rows``: ``status`` ok | degraded | inconclusive,
    ``degraded`` (None when inconclusive), the paired ``comparison`` and the ``check`` with its words.

    ok: non-inferior (the lower bound above -margin); degraded: the champion's point difference is below
    -margin; inconclusive: no comparison, or the interval too wide to tell."""
    from xray_core.evaluate.promotion import reference_check

    metric, margin = settings.promotion_metric, settings.reference_margin
    why_not, comparison = None, None
    if champion.labels != reference.labels:
        why_not = f"the champion's labels {champion.labels} differ from the reference's {reference.labels}"
    elif champion.shas != reference.shas:
        why_not = "the two models were scored on different films"
    else:
        comparison = paired(settings, champion, reference, rows)
    check = reference_check(comparison, reference.version, margin, metric, settings.target_specificity,
                            why_not)
    defined = why_not is None and comparison is not None and comparison.get("low") is not None
    detail = check["detail"].replace("challenger", f"champion v{champion.version}", 1)
    # Degraded means the champion measured below the reference by more than the margin. A lower bound
    # below -margin with the point estimate inside it only says the sequestered films are too few to
    # rule a drop out: inconclusive, said in words, no alarm (bench/year.py: on ~25 sequestered patients
    # the non-inferiority reading raised the alarm for a champion better than the reference at every site).
    degraded: bool | None = None
    if defined and comparison is not None:
        degraded = bool(comparison["difference"] < -margin) and not check["passed"]
        if not degraded and not check["passed"]:
            degraded = None
            detail += (f"; the point difference {comparison['difference']:+.3f} is within the margin: "
                       "too few sequestered films to rule a larger drop out, not a measured drop")
    status = "inconclusive" if degraded is None else ("degraded" if degraded else "ok")
    return {"status": status, "degraded": degraded, "metric": metric, "margin": margin,
            "comparison": comparison, "check": {**check, "detail": detail}}


def run_audit(settings: Settings, *, trigger: str = "cli", flow_run_id: str | None = None) -> dict[str, Any]:
    """Score the champion and the locked reference on the sequestered films, record the audit row and
    return what it says (``status``: ok | degraded | inconclusive | skipped, ``verdict``, ``id``)."""
    from xray_core.registry.reference import locked_reference
    from xray_core.registry.versions import champion_version

    with session_scope(open_catalogue(settings)) as s:
        champion, reference = champion_version(s), locked_reference(s)[0]
    rows = sequestered_rows(settings)
    base = {"champion": champion, "reference": reference, "sequestered_images": len(rows),
            "sequestered_patients": len({r.patient_id for r in rows}),
            "fraction": settings.sequester_fraction}
    if champion is None:
        return {**base, "status": "skipped", "degraded": False, "id": None,
                "verdict": "there is no champion yet"}
    if not rows:
        hint = ("XRAY_SEQUESTER_FRACTION is 0 (off)" if settings.sequester_fraction <= 0 else
                f"new patients are set aside at XRAY_SEQUESTER_FRACTION={settings.sequester_fraction}, "
                "per site and label, as they are ingested")
        return {**base, "status": "skipped", "degraded": False, "id": None,
                "verdict": f"no patient is sequestered yet ({hint})"}
    ours = score(settings, champion, rows)
    if ours.n_images == 0:
        return {**base, "status": "skipped", "degraded": False, "id": None,
                "verdict": f"no sequestered film has a label of v{champion}"}
    if reference is None or reference == champion:
        judged: dict[str, Any] = {"status": "ok", "degraded": False, "comparison": None, "check": None}
        verdict = f"champion v{champion} is the locked reference: scored alone, nothing to compare"
        theirs = None
    else:
        theirs = score(settings, reference, rows)
        judged = judge(settings, ours, theirs, rows)
        verdict = judged["check"]["detail"]
    result = {**base, **judged, "verdict": verdict, "test_set_fingerprint": ours.test_set_fingerprint,
              "n_images": ours.n_images, "champion_metrics": _key(ours),
              "reference_metrics": _key(theirs) if theirs is not None else None}
    with session_scope(open_catalogue(settings)) as s:
        row = SequesterAudit(champion=champion, reference=reference,
                             test_set_fingerprint=ours.test_set_fingerprint, n_images=ours.n_images,
                             degraded=bool(judged["degraded"]), verdict=verdict,
                             result=_jsonable(result), trigger=trigger, flow_run_id=flow_run_id)
        s.add(row)
        s.flush()
        result["id"] = row.id
    return result


def audit_markdown(result: dict[str, Any]) -> str:
    """The audit's markdown (the ``sequester-audit`` artifact): its status, verdict and both models."""
    rows = [f"| v{m['version']} | {role} | {_f(m.get('macro_auroc'))} | {_f(m.get('balanced_accuracy'))} |"
            for role in ("champion", "reference") if (m := result.get(f"{role}_metrics"))]
    table = ["| version | role | macro AUROC | balanced accuracy |", "|---|---|---|---|", *rows]
    return "\n".join([f"### Sequestered audit: {result['status']}", "", str(result["verdict"]), "",
                      f"{result['sequestered_images']} sequestered film(s) of "
                      f"{result['sequestered_patients']} patient(s).", "", *(table if rows else [])])


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _key(e: Evaluation) -> dict[str, Any]:
    keys = ("accuracy", "balanced_accuracy", "macro_auroc")
    return {"version": e.version, **{k: e.metrics.get(k) for k in keys}}


def _jsonable(value: Any) -> Any:
    import json

    from xray_core.io.fsutil import json_text

    return json.loads(json_text(value, default=str))


__all__ = ["audit_markdown", "judge", "paired", "run_audit", "score", "sequestered_rows"]
