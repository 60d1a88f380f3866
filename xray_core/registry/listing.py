"""Reading the registry: versions with their latest evaluation (on the current test set when there
is one), the audit trail, a version's lineage, and the summary ``xray status`` shows.

Writes (save, load-and-verify, decisions, promotions, rollbacks) live in :mod:`xray_core.registry.versions`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import session_scope
from db.schema import Model, Promotion
from xray_core.data.catalogue import open_catalogue
from xray_core.registry.manifests import split_manifest_images
from xray_core.registry.reference import locked_reference
from xray_core.registry.versions import champion_version, existing_model, promotion_dict
from xray_core.settings import Settings


def list_models(settings: Settings, *, current_test_set: str | None = None) -> list[dict[str, Any]]:
    """Every version with the metrics of its latest evaluation, labelled with the test set they are on.

    Numbers on different test sets do not compare, so each row carries ``n_images``,
    ``test_set_fingerprint``, ``scored_at`` and ``on_current_test_set``; an evaluation on
    ``current_test_set`` is preferred over a later one on another set. The registry cannot build the
    split (that is the pipeline's), so the caller passes the current fingerprint; without one, the
    newest test set any model was scored on stands in (the test split only grows). ``note`` says
    "n=8 on older test set a1b2c3d4, 2026-11-20" for older numbers, so they are never mistaken.
    """
    from db.schema import Evaluation

    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        models = s.scalars(select(Model).order_by(Model.id)).all()
        promoted = {}
        promotions = select(Promotion).where(Promotion.champion_after.is_not(None)).order_by(Promotion.id)
        for p in s.scalars(promotions):
            if p.champion_after == p.to_version and p.to_version is not None and p.decision != "lock":
                promoted[p.to_version] = {"time": p.created_at.isoformat(), "trigger": p.trigger,
                                          "decision": p.decision, "actor": p.actor}
        reference = locked_reference(s)[0]
        evaluations = list(s.scalars(select(Evaluation).order_by(Evaluation.id)))
        current = current_test_set or (evaluations[-1].test_set_fingerprint if evaluations else None)
        latest: dict[int, Any] = {}
        for e in evaluations:  # ascending ids: the last one wins, unless an earlier one is on the current set
            if latest.get(e.model_id) is None or latest[e.model_id].test_set_fingerprint != current \
                    or e.test_set_fingerprint == current:
                latest[e.model_id] = e
        return [{"version": m.id, "status": m.status, "created_at": m.created_at.isoformat(),
                 "backbone_fingerprint": m.backbone_fingerprint, "backbone_weights": m.backbone_weights,
                 "training_set_fingerprint": m.training_set_fingerprint, "labels": m.labels,
                 "threshold": m.threshold, **_scored(latest.get(m.id), current),
                 "pruned_at": m.pruned_at.isoformat() if m.pruned_at else None,
                 "last_promoted": promoted.get(m.id), "locked_reference": m.id == reference} for m in models]


def _scored(e: Any, current: str | None) -> dict[str, Any]:
    """The metrics of one evaluation row (or none) and where they come from."""
    if e is None:
        return {"metrics": {}, "n_images": None, "test_set_fingerprint": None, "scored_at": None,
                "on_current_test_set": False, "note": "not scored on a test set yet"}
    on_current = e.test_set_fingerprint == current
    return {"metrics": _key_metrics(e.metrics), "n_images": e.n_images,
            "test_set_fingerprint": e.test_set_fingerprint, "scored_at": e.created_at.isoformat(),
            "on_current_test_set": on_current, "note": None if on_current
            else (f"n={e.n_images} on older test set {e.test_set_fingerprint[:8]}, "
                                             f"{e.created_at.date().isoformat()}")}


def _key_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("macro_auroc", "balanced_accuracy", "accuracy")
    intervals = metrics.get("intervals", {})
    return {k: {"point": metrics.get(k), **{b: intervals.get(k, {}).get(b) for b in ("low", "high")}}
            for k in keys if k in metrics}


def history(settings: Settings) -> list[dict[str, Any]]:
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        return [promotion_dict(r) for r in s.scalars(select(Promotion).order_by(Promotion.id))]


def model_lineage(settings: Settings, version: int) -> dict[str, Any]:
    """Everything that made a version: its card, images by role (with sources), backbone, settings, and
    its latest evaluation cut by site and view (``slices``: pooled numbers can hide a collapse on one
    site; None before the first evaluation, or for evaluations made before slices existed)."""
    from db.schema import Source

    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        model = existing_model(s, version)
        rows = split_manifest_images(s, model.split_manifest)
        source_ids = sorted({r[5] for r in rows})
        sources = [{"id": src.id, "kind": src.kind, "path": src.path, "manifest": src.manifest_path,
                    "started_at": src.started_at.isoformat()}
                   for src in s.scalars(select(Source).where(Source.id.in_(source_ids)))]
        rows_eval = model_evaluations(s, version)
        evaluations = [{"test_set_fingerprint": e.test_set_fingerprint, "n_images": e.n_images,
                        "backbone_fingerprint": e.backbone_fingerprint,
                        "created_at": e.created_at.isoformat(), "metrics": _key_metrics(e.metrics),
                        "detail_pruned": (e.metrics or {}).get("detail_pruned")} for e in rows_eval]
        last = rows_eval[-1] if rows_eval else None
        slices = None
        if last is not None and (last.metrics or {}).get("slices"):
            slices = {"test_set_fingerprint": last.test_set_fingerprint, "n_images": last.n_images,
                      "scored_at": last.created_at.isoformat(), **last.metrics["slices"]}
        return {"version": model.id, "status": model.status, "created_at": model.created_at.isoformat(),
                "checkpoint_dir": model.checkpoint_dir, "checkpoint_sha256": model.checkpoint_sha256,
                "backbone_fingerprint": model.backbone_fingerprint,
                "backbone_weights": model.backbone_weights,
                "training_set_fingerprint": model.training_set_fingerprint, "labels": model.labels,
                "threshold": model.threshold, "settings": model.config, "metrics": model.metrics,
                "flow_run_id": model.flow_run_id, "sources": sources,
                "pruned_at": model.pruned_at.isoformat() if model.pruned_at else None,
                "evaluations": evaluations, "slices": slices,
                "images": {role: [{"id": r[1], "sha256": r[2], "label": r[3], "patient_id": r[4]}
                                  for r in rows if r[0] == role] for role in ("train", "val")}}


def model_evaluations(s: Session, version: int) -> list:
    from db.schema import Evaluation

    return list(s.scalars(select(Evaluation).where(Evaluation.model_id == version).order_by(Evaluation.id)))


def registry_summary(settings: Settings) -> dict[str, Any]:
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        champion = champion_version(s)
        versions = s.scalar(select(Model.id).order_by(Model.id.desc()).limit(1)) or 0
    return {"champion": champion, "versions": versions}
