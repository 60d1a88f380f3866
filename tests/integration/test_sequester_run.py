"""The sequestered test set through real retrains (issue 26): the sequestered films are in no run's
split.json, so no decision's test set (nor its fingerprint) includes them; ``xray audit`` then scores the
champion and the locked reference on them, records the audit and writes no ``evaluations`` row."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import func, select

from db import session_scope
from db.schema import Evaluation, SequesterAudit
from xray_cli.main import main
from xray_core.data.catalogue import Row, open_catalogue
from xray_core.data.snapshot import fingerprint_test_set
from xray_core.data.synthetic import write_dataset
from xray_core.pipeline.cycle import run_retrain
from xray_core.pipeline.recipe import RetrainRequest
from xray_core.pipeline.sequester import sequestered_rows
from xray_core.registry.reference import lock_reference
from xray_core.settings import load_settings, reset_settings


def _routine(run_dir: str) -> tuple[set[str], list[Row]]:
    split = json.loads((Path(run_dir) / "split.json").read_text())
    shas = {r[1] for key in ("train", "val", "test") for r in split[key]}
    return shas, [Row._make(r) for r in split["test"]]


def test_sequestered_films_never_enter_a_decision_and_the_audit_scores_them(xray_env, tmp_path, monkeypatch,
                                                                             capsys):
    for key, value in {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0",
                       "XRAY_FLOOR_SENSITIVITY": "0", "XRAY_SEQUESTER_FRACTION": "0.25"}.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    write_dataset(tmp_path / "a", patients_per_label=12, images_per_patient=1, size=32, seed=3)
    first = run_retrain(load_settings(), RetrainRequest(sources=(str(tmp_path / "a"),), trigger="test"))
    hidden = {r.sha256 for r in sequestered_rows(load_settings())}
    assert len(hidden) == 6  # a quarter of each label's 12 patients (one site)
    write_dataset(tmp_path / "b", patients_per_label=4, images_per_patient=1, size=32, seed=9,
                  patient_offset=50)
    second = run_retrain(load_settings(), RetrainRequest(sources=(str(tmp_path / "b"),), trigger="test"))
    hidden = {r.sha256 for r in sequestered_rows(load_settings())}
    assert len(hidden) == 8  # the 16th patient of each label too

    for run in (first, second):
        routine, test_rows = _routine(run.run_dir)
        assert routine and not routine & hidden
        out = json.loads((Path(run.run_dir) / "result.json").read_text())
        assert out["challenger_eval"]["test_set_fingerprint"] == fingerprint_test_set(test_rows)
        assert not set(out["challenger_eval"]["shas"]) & hidden

    settings = load_settings()
    if second.state != "Promoted":  # champion v1 = the first champion = the reference: lock v2 instead
        lock_reference(settings, 2, reason="validated by hand", trigger="test", actor="tester")
    with session_scope(open_catalogue(settings)) as s:
        evaluations = s.scalar(select(func.count()).select_from(Evaluation))
    assert main(["audit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {out["champion"], out["reference"]} == {1, 2}
    assert out["status"] in ("ok", "degraded", "inconclusive") and out["n_images"] == 8
    assert out["champion_metrics"]["version"] == out["champion"]
    assert out["reference_metrics"]["version"] == out["reference"]
    with session_scope(open_catalogue(settings)) as s:
        (row,) = s.scalars(select(SequesterAudit)).all()
        assert (row.id, row.champion, row.reference, row.n_images) == (out["id"], out["champion"],
                                                                         out["reference"], 8)
        assert row.degraded is (out["status"] == "degraded") and row.trigger == "cli"
        assert s.scalar(select(func.count()).select_from(Evaluation)) == evaluations  # none written
