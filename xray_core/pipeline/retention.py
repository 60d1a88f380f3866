"""Retention (``xray gc``, the ``maintenance/weekly`` flow): what a home keeps, and deleting the rest.

Kept, always (:func:`models_to_keep`; a rollback or an audit may need any of them):

- the champion, and every model ever promoted (each is a rollback target, and its numbers back an
  audit row);
- every candidate with no decision yet: a run still training it, or waiting for its reviewer;
- the locked reference (:func:`locked_references`: the hook where ``xray lock`` names it; the first
  champion, the default reference, is kept anyway as a promoted model);
- the newest ``XRAY_KEEP_REJECTED`` models never promoted (rejected, blocked, stale).

The other models' ``models/<version>/`` files go; their catalogue rows, lineage (split manifest),
evaluations and audit rows stay, marked pruned (``models.pruned_at``), and loading one is refused by
name. Feature folders (``features/<backbone fingerprint>/``) go unless a kept model or the current
settings' backbone uses them (the next run would re-embed everything otherwise). Report folders
older than ``XRAY_KEEP_REPORTS_DAYS`` (and than the review timeout: a run waiting for its reviewer
still reads its ``split.json``) lose every file but ``result.json``. Superseded evaluation rows lose
their per-site/view/subgroup slices, keeping every pooled number and interval, and the catalogue is
vacuumed when enough of it is free (:mod:`xray_core.pipeline.evaluation_retention`).

Crash safety: the catalogue is marked first (one transaction, re-checking inside it that no marked
version is or became the champion or another kept model), files are deleted after. A crash in
between leaves pruned rows whose files are still there: harmless (nothing loads a pruned version,
``xray doctor`` does not count them as missing), and the next gc deletes them. Deleting first would
leave unpruned rows naming missing files. gc holds the retrain lock while it deletes, so no retrain
writes features or models meanwhile.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import session_scope
from db.schema import Model, Promotion, as_utc
from xray_core.data.catalogue import open_catalogue
from xray_core.io.storage import get_storage
from xray_core.pipeline import evaluation_retention as evals
from xray_core.pipeline.lock import hold_retrain_lock
from xray_core.registry.reference import LOCK
from xray_core.settings import Settings

# Audit decisions that name a locked reference (``xray lock N --reason``, issue 26 item 2). Every model
# ever locked is kept: past audits compared champions with it.
LOCK_DECISIONS = (LOCK,)  # xray lock's audit rows (xray_core.registry.reference)
KEPT_FILE = "result.json"  # a report folder's file that is never pruned
STAMP = re.compile(r"(\d{8}T\d{6}Z)")  # reports/<UTC stamp>-<run>, monitor-<stamp>, ...


def locked_references(s: Session, settings: Settings) -> dict[int, str]:
    """The locked reference(s): models an audit row locked (decision in :data:`LOCK_DECISIONS`).

    The hook for ``xray lock``: if it records the reference elsewhere (a column, a table), read it here.
    Without any lock row the first champion is the reference, and it is kept as a promoted model."""
    rows = s.execute(select(Promotion.to_version, Promotion.created_at)
                     .where(Promotion.decision.in_(LOCK_DECISIONS), Promotion.to_version.is_not(None)))
    return {int(v): f"locked reference (since {as_utc(t):%Y-%m-%d})" for v, t in rows}


def _champion_and_promoted(s: Session, settings: Settings) -> dict[int, str]:
    keep = {v: "the champion" for v in s.scalars(select(Model.id).where(Model.status == "champion"))}
    crowned = select(Promotion.to_version, Promotion.created_at).where(
        Promotion.to_version.is_not(None), Promotion.champion_after == Promotion.to_version)
    for v, t in s.execute(crowned.order_by(Promotion.id)):
        keep.setdefault(int(v), f"promoted {as_utc(t):%Y-%m-%d} (a rollback target)")
    for v in s.scalars(select(Model.id).where(Model.status == "retired")):
        keep.setdefault(v, "a former champion (a rollback target)")
    return keep


def _undecided(s: Session, settings: Settings) -> dict[int, str]:
    decided = select(Promotion.to_version).where(Promotion.to_version.is_not(None))
    query = select(Model.id).where(Model.status == "candidate", Model.id.not_in(decided))
    return {v: "a candidate awaiting its decision or review" for v in s.scalars(query)}


# Each rule names versions that must be kept, with why; the first reason given wins.
KEEP_RULES: tuple[Callable[[Session, Settings], dict[int, str]], ...] = (
    _champion_and_promoted, locked_references, _undecided)


def models_to_keep(s: Session, settings: Settings) -> dict[int, str]:
    """Version -> why it is kept: every :data:`KEEP_RULES` model, then the newest
    ``XRAY_KEEP_REJECTED`` of the rest that are not pruned yet."""
    keep: dict[int, str] = {}
    for rule in KEEP_RULES:
        for version, why in rule(s, settings).items():
            keep.setdefault(version, why)
    rest = s.scalars(select(Model.id).where(Model.pruned_at.is_(None)).order_by(Model.id.desc()))
    never = [v for v in rest if v not in keep][:settings.keep_rejected]
    keep.update({v: f"among the newest {settings.keep_rejected} never promoted (XRAY_KEEP_REJECTED)"
                 for v in never})
    return keep


@dataclass(frozen=True)
class Removal:
    """One thing gc deletes: a model's files, a feature folder, a report folder's files, or the slices of
    a model's superseded evaluations."""

    kind: str  # model | features | report | evaluations
    target: str  # v3 | the backbone fingerprint | the report folder's name | v3
    reason: str
    keys: tuple[str, ...]  # model and feature keys of their storage area; report paths under reports/;
    # evaluation row ids (their slices go; the bytes are the JSON's, inside the catalogue file)
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "keys": len(self.keys)}


