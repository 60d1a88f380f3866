"""Crash safety by fault injection: a real retrain in a subprocess is SIGKILLed at many moments.

Each case copies a catalogue that already has a champion (cycle 1 done), starts cycle 2 (ingest of a
new batch → embed → train → evaluate both → decide → promote) in a subprocess with
``XRAY_FAULT_KILL_AT=<point>:<n>``, and after the kill checks: SQLite integrity, exactly one champion
whose checkpoint verifies, every catalogued image in the store with the right sha256, no final-named
file half-written; then re-runs cycle 2 to completion and compares with an uninterrupted run.

The runs are children forked from one interpreter that imported the pipeline once (tests/zygote.py),
not ``python -c`` subprocesses that each spent ~3 s of CPU importing torch: still a real process that
a real SIGKILL ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from zygote import Run, Zygote

from db import dispose_engines
from xray_core.data.synthetic import write_dataset
from xray_core.io.fsutil import sha256_file
from xray_core.settings import load_settings, reset_settings

ENV = {
    "XRAY_BACKBONE_WEIGHTS": "random", "XRAY_DEVICE": "cpu", "XRAY_INPUT_SIZE": "32", "XRAY_VIEWS": "1",
    "XRAY_MIN_IMAGE_SIDE": "32", "XRAY_EPOCHS": "4", "XRAY_BOOTSTRAP_SAMPLES": "50",
    "XRAY_EMBED_BATCH_SIZE": "4", "XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0.0",
    "XRAY_FLOOR_SENSITIVITY": "0.0", "XRAY_PROMOTION_MARGIN": "1.0", "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0",
    "XRAY_PATIENT_SALT": "crash-test",
}

# (crash point, n-th hit): at least 20 distinct moments across ingest, embedding and cache writes,
# training, checkpoint writing and promotion of cycle 2.
KILL_POINTS = [
    ("ingest.store_written", 1), ("ingest.store_written", 5),
    ("fsutil.tmp_written", 1),  # first store file fsynced, not yet renamed
    ("ingest.group_before_commit", 1), ("ingest.group_committed", 1), ("ingest.before_splits", 1),
    # Cycle 2 writes 8 store files (writes 1-8), 8 feature files (9-16), head and card (17, 18).
    ("fsutil.tmp_written", 10),  # feature cache files of the new images, written but not renamed
    ("fsutil.tmp_written", 14),
    ("features.file_written", 1), ("features.file_written", 3),
    ("train.epoch", 1), ("train.epoch", 3),
    ("registry.staged", 1), ("registry.renamed_before_commit", 1), ("registry.saved", 1),
    ("registry.decision_before_commit", 1), ("registry.decision_committed", 1),
    ("fsutil.tmp_written", 17),  # checkpoint files (head, card) fsynced in staging, not yet renamed
    ("fsutil.tmp_written", 18),
    ("retrain.after_train", 1), ("retrain.after_evaluate", 1),
]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_")}
    return {**env, **ENV, "XRAY_HOME": str(home)}


# What the zygote imports once: what the run's code imports, and the libraries the pipeline imports only
# when it first needs them (the backbone, the migrations, the audit and metrics, the report's figures):
# as many seconds again of CPU in each run that gets that far.
PRELOAD = ("xray_core.pipeline.cycle", "xray_core.pipeline.recipe", "xray_core.settings",
           "torchvision.models", "torchvision.transforms.v2", "alembic.command", "alembic.runtime.migration",
           "sklearn.metrics", "sklearn.ensemble", "sklearn.linear_model", "sklearn.model_selection",
           "matplotlib.figure", "jinja2")


@pytest.fixture(scope="module")
def zygote():
    with Zygote(PRELOAD) as started:
        yield started


def _run_cycle(zygote: Zygote, home: Path, source: Path, kill_at: str | None) -> Run:
    """``run_retrain`` on ``source`` in a new process (forked from the zygote), killed at ``kill_at``."""
    env = _env(home)
    if kill_at:
        env["XRAY_FAULT_KILL_AT"] = kill_at
    code = ("from xray_core.pipeline.cycle import run_retrain; from xray_core.pipeline.recipe import "
            "RetrainRequest; from xray_core.settings import get_settings; "
            f"run_retrain(get_settings(), RetrainRequest(sources=({str(source)!r},), "
            "trigger='test')).as_dict()")
    return zygote.run(code, env, timeout=300)


def _state(home: Path) -> dict:
    """What a finished run leaves: images with labels and splits, the champion's weights and training set."""
    con = sqlite3.connect(home / "catalogue.db")
    try:
        images = sorted(con.execute(
            "SELECT i.sha256, i.label, p.split FROM images i JOIN patients p ON p.patient_id = i.patient_id"))
        champion = con.execute("SELECT checkpoint_sha256, training_set_fingerprint FROM models "
                               "WHERE status = 'champion'").fetchall()
    finally:
        con.close()
    return {"images": images, "champion": champion}


