"""Drift checks in the catalogue: record one (``drift_checks`` table), list the latest, and find what
arrived since the last check (``xray monitor``: :mod:`xray_core.pipeline.monitor`).

A check is evidence that the inputs changed, not proof that performance fell; it never changes the
champion.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select

from db import session_scope
from db.schema import DriftCheck, Image, Source
from xray_core.data.catalogue import open_catalogue
from xray_core.io.fsutil import json_text, utf8_safe
from xray_core.settings import Settings

KINDS = ("ingest", "predict", "monitor", "retrain")  # retrain: its check of new arrivals before training


def record_check(settings: Settings, *, model_id: int | None, kind: str, subject: str, check: dict[str, Any],
                 flow_run_id: str | None = None) -> int:
    """Store one check (its whole result as JSON); return its id."""
    if kind not in KINDS:
        raise ValueError(f"drift check kind {kind!r}; allowed: {', '.join(KINDS)}")
    result = json.loads(json_text(check, default=_plain))  # a batch's path may hold undecodable bytes
    with session_scope(open_catalogue(settings)) as s:
        row = DriftCheck(model_id=model_id, kind=kind, subject=utf8_safe(subject)[:1000],
                         n_images=int(check["n"]), ood_flagged=int(check["ood_flagged"]),
                         drift=bool(check["drift"]), verdict=str(check["verdict"]), result=result,
                         flow_run_id=flow_run_id)
        s.add(row)
        s.flush()
        return int(row.id)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def latest_checks(settings: Settings, limit: int = 5) -> list[dict[str, Any]]:
    """The newest checks, newest first, as small dicts (what ``xray status`` shows)."""
    with session_scope(open_catalogue(settings)) as s:
        rows = s.scalars(select(DriftCheck).order_by(DriftCheck.id.desc()).limit(limit)).all()
        return [{"id": r.id, "created_at": r.created_at.isoformat(), "model": r.model_id, "kind": r.kind,
                 "subject": r.subject, "n": r.n_images, "ood_flagged": r.ood_flagged, "drift": r.drift,
                 "verdict": r.verdict} for r in rows]


def last_check_time(settings: Settings,
                    kinds: tuple[str, ...] = ("monitor", "ingest", "retrain")) -> datetime | None:
    """When catalogued films were last checked (by ``xray monitor`` or after an ingest), or None."""
    with session_scope(open_catalogue(settings)) as s:
        when = s.scalar(select(DriftCheck.created_at).where(DriftCheck.kind.in_(kinds))
                        .order_by(DriftCheck.id.desc()).limit(1))
    return when  # aware UTC on every backend (db.schema.UtcDateTime)


def images_since(settings: Settings, since: datetime | None) -> list[tuple[int, str, str, str, str, str]]:
    """(id, sha256, stored path, label, patient id, site) of every catalogued image added after ``since``
    (all when None), oldest first: the pipeline's row shape plus the site. The site is the image's own,
    else its ingest's default (:func:`xray_core.data.sites.source_site`), the rule the model's reference
    records its validation films' sites by (``xray_core.data.facts.image_facts``)."""
    from xray_core.data.sites import source_site

    query = (select(Image.id, Image.sha256, Image.stored_path, Image.label, Image.patient_id, Image.site,
                    Source.path).outerjoin(Source, Source.id == Image.source_id))
    if since is not None:
        query = query.where(Image.added_at > since)
    with session_scope(open_catalogue(settings)) as s:
        return [(r[0], r[1], r[2], r[3], r[4], r[5] or source_site(r[6]))
                for r in s.execute(query.order_by(Image.id)).all()]


def estimates_since(settings: Settings, since: datetime | None, limit: int = 20) -> list[dict[str, Any]]:
    """Earlier checks (predict, monitor, ingest) after ``since`` whose films are now labelled in the
    catalogue: each one's performance estimate beside the realised value on those films (newest
    ``limit`` checks; a check without stored films, or with fewer than 5 labelled, is left out)."""
    from xray_core.monitor.performance import realise_record

    query = select(DriftCheck).where(DriftCheck.kind.in_(("predict", "monitor", "ingest")))
    if since is not None:
        query = query.where(DriftCheck.created_at > since)
    out: list[dict[str, Any]] = []
    with session_scope(open_catalogue(settings)) as s:
        for row in s.scalars(query.order_by(DriftCheck.id.desc()).limit(limit)).all():
            record = (row.result or {}).get("films")
            performance = (row.result or {}).get("performance")
            if not record or not performance:
                continue
            shas = list(record.get("sha256") or [])
            label_of: dict[str, str] = {}
            for start in range(0, len(shas), 500):  # an IN list per 500: SQLite's variable limit
                label_of.update(s.execute(select(Image.sha256, Image.label)
                                          .where(Image.sha256.in_(shas[start:start + 500]))).tuples().all())
            realised = realise_record(record, bool(performance.get("reliable", True)), label_of)
            if realised is not None:
                out.append({"id": row.id, "kind": row.kind, "subject": row.subject, "model": row.model_id,
                            "created_at": row.created_at.isoformat(), **realised})
    return out[::-1]


def predict_checks_since(settings: Settings, since: datetime | None) -> list[dict[str, Any]]:
    """The predict batches checked after ``since``: their features are not kept, their verdicts are."""
    query = select(DriftCheck).where(DriftCheck.kind == "predict").order_by(DriftCheck.id)
    if since is not None:
        query = query.where(DriftCheck.created_at > since)
    with session_scope(open_catalogue(settings)) as s:
        return [{"id": r.id, "subject": r.subject, "n": r.n_images, "ood_flagged": r.ood_flagged,
                 "drift": r.drift, "verdict": r.verdict} for r in s.scalars(query).all()]
