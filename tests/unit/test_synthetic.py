"""Synthetic X-ray generator (xray_core.data.synthetic): determinism, layout and label signal."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from xray_core.data.images import decode_image
from xray_core.data.synthetic import SyntheticRecord, make_xray, write_dataset, write_dicom
from xray_core.settings import DEFAULT_PATIENT_REGEX


def _lungs(img: np.ndarray) -> np.ndarray:
    """Pixels of two boxes well inside where every patient's lungs lie."""
    n = img.shape[0]
    rows = slice(int(0.40 * n), int(0.60 * n))
    return np.concatenate([img[rows, int(0.20 * n): int(0.30 * n)],
                           img[rows, int(0.70 * n): int(0.80 * n)]], axis=1)


def _many(label: str, count: int = 24, size: int = 64) -> list[np.ndarray]:
    return [
        make_xray(label, size=size, rng=np.random.default_rng([1, i]),
                  patient_seed=i).astype(np.float64) / 255
        for i in range(count)
    ]


# ---- make_xray -----------------------------------------------------------------------------------


def test_make_xray_shape_dtype_and_determinism() -> None:
    a = make_xray("normal", size=48, rng=np.random.default_rng(3), patient_seed=2)
    b = make_xray("normal", size=48, rng=np.random.default_rng(3), patient_seed=2)
    assert a.shape == (48, 48) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    c = make_xray("normal", size=48, rng=np.random.default_rng(4), patient_seed=2)
    assert not np.array_equal(a, c)


def test_xray_layout_dark_background_dark_lungs_bright_mediastinum() -> None:
    img = np.mean(_many("normal"), axis=0)
    n = img.shape[0]
    corner = img[:3, :3].mean()
    mediastinum = img[int(0.4 * n): int(0.6 * n), int(0.47 * n): int(0.53 * n)].mean()
    assert corner < _lungs(img).mean() < mediastinum


def test_one_patient_looks_alike() -> None:
    def img(seed: int, patient: int) -> np.ndarray:
        return make_xray("normal", size=64, rng=np.random.default_rng(seed), patient_seed=patient) / 255.0

    same = np.abs(img(1, 5) - img(2, 5)).mean()
    other = np.mean([np.abs(img(1, 5) - img(2, p)).mean() for p in (6, 7, 8)])
    assert same < other


@pytest.mark.parametrize("label", ["pneumonia", "covid", "effusion"])
def test_findings_brighten_the_lungs(label: str) -> None:
    normal = np.mean([_lungs(i).mean() for i in _many("normal")])
    sick = np.mean([_lungs(i).mean() for i in _many(label)])
    assert sick > normal + 0.02


def test_unknown_labels_get_distinct_deterministic_patterns() -> None:
    def images(label: str, patients: range) -> np.ndarray:
        return np.stack([
            make_xray(label, size=48, rng=np.random.default_rng([7, p]), patient_seed=p).ravel() / 255.0
            for p in patients
        ])

    # Nearest centroid (learned on 10 patients) tells held-out patients of two unknown labels apart.
    a, b = images("effusion", range(10)).mean(axis=0), images("nodule", range(10)).mean(axis=0)
    test_a, test_b = images("effusion", range(10, 20)), images("nodule", range(10, 20))
    right = np.r_[
        ((test_a - a) ** 2).sum(1) < ((test_a - b) ** 2).sum(1),
        ((test_b - b) ** 2).sum(1) < ((test_b - a) ** 2).sum(1),
    ]
    assert right.mean() >= 0.85
    np.testing.assert_array_equal(images("effusion", range(2)), images("effusion", range(2)))


def test_make_xray_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_xray("normal", size=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_xray("normal", rng=np.random.default_rng(0), patient_seed=-1)


# ---- write_dataset -------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", seed=3, manifest=True)
    write_dataset(tmp_path / "b", seed=3, manifest=True)
    write_dataset(tmp_path / "c", seed=4, manifest=True)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k != "manifest.csv")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_layout_distinct_bytes_and_patient_ids(tmp_path: Path, fmt: str) -> None:
    records = write_dataset(
        tmp_path, labels=("normal", "pneumonia", "covid"), patients_per_label=3, images_per_patient=2,
        fmt=fmt, patient_offset=10,
    )
    assert len(records) == 18
    digests = {hashlib.sha256(r.path.read_bytes()).hexdigest() for r in records}
    assert len(digests) == len(records)
    ext = {"png": "png", "jpeg": "jpeg", "dicom": "dcm"}[fmt]
    label_of: dict[str, str] = {}
    for rec in records:
        assert isinstance(rec, SyntheticRecord)
        assert rec.path.parent == tmp_path / rec.label
        assert re.fullmatch(rf"person\d+_{rec.label}_\d\.{ext}", rec.path.name)
        match = re.match(DEFAULT_PATIENT_REGEX, rec.path.name)
        assert match and match.group(1) == rec.patient_id
        assert label_of.setdefault(rec.patient_id, rec.label) == rec.label  # one label per patient
    numbers = sorted(int(pid.removeprefix("person")) for pid in label_of)
    assert numbers == list(range(10, 19))
    for rec in records[:: len(records) // 3]:
        image = decode_image(rec.path.read_bytes(), min_side=32, max_pixels=10**6)
        assert (image.width, image.height, image.format) == (64, 64, fmt)
        if fmt == "dicom":
            assert image.dicom_patient_id == rec.patient_id and image.bit_depth == 12


def test_manifest_lists_every_file(tmp_path: Path) -> None:
    records = write_dataset(tmp_path, patients_per_label=2, images_per_patient=2, manifest=True)
    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "label", "patient_id"]
    assert [(r["file"], r["label"], r["patient_id"]) for r in rows] == [
        (rec.path.relative_to(tmp_path).as_posix(), rec.label, rec.patient_id) for rec in records
    ]


def test_patient_offset_keeps_new_patients_apart(tmp_path: Path) -> None:
    first = write_dataset(tmp_path / "a", patients_per_label=2)
    second = write_dataset(tmp_path / "b", patients_per_label=2, patient_offset=4)
    assert not {r.patient_id for r in first} & {r.patient_id for r in second}


def test_write_dataset_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="png, jpeg, dicom"):
        write_dataset(tmp_path, fmt="gif")


def test_write_dicom_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_dicom(tmp_path / "x.dcm", np.full((8, 8), 5000, np.uint16), patient_id="P", bits_stored=12)
    with pytest.raises(ValueError):
        write_dicom(tmp_path / "x.dcm", np.zeros((8, 8), np.float32), patient_id="P")
    with pytest.raises(ValueError):
        write_dicom(tmp_path / "x.dcm", np.zeros((8, 8), np.uint16), patient_id="P", photometric="RGB")
