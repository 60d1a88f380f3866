"""Manifests as exported (issue 25), end to end: the real adult COVID-19 manifest beside the project
ingests as is with its own columns kept; an export with other names ingests with one ``--columns``;
``xray retrain --local --columns`` maps them too, and ``XRAY_SLICE_BY`` adds reported-only subgroup
tables to report.md and ``result.json``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import PROJECT, fetch

from db.schema import Image
from xray_cli.main import main
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import write_dataset
from xray_core.report.status import status_report
from xray_core.settings import load_settings, reset_settings

ADULT = PROJECT.parent / "shared" / "data" / "cxr-adult-covid"


@pytest.fixture(scope="module")
def adult() -> Path:
    if not (ADULT / "manifest.csv").exists():
        pytest.skip(f"real adult collection not present at {ADULT} "
                    "(../shared/data/cxr-adult-covid is absent)")
    return ADULT


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_the_real_adult_manifest_ingests_as_is_with_its_own_columns_kept(xray_env, adult: Path) -> None:
    settings = load_settings()
    rows = _rows(adult / "manifest.csv")

    summary = ingest_source(adult, manifest=adult / "manifest.csv", settings=settings)

    assert summary.added == len(rows) == 42 and summary.rejected == 0
    assert summary.attributes["columns"] == ["license", "source_url", "doi"]
    by_name = {i.original_name: i for i in fetch(settings, Image)}
    for row in rows:
        image = by_name[row["file"]]
        assert image.attributes == {k: row[k] for k in ("license", "source_url", "doi") if row[k]}
        assert image.sex == row["sex"]  # known columns stay catalogue columns, not attributes
    assert status_report(settings)["attributes"] == {"films": 42, "by_name": {"doi": 42, "license": 42,
                                                                               "source_url": 42}}


def test_a_renamed_export_with_a_source_path_and_an_original_finding_ingests_with_one_columns_flag(
        xray_env, adult: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Six real films re-exported the way a hospital system might: other names, free-text columns."""
    export = tmp_path / "export"
    rows = _rows(adult / "manifest.csv")[:6]
    export.mkdir()
    with open(export / "export.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "finding", "patientid", "Sex", "source_path", "original_finding",
                         "licence"])
        for r in rows:
            (export / r["file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(adult / r["file"], export / r["file"])
            finding = "COVID-19, Pneumonia/Viral" if r["label"] == "covid19" else "No Finding"
            writer.writerow([r["file"], r["label"], r["patient_id"], r["sex"], f"/pacs/export/{r['file']}",
                             finding, r["license"]])

    code = main(["ingest", str(export / "export.csv"), "--json", "--columns",
                 "file=filename,label=finding,patient_id=patientid"])

    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["added"] == 6 and out["rejected"] == 0
    assert out["attributes"]["columns"] == ["source_path", "original_finding", "licence"]
    images = {i.original_name: i for i in fetch(load_settings(), Image)}
    for r in rows:
        image = images[r["file"]]
        assert (image.label, image.patient_id, image.sex) == (r["label"], r["patient_id"], r["sex"])
        assert image.attributes["source_path"] == f"/pacs/export/{r['file']}"


def test_retrain_maps_columns_and_reports_subgroups(xray_env, tmp_path: Path, monkeypatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    for key, value in {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0",
                       "XRAY_FLOOR_SENSITIVITY": "0", "XRAY_SPLIT_RATIOS": "0.5,0.2,0.3",
                       "XRAY_SLICE_BY": "site,view,sex,age_band,Scanner"}.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    batch = tmp_path / "batch"
    records = write_dataset(batch, patients_per_label=10, images_per_patient=1, size=48, seed=4)
    with open(batch / "export.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "finding", "patientid", "sex", "age", "scanner"])
        for i, r in enumerate(records):
            writer.writerow([r.path.relative_to(batch), r.label, r.patient_id, "MF"[i % 2], 5 + 4 * i,
                             f"dev{i % 3}"])

    code = main(["retrain", "--local", "--manifest", str(batch / "export.csv"), "--json",
                 "--columns", "file=filename,label=finding,patient_id=patientid"])

    digest = json.loads(capsys.readouterr().out)
    assert code == 0 and digest["state"] == "Promoted", digest
    result = json.loads(next((load_settings().reports_dir).glob("*/result.json")).read_text())
    ingested = result["ingests"][0]
    assert ingested["added"] == 20 and ingested["attributes"]["columns"] == ["scanner"]
    metrics = result["challenger_eval"]["metrics"]
    assert list(metrics["slices"]) == ["site", "view"]  # the guardrail's slices, as before
    assert list(metrics["subgroups"]) == ["sex", "age_band", "scanner"]
    n_test = result["challenger_eval"]["n_images"]
    for dimension, slices in metrics["subgroups"].items():
        assert sum(s["n"] for s in slices.values()) == n_test, dimension
        for s in slices.values():
            assert "macro_auroc" in s["intervals"] or not s["auroc_judged"]
            assert s["judged"] or "per class" in s["reason"]
    report = Path(result["report_path"]).read_text()
    assert "## By sex (reported only)" in report and "## By scanner (reported only)" in report
    assert "tables by age_band (reported only)" in result["report_html_contents"]
