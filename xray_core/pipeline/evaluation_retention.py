"""Retention of evaluation detail (``xray gc``): a superseded evaluation keeps its numbers, not its slices.

Every night's re-score (:mod:`xray_core.pipeline.rescore`) writes one ``evaluations`` row per registry
model, about 9 KB each at two sites: the pooled metrics with their bootstrap intervals (~3.5 KB) and
the same numbers cut per site, per view and per ``XRAY_SLICE_BY`` subgroup (``metrics.slices`` and
``metrics.subgroups``, ~5.5 KB, more with more sites). No row carries per-film scores: the test
probabilities travel in memory with the run (:func:`~xray_core.pipeline.steps.evaluate_step`) and
are never stored. Kept forever, the rows were most of the catalogue's growth (bench/year.py).

Who reads a stored evaluation, and what:

- ``xray models`` (:func:`~xray_core.registry.listing.list_models`) and ``xray models show N``
  (:func:`~xray_core.registry.listing.model_lineage`): each row's test set, size, date and the pooled
  accuracy, balanced accuracy and macro AUROC with their intervals, all kept; ``show N`` also the slices
  of the model's *latest* evaluation, which is never slimmed;
- the re-score (:func:`~xray_core.pipeline.rescore.rescore_models`) reuses a row on the current test
  set whole: rows on the newest test set are never slimmed, and a slimmed row is re-scored, not reused;
- nothing else: the recipe scores the champion, challenger and reference itself; each decision's numbers
  are copied into its audit row (``promotions.metrics``, kept whole), which the test-reuse counter and
  ``xray models --history`` read; CBPE's realised values read ``drift_checks``; reproduce reads the split
  manifest and card.

A row is **superseded** when a later evaluation of the same model is on another (newer) test set, and
its test set is none of: the newest one (that of the newest evaluation row, what ``xray models`` takes
as current), the one the latest decision was made on, and the one the decision that crowned the current
champion was made on. A superseded row loses ``slices`` and ``subgroups`` and says so in
``metrics.detail_pruned`` (when, what, why); every other key (counts, confusion matrix, per-class
numbers, every interval, the bootstrap's seed) stays.

SQLite keeps freed pages in the file and reuses them for the next rows, so a nightly gc stops the
growth without shrinking the file (a slimmed row of ~9 KB frees its overflow pages; space freed inside
a page is reused less). When the free pages are at least :data:`VACUUM_MIN_FREE_SHARE` of the database
and :data:`VACUUM_MIN_FREE_BYTES` (the first gc of an old home), gc runs ``VACUUM`` on its own
connection: one transaction of its own (a crash leaves the catalogue as it was, valid), waiting up to
:data:`VACUUM_BUSY_MS` for a writer (else it is left to the next gc); readers keep their snapshot. It
writes the new copy through the WAL, so the WAL is truncated after it (``wal_checkpoint(TRUNCATE)``,
which waits up to :data:`VACUUM_BUSY_MS` for readers); a note says when that could not be done yet.
PostgreSQL's autovacuum reclaims space itself.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import in_blocks, session_scope
from db.engine import open_sqlite
from db.schema import Evaluation, Model, Promotion
from db.urls import sqlite_file
from xray_core.data.catalogue import open_catalogue
from xray_core.settings import Settings

DETAIL_KEYS = ("slices", "subgroups")  # what a superseded evaluation loses
MARK = "detail_pruned"  # metrics[MARK]: {"at", "dropped", "reason"} once slimmed
VACUUM_MIN_FREE_SHARE = 0.25  # VACUUM when free pages are this share of the file...
VACUUM_MIN_FREE_BYTES = 1 << 20  # ...and at least this many bytes
VACUUM_BUSY_MS = 10_000  # how long VACUUM waits for a writer, and the WAL truncation for readers
# SQLite's auto-checkpoint keeps a WAL near 1000 pages (~4 MB) without truncating it. A WAL bigger than
# this and than the file is a VACUUM's copy that a reader kept from being truncated: the next gc does it.
WAL_LEFTOVER_BYTES = 16 << 20


def is_slimmed(metrics: dict[str, Any] | None) -> bool:
    """Whether gc dropped this evaluation's per-site/view/subgroup slices (see the module docstring)."""
    return bool((metrics or {}).get(MARK))


def _decision_test_set(p: Promotion) -> str | None:
    challenger = (p.metrics or {}).get("challenger")
    fingerprint = challenger.get("test_set_fingerprint") if isinstance(challenger, dict) else None
    return fingerprint if isinstance(fingerprint, str) and fingerprint else None


def protected_test_sets(s: Session) -> dict[str, str]:
    """Test-set fingerprint -> why every evaluation on it keeps its detail."""
    out: dict[str, str] = {}
    newest = s.scalar(select(Evaluation.test_set_fingerprint).order_by(Evaluation.id.desc()).limit(1))
    if newest:
        out[newest] = "the newest test set"
    champion = s.scalar(select(Model.id).where(Model.status == "champion"))
    latest = crowned = None
    for p in s.scalars(select(Promotion).order_by(Promotion.id.desc())):
        fingerprint = _decision_test_set(p)
        if fingerprint is None:
            continue
        latest = latest or fingerprint
        if champion is not None and p.to_version == champion and p.champion_after == champion:
            crowned = fingerprint
            break
    if latest:
        out.setdefault(latest, "the latest decision's test set")
    if crowned:
        out.setdefault(crowned, "the test set the current champion was promoted on")
    return out


