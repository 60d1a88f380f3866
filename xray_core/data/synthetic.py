"""X-ray-like synthetic images for tests and demos.

Real chest X-rays cannot ship with the tests, so these images imitate what matters to the pipeline:
a dark background, a body, two dark lung fields beside a bright mediastinum and heart, ribs, and a
label-dependent finding inside the lungs that is strong enough for a linear head on backbone
features to learn. One patient keeps one anatomy (``patient_seed``) across images, so patient-grouped
splits are meaningful; every image gets its own noise, so no two files share bytes.

Everything is deterministic: randomness comes only from ``np.random.default_rng`` generators that are
passed in or seeded locally, never from global seeds.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import JPEG2000, UID, ExplicitVRLittleEndian, generate_uid

# Stream tags mixed into seeds so that anatomy, label patterns and image noise never share draws.
_ANATOMY_STREAM = 0xA7A70
_LABEL_STREAM = 0x1ABE1
_IMAGE_STREAM = 0x13A6E

_CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # SOP class: Computed Radiography Image Storage
_FORMATS = {"png": "png", "jpeg": "jpeg", "dicom": "dcm"}  # fmt -> file extension


@dataclass(frozen=True)
class SyntheticRecord:
    """One written image: where it is, its label and the patient it belongs to."""

    path: Path
    label: str
    patient_id: str  # "person{N}", what the default patient regex extracts from the file name


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient geometry in normalised coordinates (-1..1 across the image)."""

    body_cx: float
    body_cy: float
    body_half_width: float
    body_half_height: float
    tilt: float  # radians: patients stand a little rotated, differently each
    lung_dx: float  # horizontal distance of each lung centre from the midline
    lung_cy: float
    lung_a: float  # lung half-width
    lung_b: float  # lung half-height
    left_scale: float  # the image-right lung (patient's left) is a little smaller: the heart
    mediastinum_half_width: float
    rib_spacing: float
    rib_tilt: float
    rib_phase: float


def _anatomy(patient_seed: int) -> _Anatomy:
    if patient_seed < 0:
        raise ValueError(f"patient_seed={patient_seed}: must be 0 or more")
    r = np.random.default_rng([_ANATOMY_STREAM, patient_seed])
    return _Anatomy(
        body_cx=float(r.uniform(-0.12, 0.12)),
        body_cy=float(r.uniform(-0.10, 0.10)),
        body_half_width=float(r.uniform(0.70, 0.95)),
        body_half_height=float(r.uniform(0.95, 1.25)),
        tilt=float(r.uniform(-0.10, 0.10)),
        lung_dx=float(r.uniform(0.36, 0.48)),
        lung_cy=float(r.uniform(-0.15, 0.12)),
        lung_a=float(r.uniform(0.21, 0.30)),
        lung_b=float(r.uniform(0.38, 0.60)),
        left_scale=float(r.uniform(0.80, 0.98)),
        mediastinum_half_width=float(r.uniform(0.14, 0.18)),
        rib_spacing=float(r.uniform(0.16, 0.22)),
        rib_tilt=float(r.uniform(0.25, 0.45)),
        rib_phase=float(r.uniform(0.0, 2 * np.pi)),
    )


def _soft(metric: np.ndarray, sharpness: float = 12.0) -> np.ndarray:
    """Soft inside-mask from an ellipse metric (< 1 inside): blurred edges like real anatomy."""
    return 1.0 / (1.0 + np.exp(np.clip(sharpness * (metric - 1.0), -50, 50)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: bilinear upsampling of a (cells+1)^2 grid."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    pos = np.linspace(0.0, cells, size)
    i0 = np.minimum(pos.astype(int), cells - 1)
    w = pos - i0
    rows = grid[i0] * (1 - w)[:, None] + grid[i0 + 1] * w[:, None]  # (size, cells+1)
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i0 + 1] * w[None, :]


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sigma: float) -> np.ndarray:
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


_Lung = tuple[np.ndarray, float, float, float, float]  # ellipse metric (< 1 inside), cx, cy, a, b


