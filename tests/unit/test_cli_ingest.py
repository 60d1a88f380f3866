"""`xray ingest` and `xray status` as a user runs them: JSON output, exit codes, messages.

The CLI runs in-process (``xray_cli.main.main``) with captured stdout/stderr; settings come from the
environment set by the ``xray_env`` fixture, as they would for the console script.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import fetch

from db.schema import SPLITS, Image
from xray_cli.main import main
from xray_core.data.synthetic import write_dataset
from xray_core.settings import load_settings, reset_settings

INGEST_KEYS = {
    "source_id", "source", "manifest", "files", "added", "duplicates", "skipped_unchanged", "rejected",
    "rejected_by_reason", "added_by_label", "new_patients", "patients_without_id", "split_assignments",
    "near_copies_linked", "quarantine", "attributes",
    "seconds",
}


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # stdout holds the JSON document and nothing else


def catalogue_rows(home: Path) -> dict[str, list[tuple]]:
    """Every row of the tables an ingest writes, read with plain sqlite3."""
    with sqlite3.connect(home / "catalogue.db") as con:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall())
                for t in ("sources", "images", "patients", "rejections", "seen_files")}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """2 labels x 3 patients x 2 images, plus one file that is not an image."""
    src = tmp_path / "incoming"
    write_dataset(src, patients_per_label=3, images_per_patient=2, size=48)
    (src / "pneumonia" / "report.png").write_text("not an image")
    return src


def test_ingest_json_output(xray_env, capsys, source: Path) -> None:
    result = run_json(capsys, "ingest", source)
    assert set(result) == INGEST_KEYS
    assert (result["files"], result["added"], result["rejected"]) == (13, 12, 1)
    assert result["rejected_by_reason"] == {"not_an_image": 1}
    assert result["added_by_label"] == {"normal": 6, "pneumonia": 6}
    assert result["source"] == str(source) and result["manifest"] is None
    assert sum(result["split_assignments"].values()) == result["new_patients"] == 6

    again = run_json(capsys, "ingest", source)
    assert (again["added"], again["skipped_unchanged"], again["rejected"]) == (0, 13, 0)
    assert again["source_id"] == result["source_id"] + 1


def test_ingest_text_output(xray_env, capsys, source: Path) -> None:
    code, out, err = run(capsys, "ingest", source)
    assert code == 0, err
    assert "added 12" in out and "rejected 1" in out and "not_an_image 1" in out


def test_status_json_counts_rejections_and_settings(xray_env, capsys, source: Path) -> None:
    empty = run_json(capsys, "status")
    assert empty["catalogue"]["images"] == 0 and empty["catalogue"]["by_label_and_split"] == {}

    run_json(capsys, "ingest", source)
    report = run_json(capsys, "status")

    cat = report["catalogue"]
    assert cat["images"] == 12
    table = cat["by_label_and_split"]
    assert set(table) == {"normal", "pneumonia"}
    for counts in table.values():
        assert set(counts) == {*SPLITS, "unassigned"}
        assert sum(counts.values()) == 6 and counts["unassigned"] == 0
    assert sum(cat["patients"]["by_split"].values()) == cat["patients"]["total"] == 6
    assert cat["rejections"] == {"total": 1, "by_reason": {"not_an_image": 1}}
    settings = report["settings"]
    assert settings["home"] == xray_env["XRAY_HOME"] == report["home"]
    assert settings["min_image_side"] == 32 and settings["split_ratios"] == [0.7, 0.15, 0.15]
    assert settings["patient_salt"] == "(set)"  # the salt itself is a secret
    assert "test-salt" not in json.dumps(report)
    assert report["database_url"].startswith("sqlite:///")


def test_status_text_output(xray_env, capsys, source: Path) -> None:
    run_json(capsys, "ingest", source)
    code, out, _ = run(capsys, "status")
    assert code == 0
    assert "images 12" in out and "not_an_image 1" in out and "settings:" in out


@pytest.mark.parametrize("argv, message", [
    (["ingest", "{tmp}/no-such-folder"], "is not a folder"),
    (["ingest", "{tmp}/a-file.png"], "is not a folder"),
    (["ingest", "{tmp}", "--manifest", "{tmp}/no-such.csv"], "does not exist"),
    (["ingest", "{tmp}/no-such.csv"], "does not exist"),
])
def test_bad_source_exits_2_with_a_message(xray_env, capsys, tmp_path: Path, argv, message: str) -> None:
    (tmp_path / "a-file.png").write_bytes(b"x")
    code, out, err = run(capsys, *(a.format(tmp=tmp_path) for a in argv), "--json")
    assert code == 2
    assert out == ""
    assert err.startswith("xray ingest: ") and message in err
    assert str(tmp_path) in err


def test_usage_errors_exit_2(xray_env, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ingest"])
    assert exc.value.code == 2
    assert "path" in capsys.readouterr().err


def test_bad_settings_exit_2(xray_env, capsys, monkeypatch, source: Path) -> None:
    monkeypatch.setenv("XRAY_PATIENT_REGEX", "(unclosed")
    reset_settings()
    code, _, err = run(capsys, "ingest", source)
    assert code == 2 and "XRAY_PATIENT_REGEX" in err
    monkeypatch.setenv("XRAY_PATIENT_REGEX", "")
    monkeypatch.setenv("XRAY_SPLIT_RATIOS", "0.5,0.5,0.5")
    reset_settings()
    code, _, err = run(capsys, "ingest", source)
    assert code == 2 and "XRAY_SPLIT_RATIOS" in err


def test_manifest_as_the_path_argument(xray_env, capsys, tmp_path: Path) -> None:
    write_dataset(tmp_path / "batch", patients_per_label=2, images_per_patient=1, size=48, manifest=True)
    result = run_json(capsys, "ingest", tmp_path / "batch" / "manifest.csv")
    assert result["manifest"] == str(tmp_path / "batch" / "manifest.csv")
    assert result["added"] == 4 and result["new_patients"] == 4
    same = run_json(capsys, "ingest", tmp_path / "batch", "--manifest", tmp_path / "batch" / "manifest.csv")
    assert same["skipped_unchanged"] == 4


@pytest.mark.parametrize("content, message", [
    (b"file,patient_id\nnormal/person0_normal_0.png,P1\n", "lacks column(s) label"),
    (b"file,label\nnormal/person0_normal_0.png,normal\nnormal/person1_normal_0.png,norm\xe4l\n",
     "not valid UTF-8"),
    (b"file,label\nnormal/person0_normal_0.png,normal\nnormal/person1_normal_0.png,normal,P1\n",
     "more cells than header"),
    (b"file,label,Patient ID\nnormal/person0_normal_0.png,normal,P1\n",
     "column 'Patient ID' looks like 'patient_id': rename it or map it with "
     "--columns patient_id='Patient ID'"),
])
def test_malformed_manifest_exits_2_and_writes_nothing(xray_env, capsys, source: Path, tmp_path: Path,
                                                       content: bytes, message: str) -> None:
    run_json(capsys, "ingest", source)
    home = Path(xray_env["XRAY_HOME"])
    before = catalogue_rows(home)
    store_before = sorted((home / "store").rglob("*"))
    batch = tmp_path / "batch"
    write_dataset(batch, patients_per_label=2, images_per_patient=1, size=48, seed=7)
    (batch / "manifest.csv").write_bytes(content)

    code, out, err = run(capsys, "ingest", batch, "--manifest", batch / "manifest.csv", "--json")

    assert code == 2 and out == ""
    assert err.startswith("xray ingest: manifest ") and message in err
    assert catalogue_rows(home) == before
    assert sorted((home / "store").rglob("*")) == store_before


def test_an_export_with_its_own_names_ingests_with_one_columns_flag(xray_env, capsys, tmp_path: Path) -> None:
    """Issue 25: ``patientid``, ``finding``, ``filename`` and free-text columns, mapped with --columns."""
    batch = tmp_path / "export"
    records = write_dataset(batch, patients_per_label=2, images_per_patient=1, size=48, seed=3)
    lines = ["filename,finding,patientid,Original Finding,comment"]
    lines += [f"{r.path.relative_to(batch)},{r.label},{r.patient_id},{r.label.upper()} (chart),\"a, b\""
              for r in records]
    (batch / "export.csv").write_text("\n".join(lines) + "\n")

    code, _, err = run(capsys, "ingest", batch / "export.csv")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "'patientid' looks like 'patient_id'" in err and "lacks column(s) file, label" in err
    code, _, err = run(capsys, "ingest", batch / "export.csv", "--columns", "file=filename,lable=finding")
    assert code == 2 and err == (
        "xray ingest: --columns lable=finding: 'lable' is not a manifest column name; known names: file, "
        "label, patient_id, view, site, device, sex, age_years, age, study_date, laterality\n")

    result = run_json(capsys, "ingest", batch / "export.csv", "--columns",
                      "file=filename,label=finding,patient_id=patientid")

    assert result["added"] == 4 and result["rejected"] == 0 and result["new_patients"] == 4
    assert result["attributes"]["columns"] == ["original finding", "comment"]
    images = sorted(fetch(load_settings(), Image), key=lambda i: i.id)
    assert [(i.patient_id, i.label) for i in images] == [(r.patient_id, r.label) for r in records]
    assert images[0].attributes == {"original finding": f"{records[0].label.upper()} (chart)",
                                    "comment": "a, b"}
    status = run_json(capsys, "status")
    assert status["attributes"] == {"films": 4, "by_name": {"comment": 4, "original finding": 4}}
