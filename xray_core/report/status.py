"""What ``xray status`` reports: catalogue, images per site × label × split, label history, the latest
shortcut audit, feature cache coverage, registry and settings."""

from __future__ import annotations

from typing import Any

from db.urls import mask_url
from xray_core.data.attributes import census as attribute_census
from xray_core.data.catalogue import catalogue_summary
from xray_core.settings import Settings


def status_report(settings: Settings) -> dict[str, Any]:
    from db import session_scope
    from xray_core.data.catalogue import census, open_catalogue

    report: dict[str, Any] = {"home": str(settings.home), "database_url": mask_url(settings.database_url),
                              "storage_url": settings.public_dict()["storage_url"]}
    with session_scope(open_catalogue(settings)) as s:
        rows = census(s)  # one pass over the images for both tables (1M images: about a second)
        attributes = attribute_census(s)  # from the attribute_set index (migration 0006a)
    report["catalogue"] = catalogue_summary(settings, rows=rows)
    report["attributes"] = attributes
    report["sites"] = sites_summary(settings, rows=rows)
    report["audit"] = latest_audit(settings)
    report["feature_cache"] = _feature_cache(settings)
    report["models"] = _models(settings)
    report["interrupted"] = interrupted_runs(settings)
    report["drift_checks"] = latest_checks(settings)
    report["settings"] = settings.public_dict()
    report["settings"]["database_url"] = mask_url(settings.database_url)
    return report


def latest_checks(settings: Settings) -> list[dict[str, Any]]:
    """The newest drift checks (predict batches and monitor runs), newest first."""
    from xray_core.monitor.checks import latest_checks as newest

    return newest(settings)


def sites_summary(settings: Settings, rows: list | None = None) -> dict[str, Any]:
    """Images per site × label × split (``by_site_label_split``) and the site names: a label that comes
    from one site only is visible here before any retrain audits it."""
    from db import session_scope
    from xray_core.data.catalogue import counts_by_label_site_split, open_catalogue

    with session_scope(open_catalogue(settings)) as s:
        table = counts_by_label_site_split(s, rows)
    return {"sites": list(table), "by_site_label_split": table}


def latest_audit(settings: Settings) -> dict[str, Any] | None:
    """The shortcut audit's flags of the newest decision that ran one (a retrain's audit row), with the
    decision it belonged to; None before any retrain audited the data.

    Manual promotions and rollbacks carry no audit, so they are passed over: after ``xray promote`` of
    a blocked challenger, the flags that blocked it are still what ``xray status`` shows.
    """
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Promotion
    from xray_core.data.catalogue import open_catalogue

    with session_scope(open_catalogue(settings)) as s:
        for row in s.scalars(select(Promotion).order_by(Promotion.id.desc())):
            audit = (row.metrics or {}).get("audit")
            if audit:
                return {"promotion_id": row.id,
                        "time": row.created_at.isoformat() if row.created_at else None,
                        "decision": row.decision, "challenger": row.to_version,
                        "flagged": bool(audit.get("flagged")), "warnings": list(audit.get("warnings") or []),
                        "policy": audit.get("policy"), "sites": list(audit.get("sites") or [])}
    return None


def interrupted_runs(settings: Settings) -> dict[str, Any]:
    """Runs a killed process left behind: ingests still marked ``running`` whose process is gone
    (the next ingest marks them ``interrupted``), and, while no retrain holds the lock, candidate
    versions with no decision in the audit trail (a killed retrain, or ``xray train``, which leaves
    its candidate for a manual promotion)."""
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Model, Promotion, Source
    from xray_core.data.catalogue import open_catalogue
    from xray_core.data.sources import owner_alive

    with session_scope(open_catalogue(settings)) as s:
        ingests = [{"source_id": src.id, "path": src.path, "started_at": src.started_at.isoformat(),
                    "status": src.status}
                   for src in s.scalars(select(Source).where(Source.status.in_(("running", "interrupted")))
                                        .order_by(Source.id))
                   if src.status == "interrupted" or not owner_alive(src.counts)]
        decided = set(s.scalars(select(Promotion.to_version).where(Promotion.to_version.is_not(None))))
        candidates = s.scalars(select(Model.id).where(Model.status == "candidate").order_by(Model.id))
        undecided = [m for m in candidates if m not in decided]
    return {"ingests": ingests, "undecided_candidates": [] if _retrain_running(settings) else undecided}


def _retrain_running(settings: Settings) -> bool:
    """Whether a retrain holds XRAY_HOME/retrain.lock (tried without waiting, released at once)."""
    import fcntl

    path = settings.home / "retrain.lock"
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _feature_cache(settings: Settings) -> list[dict[str, Any]]:
    """Per backbone fingerprint: files and bytes, and coverage = catalogued images with a cache file
    there (each file holds that image's cached views), plus the model versions built on it."""
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Image, Model
    from xray_core.data.catalogue import open_catalogue
    from xray_core.io.storage import get_storage
    from xray_core.model.features import cache_summary

    storage = get_storage(settings, "features")
    rows = cache_summary(storage)
    with session_scope(open_catalogue(settings)) as s:
        # Every sha256 only when there is a cache to compare with (1M of them take seconds to read).
        shas = list(s.scalars(select(Image.sha256))) if rows else []
        models = s.execute(select(Model.id, Model.backbone_fingerprint, Model.status)).all()
    for row in rows:
        fp = row["fingerprint"]
        present = set(storage.list(fp))  # one listing per fingerprint, not one request per image
        cached = sum(1 for sha in shas if f"{fp}/{sha[:2]}/{sha}.safetensors" in present)
        row["catalogued_images"] = len(shas)
        row["catalogued_cached"] = cached
        row["coverage"] = f"{cached}/{len(shas)}"
        row["models"] = [{"version": v, "status": st} for v, fp, st in models if fp == row["fingerprint"]]
    return rows


def _models(settings: Settings) -> dict[str, Any]:
    try:
        from xray_core.registry.listing import registry_summary
    except ImportError:
        return {}
    return registry_summary(settings)
