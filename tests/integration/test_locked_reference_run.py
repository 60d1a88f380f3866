"""The locked reference through real retrains (issue 26): when the reference is not the champion (the
first champion after a promotion, or the model ``xray lock`` named), the next run scores the reference on
its test split (task ``evaluate-reference``), adds the ``reference`` check, and writes ``reference`` and
``test_set_reuse`` to result.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

from xray_core.data.synthetic import write_dataset
from xray_core.pipeline.cycle import run_retrain
from xray_core.pipeline.recipe import RetrainRequest
from xray_core.registry.reference import lock_reference, reference_version
from xray_core.settings import load_settings, reset_settings


def test_a_locked_reference_that_is_not_the_champion_is_scored_and_checked(xray_env, tmp_path, monkeypatch):
    for key, value in {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0",
                       "XRAY_FLOOR_SENSITIVITY": "0"}.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    write_dataset(tmp_path / "a", patients_per_label=8, images_per_patient=1, size=32, seed=3)
    first = run_retrain(load_settings(), RetrainRequest(sources=(str(tmp_path / "a"),), trigger="test"))
    assert first.state == "Promoted" and reference_version(load_settings()) == 1
    write_dataset(tmp_path / "b", patients_per_label=3, images_per_patient=1, size=32, seed=9,
                  patient_offset=50)
    second = run_retrain(load_settings(), RetrainRequest(sources=(str(tmp_path / "b"),), trigger="test"))
    assert second.version == 2 and second.decision is not None
    if second.state == "Promoted":  # champion v2, the reference stays the first champion
        expected = 1
    else:  # champion v1: lock the kept v2 instead
        lock_reference(load_settings(), 2, reason="validated by hand", trigger="test", actor="tester")
        expected = 2
    write_dataset(tmp_path / "c", patients_per_label=3, images_per_patient=1, size=32, seed=11,
                  patient_offset=90)
    third = run_retrain(load_settings(), RetrainRequest(sources=(str(tmp_path / "c"),), trigger="test"))
    out = json.loads((Path(third.run_dir) / "result.json").read_text())
    ref = out["reference"]
    assert ref["version"] == expected != out["champion_eval"]["version"] and ref["same_as_champion"] is False
    assert ref["low"] is not None and ref["metric"] == "macro_auroc"
    check = next(c for c in out["decision"]["checks"] if c["name"] == "reference")
    assert check["passed"] == ref["passed"] and f"locked reference v{expected}" in check["detail"]
    assert out["test_set_reuse"]["decisions"] >= 1
    if not ref["passed"]:
        assert out["state"] != "Promoted"
    assert f"Locked reference v{expected}:" in (Path(third.run_dir) / "report.md").read_text()
