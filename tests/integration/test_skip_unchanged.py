"""A retrain with nothing new since the champion skips instead of crowning an identical copy."""

from __future__ import annotations

from sqlalchemy import func, select

from db import session_scope
from db.schema import Model
from xray_core.data.catalogue import open_catalogue
from xray_core.data.snapshot import SplitData, load_split_data
from xray_core.data.synthetic import write_dataset
from xray_core.pipeline.cycle import run_retrain
from xray_core.pipeline.recipe import RetrainRequest
from xray_core.pipeline.steps import evaluate_step
from xray_core.pipeline.unchanged import nothing_new_since_champion, nothing_new_since_last_decision
from xray_core.settings import load_settings, reset_settings

POLICY = {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0", "XRAY_FLOOR_SENSITIVITY": "0"}


def _models(settings) -> int:
    with session_scope(open_catalogue(settings)) as s:
        return s.scalar(select(func.count()).select_from(Model))


def test_nothing_new_skips_unless_forced_or_settings_changed(xray_env, tmp_path, monkeypatch):
    for key, value in POLICY.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    settings = load_settings()
    write_dataset(tmp_path / "src", patients_per_label=8, images_per_patient=1, size=64, seed=3)
    first = run_retrain(settings, RetrainRequest(sources=(str(tmp_path / "src"),), trigger="test")).as_dict()
    assert first["status"] == "completed" and first["champion_after"] == first["version"]

    # same files, nothing new
    again = run_retrain(settings, RetrainRequest(sources=(str(tmp_path / "src"),), trigger="test")).as_dict()
    assert again["status"] == "skipped" and "nothing new since champion" in again["summary"]
    assert again["champion_after"] == first["version"] and _models(settings) == 1

    forced = run_retrain(settings, RetrainRequest(trigger="test", force=True)).as_dict()
    assert forced["status"] == "completed" and _models(settings) == 2

    # XRAY_SUBSAMPLE_FILMS decides which films the recipes are compared on: a training setting too
    data = load_split_data(settings)
    assert nothing_new_since_champion(load_settings(), data) is not None
    monkeypatch.setenv("XRAY_SUBSAMPLE_FILMS", "100")
    assert nothing_new_since_champion(load_settings(), data) is None
    monkeypatch.delenv("XRAY_SUBSAMPLE_FILMS")

    monkeypatch.setenv("XRAY_EPOCHS", "3")  # a training setting changed: not "nothing new"
    changed = run_retrain(load_settings(), RetrainRequest(trigger="test")).as_dict()
    assert changed["status"] == "completed" and _models(settings) == 3

    write_dataset(tmp_path / "more", patients_per_label=3, images_per_patient=1, size=64,
                  seed=9, patient_offset=50)
    grown = run_retrain(load_settings(),
                        RetrainRequest(sources=(str(tmp_path / "more"),), trigger="test")).as_dict()
    assert grown["status"] == "completed" and _models(settings) == 4


def test_a_challenger_not_promoted_is_not_retrained_until_something_changes(xray_env, tmp_path, monkeypatch):
    """Two triggers for one ingest (or a nightly schedule) must not train the same rejected challenger
    twice: nothing changed since v2 was kept, so the rerun skips; a decision setting that changes, or
    new films, run again."""
    for key, value in POLICY.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    write_dataset(tmp_path / "src", patients_per_label=8, images_per_patient=1, size=64, seed=3)
    first = run_retrain(load_settings(),
                        RetrainRequest(sources=(str(tmp_path / "src"),), trigger="test")).as_dict()
    assert first["status"] == "completed" and first["champion_after"] == first["version"]

    # another training setting (so not "nothing new since the champion") and a bar no challenger clears
    for key, value in {"XRAY_EPOCHS": "3", "XRAY_PROMOTION_MODE": "superiority",
                       "XRAY_PROMOTION_MARGIN": "0.9"}.items():
        monkeypatch.setenv(key, value)
    kept = run_retrain(load_settings(), RetrainRequest(trigger="test")).as_dict()
    assert kept["status"] == "completed" and kept["decision"]["decision"] == "keep"
    assert kept["champion_after"] == first["version"] and _models(load_settings()) == 2

    again = run_retrain(load_settings(), RetrainRequest(trigger="test")).as_dict()
    assert again["status"] == "skipped" and _models(load_settings()) == 2
    assert f"nothing new since v{kept['version']} was not promoted (keep," in again["summary"]

    # another test set (as when new patients land in test only), even one the kept model was re-scored
    # on since (`xray models`), was not the one the decision was made on: not "nothing new"
    data = load_split_data(load_settings())
    fewer = SplitData(data.labels, data.train, data.val, data.test[:-1])
    evaluate_step(load_settings(), kept["version"], fewer)
    assert nothing_new_since_last_decision(load_settings(), fewer) is None
    assert nothing_new_since_last_decision(load_settings(), data) is not None

    monkeypatch.setenv("XRAY_INGEST_WORKERS", "2")  # how work is spread: still nothing new
    assert run_retrain(load_settings(), RetrainRequest(trigger="test")).as_dict()["status"] == "skipped"

    monkeypatch.setenv("XRAY_PROMOTION_MARGIN", "0.5")  # a decision setting changed: the decision may too
    changed = run_retrain(load_settings(), RetrainRequest(trigger="test")).as_dict()
    assert changed["status"] == "completed" and _models(load_settings()) == 3

    forced = run_retrain(load_settings(), RetrainRequest(trigger="test", force=True)).as_dict()
    assert forced["status"] == "completed" and _models(load_settings()) == 4
