"""Re-score registered models on the current test split, so the registry's numbers compare.

A model's first evaluation is on the test split of its day; the split only grows, so without this
``xray models`` would show v1 at 1.000 on 8 images next to v2 at 0.806 on 17. Re-scoring is cheap
because it reads cached features only: it never embeds. A model that would need embedding (another
backbone, or test images whose features are not cached) is skipped with the reason, and the registry
keeps showing its older numbers labelled with their test-set size and date.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from db import session_scope
from db.schema import Evaluation, Model
from xray_core.data.catalogue import open_catalogue
from xray_core.data.snapshot import SplitData, fingerprint_test_set, load_split_data
from xray_core.errors import CheckpointError, NotEnoughDataError, XrayError
from xray_core.pipeline.evaluation_retention import is_slimmed
from xray_core.pipeline.steps import evaluate_step
from xray_core.settings import Settings

# At most this many models are re-scored by default: the champion, then the other non-rejected
# versions and then the rejected ones, newest first. Each costs a head forward pass and a bootstrap
# (about a second on two CPU cores), so a long history does not make ``xray models`` slow.
MAX_RESCORED = 20


def default_versions(settings: Settings, limit: int = MAX_RESCORED) -> list[int]:
    """The versions worth re-scoring, oldest first: champion, other non-rejected, then rejected (newest
    first). Pruned versions (``xray gc``) have no files left to score."""
    with session_scope(open_catalogue(settings)) as s:
        rows = s.execute(select(Model.id, Model.status).where(Model.pruned_at.is_(None))  # files deleted
                         .order_by(Model.id.desc())).all()
    rank = {"champion": 0, "rejected": 2}
    ordered = sorted(rows, key=lambda r: rank.get(r[1], 1))  # stable: newest first within a rank
    return sorted(v for v, _ in ordered[:limit])


def rescore_models(settings: Settings, data: SplitData, *, versions: list[int] | None = None,
                   flow_run_id: str | None = None) -> list[dict[str, Any]]:
    """Score ``versions`` (default :func:`default_versions`) on ``data.test`` from cached features.

    One dict per version: ``status`` is ``reused`` (an evaluation on this exact test set already
    exists, whole: not slimmed by ``xray gc``; it is returned, not recomputed), ``scored``
    (:func:`evaluate_step` ran and stored a new evaluation row) or ``skipped`` with ``reason``.
    ``evaluation`` is evaluate_step's result shape (version, test_set_fingerprint, n_images, metrics) for
    reused and scored models, else None.
    """
    if not data.test:
        raise NotEnoughDataError("the test split is empty: ingest more patients before re-scoring")
    fingerprint = fingerprint_test_set(data.test)
    wanted = default_versions(settings) if versions is None else sorted(set(versions))
    with session_scope(open_catalogue(settings)) as s:
        query = select(Model.id, Model.backbone_fingerprint).where(Model.id.in_(wanted))
        backbones = dict(s.execute(query).tuples().all())
        existing = {e.model_id: {"version": e.model_id, "test_set_fingerprint": e.test_set_fingerprint,
                                 "n_images": e.n_images, "metrics": e.metrics}
                    for e in s.scalars(select(Evaluation)
                                       .where(Evaluation.model_id.in_(wanted),
                                              Evaluation.test_set_fingerprint == fingerprint)
                                       .order_by(Evaluation.id))
                    if not is_slimmed(e.metrics)}  # its slices dropped by xray gc: scored again
    out: list[dict[str, Any]] = []
    # cache coverage per current backbone fingerprint, loaded when needed
    seen: dict[str, dict[str, Any]] = {}
    for version in wanted:
        if version not in backbones:
            out.append(_skipped(version, f"model version {version} does not exist"))
        elif version in existing:
            out.append({"version": version, "status": "reused", "reason": None,
                        "evaluation": existing[version]})
        else:
            current = _current_backbone(settings, data, backbones[version], seen)
            reason = _why_not(backbones[version], current)
            if reason is None:
                try:
                    evaluation = evaluate_step(settings, version, data, flow_run_id=flow_run_id)
                except CheckpointError as exc:  # files missing or altered: say so, keep going
                    reason = str(exc)
                else:
                    out.append({"version": version, "status": "scored", "reason": None,
                                "evaluation": evaluation})
                    continue
            out.append(_skipped(version, reason))
    return out


def _current_backbone(settings: Settings, data: SplitData, model_fingerprint: str,
                      seen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The current backbone's fingerprint and how many test images lack a cached view-0 feature.

    With ``XRAY_EMBED_PRECISION=auto`` the current weights and preprocessing at any precision count
    as current (a model is scored with the precision it was trained with, see
    ``model_settings.settings_for_fingerprint``): the model's own when it is one of them, else the resolved
    one.
    """
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache
    from xray_core.pipeline.model_settings import settings_for_fingerprint

    own = settings_for_fingerprint(settings, model_fingerprint) or settings
    backbone = load_backbone(own)
    if backbone.fingerprint not in seen:
        coverage = FeatureCache(backbone, own).coverage([r.sha256 for r in data.test], [0])
        seen[backbone.fingerprint] = {"fingerprint": backbone.fingerprint,
                                      "missing": coverage["pairs_needed"], "images": coverage["images"]}
    return seen[backbone.fingerprint]