def _lung_metrics(x: np.ndarray, y: np.ndarray, a: _Anatomy) -> list[_Lung]:
    """For each lung: (ellipse metric, centre x, centre y, half-width, half-height)."""
    out = []
    for side, scale in ((-1.0, 1.0), (1.0, a.left_scale)):
        cx = a.body_cx + side * a.lung_dx
        la, lb = a.lung_a * scale, a.lung_b * scale
        cy = a.lung_cy + (1 - scale) * a.lung_b  # the smaller lung sits a little lower
        metric = ((x - cx) / la) ** 2 + ((y - cy) / lb) ** 2
        out.append((metric, cx, cy, la, lb))
    return out


def _finding(label: str, x: np.ndarray, y: np.ndarray, lungs: list[_Lung],
             rng: np.random.Generator) -> np.ndarray:
    """Brightness added inside the lungs for ``label``; zeros for "normal"."""
    size = x.shape[0]
    out = np.zeros_like(x)
    if label == "normal":
        return out
    if label == "pneumonia":
        # Several bright, blurred consolidations at random places in either lung.
        for _ in range(int(rng.integers(3, 6))):
            _, cx, cy, la, lb = lungs[int(rng.integers(0, 2))]
            angle, radius = rng.uniform(0, 2 * np.pi), 0.7 * np.sqrt(rng.uniform(0, 1))
            bx, by = cx + radius * la * np.cos(angle), cy + radius * lb * np.sin(angle)
            out += rng.uniform(0.45, 0.60) * _gauss(x, y, bx, by, rng.uniform(0.11, 0.17))
        return out
    if label == "covid":
        # Bilateral, peripheral, lower-zone ground-glass haze with a fine mottled texture.
        texture = 0.75 + 0.25 * _smooth_noise(rng, size, 8)
        for metric, _cx, cy, _la, lb in lungs:
            periphery = np.clip(np.sqrt(metric), 0, 1) ** 1.5
            lower = np.clip(0.55 + 0.45 * (y - cy) / lb, 0, 1)
            out += 0.45 * periphery * lower * texture
        return out
    # Any other label: a pattern derived from the label's hash, the same for every image of that
    # label: a reticular grating (orientation, frequency) confined to one zone (upper, lower, left,
    # right or both lungs), plus two or three nodules at fixed places relative to the lungs.
    digest = hashlib.sha256(label.encode("utf-8")).digest()
    lr = np.random.default_rng([_LABEL_STREAM, int.from_bytes(digest[:8], "little")])
    theta, freq = lr.uniform(0, np.pi), lr.uniform(2.5, 6.0)
    grating = 0.5 + 0.5 * np.cos(np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + rng.uniform(0, 0.3))
    zone = int(lr.integers(0, 5))
    (_, lcx, lcy, _, lb), (_, rcx, _, _, _) = lungs
    zone_weight = [
        _soft(np.maximum(0.0, (y - lcy) / (0.5 * lb)) ** 2, 6.0),  # upper zones
        _soft(np.maximum(0.0, (lcy - y) / (0.5 * lb)) ** 2, 6.0),  # lower zones
        _soft(((x - lcx) / 0.5) ** 2, 6.0),  # image-left lung
        _soft(((x - rcx) / 0.5) ** 2, 6.0),  # image-right lung
        np.ones_like(x),  # both lungs
    ][zone]
    out += lr.uniform(0.25, 0.35) * grating * zone_weight
    for _ in range(int(lr.integers(2, 4))):
        _, cx, cy, la, lb = lungs[int(lr.integers(0, 2))]
        bx, by = cx + lr.uniform(-0.5, 0.5) * la, cy + lr.uniform(-0.6, 0.6) * lb
        out += lr.uniform(0.30, 0.40) * _gauss(x, y, bx, by, lr.uniform(0.06, 0.10))
    return out


