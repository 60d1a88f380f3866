"""Ingest of folders and manifests into the catalogue (xray_core.data.ingest): the data contracts.

Layout and labels, manifests, every rejection reason with its quarantine copy, image facts per format,
DICOM privacy, patient ids, the content-addressed store, idempotent re-scans, splits after ingest,
near-duplicates across splits, and (integration) a slice of the real sample.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from badfiles import BAD_CASES, CORPUS_MAX_PIXELS, GOOD_CASES, make_bad_corpus, make_good_variants
from conftest import TEST_ENV, fetch, sha, snapshot
from PIL import Image as PILImage
from sqlalchemy import func, select

from db import dispose_engines, session_scope
from db.schema import SPLITS, Image, Patient, Rejection, Source
from xray_cli.main import main
from xray_core.data.catalogue import catalogue_summary, open_catalogue
from xray_core.data.images import load_grayscale
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray, write_dataset
from xray_core.errors import ManifestError
from xray_core.io.fsutil import sha256_file
from xray_core.settings import Settings, load_settings, reset_settings

# --------------------------------------------------------------------------- helpers


def xray_array(seed: int, *, label: str = "normal", size: int = 64,
               patient_seed: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return make_xray(label, size=size, rng=rng, patient_seed=seed if patient_seed is None else patient_seed)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, seed: int, **kwargs) -> bytes:
    """A distinct synthetic X-ray PNG at ``path``; returns its bytes."""
    data = png_bytes(xray_array(seed, **kwargs))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def images_by_name(settings: Settings) -> dict[str, Image]:
    return {img.original_name: img for img in fetch(settings, Image)}


def rejections_by_name(settings: Settings) -> dict[str, list[Rejection]]:
    out: dict[str, list[Rejection]] = {}
    for rej in fetch(settings, Rejection):
        out.setdefault(Path(rej.path).name, []).append(rej)
    return out


def split_of_image(settings: Settings) -> dict[str, str | None]:
    """sha256 -> split of the image's patient."""
    with session_scope(open_catalogue(settings)) as s:
        return dict(s.execute(select(Image.sha256, Patient.split).join(Patient)).all())


def home_settings(home: Path, **env: str) -> Settings:
    """Settings for a home of one's own (module fixtures cannot use the function-scoped xray_env)."""
    return load_settings({**TEST_ENV, "XRAY_HOME": str(home), **env})


