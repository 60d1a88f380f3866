"""Prefect events the system emits, in one place: names, resource ids and the key numbers.

Events are emitted here in ``flows/``, never in ``xray_core`` (which does not import Prefect).
Resource ids: ``xray.model.v<N>`` for a model, ``xray.site.<name>`` for a site, ``xray.catalogue``
for the catalogue as a whole. Automations and deployment triggers (``prefect.yaml``) match on them.
"""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event as _prefect_emit_event

from xray_core.io.fsutil import json_safe
from xray_core.pipeline.review import ReviewRequest


def emit_event(event: str, **kwargs: Any) -> None:
    """Prefect's ``emit_event`` with every string made valid UTF-8 (a site or report path named by a
    folder whose name is not UTF-8 would otherwise send a lone surrogate to the server)."""
    _prefect_emit_event(event, **json_safe(kwargs))


# A retrain's final state -> the event it emits.
RETRAIN_EVENTS = {"Promoted": "xray.model.promoted", "Kept": "xray.model.kept", "Skipped": "xray.retrain.skipped",
                  "Insufficient evidence": "xray.retrain.insufficient_evidence"}


def model_resource(version: Any) -> dict[str, str]:
    return {"prefect.resource.id": f"xray.model.v{version}" if version is not None else "xray.catalogue",
            "prefect.resource.name": f"model v{version}" if version is not None else "catalogue"}


def emit_retrain_outcome(result: dict[str, Any]) -> str | None:
    """One event for a finished retrain (none for Blocked or Failed); returns its name."""
    name = RETRAIN_EVENTS.get(result.get("state", ""))
    if name is None:
        return None
    challenger = result.get("challenger_eval") or {}
    metrics = challenger.get("metrics") or {}
    payload = {"state": result["state"], "message": str(result.get("state_message", ""))[:500],
               "challenger": result.get("version"), "champion_after": result.get("champion_after"),
               "macro_auroc": metrics.get("macro_auroc"), "n_test": challenger.get("n_images"),
               "trigger": result.get("trigger")}
    version = result.get("version") if name.startswith("xray.model.") else result.get("champion_after")
    emit_event(name, resource=model_resource(version), payload=payload)
    return name


def emit_ingested(summary: dict[str, Any], site: str | None) -> None:
    """``xray.batch.ingested`` for a finished ingest, on the site's resource."""
    where = site or "unknown"
    keys = ("source_id", "files", "added", "duplicates", "rejected", "new_patients", "added_by_label")
    emit_event("xray.batch.ingested", resource={"prefect.resource.id": f"xray.site.{where}",
                                                "prefect.resource.name": f"site {where}"},
               payload={"site": where, **{k: summary[k] for k in keys if k in summary}})


def emit_drift(result: dict[str, Any]) -> int:
    """``xray.drift.detected`` once per drifted site (or for the whole batch); returns how many."""
    drifted = [c for c in result.get("checks", []) if c.get("drift")]
    sent = 0
    for check in drifted:
        subject = check["subject"]
        resource = ({"prefect.resource.id": f"xray.site.{subject.removeprefix('site ')}"} if subject.startswith("site ")
                    else model_resource(result.get("model")))
        emit_event("xray.drift.detected", resource=resource,
                   related=[{**model_resource(result.get("model")), "prefect.resource.role": "champion"}],
                   payload={k: check.get(k) for k in ("n", "ood_flagged", "mmd_p", "ks_p", "prevalence", "verdict")}
                   | {"subject": subject, "report": result.get("report")})
        sent += 1
    return sent


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