@dataclass
class GcPlan:
    removals: list[Removal] = field(default_factory=list)
    kept_models: dict[int, str] = field(default_factory=dict)
    kept_backbones: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    catalogue: dict[str, Any] = field(default_factory=dict)  # the SQLite file's bytes, before and after

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)

    def as_dict(self, *, dry_run: bool) -> dict[str, Any]:
        return {"dry_run": dry_run, "bytes": self.bytes, "removals": [r.as_dict() for r in self.removals],
                "kept_models": self.kept_models, "kept_backbones": self.kept_backbones, "notes": self.notes,
                "catalogue": self.catalogue}


def current_backbone(settings: Settings) -> str:
    """The fingerprint the next run files features under (loads the backbone's weights: seconds)."""
    from xray_core.model.backbone import load_backbone

    return load_backbone(settings).fingerprint


def plan_gc(settings: Settings, *, backbone: str | None = None, now: datetime | None = None) -> GcPlan:
    """What gc would delete, with bytes; nothing changes. ``backbone``: the current settings'
    fingerprint (default: :func:`current_backbone`; if that fails, no feature folder is removed)."""
    now = now or datetime.now(UTC)
    plan = GcPlan()
    models = get_storage(settings, "models")
    with session_scope(open_catalogue(settings)) as s:
        plan.kept_models = dict(sorted(models_to_keep(s, settings).items()))
        rows = s.execute(select(Model.id, Model.checkpoint_dir, Model.pruned_at, Model.status,
                                Model.backbone_fingerprint).order_by(Model.id)).all()
    used: dict[str, str] = {}
    for version, folder, pruned_at, status, fingerprint in rows:
        name = str(folder).rstrip("/").rpartition("/")[2] or str(version)
        keys = tuple(models.list(name)) if name else ()
        if version in plan.kept_models:
            used.setdefault(fingerprint, f"used by v{version}")
        elif pruned_at is not None:
            if keys:  # an interrupted gc marked it and stopped before deleting
                plan.removals.append(Removal("model", f"v{version}", "pruned earlier; its files were left",
                                             keys, _sizes(models, keys)))
        else:
            plan.removals.append(Removal("model", f"v{version}", f"{status}, not kept by the policy", keys,
                                         _sizes(models, keys)))
    try:
        fingerprint = backbone or current_backbone(settings)
        used.setdefault(fingerprint, "the current settings' backbone")
    except Exception as exc:  # noqa: BLE001 - any failure: keep every folder rather than guess
        fingerprint = None
        plan.notes.append(f"the current backbone could not be loaded ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); no feature folder is removed")
    plan.kept_backbones = used
    features = get_storage(settings, "features")
    for folder in features.folders():
        if fingerprint is None or folder in used or folder.startswith("."):
            continue
        keys = tuple(features.list(folder))
        plan.removals.append(Removal("features", folder, "no kept model and not the current backbone uses it",
                                     keys, _sizes(features, keys)))
    plan.removals += _old_reports(settings, now)
    plan.removals += [_slimming(e) for e in evals.plan_slimming(settings, now)]
    if (path := evals.catalogue_file(settings)) is not None:
        plan.catalogue = {"before": evals.catalogue_space(path)}
    return plan


def _slimming(entry: dict[str, Any]) -> Removal:
    return Removal("evaluations", f"v{entry['version']}",
                   "superseded: scored again on a newer test set; per-site/view slices go, every pooled "
                   "number and interval stays", tuple(str(i) for i in entry["ids"]), int(entry["bytes"]))


def _sizes(storage: Any, keys: tuple[str, ...]) -> int:
    total = 0
    for key in keys:
        with contextlib.suppress(FileNotFoundError):
            total += storage.size(key)
    return total


