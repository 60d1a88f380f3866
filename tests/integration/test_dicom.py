"""DICOM as hospitals export it (issue 17), through real ingests.

Every transfer syntax is tried on pydicom's own bundled test files, copied into a temp folder (never
committed) with Modality set to DX so the modality check lets them through; each row of docs/data.md's
transfer-syntax table is one parameter of :data:`SYNTAXES`. Also: CT and MR refused by default,
the de-identified store copy checked tag by tag, re-ingest of the original still a duplicate, and
an existing catalogue upgraded in place by migration 0002.
"""

from __future__ import annotations

import os
import shutil
import warnings
from datetime import date
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pydicom.pixels
import pytest
from badfiles import make_bad_corpus
from conftest import fetch, sha
from pydicom import uid as U
from sqlalchemy import text

from db.schema import Image, Rejection
from xray_core.data.catalogue import catalogue_summary
from xray_core.data.images import decode_stored
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray, write_dicom
from xray_core.settings import load_settings

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"

# (pydicom test file, its transfer syntax, expected outcome: "stored" or a rejection reason).
SYNTAXES = [
    ("MR_small_implicit.dcm", U.ImplicitVRLittleEndian, "stored"),
    ("MR_small.dcm", U.ExplicitVRLittleEndian, "stored"),
    ("MR_small_bigendian.dcm", U.ExplicitVRBigEndian, "stored"),
    ("image_dfl.dcm", U.DeflatedExplicitVRLittleEndian, "stored"),
    ("SC_rgb_jpeg_dcmtk.dcm", U.JPEGBaseline8Bit, "stored"),
    ("JPGExtended.dcm", U.JPEGExtended12Bit, "stored"),
    # The same film as JPGExtended.dcm with a malformed scan header (libjpeg: "misplaced marker").
    ("JPEG-lossy.dcm", U.JPEGExtended12Bit, "unreadable_dicom"),
    ("SC_rgb_jpeg_gdcm.dcm", U.JPEGLosslessSV1, "stored"),
    ("MR_small_jpeg_ls_lossless.dcm", U.JPEGLSLossless, "stored"),
    ("JPEGLSNearLossless_16.dcm", U.JPEGLSNearLossless, "stored"),
    ("MR_small_jp2klossless.dcm", U.JPEG2000Lossless, "stored"),
    ("693_J2KI.dcm", U.JPEG2000, "stored"),
    ("MR_small_RLE.dcm", U.RLELossless, "stored"),
]
# Syntaxes with an installed decoder but no bundled test file (pydicom cannot encode them either).
DECODER_ONLY = [U.JPEGLossless, U.HTJ2KLossless, U.HTJ2KLosslessRPCL, U.HTJ2K]