def make_xray(label: str, *, size: int = 64, rng: np.random.Generator, patient_seed: int = 0,
              signal: float = 1.0) -> np.ndarray:
    """One synthetic chest X-ray: uint8 array (size, size), 0 = black.

    ``patient_seed`` fixes the anatomy (lung shape and position, ribs), so one patient's images look
    alike; ``rng`` supplies everything that varies per image (finding placement, exposure, noise).
    ``label`` "normal" gives clear lungs; "pneumonia" bright blurred opacities; "covid" peripheral
    ground-glass haze; any other label a distinct pattern derived from a hash of the label.
    ``signal`` scales the finding's brightness (1.0: as drawn; 0: no disease signal at all), so a
    benchmark can make the labels as hard to tell apart as it needs.
    """
    if size < 8:
        raise ValueError(f"size={size}: must be at least 8 pixels")
    label = label.strip().lower()
    a = _anatomy(patient_seed)
    coords = np.linspace(-1.0, 1.0, size)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    # The patient's tilt plus a small per-image repositioning (shift and rotation).
    angle = a.tilt + rng.uniform(-0.03, 0.03)
    gx, gy = gx - rng.uniform(-0.03, 0.03), gy - rng.uniform(-0.03, 0.03)
    x = gx * np.cos(angle) - gy * np.sin(angle)
    y = gx * np.sin(angle) + gy * np.cos(angle) - a.body_cy

    body = _soft(((x - a.body_cx) / a.body_half_width) ** 2 + (y / a.body_half_height) ** 2, 10.0)
    lungs = _lung_metrics(x, y, a)
    lung_mask = np.clip(sum(_soft(m, 10.0) for m, *_ in lungs), 0.0, 1.0)

    img = 0.04 + 0.42 * body  # soft tissue over a dark background
    # Ribs: thin bright arcs, clearer inside the lungs where nothing overlays them.
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (y - a.rib_tilt * np.abs(x - a.body_cx)) / a.rib_spacing
                               + a.rib_phase)) ** 4
    lung_level = 0.18 + 0.03 * _smooth_noise(rng, size, 6) + 0.12 * ribs  # aerated lung is dark
    img = img * (1 - lung_mask) + lung_level * lung_mask
    img += 0.06 * ribs * body * (1 - lung_mask)
    # The finding goes in before the mediastinum and heart, which overlay the lungs' inner edges.
    img += signal * _finding(label, x, y, lungs, rng) * lung_mask
    # Mediastinum and heart: the brightest structures between the lungs.
    mediastinum = _soft(((x - a.body_cx) / a.mediastinum_half_width) ** 2 + ((y + 0.05) / 0.9) ** 4, 8.0)
    heart = _soft(((x - a.body_cx - 0.1) / 0.28) ** 2 + ((y - 0.32) / 0.25) ** 2, 8.0)
    img = np.maximum(img, 0.66 * np.maximum(mediastinum, heart) * body)
    # Per-image exposure and detector noise.
    img = img * rng.uniform(0.97, 1.03) + rng.uniform(-0.01, 0.01)
    img += rng.normal(0.0, 0.02, size=img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def write_dicom(
    path: Path,
    pixels_uint16: np.ndarray,
    *,
    patient_id: str,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    view: str | None = "PA",
    with_pixels: bool = True,
    bits_stored: int = 16,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    presentation_lut_shape: str | None = None,
    transfer_syntax: str | None = None,
    tags: dict[str, object] | None = None,
) -> Path:
    """Write a single-frame DICOM film (a chest CR by default); return its path.

    ``pixels_uint16``: (rows, cols) integers in [0, 2**bits_stored). ``with_pixels=False`` writes a
    header-only file (Rows/Columns kept), for testing the dicom_no_pixels rejection. UIDs are derived
    from the path and patient id, so the same call writes the same bytes.

    What hospital exports carry, for the DICOM tests: ``modality`` (CR, DX, or CT to be refused),
    ``body_part`` (BodyPartExamined), ``window`` = (centre, width), ``voi_lut`` (a VOI LUT Sequence
    table, uint16 values indexed from 0), ``presentation_lut_shape`` (e.g. INVERSE),
    ``transfer_syntax`` (a UID pydicom can encode here: RLE, JPEG-LS, JPEG 2000; default Explicit
    VR Little Endian, uncompressed) and ``tags``: any further keyword -> value (PatientName,
    InstitutionName, PatientAge, ...).
    """
    arr = np.asarray(pixels_uint16)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"write_dicom needs a 2-D integer array, got {arr.dtype} {arr.shape}")
    if not 1 <= bits_stored <= 16 or arr.min() < 0 or arr.max() >= 2**bits_stored:
        raise ValueError(f"pixel values must lie in [0, 2**{bits_stored}) for bits_stored={bits_stored}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric={photometric!r}: only MONOCHROME1 and MONOCHROME2 are supported")
    path = Path(path)
    instance_uid = generate_uid(entropy_srcs=[path.name, patient_id, photometric])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = _CR_IMAGE_STORAGE
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, "series"])
    ds.Modality = modality
    ds.PatientID = patient_id
    if view:
        ds.ViewPosition = view
    if body_part:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if voi_lut is not None:
        ds.VOILUTSequence = [_voi_lut_item(np.asarray(voi_lut))]
    if presentation_lut_shape:
        ds.PresentationLUTShape = presentation_lut_shape
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    if with_pixels:
        ds.PixelData = arr.astype("<u2").tobytes()
        if transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            # Lossy JPEG 2000 needs a compression ratio; 10:1 is a typical archive setting.
            lossy: dict[str, Any] = {"j2k_cr": [10]} if transfer_syntax == JPEG2000 else {}
            ds.compress(transfer_syntax, arr.astype(np.uint16), generate_instance_uid=False, **lossy)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _voi_lut_item(table: np.ndarray) -> Dataset:
    """One VOI LUT Sequence item: LUTDescriptor (entries, first mapped value 0, bits) and LUTData."""
    if table.ndim != 1 or len(table) < 2 or table.min() < 0 or table.max() >= 2**16:
        raise ValueError("voi_lut must be a 1-D table of at least 2 values in [0, 65536)")
    item = Dataset()
    item.LUTDescriptor = [len(table) if len(table) < 2**16 else 0, 0, 16]
    item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
    return item


