"""Manifests as exported (issue 25): near misses of known names refused with the suggestion, ``--columns``
mappings, other columns kept per film as attributes (stored, merged, shown by ``xray status``), and
subgroup slices by attribute (``XRAY_SLICE_BY``) with intervals and "too small" reasons."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import fetch
from sqlalchemy import select

from db import session_scope
from db.schema import Image, Rejection
from xray_core.data.catalogue import Row, open_catalogue
from xray_core.data.columns import MAX_ATTRIBUTES, layout, near_miss, parse_columns
from xray_core.data.ingest import ingest_source
from xray_core.data.subgroups import age_band
from xray_core.data.synthetic import write_dataset
from xray_core.errors import ManifestError, UsageError
from xray_core.evaluate.slices import fold_rare
from xray_core.report.sites import slice_sections
from xray_core.report.status import status_report
from xray_core.report.terminal import render_ingest, render_status
from xray_core.results import Evaluation
from xray_core.settings import Settings

MANIFEST = Path("/batch/manifest.csv")


# --------------------------------------------------------------------------- the near-miss rule


@pytest.mark.parametrize("cell, looks_like", [
    ("Patient ID", "patient_id"), ("patientid", "patient_id"), ("PATIENT-ID", "patient_id"),
    ("pateint_id", "patient_id"), ("patient", "patient_id"), ("lable", "label"), ("labels", "label"),
    ("sexe", "sex"), ("views", "view"), ("Study Date", "study_date"), ("age_yrs", "age_years"),
    ("latterality", "laterality"),
])
def test_a_near_miss_names_the_known_column_it_looks_like(cell: str, looks_like: str) -> None:
    assert near_miss(cell) == looks_like


@pytest.mark.parametrize("cell", [
    "PATIENT_ID", "Sex",  # the known names themselves, in another case (always accepted)
    "size", "side", "set",  # a replaced character in a short name: other words
    "device_id", "label_id",  # a known name plus a word of its own
    "finding", "license", "licence", "source_url", "doi", "notes", "width", "sha256", "filename",
    "original_finding", "source_repo", "gender", "projection", "modality", "age_group",
])
def test_other_columns_are_not_near_misses(cell: str) -> None:
    assert near_miss(cell) is None


def test_the_refusal_is_one_line_with_the_mapping_to_type() -> None:
    with pytest.raises(ManifestError) as err:
        layout(["file", "label", "Patient ID", "licence"], MANIFEST)
    assert str(err.value) == (f"manifest {MANIFEST}: column 'Patient ID' looks like 'patient_id': rename it "
                              "or map it with --columns patient_id='Patient ID'")


def test_every_problem_of_a_header_is_named_at_once() -> None:
    with pytest.raises(ManifestError) as err:
        layout(["filename", "finding", "patientid"], MANIFEST)
    text = str(err.value)
    assert "'patientid' looks like 'patient_id'" in text and "lacks column(s) file, label" in text
    assert "--columns file=filename,label=finding" in text and "\n" not in text


def test_a_near_miss_of_a_name_the_manifest_uses_is_an_attribute() -> None:
    found = layout(["File", "label", "patient_id", "patientid", "Source  URL"], MANIFEST)
    assert found.known == {"file": "File", "label": "label", "patient_id": "patient_id"}
    assert found.attributes == {"patientid": "patientid", "source url": "Source  URL"}


# --------------------------------------------------------------------------- --columns


def test_columns_map_an_exports_names_and_the_rest_are_attributes() -> None:
    columns = parse_columns("patient_id=patientid, label=Finding,file=filename")
    found = layout(["filename", "finding", "patientid", "Original Finding", "notes"], MANIFEST, columns)
    assert found.known == {"patient_id": "patientid", "label": "finding", "file": "filename"}
    assert found.attributes == {"original finding": "Original Finding", "notes": "notes"}


@pytest.mark.parametrize("text, message", [
    ("file", "'file' is not KNOWN=COLUMN"),
    ("patientid=pid", "'patientid' is not a manifest column name; known names: file, label, patient_id"),
    ("label=a,label=b", "names label twice"),
    ("label=", "is not KNOWN=COLUMN"),
])
def test_bad_columns_are_refused_with_the_allowed_names(text: str, message: str) -> None:
    with pytest.raises(UsageError, match="^--columns") as err:
        parse_columns(text)
    assert message in str(err.value)


@pytest.mark.parametrize("columns, message", [
    ({"label": "diagnosis"}, "the manifest has no column 'diagnosis'; its columns: file, label, finding"),
    ({"patient_id": "finding", "view": "finding"}, "maps column 'finding' twice"),
    ({"label": "finding"}, "has a column 'label' and --columns maps label to 'finding'"),
])
def test_a_mapping_that_does_not_fit_the_header_is_refused(columns: dict[str, str], message: str) -> None:
    with pytest.raises(ManifestError) as err:
        layout(["file", "label", "finding"], MANIFEST, columns)
    assert message in str(err.value)


def test_attribute_columns_are_bounded() -> None:
    extra = [f"col{i}" for i in range(MAX_ATTRIBUTES + 1)]
    with pytest.raises(ManifestError, match=f"{MAX_ATTRIBUTES + 1} columns besides the known ones"):
        layout(["file", "label", *extra], MANIFEST)
    with pytest.raises(ManifestError, match="control characters"):
        layout(["file", "label", "bad\x1bname"], MANIFEST)
    with pytest.raises(ManifestError, match="at most 64"):
        layout(["file", "label", "n" * 65], MANIFEST)


# --------------------------------------------------------------------------- attributes in the catalogue


def _manifest(root: Path, header: list[str], rows: list[list[str]]) -> Path:
    path = root / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _files(root: Path, n_per_label: int = 2) -> list[str]:
    records = write_dataset(root, patients_per_label=n_per_label, images_per_patient=1, size=48, seed=5)
    return [str(r.path.relative_to(root)) for r in records]


def test_attributes_are_stored_as_exported_and_shown_by_status(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "batch"
    files = _files(root)
    manifest = _manifest(root, ["file", "label", "Licence", "source_repo", "notes"],
                         [[f, f.split("/")[0], "  CC BY 4.0 ", "ieee8023" if i < 3 else "", "x\ty"]
                          for i, f in enumerate(files)])
    summary = ingest_source(root, manifest=manifest, settings=settings)

    assert summary.added == 4 and summary.attributes == {"columns": ["licence", "source_repo", "notes"],
                                                         "conflicts": 0, "examples": []}
    stored = {i.original_name: i.attributes for i in fetch(settings, Image)}
    assert stored[files[0]] == {"licence": "CC BY 4.0", "source_repo": "ieee8023", "notes": "x\\x09y"}
    assert stored[files[3]] == {"licence": "CC BY 4.0", "notes": "x\\x09y"}  # an empty cell is absent
    assert "kept as attributes: licence, source_repo, notes" in render_ingest(summary.as_dict())
    report = status_report(settings)
    assert report["attributes"] == {"films": 4, "by_name": {"licence": 4, "notes": 4, "source_repo": 3}}
    line = "manifest attributes on 4 film(s), films per name: licence 4, notes 4, source_repo 3"
    assert line in render_status(report)


def test_a_film_ingested_again_keeps_its_stored_attributes_and_gains_new_ones(settings: Settings,
                                                                              tmp_path: Path) -> None:
    root = tmp_path / "batch"
    files = _files(root, 1)
    _manifest(root, ["file", "label", "licence"], [[f, f.split("/")[0], "CC BY 3.0"] for f in files])
    ingest_source(root, manifest=root / "manifest.csv", settings=settings)
    again = root / "again"
    again.mkdir()
    for f in files:  # the same bytes, listed by a second export with other cells
        (again / f).parent.mkdir(parents=True, exist_ok=True)
        (again / f).write_bytes((root / f).read_bytes())
    _manifest(again, ["file", "label", "licence", "doi"],
              [[f, f.split("/")[0], "CC BY 4.0", "10.1/x"] for f in files])

    summary = ingest_source(again, manifest=again / "manifest.csv", settings=settings)

    assert summary.duplicates == 2 and summary.added == 0
    assert {i.original_name: i.attributes for i in fetch(settings, Image)} == {
        f: {"licence": "CC BY 3.0", "doi": "10.1/x"} for f in files}
    assert summary.attributes["conflicts"] == 2
    assert {(e["name"], e["stored"], e["given"]) for e in summary.attributes["examples"]} == {
        ("licence", "CC BY 3.0", "CC BY 4.0")}
    assert "2 value(s) differ" in render_ingest(summary.as_dict())
    assert status_report(settings)["attributes"]["by_name"] == {"doi": 2, "licence": 2}
    # Unchanged since: skipped, nothing counted twice.
    third = ingest_source(again, manifest=again / "manifest.csv", settings=settings)
    assert third.skipped_unchanged == 2 and third.attributes["conflicts"] == 0


def test_an_attribute_value_over_the_cap_rejects_its_row_only(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "batch"
    files = _files(root, 1)
    _manifest(root, ["file", "label", "notes"],
              [[files[0], "normal", "n" * 1025], [files[1], "pneumonia", "ok"]])
    summary = ingest_source(root, manifest=root / "manifest.csv", settings=settings)
    assert summary.added == 1 and summary.rejected_by_reason == {"bad_metadata": 1}
    (rejection,) = fetch(settings, Rejection)
    assert "column 'notes' holds 1025 characters; an attribute may hold at most 1024" in rejection.detail


# --------------------------------------------------------------------------- subgroups


@pytest.mark.parametrize("years, band", [(0, "0-17"), (17.9, "0-17"), (18, "18-39"), (39.5, "18-39"),
                                         (40, "40-64"), (64.99, "40-64"), (65, "65+"), (103, "65+"),
                                         (None, None), (float("nan"), None), (-1, None), ("x", None)])
def test_age_bands(years: object, band: str | None) -> None:
    assert age_band(years) == band


def test_rare_values_share_one_slice() -> None:
    values = ["a"] * 5 + ["b"] * 4 + ["c", "d", "e"] + [None]
    assert fold_rare(values, most=3) == ["a"] * 5 + ["b"] * 4 + ["(other: 3 values)"] * 3 + [None]
    assert fold_rare(values, most=5) == values


def test_subgroups_by_sex_age_band_and_attribute_have_intervals_and_say_what_is_too_small(
        settings: Settings, tmp_path: Path) -> None:
    from xray_core.pipeline.guards import subgroup_slices

    root = tmp_path / "batch"
    files = _files(root, 6)  # 6 normal, then 6 pneumonia
    rows = [[f, f.split("/")[0], f"P{i}", "MF"[i % 2], str(10 + 9 * i), "dev-a" if i < 10 else "dev-b"]
            for i, f in enumerate(files)]
    _manifest(root, ["file", "label", "patient_id", "sex", "age", "scanner"], rows)
    ingest_source(root, manifest=root / "manifest.csv", settings=settings)
    with session_scope(open_catalogue(settings)) as s:
        images = s.execute(select(Image.id, Image.sha256, Image.label, Image.patient_id, Image.original_name)
                           .order_by(Image.id)).all()
    test_rows = [Row(i.id, i.sha256, "test", i.label, i.patient_id) for i in images]
    y = np.array([0 if r.label == "normal" else 1 for r in test_rows])
    probs = np.stack([1 - (0.2 + 0.6 * y), 0.2 + 0.6 * y], axis=1)
    tuned = settings.with_overrides(slice_by=("site", "view", "sex", "age_band", "scanner"),
                                    min_test_per_class=3)

    out = subgroup_slices(tuned, test_rows, y, probs, ["normal", "pneumonia"], 0.5)

    assert list(out) == ["sex", "age_band", "scanner"]  # site and view stay in metrics.slices
    assert {v: s["n"] for v, s in out["sex"].items()} == {"F": 6, "M": 6}
    assert out["sex"]["F"]["judged"] and out["sex"]["F"]["macro_auroc"] == 1.0
    assert out["sex"]["F"]["intervals"]["macro_auroc"]["low"] <= 1.0
    assert set(out["age_band"]) == {"0-17", "18-39", "40-64", "65+"}
    assert not out["age_band"]["0-17"]["judged"]  # aged 10, 19, 28 ...: one film under 18
    assert out["age_band"]["0-17"]["reason"] == "1 normal (< 3 per class)"
    assert {v: s["n"] for v, s in out["scanner"].items()} == {"dev-a": 10, "dev-b": 2}
    assert out["scanner"]["dev-b"]["reason"] == "2 pneumonia (< 3 per class)"
    assert subgroup_slices(settings, test_rows, y, probs, ["normal", "pneumonia"], 0.5) == {}  # default: none

    challenger = Evaluation.from_dict({"version": 2, "metrics": {"slices": {}, "subgroups": out}})
    sections = slice_sections([("challenger", challenger)])
    assert [s["title"] for s in sections] == ["By sex (reported only)", "By age_band (reported only)",
                                              "By scanner (reported only)"]
    (table,) = sections[2]["tables"]
    assert table["rows"][1][0] == "dev-b"
    assert table["rows"][1][-1] == "not judged: 2 pneumonia (< 3 per class)"


# --------------------------------------------------------------------------- migration 0006a


def test_a_0005_catalogue_upgrades_in_place_and_its_films_gain_attributes(database_url: str) -> None:
    """SQLite, and PostgreSQL in its lane: existing rows keep their ids and values, with no attributes."""
    from sqlalchemy import inspect, text
    from sqlalchemy.orm import Session

    from db.engine import make_engine, migrate

    engine = make_engine(database_url)
    migrate(engine, "0005")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                          "VALUES (1, 'manifest', '/x', 'done', '2026-01-01 00:00:00', '{}')"))
        conn.execute(text("INSERT INTO patients (patient_id, id_source, split) "
                          "VALUES ('p1', 'manifest', 'test')"))
        conn.execute(text("INSERT INTO images (id, sha256, stored_path, label, patient_id, width, height, "
                          "bit_depth, format, phash, original_name, source_id, added_at, sex) "
                          "VALUES (7, :sha, 'store/x.png', 'normal', 'p1', 64, 64, 8, 'png', -5, 'a.png', 1, "
                          "'2026-01-01 00:00:00', 'F')"),
                     {"sha": "ab" * 32})

    migrate(engine, "head")

    with Session(engine) as s:
        image = s.get(Image, 7)
        assert (image.sha256, image.sex) == ("ab" * 32, "F")
        assert (image.attributes, image.attribute_set) == (None, None)
        assert s.execute(text("SELECT count(*) FROM images WHERE attributes IS NULL")).scalar() == 1
        from xray_core.data.attributes import census, merge

        assert merge(image, (("licence", "CC BY 4.0"),)) == []
        s.commit()
        assert census(s) == {"films": 1, "by_name": {"licence": 1}}
        # the head: 0008 (sequestered split) follows 0007g (model retention), 0006b (incoming batches), 0006a
        assert s.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0008"
    migrate(engine, downgrade=True, revision="0005")
    assert "attributes" not in {c["name"] for c in inspect(engine).get_columns("images")}
    migrate(engine, "head")
    with Session(engine) as s:
        assert s.get(Image, 7).attributes is None  # downgrading drops the column and what it held
    engine.dispose()
