"""Retention (``xray gc``): it keeps every model a rollback or an audit could need, prunes the rest's files
(rows and lineage stay, marked pruned), drops unused feature folders and old report files but result.json,
and a dry run's byte count is what the real run frees. Tiny heads (tests/registry_heads.py), no backbone:
the current backbone's fingerprint is passed in."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from registry_heads import BACKBONE, save, status_of
from sqlalchemy import select

from db import session_scope
from db.schema import Model
from xray_core.data.catalogue import open_catalogue
from xray_core.data.doctor import examine
from xray_core.errors import UsageError
from xray_core.io.storage import LocalStorage, get_storage
from xray_core.pipeline.retention import run_gc
from xray_core.registry.listing import list_models, model_lineage
from xray_core.registry.versions import load_model, promote_manually, record_decision, rollback
from xray_core.report.terminal import render_models

CURRENT, UNUSED = "c" * 64, "d" * 64
NOW = datetime(2027, 1, 1, tzinfo=UTC)
OLD, RECENT = "20260901T020000Z-abcd1234", "20261225T020000Z-ef567890"  # 122 and 7 days before NOW


def _decide(settings, version: int, decision: str, promote: bool = False) -> None:
    record_decision(settings, challenger=version, decision=decision, rationale="test", metrics={},
                    trigger="test", promote=promote)


@pytest.fixture
def home(settings):
    """v1 promoted, v2 v3 kept (rejected), v4 promoted (champion), v5 blocked (a candidate with a
    decision), v6 kept, v7 awaiting review (no decision), v8 kept; three feature folders; two run
    folders and a monitor folder. XRAY_KEEP_REJECTED=2."""
    settings = settings.with_overrides(keep_rejected=2)
    versions = [save(settings, seed=k) for k in range(8)]
    assert versions == list(range(1, 9))
    for version, decision in [(1, "promote"), (2, "keep"), (3, "keep"), (4, "promote"), (5, "blocked"),
                              (6, "keep"), (8, "keep")]:
        _decide(settings, version, decision, promote=decision == "promote")
    features = get_storage(settings, "features")
    for fp in (BACKBONE, CURRENT, UNUSED):
        for sha in ("ab" * 32, "cd" * 32):
            features.write_bytes(f"{fp}/{sha[:2]}/{sha}.safetensors", b"x" * 1000)
    reports = Path(settings.reports_dir)
    for run in (OLD, RECENT):
        for name, size in (("result.json", 10), ("report.html", 500), ("report.md", 50), ("split.json", 70),
                           ("heatmaps/v4-1.png", 300)):
            (reports / run / name).parent.mkdir(parents=True, exist_ok=True)
            (reports / run / name).write_bytes(b"r" * size)
    (reports / "monitor-20260901T063000Z").mkdir()
    (reports / "monitor-20260901T063000Z" / "report.md").write_bytes(b"m" * 40)
    return settings


def _files(settings) -> dict[str, int]:
    """Every file of the home but the catalogue's, with its size."""
    root = Path(settings.home)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not p.name.startswith("catalogue.db") and p.name != "retrain.lock"}


def _pruned(settings) -> list[int]:
    with session_scope(open_catalogue(settings)) as s:
        return list(s.scalars(select(Model.id).where(Model.pruned_at.is_not(None)).order_by(Model.id)))


def test_dry_run_changes_nothing_and_gc_frees_exactly_what_it_listed(home) -> None:
    before = _files(home)
    plan = run_gc(home, dry_run=True, backbone=CURRENT, now=NOW)
    assert _files(home) == before and _pruned(home) == []
    listed = {(r["kind"], r["target"]) for r in plan["removals"]}
    assert listed == {("model", "v2"), ("model", "v3"), ("model", "v5"), ("features", UNUSED),
                      ("report", OLD), ("report", "monitor-20260901T063000Z")}
    assert set(plan["kept_models"]) == {1, 4, 6, 7, 8}
    assert "champion" in plan["kept_models"][4] and "rollback target" in plan["kept_models"][1]
    assert "review" in plan["kept_models"][7] and "XRAY_KEEP_REJECTED" in plan["kept_models"][8]

    done = run_gc(home, backbone=CURRENT, now=NOW)
    after = _files(home)
    assert done["bytes"] == plan["bytes"] == sum(before.values()) - sum(after.values()) > 0
    assert _pruned(home) == [2, 3, 5]
    for version in (1, 4, 6, 7, 8):  # kept: files intact, loadable
        assert load_model(home, version).version == version
    assert not any(k.startswith(("models/2/", "models/3/", "models/5/")) for k in after)
    assert not any(k.startswith(f"features/{UNUSED}") for k in after)
    assert sum(k.startswith(f"features/{fp}/") for k in after for fp in (BACKBONE, CURRENT)) == 4
    assert sorted(k for k in after if k.startswith(f"reports/{OLD}")) == [f"reports/{OLD}/result.json"]
    assert sum(k.startswith(f"reports/{RECENT}/") for k in after) == 5  # young: untouched
    assert not (Path(home.reports_dir) / "monitor-20260901T063000Z").exists()
    assert run_gc(home, backbone=CURRENT, now=NOW)["bytes"] == 0  # nothing left to do