def _encode(pixels: np.ndarray, fmt: str, *, path: Path, patient_id: str) -> bytes | None:
    """PNG/JPEG bytes for ``pixels``; DICOM is written straight to ``path`` (returns None)."""
    if fmt == "dicom":
        # 12-bit, the common detector depth: uint8 * 16 spans 0..4080.
        write_dicom(path, pixels.astype(np.uint16) * 16, patient_id=patient_id, bits_stored=12)
        return None
    buf = BytesIO()
    if fmt == "png":
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    else:
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_dataset(
    root: Path,
    *,
    labels: tuple[str, ...] = ("normal", "pneumonia"),
    patients_per_label: int = 4,
    images_per_patient: int = 2,
    size: int = 64,
    seed: int = 0,
    fmt: str = "png",
    manifest: bool = False,
    patient_offset: int = 0,
) -> list[SyntheticRecord]:
    """Write a labelled image folder ``root/<label>/person{N}_{label}_{k}.{png|jpeg|dcm}``.

    Patients are numbered from ``patient_offset`` (label by label) and each has one label, so the
    default patient regex extracts ``person{N}``. With ``manifest=True`` also writes
    ``root/manifest.csv`` (columns file,label,patient_id; file relative to root). The same arguments
    always write the same bytes; every image's bytes are distinct. DICOM files carry the patient id in
    PatientID.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt={fmt!r}: only {', '.join(_FORMATS)} are supported")
    if seed < 0 or patient_offset < 0:
        raise ValueError("seed and patient_offset must be 0 or more")
    root = Path(root)
    records: list[SyntheticRecord] = []
    seen: set[bytes] = set()
    for li, label in enumerate(labels):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(patients_per_label):
            n = patient_offset + li * patients_per_label + j
            patient_id = f"person{n}"
            # Anatomy depends on the dataset seed and the patient number only, not on the label.
            patient_seed = int(np.random.default_rng([_ANATOMY_STREAM, seed, n]).integers(0, 2**62))
            for k in range(images_per_patient):
                path = folder / f"{patient_id}_{label}_{k}.{_FORMATS[fmt]}"
                rng = np.random.default_rng([_IMAGE_STREAM, seed, n, k])
                while True:  # noise makes a repeat all but impossible; the loop makes it certain
                    pixels = make_xray(label, size=size, rng=rng, patient_seed=patient_seed)
                    data = _encode(pixels, fmt, path=path, patient_id=patient_id)
                    if data is None:
                        data = path.read_bytes()
                    digest = hashlib.sha256(data).digest()
                    if digest not in seen:
                        break
                seen.add(digest)
                if fmt != "dicom":
                    path.write_bytes(data)
                records.append(SyntheticRecord(path=path, label=label, patient_id=patient_id))
    if manifest:
        with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "label", "patient_id"])
            for rec in records:
                writer.writerow([rec.path.relative_to(root).as_posix(), rec.label, rec.patient_id])
    return records


__all__ = ["SyntheticRecord", "make_xray", "write_dataset", "write_dicom"]