def status_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                env: dict[str, str]) -> tuple[str, dict]:
    """`xray status --json` in-process under ``env``; returns (raw stdout, parsed)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    try:
        capsys.readouterr()
        assert main(["status", "--json"]) == 0
        out = capsys.readouterr().out
    finally:
        reset_settings()
    return out, json.loads(out)


# --------------------------------------------------------------------------- folder layout


def test_folder_layout_labels_and_what_is_ignored(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = write_png(src / "PNEUMONIA" / "ward 3" / "2024" / "scan_a.png", 1, label="pneumonia")
    flat = write_png(src / "Normal" / "scan_b.png", 2)
    spaced = write_png(src / " Normal " / "scan_c.png", 3)  # trimmed and lower-cased: still "normal"
    # Hidden files and folders, OS litter: never even listed.
    write_png(src / ".hidden" / "scan_d.png", 4)
    write_png(src / "Normal" / ".cache" / "scan_e.png", 5)
    write_png(src / "__MACOSX" / "Normal" / "._scan_b.png", 6)
    (src / "Normal" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    (src / "Normal" / "Thumbs.db").write_bytes(b"not an image")
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    # Beside the label folders: metadata is skipped, anything else has no label.
    (src / "manifest.csv").write_text("file,label\n")
    (src / "README.md").write_text("# scans\n")
    (src / "notes.txt").write_text("from ward 3\n")
    stray = write_png(src / "stray.png", 7)

    summary = ingest_source(src, settings=settings)

    assert (summary.files, summary.added, summary.rejected) == (4, 3, 1)
    assert summary.rejected_by_reason == {"unknown_label": 1}
    assert summary.added_by_label == {"pneumonia": 1, "normal": 2}
    imgs = images_by_name(settings)
    assert set(imgs) == {"PNEUMONIA/ward 3/2024/scan_a.png", "Normal/scan_b.png", " Normal /scan_c.png"}
    assert imgs["PNEUMONIA/ward 3/2024/scan_a.png"].label == "pneumonia"
    assert imgs["PNEUMONIA/ward 3/2024/scan_a.png"].sha256 == sha(deep)
    assert imgs["Normal/scan_b.png"].label == "normal" and imgs["Normal/scan_b.png"].sha256 == sha(flat)
    assert imgs[" Normal /scan_c.png"].label == "normal" and imgs[" Normal /scan_c.png"].sha256 == sha(spaced)
    (rej,) = fetch(settings, Rejection)
    assert (Path(rej.path).name, rej.reason, rej.sha256) == ("stray.png", "unknown_label", None)
    assert "label folder" in rej.detail
    assert sha(stray) not in {img.sha256 for img in imgs.values()}


def test_label_names_that_are_not_safe_are_rejected(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_png(src / "pneumonia?!" / "a.png", 1)
    write_png(src / "Pneumonia Viral" / "b.png", 2)
    summary = ingest_source(src, settings=settings)
    assert summary.added_by_label == {"pneumonia_viral": 1}
    (rej,) = fetch(settings, Rejection)
    assert rej.reason == "unknown_label" and "a-z" in rej.detail
    assert (settings.home / rej.quarantine_path).read_bytes() == (src / "pneumonia?!" / "a.png").read_bytes()


# --------------------------------------------------------------------------- manifests


def test_manifest_rows_patients_views_and_bad_paths(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "batch"
    a = write_png(root / "img" / "a.png", 1)
    b = write_png(root / "img" / "nested" / "b.png", 2, label="pneumonia")
    c = write_png(root / "c.png", 3)
    outside = write_png(tmp_path / "outside.png", 4)  # exists, but beside the manifest's folder
    rows = [
        ["img/a.png", "Normal", "P-001", "PA"],
        ["img/nested/b.png", "PNEUMONIA", "P-002", ""],
        ["c.png", "normal", "P-001", "AP"],
        ["../outside.png", "normal", "P-003", ""],
        [str(tmp_path / "outside.png"), "normal", "P-004", ""],
        ["img/missing.png", "normal", "P-005", ""],
    ]
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["file", "label", "patient_id", "view"], *rows])

    summary = ingest_source(root, manifest=manifest, settings=settings)

    assert (summary.files, summary.added, summary.rejected) == (6, 3, 3)
    assert summary.rejected_by_reason == {"outside_root": 2, "missing_file": 1}
    imgs = {img.sha256: img for img in fetch(settings, Image)}
    assert set(imgs) == {sha(a), sha(b), sha(c)}
    assert sha(outside) not in imgs
    assert (imgs[sha(a)].patient_id, imgs[sha(a)].label, imgs[sha(a)].view) == ("P-001", "normal", "PA")
    assert (imgs[sha(b)].patient_id, imgs[sha(b)].label, imgs[sha(b)].view) == ("P-002", "pneumonia", None)
    assert (imgs[sha(c)].patient_id, imgs[sha(c)].view) == ("P-001", "AP")
    patients = {p.patient_id: p for p in fetch(settings, Patient)}
    assert set(patients) == {"P-001", "P-002"}
    assert {p.id_source for p in patients.values()} == {"manifest"}
    rejs = rejections_by_name(settings)
    assert [r.reason for r in rejs["outside.png"]] == ["outside_root", "outside_root"]
    assert [r.reason for r in rejs["missing.png"]] == ["missing_file"]
    for rej in [*rejs["outside.png"], *rejs["missing.png"]]:
        assert rej.detail and rej.quarantine_path is None  # a file outside is never read or copied
    assert "outside the manifest's folder" in rejs["outside.png"][0].detail
    (source,) = fetch(settings, Source)
    assert (source.kind, source.manifest_path, source.status) == ("manifest", str(manifest), "done")


def _good_rows_then(bad_tail: bytes, root: Path) -> Path:
    """A manifest whose first rows name real images, and whose last line is broken."""
    write_png(root / "normal" / "a.png", 1)
    write_png(root / "normal" / "b.png", 2)
    manifest = root / "manifest.csv"
    manifest.write_bytes(b"file,label,patient_id\nnormal/a.png,normal,P1\nnormal/b.png,normal,P2\n"
                         + bad_tail)
    return manifest


MALFORMED = {
    "missing label column": (b"", "lacks column(s) label"),
    "non-UTF-8 bytes": (b"normal/c.png,normal,P\xe9\xff3\n", "not valid UTF-8"),
    "more cells than header": (b"normal/c.png,normal,P3,PA,extra\n", "more cells than header"),
    "empty file": (b"", "lacks column(s) file, label"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_raises_and_writes_nothing(settings: Settings, tmp_path: Path, case: str) -> None:
    # A catalogue that already holds something, so "nothing written" is checked against real rows.
    before_src = tmp_path / "earlier"
    write_png(before_src / "normal" / "x.png", 10)
    (before_src / "bad.png").write_bytes(b"junk")
    ingest_source(before_src, settings=settings)
    before = snapshot(settings)
    assert before["tables"]["images"] and before["tables"]["rejections"] and before["files"]

    tail, message = MALFORMED[case]
    manifest = _good_rows_then(tail, tmp_path / "batch")
    if case == "missing label column":
        manifest.write_text("file,patient_id\nnormal/a.png,P1\nnormal/b.png,P2\n")
    elif case == "empty file":
        manifest.write_bytes(b"")

    with pytest.raises(ManifestError) as err:
        ingest_source(manifest.parent, manifest=manifest, settings=settings)

    assert message in str(err.value)
    assert str(manifest) in str(err.value)
    assert snapshot(settings) == before


# --------------------------------------------------------------------------- the bad corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """One ingest of every bad file (label normal), valid variants (label pneumonia) and two plain
    good PNGs, all in one batch; under the corpus's pixel limit."""
    base = tmp_path_factory.mktemp("corpus")
    src = base / "src"
    bad = make_bad_corpus(src, label="normal")
    good = make_good_variants(src, label="pneumonia")
    plain = {f"plain{i}.png": write_png(src / "normal" / f"person90{i}_plain.png", 90 + i) for i in range(2)}
    originals = {p.name: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    env = {**TEST_ENV, "XRAY_HOME": str(base / "home"), "XRAY_MAX_PIXELS": str(CORPUS_MAX_PIXELS)}
    settings = load_settings(env)
    summary = ingest_source(src, settings=settings)
    yield {"settings": settings, "env": env, "src": src, "bad": bad, "good": good, "plain": plain,
           "originals": originals, "summary": summary}
    dispose_engines()


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file_gets_rejection_detail_and_quarantine_copy(corpus, name: str) -> None:
    settings = corpus["settings"]
    rejs = rejections_by_name(settings)[name]
    assert len(rejs) == 1
    rej = rejs[0]
    assert rej.reason == BAD_CASES[name]
    assert len(rej.detail) > 10
    assert rej.source_id == corpus["summary"].source_id
    original = corpus["originals"][name]
    assert rej.sha256 == sha(original)
    assert rej.quarantine_path and rej.quarantine_path.startswith("quarantine/")
    copy = settings.home / rej.quarantine_path
    if name in ("nopixels.dcm", "mpeg2.dcm"):  # DICOM that parses is quarantined de-identified
        assert pydicom.dcmread(copy).PatientIdentityRemoved == "YES"
    else:
        assert copy.is_file() and copy.read_bytes() == original
    assert sha(original) not in {img.sha256 for img in fetch(settings, Image)}


def test_good_files_of_a_bad_batch_are_ingested(corpus) -> None:
    summary = corpus["summary"]
    n_good = len(corpus["good"]) + len(corpus["plain"])
    assert summary.files == len(BAD_CASES) + n_good
    assert summary.added == n_good
    assert summary.rejected == len(BAD_CASES)
    expected_reasons: dict[str, int] = {}
    for reason in BAD_CASES.values():
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert summary.rejected_by_reason == expected_reasons
    assert summary.added_by_label == {"pneumonia": len(corpus["good"]), "normal": len(corpus["plain"])}
    stored = {img.sha256 for img in fetch(corpus["settings"], Image)}
    assert {sha(data) for data in corpus["plain"].values()} <= stored


@pytest.mark.parametrize("name", sorted(GOOD_CASES))
def test_format_variant_is_catalogued_with_its_facts(corpus, name: str) -> None:
    img = images_by_name(corpus["settings"])[f"pneumonia/{name}"]
    expected = GOOD_CASES[name]
    assert (img.width, img.height, img.bit_depth, img.format) == (
        expected["width"], expected["height"], expected["bit_depth"], expected["format"])
    assert img.sha256 == sha(corpus["originals"][name])
    assert img.stored_path.endswith({"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}[img.format])


@pytest.mark.sqlite_only
def test_dicom_patient_id_is_only_stored_salted_and_hashed(corpus, monkeypatch, capsys) -> None:
    settings = corpus["settings"]
    imgs = images_by_name(settings)
    raw_ids = {"mono1.dcm": "PAT-MONO1", "mono2.dcm": "PAT-MONO2", "mono2_16bit.dcm": "PAT-16"}
    hashed = {}
    for name, raw in raw_ids.items():
        pid = imgs[f"pneumonia/{name}"].patient_id
        assert pid.startswith("dcm-") and raw not in pid
        assert pid != "dcm-" + hashlib.sha256(raw.encode()).hexdigest()[:24]  # salted, not a bare hash
        hashed[name] = pid
    assert len(set(hashed.values())) == 3
    assert {p.patient_id: p.id_source for p in fetch(settings, Patient)}[hashed["mono1.dcm"]] == "dicom"
    assert (imgs["pneumonia/mono1.dcm"].view, imgs["pneumonia/mono2.dcm"].view) == ("AP", "PA")

    # Every byte of the SQLite database (main file, WAL and shared memory), and `xray status --json`.
    out, report = status_json(monkeypatch, capsys, corpus["env"])
    db_files = list(settings.home.glob("catalogue.db*"))
    assert any(p.name == "catalogue.db" for p in db_files)
    db_bytes = b"".join(p.read_bytes() for p in db_files)
    for raw in [*raw_ids.values(), "bad-nopixels", "bad-mpeg2"]:
        assert raw.encode() not in db_bytes, f"raw PatientID {raw} found in the catalogue"
        assert raw not in out, f"raw PatientID {raw} found in `xray status --json`"
    assert report["catalogue"]["patients"]["by_id_source"]["dicom"] == 3
    assert report["settings"]["patient_salt"] == "(set)" and "test-salt" not in out


def test_a_second_run_of_the_corpus_changes_nothing(corpus) -> None:
    settings = corpus["settings"]
    before = snapshot(settings)
    again = ingest_source(corpus["src"], settings=settings)
    assert (again.added, again.rejected, again.duplicates) == (0, 0, 0)
    assert again.skipped_unchanged == corpus["summary"].files
    after = snapshot(settings)
    assert after["tables"]["images"] == before["tables"]["images"]
    assert after["tables"]["rejections"] == before["tables"]["rejections"]
    assert after["files"] == before["files"]


# --------------------------------------------------------------------------- labels


def test_unknown_label_under_xray_labels_and_reevaluated_when_labels_change(
        settings: Settings, tmp_path: Path) -> None:
    strict = settings.with_overrides(labels=("normal", "pneumonia"))
    src = tmp_path / "src"
    write_png(src / "Pneumonia" / "a.png", 1)
    covid = write_png(src / "covid" / "b.png", 2)

    first = ingest_source(src, settings=strict)
    assert (first.added, first.rejected_by_reason) == (1, {"unknown_label": 1})
    (rej,) = fetch(settings, Rejection)
    assert "XRAY_LABELS" in rej.detail and "covid" in rej.detail
    assert (settings.home / rej.quarantine_path).read_bytes() == covid

    # Unchanged settings: the file is skipped, not rejected again.
    second = ingest_source(src, settings=strict)
    assert (second.skipped_unchanged, second.rejected) == (2, 0)
    # The label is allowed now: the rejected file is looked at again, although it did not change.
    third = ingest_source(src, settings=strict.with_overrides(labels=("covid", "normal", "pneumonia")))
    assert (third.added, third.added_by_label, third.skipped_unchanged) == (1, {"covid": 1}, 1)


def test_label_conflict_in_one_batch_keeps_the_first(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = write_png(src / "normal" / "a.png", 1)
    (src / "pneumonia").mkdir()
    shutil.copy(src / "normal" / "a.png", src / "pneumonia" / "a_again.png")

    summary = ingest_source(src, settings=settings)

    assert (summary.added, summary.rejected_by_reason) == (1, {"label_conflict": 1})
    (img,) = fetch(settings, Image)
    assert (img.sha256, img.label, img.original_name) == (sha(data), "normal", "normal/a.png")
    (rej,) = fetch(settings, Rejection)
    assert (Path(rej.path).name, rej.reason, rej.sha256) == ("a_again.png", "label_conflict", sha(data))
    assert "'normal'" in rej.detail and "'pneumonia'" in rej.detail
    assert (settings.home / rej.quarantine_path).read_bytes() == data


def test_label_conflict_across_ingests_leaves_the_catalogued_image_as_it_was(
        settings: Settings, tmp_path: Path) -> None:
    first_src = tmp_path / "monday"
    data = write_png(first_src / "normal" / "person5_a.png", 1)
    ingest_source(first_src, settings=settings)
    (before,) = fetch(settings, Image)
    before_patient = fetch(settings, Patient)

    second_src = tmp_path / "tuesday"
    (second_src / "pneumonia").mkdir(parents=True)
    (second_src / "pneumonia" / "person7_b.png").write_bytes(data)
    summary = ingest_source(second_src, settings=settings)

    assert (summary.added, summary.duplicates, summary.rejected_by_reason) == (0, 0, {"label_conflict": 1})
    (after,) = fetch(settings, Image)
    cols = [c.key for c in Image.__table__.columns]
    assert [getattr(after, c) for c in cols] == [getattr(before, c) for c in cols]
    assert [(p.patient_id, p.split) for p in fetch(settings, Patient)] == [
        (p.patient_id, p.split) for p in before_patient]
    (rej,) = fetch(settings, Rejection)
    assert rej.reason == "label_conflict" and rej.source_id == summary.source_id
    assert (settings.home / rej.quarantine_path).read_bytes() == data


def test_symlink_outside_the_root_is_rejected_and_not_followed(settings: Settings, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    secret = write_png(outside / "secret.png", 1)
    write_png(outside / "nested" / "deep.png", 2)
    src = tmp_path / "src"
    kept = write_png(src / "normal" / "a.png", 3)
    (src / "normal" / "link_out.png").symlink_to(outside / "secret.png")
    (src / "normal" / "link_in.png").symlink_to(src / "normal" / "a.png")  # inside: fine, same bytes
    (src / "normal" / "linked_dir").symlink_to(outside / "nested", target_is_directory=True)

    summary = ingest_source(src, settings=settings)

    assert summary.files == 4  # the linked folder is one row, not descended
    assert (summary.added, summary.duplicates, summary.rejected_by_reason) == (1, 1, {"outside_root": 2})
    rejections = {Path(r.path).name: r for r in fetch(settings, Rejection)}
    assert set(rejections) == {"link_out.png", "linked_dir"}
    assert "outside" in rejections["link_out.png"].detail and "folder" in rejections["linked_dir"].detail
    for rej in rejections.values():
        assert rej.sha256 is None and rej.quarantine_path is None  # never read, never copied
    assert {img.sha256 for img in fetch(settings, Image)} == {sha(kept)}
    store_and_quarantine = [p.read_bytes() for p in settings.home.rglob("*") if p.is_file()
                            and ("store" in p.parts or "quarantine" in p.parts)]
    assert secret not in store_and_quarantine


# --------------------------------------------------------------------------- patient ids


def test_patient_id_from_the_file_name(settings: Settings, tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "src", patients_per_label=3, images_per_patient=2, size=48)
    summary = ingest_source(tmp_path / "src", settings=settings)
    assert (summary.added, summary.new_patients, summary.patients_without_id) == (12, 6, 0)
    imgs = images_by_name(settings)
    for rec in records:
        assert imgs[rec.path.relative_to(tmp_path / "src").as_posix()].patient_id == rec.patient_id
    assert {p.patient_id: p.id_source for p in fetch(settings, Patient)} == {
        f"person{n}": "filename" for n in range(6)}


def test_empty_patient_regex_makes_each_image_its_own_patient(xray_env, monkeypatch,
                                                              capsys, tmp_path: Path) -> None:
    monkeypatch.setenv("XRAY_PATIENT_REGEX", "")
    settings = load_settings()
    assert settings.patient_regex == ""
    write_dataset(tmp_path / "src", patients_per_label=2, images_per_patient=2, size=48)

    summary = ingest_source(tmp_path / "src", settings=settings)

    assert (summary.added, summary.new_patients, summary.patients_without_id) == (8, 8, 8)
    imgs = fetch(settings, Image)
    assert len({img.patient_id for img in imgs}) == 8
    assert all(img.patient_id == f"img-{img.sha256[:16]}" for img in imgs)
    _, report = status_json(monkeypatch, capsys, {})
    assert report["catalogue"]["patients"]["by_id_source"] == {"image": 8}
    assert any("no patient id" in note and "8 image(s)" in note for note in report["catalogue"]["notes"])
    assert report["settings"]["patient_regex"] == ""


def test_invalid_patient_regex_is_a_settings_error(settings: Settings, tmp_path: Path) -> None:
    from xray_core.errors import SettingsError

    write_png(tmp_path / "src" / "normal" / "a.png", 1)
    with pytest.raises(SettingsError, match="XRAY_PATIENT_REGEX"):
        ingest_source(tmp_path / "src", settings=settings.with_overrides(patient_regex="(person"))


# --------------------------------------------------------------------------- the store


def test_store_is_content_addressed_and_outlives_the_source(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "incoming"
    write_dataset(src, patients_per_label=2, images_per_patient=2, size=48)
    write_dataset(src, patients_per_label=1, images_per_patient=1, size=48, fmt="jpeg", patient_offset=10)
    shutil.copy(src / "normal" / "person0_normal_0.png", src / "normal" / "person0_copy.png")
    summary = ingest_source(src, settings=settings)
    assert (summary.added, summary.duplicates) == (10, 1)

    imgs = fetch(settings, Image)
    store_files = sorted(p for p in (settings.home / "store").rglob("*") if p.is_file())
    assert len(store_files) == len(imgs) == 10  # the copy is stored once
    for img in imgs:
        stored = settings.home / img.stored_path
        assert stored.parent.name == img.sha256[:2] and stored.parent.parent.name == "store"
        assert stored.stem == img.sha256
        assert sha256_file(stored) == img.sha256
    mtimes = {p: p.stat().st_mtime_ns for p in store_files}

    # The same bytes from another folder: counted as duplicates, the store is not written again.
    again = tmp_path / "again"
    shutil.copytree(src, again)
    second = ingest_source(again, settings=settings)
    assert (second.added, second.duplicates) == (0, 11)
    assert {p: p.stat().st_mtime_ns for p in store_files} == mtimes

    shutil.rmtree(src)
    shutil.rmtree(again)
    for img in imgs:
        stored = settings.home / img.stored_path
        assert sha256_file(stored) == img.sha256
        assert load_grayscale(stored).shape == (img.height, img.width)


# --------------------------------------------------------------------------- idempotence


def test_ingesting_the_same_source_twice_adds_nothing(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_dataset(src, patients_per_label=2, images_per_patient=2, size=48)
    (src / "normal" / "empty.png").write_bytes(b"")
    (src / "pneumonia" / "notes.png").write_bytes(b"not an image")
    write_png(src / "stray.png", 1)
    first = ingest_source(src, settings=settings)
    assert (first.files, first.added, first.rejected) == (11, 8, 3)
    before = snapshot(settings)

    second = ingest_source(src, settings=settings)

    assert second.as_dict() | {"source_id": 0, "seconds": 0} == {
        "source_id": 0, "source": str(src), "manifest": None, "files": 11, "added": 0, "duplicates": 0,
        "skipped_unchanged": 11, "rejected": 0, "rejected_by_reason": {}, "added_by_label": {},
        "new_patients": 0, "patients_without_id": 0,
        "split_assignments": {"train": 0, "val": 0, "test": 0}, "near_copies_linked": [], "seconds": 0,
        "quarantine": {"copies_written": 0, "bytes_written": 0, "rows_sharing_a_copy": 0, "copies_skipped": 0,
                       "skipped_because": None, "max_bytes": settings.quarantine_max_bytes},
        "attributes": {}}
    after = snapshot(settings)
    for table in ("images", "patients", "rejections"):
        assert after["tables"][table] == before["tables"][table]
    assert after["files"] == before["files"]
    assert len(after["tables"]["sources"]) == 2  # the run itself is recorded


def test_a_touched_file_is_reread_and_counted_as_duplicate(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_dataset(src, patients_per_label=2, images_per_patient=1, size=48)
    ingest_source(src, settings=settings)
    touched = src / "normal" / "person0_normal_0.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    summary = ingest_source(src, settings=settings)

    assert (summary.added, summary.duplicates, summary.skipped_unchanged, summary.rejected) == (0, 1, 3, 0)
    assert len(fetch(settings, Image)) == 4 and not fetch(settings, Rejection)
    # Seen again at the new mtime: the next run skips it.
    assert ingest_source(src, settings=settings).skipped_unchanged == 4


def test_identical_bytes_under_two_names_are_stored_once(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = write_png(src / "normal" / "a.png", 1)
    (src / "normal" / "sub").mkdir()
    (src / "normal" / "sub" / "a_copy.png").write_bytes(data)
    write_png(src / "normal" / "b.png", 2)

    summary = ingest_source(src, settings=settings)

    assert (summary.added, summary.duplicates, summary.rejected) == (2, 1, 0)
    assert sorted(img.sha256 for img in fetch(settings, Image)) == sorted(
        [sha(data), sha((src / "normal" / "b.png").read_bytes())])
    assert len(list((settings.home / "store" / sha(data)[:2]).glob(f"{sha(data)}*"))) == 1


def test_manifest_rerun_is_idempotent_and_a_missing_file_is_picked_up_once_it_appears(
        settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "batch"
    write_png(root / "a.png", 1)
    write_png(tmp_path / "outside.png", 2)
    manifest = root / "manifest.csv"
    manifest.write_text("file,label,patient_id\na.png,normal,P1\nlater.png,normal,P2\n"
                        f"../outside.png,normal,P3\n{tmp_path / 'outside.png'},normal,P4\n")
    first = ingest_source(root, manifest=manifest, settings=settings)
    assert (first.added, first.rejected_by_reason) == (1, {"missing_file": 1, "outside_root": 2})

    second = ingest_source(root, manifest=manifest, settings=settings)
    assert (second.skipped_unchanged, second.added, second.rejected) == (4, 0, 0)
    assert len(fetch(settings, Rejection)) == 3

    later = write_png(root / "later.png", 3)
    third = ingest_source(root, manifest=manifest, settings=settings)
    assert (third.added, third.skipped_unchanged, third.rejected) == (1, 3, 0)
    assert images_by_name(settings)["later.png"].sha256 == sha(later)


def test_editing_a_manifest_row_reevaluates_the_file(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "batch"
    data = write_png(root / "a.png", 1)
    manifest = root / "manifest.csv"
    manifest.write_text("file,label,patient_id\na.png,normal,P1\n")
    ingest_source(root, manifest=manifest, settings=settings)
    manifest.write_text("file,label,patient_id\na.png,pneumonia,P1\n")  # relabelled: a conflict now

    summary = ingest_source(root, manifest=manifest, settings=settings)

    assert (summary.skipped_unchanged, summary.rejected_by_reason) == (0, {"label_conflict": 1})
    (img,) = fetch(settings, Image)
    assert (img.sha256, img.label) == (sha(data), "normal")


def test_a_file_that_could_not_be_read_is_tried_again(settings: Settings,
                                                      tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    write_png(src / "normal" / "a.png", 1)
    locked = write_png(src / "normal" / "locked.png", 2)
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    with monkeypatch.context() as m:  # (chmod cannot lock out root, who may run the tests)
        m.setattr(Path, "read_bytes", read_bytes)
        first = ingest_source(src, settings=settings)
    assert (first.added, first.rejected_by_reason) == (1, {"unreadable_file": 1})
    assert "Permission denied" in fetch(settings, Rejection)[0].detail

    # Permissions fixed (chmod leaves size and mtime alone): the file is read, not skipped.
    second = ingest_source(src, settings=settings)
    assert (second.added, second.skipped_unchanged) == (1, 1)
    assert sha(locked) in {img.sha256 for img in fetch(settings, Image)}


def test_a_rejection_by_a_limit_is_reevaluated_when_the_limit_changes(
        settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_png(src / "normal" / "small.png", 1, size=40)
    strict = settings.with_overrides(min_image_side=48)
    assert ingest_source(src, settings=strict).rejected_by_reason == {"too_small": 1}
    assert ingest_source(src, settings=strict).skipped_unchanged == 1
    assert ingest_source(src, settings=settings).added == 1  # XRAY_MIN_IMAGE_SIDE back to 32


def test_bad_source_path_is_a_source_error(settings: Settings, tmp_path: Path) -> None:
    from xray_core.errors import SourceError

    (tmp_path / "file.png").write_bytes(b"x")
    for bad in (tmp_path / "nope", tmp_path / "file.png"):
        with pytest.raises(SourceError, match="not a folder"):
            ingest_source(bad, settings=settings)
    with pytest.raises(SourceError, match="does not exist"):
        ingest_source(tmp_path, manifest=tmp_path / "nope.csv", settings=settings)
    assert not (settings.home / "catalogue.db").exists() or not fetch(settings, Source)


# --------------------------------------------------------------------------- splits


def _patient_splits(settings: Settings) -> dict[str, tuple[str | None, object]]:
    return {p.patient_id: (p.split, p.assigned_at) for p in fetch(settings, Patient)}


def test_every_patient_has_one_split_and_new_images_join_it(settings: Settings, tmp_path: Path) -> None:
    write_dataset(tmp_path / "night1", patients_per_label=4, images_per_patient=1, size=48, seed=0)
    first = ingest_source(tmp_path / "night1", settings=settings)
    assert sum(first.split_assignments.values()) == 8
    splits1 = _patient_splits(settings)
    assert len(splits1) == 8 and all(split in SPLITS for split, _ in splits1.values())

    # Same patients (person0..7), new images (another seed: different bytes), plus new patients.
    write_dataset(tmp_path / "night2", patients_per_label=4, images_per_patient=2, size=48, seed=1)
    write_dataset(tmp_path / "night2", patients_per_label=2, images_per_patient=1, size=48, patient_offset=20)
    second = ingest_source(tmp_path / "night2", settings=settings)
    assert (second.added, second.new_patients) == (20, 4)
    assert sum(second.split_assignments.values()) == 4

    splits2 = _patient_splits(settings)
    for pid, (split, assigned_at) in splits1.items():
        assert splits2[pid] == (split, assigned_at)  # never reassigned
    with session_scope(open_catalogue(settings)) as s:
        per_patient = s.execute(
            select(Image.patient_id, func.count(func.distinct(Patient.split)), func.count())
            .join(Patient).group_by(Image.patient_id)).all()
        assert s.scalar(select(func.count()).select_from(Patient).where(Patient.split.is_(None))) == 0
    assert len(per_patient) == 12
    assert all(n_splits == 1 for _, n_splits, _ in per_patient)
    assert {pid: n for pid, _, n in per_patient}["person3"] == 3  # 1 from night 1, 2 from night 2


def test_split_ratios_are_about_70_15_15_per_label(settings: Settings, tmp_path: Path) -> None:
    write_dataset(tmp_path / "src", patients_per_label=60, images_per_patient=1, size=32)
    summary = ingest_source(tmp_path / "src", settings=settings)
    assert summary.added == 120
    by_label = catalogue_summary(settings)["by_label_and_split"]
    for label in ("normal", "pneumonia"):
        counts = by_label[label]
        assert counts["unassigned"] == 0
        for split, target in zip(SPLITS, settings.split_ratios):
            assert abs(counts[split] / 60 - target) <= 0.04, (label, counts)


# --------------------------------------------------------------------------- near-duplicates


def test_near_duplicates_of_different_patients_across_splits_are_reported(tmp_path: Path) -> None:
    """With the ingest-time rule off (XRAY_NEAR_COPY_DISTANCE=-1; on, such a film is quarantined, see
    test_admission.py), ``status`` still finds and lists near duplicates that straddle splits."""
    base = xray_array(1)
    altered = base.copy()
    altered[20:23, 30:33] = np.minimum(altered[20:23, 30:33].astype(int) + 1, 255).astype(np.uint8)
    original_png, altered_png = png_bytes(base), png_bytes(altered)
    assert original_png != altered_png

    # The two patients must land in different splits; which do depends on their ids' hash order, so
    # try pairs of ids until one does (deterministic: the same pair wins every run).
    for attempt in range(20):
        root = tmp_path / f"try{attempt}"
        settings = home_settings(root / "home").with_overrides(near_copy_distance=-1)
        (root / "src").mkdir(parents=True)
        (root / "src" / "a.png").write_bytes(original_png)
        (root / "src" / "b.png").write_bytes(altered_png)
        rows = [("a.png", f"pa{attempt}"), ("b.png", f"pb{attempt}")]
        for i in range(3):  # fillers of the same label, so that the stratum has val/test places
            write_png(root / "src" / f"f{i}.png", 100 + i)
            rows.append((f"f{i}.png", f"filler{i}"))
        manifest = root / "src" / "manifest.csv"
        manifest.write_text("file,label,patient_id\n" + "".join(f"{f},normal,{p}\n" for f, p in rows))
        ingest_source(root / "src", manifest=manifest, settings=settings)
        splits = split_of_image(settings)
        if splits[sha(original_png)] != splits[sha(altered_png)]:
            break
        dispose_engines()
    else:
        pytest.fail("no pair of patient ids put the two images in different splits")

    report = catalogue_summary(settings)
    near = report["near_duplicates"]
    pairs = {frozenset((p["sha256_a"], p["sha256_b"])): p for p in near["examples"]}
    pair = pairs[frozenset((sha(original_png), sha(altered_png)))]
    assert pair["split_a"] != pair["split_b"]
    assert {pair["file_a"], pair["file_b"]} == {"a.png", "b.png"}  # listed with both files and patients
    assert {pair["patient_a"], pair["patient_b"]} == {f"pa{attempt}", f"pb{attempt}"}
    assert pair["distance"] <= near["max_distance"]
    assert near["pairs_across_splits"] >= 1
    assert any("near-duplicate" in note for note in report["notes"])
    dispose_engines()


def test_near_duplicates_within_one_split_are_not_reported(settings: Settings, tmp_path: Path) -> None:
    base = xray_array(1)
    altered = base.copy()
    altered[20:23, 30:33] = np.minimum(altered[20:23, 30:33].astype(int) + 1, 255).astype(np.uint8)
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(base))
    (root / "b.png").write_bytes(png_bytes(altered))
    manifest = root / "manifest.csv"
    manifest.write_text("file,label,patient_id\na.png,normal,P1\nb.png,normal,P1\n")  # one patient
    ingest_source(root, manifest=manifest, settings=settings)
    assert catalogue_summary(settings)["near_duplicates"]["pairs_across_splits"] == 0


# --------------------------------------------------------------------------- the real sample


@pytest.mark.integration
def test_real_sample_slice_through_a_manifest(sample_dir: Path, settings: Settings, tmp_path: Path) -> None:
    with open(sample_dir / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        all_rows = list(reader)
    chosen = ([r for r in all_rows if r["label"] == "normal"][:6]
              + [r for r in all_rows if r["label"] == "pneumonia"][:6])
    assert len(chosen) == 12
    root = tmp_path / "sample"
    for row in chosen:
        (root / row["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / row["file"], root / row["file"])
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)  # extra columns (finding, width, ...) are allowed
        writer.writeheader()
        writer.writerows(chosen)

    summary = ingest_source(root, manifest=root / "manifest.csv", settings=settings)

    assert (summary.files, summary.added, summary.rejected) == (12, 12, 0)
    assert summary.added_by_label == {"normal": 6, "pneumonia": 6}
    imgs = images_by_name(settings)
    for row in chosen:
        img = imgs[row["file"]]
        assert (img.label, img.patient_id, img.sha256) == (row["label"], row["patient_id"], row["sha256"])
        assert (img.width, img.height, img.format) == (int(row["width"]), int(row["height"]), "jpeg")
    patients = {p.patient_id: p for p in fetch(settings, Patient)}
    assert set(patients) == {r["patient_id"] for r in chosen}
    assert all(p.id_source == "manifest" and p.split in SPLITS for p in patients.values())
    assert summary.new_patients == len(patients)
    table = catalogue_summary(settings)["by_label_and_split"]
    assert {label: sum(v.values()) for label, v in table.items()} == {"normal": 6, "pneumonia": 6}
    assert all(v["unassigned"] == 0 and v["train"] >= 1 for v in table.values())