def _check_invariants(home: Path, *, had_champion: bool) -> None:
    con = sqlite3.connect(home / "catalogue.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        champions = con.execute("SELECT id, checkpoint_dir, checkpoint_sha256, card_sha256 FROM models "
                                "WHERE status = 'champion'").fetchall()
        stored = con.execute("SELECT sha256, stored_path FROM images").fetchall()
        models = con.execute("SELECT checkpoint_dir, checkpoint_sha256, card_sha256 FROM models").fetchall()
    finally:
        con.close()
    assert len(champions) == (1 if had_champion else len(champions)) and len(champions) <= 1
    for _, folder, head_sha, card_sha in champions:
        assert sha256_file(home / folder / "head.safetensors") == head_sha
        assert sha256_file(home / folder / "card.json") == card_sha
    for folder, head_sha, _card_sha in models:  # every version the catalogue names has complete files
        assert sha256_file(home / folder / "head.safetensors") == head_sha
    for sha, rel in stored:  # the store holds every ingested image, complete
        assert sha256_file(home / rel) == sha
    for path in (home / "store").rglob("*"):  # no final-named store file is partial
        if path.is_file() and not path.name.startswith("."):
            assert sha256_file(path) == path.name.split(".")[0]
    _check_feature_files(home)


def _check_feature_files(home: Path) -> None:
    """Every final-named feature file either verifies or is rejected by the cache as corrupt."""
    from safetensors import safe_open

    for path in (home / "features").rglob("*.safetensors"):
        if path.name.startswith("."):
            continue
        with safe_open(str(path), framework="pt") as fh:  # a half-written file would not parse
            assert fh.keys()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, zygote):
    root = tmp_path_factory.mktemp("crash")
    batch1 = root / "batch1"
    batch2 = root / "batch2"
    write_dataset(batch1, patients_per_label=8, images_per_patient=1, size=64, seed=1)
    write_dataset(batch2, patients_per_label=4, images_per_patient=1, size=64, seed=2, patient_offset=100)
    after_cycle1 = root / "after-cycle1"
    done = _run_cycle(zygote, after_cycle1, batch1, None)
    assert done.returncode == 0, done.output[-3000:]
    reference = root / "reference"
    shutil.copytree(after_cycle1, reference)
    done = _run_cycle(zygote, reference, batch2, None)
    assert done.returncode == 0, done.output[-3000:]
    return {"root": root, "batch2": batch2, "after_cycle1": after_cycle1, "reference": _state(reference)}