def _old_reports(settings: Settings, now: datetime) -> list[Removal]:
    """Report folders older than XRAY_KEEP_REPORTS_DAYS (and the review timeout): their files but
    result.json. A folder's age is the UTC stamp in its name, else its modification time."""
    root = Path(settings.reports_dir)
    if not root.is_dir():
        return []
    days = max(float(settings.keep_reports_days), settings.review_timeout_h / 24)
    cutoff = now - timedelta(days=days)
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found = STAMP.search(folder.name)
        when = (datetime.strptime(found.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) if found
                else datetime.fromtimestamp(folder.stat().st_mtime, UTC))
        if when >= cutoff:
            continue
        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / KEPT_FILE]
        if files:
            out.append(Removal("report", folder.name, f"written {when:%Y-%m-%d}, over {days:g} days ago",
                               tuple(p.relative_to(root).as_posix() for p in files),
                               sum(p.stat().st_size for p in files)))
    return out


def run_gc(settings: Settings, *, dry_run: bool = False, backbone: str | None = None,
           now: datetime | None = None, wait_seconds: float = 0.0) -> dict[str, Any]:
    """Plan, and unless ``dry_run`` delete (holding the retrain lock; see the module docstring).

    Returns the plan as a dict: ``bytes`` is what was (or would be) freed, ``removals`` each item."""
    if dry_run:
        return plan_gc(settings, backbone=backbone, now=now).as_dict(dry_run=True)
    with hold_retrain_lock(settings, wait_seconds=wait_seconds):
        plan = plan_gc(settings, backbone=backbone, now=now)
        marked = _mark_pruned(settings, [int(r.target[1:]) for r in plan.removals if r.kind == "model"], now)
        planned = {int(r.target[1:]) for r in plan.removals if r.kind == "model"}
        if planned - marked:  # promoted or locked meanwhile: their backbones' folders may be in use
            plan.notes.append(f"kept {', '.join(f'v{v}' for v in sorted(planned - marked))} (the policy "
                              "changed while gc ran); feature folders are left for the next gc")
        plan.removals = [r for r in plan.removals if (r.kind == "model" and int(r.target[1:]) in marked)
                         or r.kind in ("report", "evaluations")
                         or (r.kind == "features" and planned <= marked)]
        models, features = get_storage(settings, "models"), get_storage(settings, "features")
        for r in plan.removals:
            if r.kind == "model":
                for key in r.keys:
                    models.delete(key)
                _drop_empty(models, r.keys)
            elif r.kind == "features":
                features.delete_prefix(r.target)
            elif r.kind == "report":
                _prune_report(Path(settings.reports_dir), r.keys)
        _slim_and_tidy(settings, plan, now)
    return plan.as_dict(dry_run=False)


def _slim_and_tidy(settings: Settings, plan: GcPlan, now: datetime | None) -> None:
    """Slim the planned evaluations still superseded (one transaction), then VACUUM when worth it."""
    planned = [int(k) for r in plan.removals if r.kind == "evaluations" for k in r.keys]
    plan.removals = [r for r in plan.removals if r.kind != "evaluations"]
    plan.removals += [_slimming(e) for e in evals.slim_evaluations(settings, planned, now)]
    if (path := evals.catalogue_file(settings)) is not None:
        plan.catalogue["vacuumed"], notes = evals.tidy_catalogue(path)
        plan.catalogue["after"] = evals.catalogue_space(path)
        plan.notes += notes


def _mark_pruned(settings: Settings, versions: list[int], now: datetime | None) -> set[int]:
    """Mark ``versions`` pruned in one transaction, skipping any that is now kept (the policy is
    re-read inside it, rows locked where the database can); returns the versions to delete files of."""
    if not versions:
        return set()
    when = now or datetime.now(UTC)
    with session_scope(open_catalogue(settings)) as s:
        rows = s.scalars(select(Model).where(Model.id.in_(versions)).with_for_update()).all()
        keep = models_to_keep(s, settings)
        marked = set()
        for model in rows:
            if model.id in keep or model.status == "champion":
                continue
            if model.pruned_at is None:
                model.pruned_at = when
            marked.add(model.id)
    return marked


def _drop_empty(storage: Any, keys: tuple[str, ...]) -> None:
    """Remove a model's folder once its files are gone (local folders; object stores have none)."""
    for folder in {k.rpartition("/")[0] for k in keys if "/" in k}:
        if not storage.list(folder):
            storage.delete_prefix(folder)


def _prune_report(root: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        (root / key).unlink(missing_ok=True)
    folders = {parent for k in keys for parent in (root / k).parents if root in parent.parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty (result.json stays): kept
            folder.rmdir()


__all__ = ["GcPlan", "KEEP_RULES", "LOCK_DECISIONS", "Removal", "current_backbone", "locked_references",
           "models_to_keep", "plan_gc", "run_gc"]