def test_pruned_models_stay_in_the_catalogue_are_refused_by_name_and_rollback_still_works(home) -> None:
    run_gc(home, backbone=CURRENT, now=NOW)
    assert status_of(home, 2) == "rejected" and status_of(home, 5) == "candidate"  # status unchanged
    lineage = model_lineage(home, 2)
    assert lineage["pruned_at"] is not None and lineage["checkpoint_sha256"]
    rows = {m["version"]: m for m in list_models(home)}
    assert rows[2]["pruned_at"] and rows[4]["pruned_at"] is None
    assert "rejected (pruned)" in render_models(list(rows.values()))
    for refused in (lambda: load_model(home, 2), lambda: promote_manually(home, 5, reason="by hand")):
        with pytest.raises(UsageError, match="model version [25] was pruned by xray gc"):
            refused()
    assert status_of(home, 4) == "champion"
    assert rollback(home, reason="after gc")["champion_after"] == 1  # a promoted model: never pruned
    assert examine(home).healthy  # a pruned model's missing files are no problem


def test_a_gc_interrupted_after_marking_leaves_a_valid_home_and_the_next_gc_finishes(home, monkeypatch):
    original = LocalStorage.delete

    def crash(self, key):
        raise OSError("disk went away")

    monkeypatch.setattr(LocalStorage, "delete", crash)
    with pytest.raises(OSError):
        run_gc(home, backbone=CURRENT, now=NOW)
    assert _pruned(home) == [2, 3, 5] and status_of(home, 4) == "champion"
    assert Path(home.models_dir, "2", "head.safetensors").exists()  # marked first, files not yet deleted
    assert examine(home).healthy
    with pytest.raises(UsageError, match="pruned"):
        load_model(home, 2)
    monkeypatch.setattr(LocalStorage, "delete", original)
    again = run_gc(home, backbone=CURRENT, now=NOW)
    assert {r["target"] for r in again["removals"] if r["kind"] == "model"} == {"v2", "v3", "v5"}
    assert all("pruned earlier" in r["reason"] for r in again["removals"] if r["kind"] == "model")
    assert not Path(home.models_dir, "2").exists()


def test_a_higher_keep_rejected_keeps_more_and_an_unknown_backbone_keeps_every_feature_folder(
        home, monkeypatch) -> None:
    from xray_core.pipeline import retention

    def missing(settings):
        raise FileNotFoundError("weights file /w/densenet.pth is missing")

    monkeypatch.setattr(retention, "current_backbone", missing)
    plan = run_gc(home.with_overrides(keep_rejected=10), dry_run=True, backbone=None, now=NOW)
    assert not [r for r in plan["removals"] if r["kind"] in ("model", "features")]  # backbone not loadable
    assert any("no feature folder is removed" in n for n in plan["notes"])


def test_the_0006b_catalogue_upgrades_in_place_and_its_models_are_not_pruned(database_url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from db.engine import make_engine, migrate

    engine = make_engine(database_url)
    migrate(engine, "0006b")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO models (id, created_at, status, checkpoint_dir, checkpoint_sha256, card_sha256, "
            "backbone_fingerprint, backbone_weights, training_set_fingerprint, labels, config, metrics) "
            "VALUES (3, '2026-01-01 00:00:00', 'champion', 'models/3', :h, :h, :h, 'random', :h, "
            "'[\"a\",\"b\"]', '{}', '{}')"), {"h": "e" * 64})
    migrate(engine, "head")
    with Session(engine) as s:
        model = s.get(Model, 3)
        assert (model.status, model.checkpoint_dir, model.pruned_at) == ("champion", "models/3", None)
        assert s.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0008"
    migrate(engine, downgrade=True, revision="0006b")
    migrate(engine, "head")
    engine.dispose()


def test_gc_prunes_on_storage_url_homes_as_models_are_stored_there(xray_env, monkeypatch) -> None:
    from xray_core.settings import load_settings, reset_settings

    monkeypatch.setenv("XRAY_STORAGE_URL", "memory://gc-retention-test")
    reset_settings()
    settings = load_settings().with_overrides(keep_rejected=1)
    for k, decision in enumerate(("promote", "keep", "keep")):
        _decide(settings, save(settings, seed=k), decision, promote=decision == "promote")
    models = get_storage(settings, "models")
    assert models.list("2")  # in memory, not under XRAY_HOME
    plan = run_gc(settings, dry_run=True, backbone=BACKBONE, now=NOW)
    assert [r["target"] for r in plan["removals"]] == ["v2"]
    sizes = sum(models.size(k) for k in models.list("2"))
    assert run_gc(settings, backbone=BACKBONE, now=NOW)["bytes"] == plan["bytes"] == sizes
    assert models.list("2") == [] and models.list("1") and models.list("3")
    assert _pruned(settings) == [2]
    get_storage(settings).delete_prefix("")
