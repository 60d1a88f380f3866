"""Admission at ingest: near copies of another patient's film, disallowed views, the site of each film."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from db import session_scope
from db.schema import Image, Rejection
from xray_core.data.catalogue import open_catalogue
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray, write_dataset
from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
from xray_core.settings import load_settings


def _manifest(root: Path, rows: list[dict]) -> Path:
    path = root / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rejections(settings) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with session_scope(open_catalogue(settings)) as s:
        for reason, detail in s.execute(select(Rejection.reason, Rejection.detail)):
            out.setdefault(reason, []).append(detail)
    return out


def test_reencoded_and_resized_copies_of_another_patients_film_are_quarantined(xray_env, tmp_path):
    settings = load_settings()
    first = tmp_path / "first"
    write_dataset(first, patients_per_label=6, images_per_patient=1, size=128, seed=1, manifest=True)
    ingest_source(first, manifest=first / "manifest.csv", settings=settings)
    original = first / "pneumonia" / "person6_pneumonia_0.png"
    pixels = np.asarray(PILImage.open(original))
    copies = tmp_path / "copies"
    (copies / "pneumonia").mkdir(parents=True)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="JPEG", quality=75)
    (copies / "pneumonia" / "reencoded.jpg").write_bytes(buf.getvalue())
    PILImage.fromarray(pixels).resize((96, 96), PILImage.BILINEAR).save(copies / "pneumonia" / "resized.png")
    rng = np.random.default_rng(7)  # a genuinely different synthetic patient
    PILImage.fromarray(make_xray("pneumonia", size=128, rng=rng, patient_seed=987654)).save(
        copies / "pneumonia" / "other.png")
    manifest = _manifest(copies, [{"file": f"pneumonia/{n}", "label": "pneumonia", "patient_id": f"copy-{i}"}
                                  for i, n in enumerate(("reencoded.jpg", "resized.png", "other.png"))])
    summary = ingest_source(copies, manifest=manifest, settings=settings)
    assert summary.rejected_by_reason == {"near_duplicate_other_patient": 2}, summary.rejected_by_reason
    assert summary.added == 1  # the different patient's film is stored
    details = _rejections(settings)["near_duplicate_other_patient"]
    assert all("person6_pneumonia_0.png" in d and "(patient person6)" in d for d in details)
    assert any("reencoded.jpg (patient copy-0)" in d for d in details)


def test_different_synthetic_patients_are_not_near_copies(xray_env, tmp_path):
    settings = load_settings()
    write_dataset(tmp_path / "many", patients_per_label=20, images_per_patient=1, size=64, seed=3)
    summary = ingest_source(tmp_path / "many", settings=settings)
    assert summary.added == 40 and "near_duplicate_other_patient" not in summary.rejected_by_reason


def test_views_outside_the_allowed_list_are_quarantined_and_unknown_views_kept(
        xray_env, tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_ALLOWED_VIEWS", "PA,AP")
    settings = load_settings()
    write_dataset(tmp_path / "v", patients_per_label=3, images_per_patient=1, size=64, seed=5)
    files = sorted((tmp_path / "v").rglob("*.png"))
    views = ["PA", "lateral", "", "AP", "ap_supine", "PA"]
    manifest = _manifest(tmp_path / "v",
                         [{"file": f.relative_to(tmp_path / "v").as_posix(), "label": f.parent.name,
                           "patient_id": f"v{i}", "view": v} for i, (f, v) in enumerate(zip(files, views))])
    summary = ingest_source(tmp_path / "v", manifest=manifest, settings=settings)
    assert summary.rejected_by_reason == {"view_not_allowed": 2}
    assert any("LATERAL is not in XRAY_ALLOWED_VIEWS=AP,PA" in d
               for d in _rejections(settings)["view_not_allowed"])
    with session_scope(open_catalogue(settings)) as s:
        stored = sorted((v or "") for v in s.scalars(select(Image.view)))
    assert stored == ["", "AP", "PA", "PA"]  # the film of unknown view is kept ...
    from xray_core.data.catalogue import catalogue_summary

    assert catalogue_summary(settings)["views"] == {"AP": 1, "PA": 2, "unknown": 1}  # ... and counted


def test_the_site_comes_from_the_manifest_then_the_flag_then_the_folder(xray_env, tmp_path):
    settings = load_settings()
    write_site_dataset(tmp_path / "hospital-a", SiteStyle("a-from-manifest"), patients_per_label=2, seed=1)
    ingest_source(tmp_path / "hospital-a",
                  manifest=tmp_path / "hospital-a" / "manifest.csv", settings=settings,
                  site="ignored-by-manifest")
    write_dataset(tmp_path / "hospital-b" / "2026-11-20", patients_per_label=2, images_per_patient=1, size=64,
                  seed=2, patient_offset=100)
    ingest_source(tmp_path / "hospital-b" / "2026-11-20", settings=settings)  # a dated delivery folder
    write_dataset(tmp_path / "c", patients_per_label=2, images_per_patient=1, size=64,
                  seed=3, patient_offset=200)
    ingest_source(tmp_path / "c", settings=settings, site="Site C")
    with session_scope(open_catalogue(settings)) as s:
        sites = sorted(set(s.scalars(select(Image.site))))
    assert sites == ["Site C", "a-from-manifest", "hospital-b"]