@pytest.mark.parametrize("point,nth", KILL_POINTS, ids=[f"{p}:{n}" for p, n in KILL_POINTS])
def test_sigkill_leaves_a_valid_state_and_a_rerun_completes(scenario, zygote, point, nth, tmp_path,
                                                            monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(scenario["after_cycle1"], home)
    killed = _run_cycle(zygote, home, scenario["batch2"], f"{point}:{nth}")
    assert killed.returncode == -signal.SIGKILL, (
        f"the run was not killed at {point}:{nth} (exit {killed.returncode}); "
        f"output:\n{killed.output[-2000:]}")
    _check_invariants(home, had_champion=True)

    # The re-run (no fault) completes and reaches the uninterrupted run's state.
    for key, value in _env(home).items():
        if key.startswith("XRAY_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("XRAY_FAULT_KILL_AT", raising=False)
    reset_settings()
    dispose_engines()
    from xray_core.pipeline.cycle import run_retrain
    from xray_core.pipeline.recipe import RetrainRequest

    result = run_retrain(load_settings(),
                         RetrainRequest(sources=(str(scenario["batch2"]),), trigger="test")).as_dict()
    # "skipped": the killed run had already promoted a champion trained on exactly this data.
    assert result["status"] in ("completed", "skipped")
    dispose_engines()
    _check_invariants(home, had_champion=True)
    state = _state(home)
    assert state["images"] == scenario["reference"]["images"]
    # The champion was trained on exactly the uninterrupted run's training set, and its weights are
    # byte-identical (features do not depend on how a resumed run batches the remaining images).
    assert [c[1] for c in state["champion"]] == [c[1] for c in scenario["reference"]["champion"]]
    assert [c[0] for c in state["champion"]] == [c[0] for c in scenario["reference"]["champion"]]


def test_a_sigterm_during_a_local_retrain_records_its_failure(tmp_path):
    """``xray retrain --local`` stopped by SIGTERM (a cancellation, a service stop) after training:
    exit 143, a ``failed`` audit row saying so, a failure report, and no champion."""
    home = tmp_path / "home"
    write_dataset(tmp_path / "src", patients_per_label=6, images_per_patient=1, size=64, seed=1)
    env = {**_env(home), "XRAY_FAULT_KILL_AT": "retrain.after_train:1:TERM"}
    done = subprocess.run([sys.executable, "-m", "xray_cli.main", "retrain", "--local", "--source",
                           str(tmp_path / "src")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    con = sqlite3.connect(home / "catalogue.db")
    try:
        rows = con.execute("SELECT decision, rationale, champion_after FROM promotions").fetchall()
        statuses = [r[0] for r in con.execute("SELECT status FROM models")]
    finally:
        con.close()
    assert len(rows) == 1 and rows[0][0] == "failed" and rows[0][2] is None
    assert "cancelled" in rows[0][1] and "terminated by a signal (SIGTERM)" in rows[0][1]
    assert statuses == ["rejected"]  # the trained candidate is closed, not left dangling
    report = next(home.glob("reports/*/report.md")).read_text()
    assert "Failed" in report and "SIGTERM" in report


def test_the_next_retrain_closes_the_candidate_a_killed_one_left(zygote, tmp_path):
    """SIGKILL after training leaves a candidate with no decision; the next retrain records it as
    ``failed`` ("interrupted") and closes it before doing its own work."""
    home = tmp_path / "home"
    write_dataset(tmp_path / "src", patients_per_label=6, images_per_patient=1, size=64, seed=1)
    killed = _run_cycle(zygote, home, tmp_path / "src", "retrain.after_train:1")
    assert killed.returncode == -9
    write_dataset(tmp_path / "more", patients_per_label=3, images_per_patient=1, size=64,
                  seed=2, patient_offset=50)
    done = _run_cycle(zygote, home, tmp_path / "more", None)
    assert done.returncode == 0, done.output[-3000:]
    con = sqlite3.connect(home / "catalogue.db")
    try:
        first = con.execute("SELECT decision, rationale FROM promotions WHERE to_version = 1").fetchall()
        status = dict(con.execute("SELECT id, status FROM models"))
    finally:
        con.close()
    assert first and first[0][0] == "failed"
    assert first[0][1].startswith("interrupted: the retrain that trained v1")
    assert status[1] == "rejected" and "candidate" not in status.values()