@pytest.fixture
def dicom_env(xray_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("XRAY_MIN_IMAGE_SIDE", "8")  # some bundled files are 10 px wide
    return xray_env


def _as_dx(name: str, dest: Path) -> bytes:
    """Copy a bundled file with Modality=DX (pixel data and transfer syntax unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some bundled files carry deliberately odd elements
        ds = pydicom.dcmread(TEST_FILES / name)
    ds.Modality = "DX"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)
    return dest.read_bytes()


def _store_bytes(settings, image: Image) -> bytes:
    return (settings.home / image.stored_path).read_bytes()


def test_every_transfer_syntax_is_stored_or_quarantined_with_its_reason(dicom_env, tmp_path: Path) -> None:
    src = tmp_path / "src"
    originals = {name: _as_dx(name, src / "normal" / name) for name, _, _ in SYNTAXES}
    settings = load_settings()
    summary = ingest_source(src, settings=settings)
    images = {img.original_name.split("/")[-1]: img for img in fetch(settings, Image)}
    rejections = {Path(r.path).name: r for r in fetch(settings, Rejection)}
    for name, syntax, outcome in SYNTAXES:
        assert pydicom.dcmread(BytesIO(originals[name])).file_meta.TransferSyntaxUID == syntax, name
        if outcome == "stored":
            assert name in images, (name, rejections.get(name) and rejections[name].detail)
            image = images[name]
            assert image.sha256 == sha(originals[name]) and image.modality == "DX"
            stored = _store_bytes(settings, image)
            assert pydicom.dcmread(BytesIO(stored)).file_meta.TransferSyntaxUID == syntax
            assert 0.0 <= decode_stored(stored).min() < decode_stored(stored).max() <= 1.0
        else:
            assert rejections[name].reason == outcome, rejections[name].detail
    assert summary.added == sum(o == "stored" for _, _, o in SYNTAXES)


@pytest.mark.parametrize("syntax", DECODER_ONLY, ids=lambda u: u.name)
def test_syntaxes_without_a_bundled_file_have_a_decoder(syntax: U.UID) -> None:
    assert pydicom.pixels.get_decoder(syntax).is_available


def test_a_syntax_without_any_decoder_names_itself_and_what_is_missing(dicom_env, tmp_path: Path) -> None:
    make_bad_corpus(tmp_path / "src")  # holds mpeg2.dcm (MPEG-2 video)
    for other in (tmp_path / "src" / "normal").iterdir():
        if other.name != "mpeg2.dcm":
            other.unlink()
    settings = load_settings()
    ingest_source(tmp_path / "src", settings=settings)
    (rej,) = fetch(settings, Rejection)
    assert rej.reason == "unsupported_format"
    assert "MPEG2" in rej.detail.replace("-", "") and "no pydicom decoder" in rej.detail


@pytest.mark.parametrize("syntax", [U.RLELossless, U.JPEGLSLossless, U.JPEG2000Lossless, U.JPEG2000],
                         ids=lambda u: u.name)
def test_synthetic_cr_in_compressed_syntaxes_is_stored(dicom_env, tmp_path: Path, syntax: U.UID) -> None:
    pixels = make_xray("normal", size=64, rng=np.random.default_rng(3)).astype(np.uint16) * 16
    path = write_dicom(tmp_path / "src" / "normal" / "c.dcm", pixels, patient_id="P1", bits_stored=12,
                       transfer_syntax=syntax)
    settings = load_settings()
    assert ingest_source(tmp_path / "src", settings=settings).added == 1
    (image,) = fetch(settings, Image)
    assert pydicom.dcmread(BytesIO(_store_bytes(settings, image))).file_meta.TransferSyntaxUID == syntax
    assert image.sha256 == sha(path.read_bytes()) and image.windowing == "percentile"


def test_ct_and_mr_are_quarantined_as_wrong_modality_by_default(dicom_env, tmp_path: Path) -> None:
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (tmp_path / "src" / "normal").mkdir(parents=True, exist_ok=True)
        shutil.copy(TEST_FILES / name, tmp_path / "src" / "normal" / name)
    pixels = make_xray("normal", size=64, rng=np.random.default_rng(4)).astype(np.uint16) * 16
    write_dicom(tmp_path / "src" / "normal" / "ct.dcm", pixels, patient_id="P2",
                bits_stored=12, modality="CT")
    settings = load_settings()
    summary = ingest_source(tmp_path / "src", settings=settings)
    assert summary.rejected_by_reason == {"wrong_modality": 3} and summary.added == 0
    details = [r.detail for r in fetch(settings, Rejection)]
    assert all("CR, DX" in d and "XRAY_ALLOWED_MODALITIES" in d for d in details)
    assert any("Modality is MR" in d for d in details) and any("Modality is CT" in d for d in details)
    for rej in fetch(settings, Rejection):  # quarantined de-identified too: the files parse
        copy = pydicom.dcmread(settings.home / rej.quarantine_path)
        assert copy.PatientIdentityRemoved == "YES" and "PatientName" not in copy


def test_require_chest_quarantines_other_body_parts(dicom_env, tmp_path: Path, monkeypatch) -> None:
    pixels = make_xray("normal", size=64, rng=np.random.default_rng(5)).astype(np.uint16) * 16
    write_dicom(tmp_path / "src" / "normal" / "abd.dcm", pixels, patient_id="P3",
                bits_stored=12, body_part="ABDOMEN")
    write_dicom(tmp_path / "src" / "normal" / "chest.dcm", pixels + 1, patient_id="P3", bits_stored=12)
    settings = load_settings()
    assert ingest_source(tmp_path / "src", settings=settings).added == 2  # recorded, not refused
    assert sorted(img.body_part for img in fetch(settings, Image)) == ["ABDOMEN", "CHEST"]
    status = catalogue_summary(settings)
    assert status["dicom_not_marked_chest"] == 1 and any("not marked CHEST" in n for n in status["notes"])

    monkeypatch.setenv("XRAY_REQUIRE_CHEST", "true")
    monkeypatch.setenv("XRAY_HOME", str(tmp_path / "home2"))
    monkeypatch.delenv("XRAY_DATABASE_URL", raising=False)
    strict = load_settings()
    summary = ingest_source(tmp_path / "src", settings=strict)
    assert summary.added == 1 and summary.rejected_by_reason == {"not_chest": 1}
    assert "ABDOMEN" in fetch(strict, Rejection)[0].detail


PHI = {
    "PatientName": "Doe^Jane",
    "PatientBirthDate": "19700101",
    "InstitutionAddress": "1 Hospital Road, Springfield",
    "InstitutionName": "St Elsewhere General",
    "ReferringPhysicianName": "House^Gregory",
    "AccessionNumber": "ACC-998877",
    "OtherPatientIDs": "MRN-5551234",
}
KEPT = {
    "PatientSex": "F", "PatientAge": "045Y", "StudyDate": "20240102", "Manufacturer": "ACME",
    "ManufacturerModelName": "DR-1", "PixelSpacing": ["0.15", "0.15"], "ImageLaterality": "B",
}


def _phi_film(path: Path, seed: int = 6) -> Path:
    pixels = make_xray("pneumonia", size=64, rng=np.random.default_rng(seed)).astype(np.uint16) * 16
    path = write_dicom(path, pixels, patient_id="MRN-0042-SECRET", bits_stored=12, modality="DX",
                       tags={**PHI, **KEPT})
    ds = pydicom.dcmread(path)
    ds.private_block(0x0011, "ACME PRIVATE", create=True).add_new(0x01, "LO", "Doe Jane private copy")
    ds.save_as(path)
    return path


def test_stored_copy_is_deidentified_and_the_original_is_still_a_duplicate(dicom_env, tmp_path: Path) -> None:
    original = _phi_film(tmp_path / "src" / "normal" / "film.dcm")
    raw = original.read_bytes()
    study_uid = str(pydicom.dcmread(original).StudyInstanceUID)
    settings = load_settings()
    assert ingest_source(tmp_path / "src", settings=settings).added == 1
    (image,) = fetch(settings, Image)
    assert image.sha256 == sha(raw)  # named by what arrived
    stored = _store_bytes(settings, image)
    ds = pydicom.dcmread(BytesIO(stored))
    for keyword in ("PatientName", "PatientBirthDate", "InstitutionAddress", "ReferringPhysicianName",
                    "AccessionNumber", "OtherPatientIDs"):
        assert keyword not in ds, keyword
    assert not any(elem.tag.is_private for elem in ds)
    assert ds.PatientID == image.patient_id and ds.PatientID.startswith("dcm-")
    assert ds.PatientIdentityRemoved == "YES" and ds.InstitutionName == image.site
    assert ds.StudyInstanceUID != study_uid and ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    for secret in ("Doe", "MRN-0042-SECRET", "St Elsewhere", "Hospital Road", "House", study_uid, "19700101"):
        assert secret.encode() not in stored, secret
    for keyword, value in KEPT.items():
        assert ds.data_element(keyword).value == (value if keyword != "PixelSpacing" else [0.15, 0.15])
    np.testing.assert_array_equal(decode_stored(stored), decode_stored(raw))  # pixels kept exactly

    # The catalogue's acquisition columns, with study and site as salted hashes.
    assert (image.sex, image.age_years, image.study_date) == ("F", 45.0, date(2024, 1, 2))
    assert (image.device, image.modality, image.body_part) == ("ACME DR-1", "DX", "CHEST")
    assert (image.view_position, image.laterality, image.pixel_spacing) == ("PA", "B", 0.15)
    assert image.site.startswith("site-") and image.study_hash.startswith("study-")
    assert image.windowing == "percentile"

    # Re-ingesting the original under another name: a duplicate; the store copy is unchanged.
    shutil.copy(original, tmp_path / "src" / "normal" / "again.dcm")
    again = ingest_source(tmp_path / "src", settings=settings)
    assert (again.duplicates, again.added, again.skipped_unchanged) == (1, 0, 1)
    assert _store_bytes(settings, image) == stored


def test_deidentification_is_deterministic(dicom_env, tmp_path: Path) -> None:
    from xray_core.data.deidentify import deidentify

    raw = _phi_film(tmp_path / "f.dcm").read_bytes()
    one = deidentify(raw, salt="s", patient_id="dcm-x", site_mode="hash")
    assert one == deidentify(raw, salt="s", patient_id="dcm-x", site_mode="hash")
    assert pydicom.dcmread(BytesIO(one)).StudyInstanceUID != pydicom.dcmread(
        BytesIO(deidentify(raw, salt="other", patient_id="dcm-x", site_mode="hash"))).StudyInstanceUID
    scrubbed = deidentify(raw, salt="s", patient_id="", site_mode="off")
    assert "InstitutionName" not in pydicom.dcmread(BytesIO(scrubbed))


def test_original_store_mode_keeps_the_bytes_and_site_by_name(dicom_env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XRAY_DICOM_STORE", "original")
    monkeypatch.setenv("XRAY_SITE_FROM_DICOM", "name")
    raw = _phi_film(tmp_path / "src" / "normal" / "film.dcm").read_bytes()
    settings = load_settings()
    ingest_source(tmp_path / "src", settings=settings)
    (image,) = fetch(settings, Image)
    assert _store_bytes(settings, image) == raw and image.site == "St Elsewhere General"


@pytest.mark.sqlite_only
def test_a_catalogue_at_revision_0001_upgrades_in_place(tmp_path: Path) -> None:
    from db.engine import make_engine, migrate, upgrade_to_head

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    migrate(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                          "VALUES (1, 'folder', '/x', 'done', '2026-01-01 00:00:00', '{}')"))
        conn.execute(text("INSERT INTO patients (patient_id, id_source, split) VALUES ('p1', "
                          "'filename', 'train')"))
        conn.execute(text("INSERT INTO images (id, sha256, stored_path, label, patient_id, view, width, "
                          "height, bit_depth, format, phash, original_name, source_id, added_at) VALUES (7, "
                          ":sha, 'store/ab/x.png', 'normal', 'p1', 'PA', 64, 64, 8, 'png', -5, 'a.png', 1, "
                          "'2026-01-01 00:00:00')"), {"sha": "ab" * 32})
    upgrade_to_head(engine)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT id, sha256, label, patient_id, view, phash, site, device, sex, "
                                "age_years, study_hash, study_date, view_position, laterality, "
                                "pixel_spacing, body_part, modality, windowing FROM images")).one()
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert tuple(row[:6]) == (7, "ab" * 32, "normal", "p1", "PA", -5)
    assert set(row[6:]) == {None}
    assert revision == "0008"
    engine.dispose()


def test_manifest_columns_supply_the_same_facts(dicom_env, tmp_path: Path) -> None:
    from PIL import Image as PILImage

    src = tmp_path / "src"
    _phi_film(src / "films" / "film.dcm")  # DICOM says sex F, 45 years, hashed site
    (src / "films").mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(make_xray("normal", size=64,
                                 rng=np.random.default_rng(8))).save(src / "films" / "a.png")
    PILImage.fromarray(make_xray("normal", size=64,
                                 rng=np.random.default_rng(9))).save(src / "films" / "b.png")
    (src / "manifest.csv").write_text(
        "file,label,site,device,sex,age_years,study_date,laterality\n"
        "films/film.dcm,normal,north,,m,61.5,,\n"
        "films/a.png,normal,south,Acme DR-2,F,30,2025-03-04,l\n"
        "films/b.png,normal,south,,X,,,\n", encoding="utf-8")
    settings = load_settings()
    summary = ingest_source(src, settings=settings, manifest=src / "manifest.csv")
    assert summary.added == 2 and summary.rejected_by_reason == {"bad_metadata": 1}
    (rej,) = fetch(settings, Rejection)
    assert "sex" in rej.detail and "M, F or O" in rej.detail
    images = {Path(i.original_name).name: i for i in fetch(settings, Image)}
    film, png = images["film.dcm"], images["a.png"]
    assert (film.site, film.sex, film.age_years, film.device) == ("north", "M", 61.5, "ACME DR-1")
    assert film.study_date == date(2024, 1, 2)  # the manifest cell was empty: the DICOM tag stays
    assert (png.site, png.device, png.sex, png.age_years, png.study_date, png.laterality) == (
        "south", "Acme DR-2", "F", 30.0, date(2025, 3, 4), "L")
    assert png.modality is None and png.windowing is None
