"""Prefect events the system emits, in one place: names, resource ids and the key numbers.

Events are emitted here in ``flows/``, never in ``xray_core`` (which does not import Prefect).
Resource ids: ``xray.model.v<N>`` for a model, ``xray.site.<name>`` for a site, ``xray.catalogue``
for the catalogue as a whole. Automations and deployment triggers (``prefect.yaml``) match on them.

``xray.drift.detected`` and ``xray.batch.ingested`` also carry the resource label ``xray.source``: the
flow whose check or ingest sent it (``ingest``, ``monitor`` or ``retrain``). The ``retrain/on-drift``
trigger matches ``ingest`` and ``monitor`` only: a retrain that finds drift in the films it has just
trained on must not queue another retrain (which would check nothing new, end Skipped, and could
loop if it ever found drift again). Automations that should hear of every drift match the event
name and resource without the label.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.events import emit_event as _prefect_emit_event

from xray_core.io.fsutil import json_safe
from xray_core.pipeline.review import ReviewRequest
from xray_core.results import NOT_REACHED, RunResult


def emit_event(event: str, **kwargs: Any) -> None:
    """Prefect's ``emit_event`` with every string made valid UTF-8 (a site or report path named by a
    folder whose name is not UTF-8 would otherwise send a lone surrogate to the server)."""
    _prefect_emit_event(event, **json_safe(kwargs))


# A retrain's final state -> the event it emits.
RETRAIN_EVENTS = {"Promoted": "xray.model.promoted", "Kept": "xray.model.kept",
                  "Skipped": "xray.retrain.skipped",
                  "Insufficient evidence": "xray.retrain.insufficient_evidence",
                  "Blocked": "xray.retrain.blocked"}
# Events about the challenger (on its model resource; a Blocked one waits for a reviewer: `xray promote N`);
# the others are on the champion the run left.
ON_CHALLENGER = ("xray.model.promoted", "xray.model.kept", "xray.retrain.blocked")
# The flows whose drift checks and ingests the retrain/on-drift trigger reacts to (label xray.source).
Source = Literal["ingest", "monitor", "retrain"]


def model_resource(version: Any) -> dict[str, str]:
    return {"prefect.resource.id": f"xray.model.v{version}" if version is not None else "xray.catalogue",
            "prefect.resource.name": f"model v{version}" if version is not None else "catalogue"}


def emit_retrain_outcome(run: RunResult) -> str | None:
    """One event for a finished retrain (none for Failed); returns its name."""
    name = RETRAIN_EVENTS.get(run.state or "")
    if name is None:
        return None
    challenger = run.challenger_eval
    after = None if run.champion_after is NOT_REACHED else run.champion_after
    payload = {"state": run.state, "message": run.state_message[:500],
               "challenger": run.version, "champion_after": after,
               "macro_auroc": challenger.metrics.get("macro_auroc") if challenger else None,
               "n_test": challenger.n_images if challenger else None, "trigger": run.trigger}
    version = run.version if name in ON_CHALLENGER else after
    emit_event(name, resource=model_resource(version), payload=payload)
    return name


def emit_ingested(summary: dict[str, Any], site: str | None) -> bool:
    """``xray.batch.ingested`` for an ingest that added films, on the site's resource; an ingest that
    added none (all duplicates, all quarantined, an empty folder) sends nothing, so it queues no
    retrain. Returns whether it sent one."""
    if not summary.get("added"):
        return False
    where = site or "unknown"
    keys = ("source_id", "files", "added", "duplicates", "rejected", "new_patients", "added_by_label")
    emit_event("xray.batch.ingested",
               resource={"prefect.resource.id": f"xray.site.{where}",
                         "prefect.resource.name": f"site {where}", "xray.source": "ingest"},
               payload={"site": where, "source": "ingest", **{k: summary[k] for k in keys if k in summary}})
    return True


def emit_drift(result: dict[str, Any], source: Source = "monitor") -> int:
    """``xray.drift.detected`` once per drifted site (or for the whole batch); returns how many.

    ``result``: a drift check (``checks``, the champion ``model`` it was checked against, the
    ``report`` path); ``source``: the flow that ran it, the resource's ``xray.source`` label."""
    drifted = [c for c in result.get("checks", []) if c.get("drift")]
    sent = 0
    for check in drifted:
        subject = check["subject"]
        resource = ({"prefect.resource.id": f"xray.site.{subject.removeprefix('site ')}"}
                    if subject.startswith("site ") else model_resource(result.get("model")))
        emit_event("xray.drift.detected", resource={**resource, "xray.source": source},
                   related=[{**model_resource(result.get("model")), "prefect.resource.role": "champion"}],
                   payload={k: check.get(k)
                            for k in ("n", "ood_flagged", "mmd_p", "ks_p", "prevalence", "verdict")}
                   | {"subject": subject, "report": result.get("report"), "source": source})
        sent += 1
    return sent