def superseded(s: Session) -> list[int]:
    """Ids of the evaluation rows whose detail may go (the module docstring's rule), not yet slimmed."""
    protected = protected_test_sets(s)
    rows = s.execute(select(Evaluation.id, Evaluation.model_id, Evaluation.test_set_fingerprint)
                     .order_by(Evaluation.id.desc())).all()
    later: dict[int, set[str]] = {}  # model -> test sets of its evaluations after the current row
    out = []
    for eid, model, fingerprint in rows:
        seen = later.setdefault(model, set())
        if fingerprint not in protected and seen - {fingerprint}:
            out.append(eid)
        seen.add(fingerprint)
    # Rows a gc already slimmed are left out in SQL (their marker is set) and the rest read in blocks
    # (in_blocks): a gc reads the detail of the rows it may slim, not the whole history's.
    fresh = Evaluation.metrics[MARK].as_string().is_(None)
    detail = [row for block in in_blocks(out)
              for row in s.execute(select(Evaluation.id, Evaluation.metrics)
                                   .where(Evaluation.id.in_(block), fresh))]
    return sorted(eid for eid, metrics in detail if not is_slimmed(metrics) and _dropped(metrics))


def _dropped(metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {k: (metrics or {})[k] for k in DETAIL_KEYS if k in (metrics or {})}


def _slim(metrics: dict[str, Any], when: datetime) -> dict[str, Any]:
    dropped = list(_dropped(metrics))
    kept = {k: v for k, v in metrics.items() if k not in DETAIL_KEYS}
    kept[MARK] = {"at": when.isoformat(timespec="seconds"), "dropped": dropped,
                  "reason": "superseded: its model was scored again on a newer test set (xray gc)"}
    return kept


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value).encode())


def _collect(s: Session, ids: set[int], when: datetime, *, apply: bool) -> list[dict[str, Any]]:
    """Per model: ``version``, evaluation ``ids`` and ``bytes`` of stored JSON that go (the marker's few
    bytes deducted); with ``apply`` the rows are slimmed too."""
    per: dict[int, dict[str, Any]] = {}
    for e in (e for block in in_blocks(sorted(ids))
              for e in s.scalars(select(Evaluation).where(Evaluation.id.in_(block)).order_by(Evaluation.id))):
        slim = _slim(e.metrics, when)
        entry = per.setdefault(e.model_id, {"version": e.model_id, "ids": [], "bytes": 0})
        entry["ids"].append(e.id)
        entry["bytes"] += max(0, _json_bytes(e.metrics) - _json_bytes(slim))
        if apply:
            e.metrics = slim
    return [per[v] for v in sorted(per)]


def plan_slimming(settings: Settings, now: datetime | None = None) -> list[dict[str, Any]]:
    """The superseded evaluations, per model (:func:`_collect`'s entries). Changes nothing."""
    with session_scope(open_catalogue(settings)) as s:
        return _collect(s, set(superseded(s)), now or datetime.now(UTC), apply=False)


def slim_evaluations(settings: Settings, ids: Iterable[int],
                     now: datetime | None = None) -> list[dict[str, Any]]:
    """Slim the rows of ``ids`` that are still superseded, in one transaction (the rule is re-read inside
    it: a decision or an evaluation made since the plan may protect a row again); returns what was
    slimmed, as :func:`plan_slimming` does."""
    wanted = set(ids)
    if not wanted:
        return []
    with session_scope(open_catalogue(settings)) as s:
        return _collect(s, wanted & set(superseded(s)), now or datetime.now(UTC), apply=True)


def catalogue_file(settings: Settings) -> Path | None:
    """The SQLite catalogue's main file (None on another database, or before the file exists)."""
    path = sqlite_file(settings.database_url)
    return path if path is not None and path.is_file() else None


def catalogue_space(path: Path) -> dict[str, int]:
    """``database_bytes``: the database's pages (in the main file or, not yet checkpointed, in the WAL);
    ``free_bytes``: its free pages; ``file_bytes`` and ``wal_bytes``: the two files on disk."""
    conn = open_sqlite(path, read_only=True)
    try:
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    finally:
        conn.close()
    wal = Path(f"{path}-wal")
    return {"database_bytes": pages * page, "free_bytes": free * page, "file_bytes": path.stat().st_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0}


def tidy_catalogue(path: Path) -> tuple[bool, list[str]]:
    """VACUUM the catalogue when its free pages are worth it, then truncate its WAL (also when an earlier
    VACUUM's copy is still in it: :data:`WAL_LEFTOVER_BYTES`); see the module docstring. Returns whether
    VACUUM ran, and notes. Any SQLite error leaves the catalogue as it was (VACUUM is one transaction)."""
    space = catalogue_space(path)
    worth = space["free_bytes"] >= max(VACUUM_MIN_FREE_BYTES, VACUUM_MIN_FREE_SHARE * space["database_bytes"])
    if not worth and space["wal_bytes"] <= max(space["database_bytes"], WAL_LEFTOVER_BYTES):
        return False, []
    notes: list[str] = []
    conn = open_sqlite(path)
    try:
        conn.execute(f"PRAGMA busy_timeout = {VACUUM_BUSY_MS}")  # for writers (VACUUM) and readers (TRUNCATE)
        if worth:
            try:
                conn.execute("VACUUM")
            except sqlite3.Error as exc:
                return False, [f"catalogue not vacuumed ({exc}); nothing changed, the next gc tries again"]
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as exc:
        busy, notes = 1, [f"WAL checkpoint failed ({exc})"]
    finally:
        conn.close()
    if busy:
        notes.append("a reader kept the catalogue's WAL from being truncated after VACUUM: it holds a copy "
                     "of the catalogue until a later checkpoint (the next gc tries again)")
    return worth, notes


__all__ = ["DETAIL_KEYS", "MARK", "catalogue_file", "catalogue_space", "is_slimmed", "plan_slimming",
           "protected_test_sets", "slim_evaluations", "superseded", "tidy_catalogue"]
