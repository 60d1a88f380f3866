"""``xray gc`` slims superseded evaluation rows: a row whose model was scored again on a newer test set loses
its per-site/view/subgroup slices and keeps every pooled number and interval; rows on the newest test set,
on the test set of the latest decision or of the decision that crowned the champion, and each model's
latest row stay whole. Every reader of the rows still works on a slimmed one, and the catalogue is
vacuumed only when enough of it is free. Tiny heads (tests/registry_heads.py), evaluation rows written
directly: no backbone."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
from registry_heads import BACKBONE, save
from sqlalchemy import select

import db.engine
from db import session_scope
from db.schema import Evaluation
from xray_cli.gc import render
from xray_core.data.catalogue import open_catalogue
from xray_core.pipeline import evaluation_retention as evals
from xray_core.pipeline.retention import run_gc
from xray_core.registry.listing import history, list_models, model_lineage
from xray_core.registry.reference import count_test_set_reuse
from xray_core.registry.versions import record_decision
from xray_core.report.terminal import render_lineage

NOW = datetime(2027, 1, 1, tzinfo=UTC)
T1, T2, T3, T4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)  # test sets, oldest first


def _metrics(auroc: float, sites: int = 3) -> dict:
    interval = {"point": auroc, "low": auroc - 0.1, "high": auroc + 0.05, "n_used": 200,
                "method": "bootstrap"}
    one = {"n": 10, "counts": {"normal": 5, "pneumonia": 5}, "macro_auroc": auroc,
           "intervals": {k: interval for k in ("accuracy", "macro_auroc", "per_class.normal.auroc")}}
    return {"n": 30, "labels": ["normal", "pneumonia"], "threshold": 0.4, "accuracy": auroc - 0.1,
            "balanced_accuracy": auroc - 0.05, "macro_auroc": auroc, "confusion_matrix": [[12, 3], [4, 11]],
            "per_class": {"normal": {"auroc": auroc, "support": 15}},
            "intervals": {k: interval for k in ("accuracy", "balanced_accuracy", "macro_auroc")},
            "bootstrap": {"samples": 200, "seed": 0},
            "slices": {"site": {f"S{k}": one for k in range(sites)}, "view": {"PA": one}},
            "subgroups": {"sex": {"F": one, "M": one}}}


def _evaluate(settings, version: int, test_set: str, auroc: float) -> int:
    with session_scope(open_catalogue(settings)) as s:
        row = Evaluation(model_id=version, test_set_fingerprint=test_set, backbone_fingerprint=BACKBONE,
                         n_images=30, metrics=_metrics(auroc))
        s.add(row)
        s.flush()
        return row.id


def _decide(settings, version: int, test_set: str, promote: bool = False) -> None:
    record_decision(settings, challenger=version, decision="promote" if promote else "keep", rationale="test",
                    metrics={"challenger": {"version": version, "test_set_fingerprint": test_set}},
                    trigger="test", promote=promote)


def _rows(settings) -> dict[int, dict]:
    with session_scope(open_catalogue(settings)) as s:
        return {e.id: e.metrics for e in s.scalars(select(Evaluation))}


@pytest.fixture
def nights(settings):
    """Three nights: v1 promoted on T1; v2 kept on T2 (v1 re-scored there); v3 kept on T3 (v1, v2
    re-scored there). Evaluation ids 1..6: v1@T1, v2@T2, v1@T2, v3@T3, v1@T3, v2@T3."""
    v1, v2, v3 = (save(settings, seed=k) for k in range(3))
    _evaluate(settings, v1, T1, 0.80)
    _decide(settings, v1, T1, promote=True)
    _evaluate(settings, v2, T2, 0.81)
    _evaluate(settings, v1, T2, 0.79)
    _decide(settings, v2, T2)
    for version, auroc in ((v3, 0.78), (v1, 0.82), (v2, 0.83)):
        _evaluate(settings, version, T3, auroc)
    _decide(settings, v3, T3)
    return settings


def test_dry_run_lists_superseded_rows_with_bytes_and_gc_slims_exactly_those(nights) -> None:
    before = _rows(nights)
    plan = run_gc(nights, dry_run=True, backbone=BACKBONE, now=NOW)
    assert _rows(nights) == before  # a dry run changes nothing
    listed = {r["target"]: r for r in plan["removals"] if r["kind"] == "evaluations"}
    # v1@T1 stays: the champion was promoted on T1; T3 is the newest and the latest decision's test set
    assert set(listed) == {"v1", "v2"} and listed["v1"]["keys"] == listed["v2"]["keys"] == 1
    assert "would remove the slices of v1's old evaluations" in render(plan)
    assert plan["catalogue"]["before"]["file_bytes"] > 0

    done = run_gc(nights, backbone=BACKBONE, now=NOW)
    after = _rows(nights)
    assert {i for i, m in after.items() if evals.is_slimmed(m)} == {2, 3}
    for i in (2, 3):
        kept = {k: v for k, v in before[i].items() if k not in ("slices", "subgroups")}
        assert {k: v for k, v in after[i].items() if k != evals.MARK} == kept  # every number, every interval
        assert after[i][evals.MARK]["dropped"] == ["slices", "subgroups"]
        assert "newer test set" in after[i][evals.MARK]["reason"]
    assert all(after[i] == before[i] for i in (1, 4, 5, 6))
    assert [r["bytes"] for r in done["removals"]] == [r["bytes"] for r in plan["removals"]]
    assert sum(r["bytes"] for r in done["removals"]) > 0
    assert "after" in done["catalogue"] and done["catalogue"]["vacuumed"] is False  # too little free
    assert not [r for r in run_gc(nights, dry_run=True, backbone=BACKBONE, now=NOW)["removals"]
                if r["kind"] == "evaluations"]  # nothing left to slim


def test_a_gc_reads_no_detail_of_rows_already_slimmed_and_reads_ids_in_blocks(nights, monkeypatch) -> None:
    read: list[dict] = []
    real = evals.is_slimmed
    monkeypatch.setattr(evals, "is_slimmed", lambda metrics: read.append(metrics) or real(metrics))
    monkeypatch.setattr(db.engine, "IN_BLOCK", 1)  # one id per IN list (db.in_blocks): the same rows
    with session_scope(open_catalogue(nights)) as s:
        assert evals.superseded(s) == [2, 3] and len(read) == 2
    run_gc(nights, backbone=BACKBONE, now=NOW)
    read.clear()
    with session_scope(open_catalogue(nights)) as s:  # 2 and 3 are superseded, and slimmed: left out in SQL
        assert evals.superseded(s) == [] and read == []


def test_rows_of_the_latest_decision_and_the_champions_decision_stay_until_a_newer_decision(nights) -> None:
    run_gc(nights, backbone=BACKBONE, now=NOW)
    _evaluate(nights, 1, T4, 0.84)  # `xray models` after an ingest: v1 re-scored on a newer test set
    run_gc(nights, backbone=BACKBONE, now=NOW)
    rows = _rows(nights)
    assert not evals.is_slimmed(rows[5])  # v1@T3: the latest decision (v3's) was made on T3
    assert not evals.is_slimmed(rows[1])  # v1@T1: the champion's promotion was decided on T1
    v4 = save(nights, seed=4)
    _evaluate(nights, v4, T4, 0.83)
    _decide(nights, v4, T4)  # a newer decision, on T4 (kept)
    run_gc(nights, backbone=BACKBONE, now=NOW)
    rows = _rows(nights)
    assert evals.is_slimmed(rows[5])  # superseded now
    assert not evals.is_slimmed(rows[1])  # still the champion's decision
    assert not evals.is_slimmed(rows[4]) and not evals.is_slimmed(rows[6])  # v3's and v2's latest rows


def test_every_reader_of_the_rows_works_on_slimmed_ones(nights) -> None:
    listed, lineages = list_models(nights), {v: model_lineage(nights, v) for v in (1, 2, 3)}
    on_t2 = list_models(nights, current_test_set=T2)
    audit, reuse = history(nights), count_test_set_reuse(nights, T3)
    run_gc(nights, backbone=BACKBONE, now=NOW)
    assert list_models(nights) == listed and list_models(nights, current_test_set=T2) == on_t2
    assert history(nights) == audit and count_test_set_reuse(nights, T3) == reuse
    for version in (1, 2, 3):
        after = model_lineage(nights, version)
        assert after["slices"] == lineages[version]["slices"] is not None  # the latest row's slices
        assert [e["metrics"] for e in after["evaluations"]] == [
            e["metrics"] for e in lineages[version]["evaluations"]]
    evaluations = model_lineage(nights, 1)["evaluations"]
    assert [bool(e["detail_pruned"]) for e in evaluations] == [False, True, False]
    text = render_lineage(model_lineage(nights, 1))
    assert text.count("(per-site slices dropped by xray gc)") == 1 and "sliced:" in text


@pytest.fixture
def sqlite_only(nights):
    if evals.catalogue_file(nights) is None:
        pytest.skip("VACUUM is SQLite's; PostgreSQL's autovacuum reclaims space itself")
    return nights


def test_gc_vacuums_when_enough_is_free_and_a_reader_does_not_stop_it(sqlite_only, monkeypatch) -> None:
    settings = sqlite_only
    monkeypatch.setattr(evals, "VACUUM_MIN_FREE_BYTES", 0)  # the share (25%) still applies
    monkeypatch.setattr(evals, "VACUUM_BUSY_MS", 100)
    with session_scope(open_catalogue(settings)) as s:  # 30 rows of ~9 KB: overflow pages, as at 12 sites
        s.add_all(Evaluation(model_id=1 + k % 3, test_set_fingerprint=T2, backbone_fingerprint=BACKBONE,
                             n_images=30, metrics=_metrics(0.7, sites=12)) for k in range(30))
    for version in (1, 2, 3):  # each model scored again on a newer test set: the 30 are superseded
        _evaluate(settings, version, T4, 0.9)
    path = evals.catalogue_file(settings)
    reader = sqlite3.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    seen = reader.execute("SELECT count(*) FROM evaluations").fetchone()[0]  # holds its snapshot
    done = run_gc(settings, backbone=BACKBONE, now=NOW)
    before, after = done["catalogue"]["before"], done["catalogue"]["after"]
    assert done["catalogue"]["vacuumed"] is True
    assert any("kept the catalogue's WAL from being truncated" in n for n in done["notes"])
    assert reader.execute("SELECT count(*) FROM evaluations").fetchone()[0] == seen
    reader.execute("COMMIT")
    reader.close()
    assert after["free_bytes"] == 0 and after["database_bytes"] < before["database_bytes"]
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert len(_rows(settings)) == 39 and len(list_models(settings)) == 3
    assert evals.tidy_catalogue(path) == (False, [])  # nothing free now; the WAL is ~4 MB at most


def test_a_vacuum_that_cannot_get_the_lock_changes_nothing_and_says_so(sqlite_only, monkeypatch) -> None:
    settings = sqlite_only
    monkeypatch.setattr(evals, "VACUUM_MIN_FREE_BYTES", 0)
    monkeypatch.setattr(evals, "VACUUM_MIN_FREE_SHARE", 0.0)
    monkeypatch.setattr(evals, "VACUUM_BUSY_MS", 100)
    path = evals.catalogue_file(settings)
    slimmed = evals.slim_evaluations(settings, [2, 3])
    assert [(e["version"], e["ids"]) for e in slimmed] == [(1, [3]), (2, [2])]
    writer = sqlite3.connect(str(path), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # e.g. an ingest writing
    before = evals.catalogue_space(path)
    vacuumed, notes = evals.tidy_catalogue(path)
    writer.execute("ROLLBACK")
    writer.close()
    assert vacuumed is False and "not vacuumed" in notes[0] and "the next gc tries again" in notes[0]
    assert evals.catalogue_space(path)["free_bytes"] == before["free_bytes"]
    assert {i for i, m in _rows(settings).items() if evals.is_slimmed(m)} == {2, 3}