def _why_not(model_backbone: str, current: dict[str, Any]) -> str | None:
    """Why a model cannot be scored from the cache alone, or None when it can."""
    if model_backbone != current["fingerprint"]:
        return (f"trained on backbone {model_backbone[:12]}, not the current {current['fingerprint'][:12]}; "
                "its test features are not cached (re-scoring does not embed)")
    if current["missing"]:
        return (f"{current['missing']} of {current['images']} test images have no cached features "
                "(re-scoring does not embed; the next retrain embeds them)")
    return None


def _skipped(version: int, reason: str) -> dict[str, Any]:
    return {"version": version, "status": "skipped", "reason": reason, "evaluation": None}


def models_on_current_test_set(settings: Settings) -> dict[str, Any]:
    """``xray models``: re-score what the cache allows, then list every model against the current test set.

    Returns ``{"models": rows, "notes": [...]}``; each row is :func:`list_models`'s with ``rescore``
    (status and reason) added. Without a usable test split nothing is re-scored and a note says why.
    """
    from xray_core.registry.listing import list_models

    try:
        data = load_split_data(settings)
        if not data.test:
            raise NotEnoughDataError("the test split is empty (ingest more patients)")
    except NotEnoughDataError as exc:
        note = f"not re-scored on a current test set: {exc}"
        return {"models": [{**m, "rescore": {"status": "skipped", "reason": note}}
                           for m in list_models(settings)],
                "notes": [note]}
    notes = []
    try:
        done = {r["version"]: r for r in rescore_models(settings, data)}
    except XrayError as exc:  # e.g. the backbone cannot be loaded: list what is stored, say why
        done = {}
        notes.append(f"not re-scored: {exc}")
    rows = list_models(settings, current_test_set=fingerprint_test_set(data.test))
    for row in rows:
        r = done.get(row["version"])
        row["rescore"] = ({"status": r["status"], "reason": r["reason"]} if r else
                          {"status": "not_rescored", "reason": notes[0] if notes else
                           f"not among the {MAX_RESCORED} versions re-scored by default"})
    why: dict[str, list[str]] = {}  # one note per reason, naming every version it applies to
    for r in done.values():
        if r["reason"]:
            why.setdefault(r["reason"], []).append(f"v{r['version']}")
    notes += [f"{', '.join(vs)} not re-scored: {reason}" for reason, vs in why.items()]
    return {"models": rows, "notes": notes}


HEADLINE = ("n", "labels", "threshold", "accuracy", "balanced_accuracy", "macro_auroc")


def for_result(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a run's result.json keeps of the re-scored registry: each model's status and headline
    numbers on this test set. The full evaluations (per-class metrics, intervals, per-site and per-view
    slices) are rows of the catalogue's ``evaluations`` table (``xray gc`` slims superseded ones);
    result.json is kept forever (``xray gc``), and with them it grew by ~110 KB a night at 9 models and 44
    test films (bench/year.py)."""
    out = []
    for e in entries:
        ev = e.get("evaluation")
        headline = None if ev is None else {
            "version": ev.get("version"), "test_set_fingerprint": ev.get("test_set_fingerprint"),
            "n_images": ev.get("n_images"),
            "metrics": {k: (ev.get("metrics") or {}).get(k) for k in HEADLINE}}
        out.append({**e, "evaluation": headline} if "evaluation" in e else dict(e))
    return out