def emit_retrain_drift(run: RunResult) -> int:
    """``xray.drift.detected`` for each drift the retrain's own check flagged (``RunResult.drift``, by
    ``recipe.check_arrivals``): the monitor's resource and payload, ``xray.source`` ``retrain`` (which
    the ``retrain/on-drift`` trigger does not match). Returns how many were sent."""
    if not run.drift or not run.drift.get("flagged"):
        return 0
    # The champion the new films were checked against: the one this run evaluated, else (no
    # evaluation: a skip) the one it left, which is the same.
    champion: int | None = None
    if run.champion_eval is not None:
        champion = run.champion_eval.version
    elif run.champion_after is not NOT_REACHED and run.state != "Promoted":
        champion = run.champion_after
    check = {"model": champion, "report": run.drift.get("report"), "checks": run.drift.get("checks") or []}
    return emit_drift(check, source="retrain")


def emit_review_requested(ask: ReviewRequest, ui_url: str | None) -> None:
    """``xray.review.requested`` when a run starts waiting for its reviewer, on the challenger's resource
    (the champion related), with what an automation needs to notify someone: the run, its form's link,
    the deadline and the decision without review."""
    champion = [{**model_resource(ask.champion), "prefect.resource.role": "champion"}]
    related = champion if ask.champion is not None else []
    emit_event("xray.review.requested", resource=model_resource(ask.version), related=related,
               payload={"challenger": ask.version, "champion": ask.champion, "decision": ask.decision,
                        "mode": ask.mode, "flow_run_id": ask.flow_run_id, "run_name": ask.run_name,
                        "url": ui_url, "deadline": ask.deadline.isoformat(),
                        "rationale": ask.rationale[:500]})


def emit_audit_degraded(result: dict[str, Any]) -> bool:
    """``xray.audit.degraded`` when an audit of the sequestered test set found the champion below the
    locked reference by more than XRAY_REFERENCE_MARGIN (:mod:`xray_core.pipeline.sequester`), on the
    champion's resource with the reference related. Returns whether it sent one."""
    if result.get("status") != "degraded":
        return False
    comparison = result.get("comparison") or {}
    emit_event("xray.audit.degraded", resource=model_resource(result.get("champion")),
               related=[{**model_resource(result.get("reference")), "prefect.resource.role": "reference"}],
               payload={"audit": result.get("id"), "champion": result.get("champion"),
                        "reference": result.get("reference"), "n_images": result.get("n_images"),
                        "metric": result.get("metric"), "margin": result.get("margin"),
                        **{k: comparison.get(k) for k in ("difference", "low", "high")},
                        "verdict": str(result.get("verdict"))[:500]})
    return True


def emit_reference_breach(run: RunResult) -> int:
    """``xray.reference.breach`` for each drifted site where the retrain measured the champion below the
    locked reference by more than XRAY_REFERENCE_MARGIN, or its detection there fallen (``kind``)
    (``RunResult.breach_checks``, :mod:`xray_core.pipeline.breach`), on the champion's resource with the
    reference related, as ``xray.audit.degraded``. Returns how many were sent."""
    sent, after = 0, None if run.champion_after is NOT_REACHED else run.champion_after
    for check in (c for c in run.breach_checks if c.breached):
        emit_event("xray.reference.breach", resource=model_resource(check.champion),
                   related=[{**model_resource(check.reference), "prefect.resource.role": "reference"}],
                   payload={"site": check.site, "champion": check.champion, "reference": check.reference,
                            "films": check.films, "metric": check.metric, "margin": check.margin,
                            "difference": check.difference, "low": check.low, "high": check.high,
                            "mode": check.mode, "action": check.action, "challenger": run.version,
                            "kind": check.kind, "detection": check.detection,
                            "champion_after": after,
                            "detail": check.detail[:500]})
        sent += 1
    return sent
