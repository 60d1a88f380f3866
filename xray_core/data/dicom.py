"""DICOM as hospitals export it: parse, check modality and body part, window, collect the acquisition
facts, and write a de-identified copy.

:mod:`xray_core.data.images` drives these steps for a file whose magic bytes say DICOM, in this order:
:func:`read_dataset` → :func:`image_size` (the caller checks it against its limits before any pixel
is decoded) → :func:`check_decoder` → :func:`check_acquisition` → :func:`render` → :func:`facts`. Rejections
raise :class:`~xray_core.errors.ImageRejected` with a stable reason code:

``unreadable_dicom`` · ``dicom_no_pixels`` · ``unsupported_format`` (a transfer syntax nobody here can
decode; the detail names the syntax and the package that would) · ``wrong_modality`` (Modality not
in XRAY_ALLOWED_MODALITIES) · ``not_chest`` (BodyPartExamined is not CHEST and XRAY_REQUIRE_CHEST is on)

Decoders are pydicom's own (uncompressed, big-endian, deflate, RLE) plus the pylibjpeg plugins
(libjpeg: JPEG baseline/extended/lossless/SV1 and JPEG-LS; openjpeg: JPEG 2000 and HTJ2K; rle) and
pyjpegls. Multi-frame files: the first frame is used (chest films are single-frame; a multi-frame
CT or MR is refused by its modality anyway). pydicom's global config is never changed.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass
from datetime import date
from io import BytesIO

import numpy as np
import pydicom
import pydicom.multival
import pydicom.pixels
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from xray_core.errors import ImageRejected
from xray_core.io.fsutil import printable
from xray_core.settings import setting_default

# The percentile window used when the file carries no VOI LUT and no window centre/width: robust to
# the few saturated pixels (collimator edges, burned-in text) that would squash a min-max window.
PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)
WINDOWING_VERSION = "1"  # bump when render() changes behaviour: the backbone fingerprint follows
WINDOWING_SPEC = {
    "version": WINDOWING_VERSION,
    "order": "modality-lut,voi-lut|window|percentile,invert-if-monochrome1-or-inverse",
    "percentile": list(PERCENTILE_WINDOW),
}
SITE_MODES = ("hash", "name", "off")
STORE_MODES = ("deidentified", "original")
CHEST = "CHEST"

# What pydicom's readers and pixel decoders raise on garbage (found by fuzzing, see test_images.py).
DICOM_ERRORS = (
    InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, TypeError, KeyError,
    IndexError, AttributeError, OverflowError, NotImplementedError, RuntimeError, UnicodeDecodeError,
    struct.error, zlib.error,
)

# Transfer syntaxes that no installed plugin can decode, and what would.
_NEEDS = {
    "1.2.840.10008.1.2.4.100": "no pydicom decoder (MPEG-2 video); export the film as a still image",
    "1.2.840.10008.1.2.4.101": "no pydicom decoder (MPEG-2 video); export the film as a still image",
    "1.2.840.10008.1.2.4.102": "no pydicom decoder (MPEG-4 video); export the film as a still image",
    "1.2.840.10008.1.2.4.103": "no pydicom decoder (MPEG-4 video); export the film as a still image",
    "1.2.840.10008.1.2.4.110": "a JPEG XL decoder (not yet supported by pydicom 3.0)",
}
_DEFAULT_NEED = "pylibjpeg with pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle, or pyjpegls"


@dataclass(frozen=True)
class DicomPolicy:
    """Which acquisitions ingest accepts. ``modalities`` empty = any (XRAY_ALLOWED_MODALITIES=any)."""

    modalities: tuple[str, ...] = setting_default("allowed_modalities")  # XRAY_ALLOWED_MODALITIES
    require_chest: bool = setting_default("require_chest")  # True: only BodyPartExamined CHEST


@dataclass(frozen=True)
class DicomFacts:
    """What the header says about the acquisition, as read (raw UIDs and names: hash before storing).

    Held in memory only; :func:`catalogue_fields` turns it into the catalogue's columns.
    """

    modality: str | None
    body_part: str | None
    manufacturer: str | None
    model: str | None
    institution: str | None  # raw InstitutionName: hashed unless XRAY_SITE_FROM_DICOM=name
    sex: str | None  # M | F | O
    age_years: float | None
    study_uid: str | None  # raw StudyInstanceUID: stored only as a salted hash
    study_date: date | None
    view_position: str | None
    laterality: str | None  # R | L | B | U
    pixel_spacing: float | None  # mm per pixel (row spacing; PixelSpacing, else ImagerPixelSpacing)
    windowing: str  # how render() mapped values to grey: voi_lut | window | percentile, +invert


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    """A header string, made printable and cut to ``limit`` (a hostile file may hold anything)."""
    try:
        value = ds.get(keyword)
    except DICOM_ERRORS:
        return None
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    return printable(str(value).strip())[:limit] or None


def read_dataset(data: bytes) -> Dataset:
    """Parse a Part 10 file fully (pydicom is lazy; garbage must fail here, not later)."""
    try:
        ds = pydicom.dcmread(BytesIO(data), force=False)
        tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if not tsyntax:
            raise ImageRejected(
                "unreadable_dicom",
                "the file has the DICM marker but no file meta information with a transfer syntax; "
                "it is not a readable DICOM Part 10 file",
            )
        for _ in ds.iterall():
            pass
    except DICOM_ERRORS as exc:
        raise ImageRejected("unreadable_dicom",
                            f"the DICOM data is corrupt ({type(exc).__name__}: {exc})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageRejected(
            "dicom_no_pixels",
            "the DICOM file has no pixel data (e.g. a structured report or a header-only file); "
            "only DICOM images are supported",
        )
    return ds


def image_size(ds: Dataset) -> tuple[int, int]:
    """(rows, cols) from the header, before any pixel is decoded."""
    try:
        return int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageRejected("unreadable_dicom",
                            "the DICOM image lacks valid Rows/Columns, so its size is unknown") from None


def check_acquisition(ds: Dataset, policy: DicomPolicy) -> None:
    """Refuse what is not a chest radiograph by the header's own account (CT, MR, ultrasound...)."""
    modality = (_text(ds, "Modality", 16) or "").upper()
    if policy.modalities and modality not in policy.modalities:
        raise ImageRejected(
            "wrong_modality",
            f"the DICOM Modality is {modality or '(missing)'}; only {', '.join(policy.modalities)} are "
            "accepted (XRAY_ALLOWED_MODALITIES, or 'any' to accept every modality)",
        )
    body = (_text(ds, "BodyPartExamined", 16) or "").upper()
    if policy.require_chest and body != CHEST:
        raise ImageRejected(
            "not_chest",
            f"the DICOM BodyPartExamined is {body or '(missing)'}; only CHEST is accepted while "
            "XRAY_REQUIRE_CHEST=true",
        )


def check_decoder(ds: Dataset) -> None:
    """Refuse a transfer syntax no installed plugin decodes, naming the package that would."""
    uid = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID))
    need = _NEEDS.get(str(uid), _DEFAULT_NEED)
    try:
        decoder = pydicom.pixels.get_decoder(uid)
    except NotImplementedError:
        raise ImageRejected(
            "unsupported_format",
            f"DICOM transfer syntax {uid.name} ({uid}) cannot be decoded here; it needs {need}",
        ) from None
    if not decoder.is_available:
        raise ImageRejected(
            "unsupported_format",
            f"DICOM transfer syntax {uid.name} ({uid}) needs a decoder that is not installed; install {need}",
        )


def _unit(arr: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1] over the array's own min..max; a constant array stays 0 (constant_image)."""
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def render(ds: Dataset) -> tuple[np.ndarray, str]:
    """First frame -> float64 (rows, cols) in [0, 1], 0 = black, and the windowing method used.

    Modality LUT (rescale) first; then the file's VOI LUT or window centre/width (what the
    radiographer chose for reading), else the robust percentile window. MONOCHROME1 and
    PresentationLUTShape INVERSE both mean "high values are black": inverted once, not twice (a DX
    MONOCHROME1 file must carry INVERSE, PS3.3 C.8.11.6).
    """
    check_decoder(ds)
    rows, cols = image_size(ds)
    try:
        raw = pydicom.pixels.pixel_array(ds, index=0)  # first frame only: no need to decode all
        arr = pydicom.pixels.apply_modality_lut(raw, ds)
        colour = arr.ndim == 3
        has_voi = not colour and ("VOILUTSequence" in ds or "WindowCenter" in ds)
        if has_voi:
            if np.issubdtype(arr.dtype, np.floating) and np.array_equal(arr, np.rint(arr)):
                arr = arr.astype(np.int64)  # a rescale of 1/0 gives floats; a LUT is indexed by integers
            arr = pydicom.pixels.apply_voi_lut(arr, ds, index=0)
    except DICOM_ERRORS as exc:
        raise ImageRejected(
            "unreadable_dicom", f"the DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from None
    arr = np.asarray(arr, dtype=np.float64)
    if colour:  # colour DICOM (pydicom already converted YBR to RGB): ITU-R BT.601 luminance
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2 or arr.shape != (rows, cols):
        raise ImageRejected("unreadable_dicom",
                            f"the DICOM pixel data has shape {arr.shape}, not the declared {rows}x{cols}")
    if not np.isfinite(arr).all():
        raise ImageRejected("unreadable_dicom", "the DICOM pixel data holds NaN or infinite values")
    if has_voi:
        method = "voi_lut" if "VOILUTSequence" in ds else "window"
        pixels = _unit(arr)
    else:
        method = "percentile"
        lo, hi = np.percentile(arr, PERCENTILE_WINDOW)
        pixels = np.clip((arr - lo) / (hi - lo), 0.0, 1.0) if hi > lo else _unit(arr)
    photometric = (_text(ds, "PhotometricInterpretation", 16) or "").upper()
    if photometric == "MONOCHROME1" or (_text(ds, "PresentationLUTShape", 16) or "").upper() == "INVERSE":
        pixels, method = 1.0 - pixels, method + "+invert"
    return pixels, method


def _age_years(raw: str | None) -> float | None:
    """DICOM AS ('045Y', '006M', '010W', '003D') -> years; None when absent or malformed."""
    match = re.fullmatch(r"(\d{3})([DWMY])", raw or "")
    if not match:
        return None
    per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]
    return round(int(match.group(1)) / per_year, 3)


def _date(raw: str | None) -> date | None:
    try:
        return date(int(raw[:4]), int(raw[4:6]), int(raw[6:8])) if raw and len(raw) == 8 else None
    except ValueError:
        return None


def _spacing(ds: Dataset) -> float | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            spacing = float(value[0]) if value else None
        except DICOM_ERRORS:
            spacing = None
        if spacing is not None and np.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def facts(ds: Dataset, windowing: str) -> DicomFacts:
    """Collect the acquisition facts later stages slice by (site, device, sex/age, study, view...)."""
    sex = (_text(ds, "PatientSex", 16) or "").upper()
    laterality = (_text(ds, "ImageLaterality", 16) or _text(ds, "Laterality", 16) or "").upper()
    return DicomFacts(
        modality=(_text(ds, "Modality", 16) or "").upper() or None,
        body_part=(_text(ds, "BodyPartExamined", 16) or "").upper() or None,
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        institution=_text(ds, "InstitutionName"),
        sex=sex if sex in ("M", "F", "O") else None,
        age_years=_age_years(_text(ds, "PatientAge", 16)),
        study_uid=_text(ds, "StudyInstanceUID"),
        study_date=_date(_text(ds, "StudyDate", 16)),
        view_position=(_text(ds, "ViewPosition", 16) or "").upper() or None,
        laterality=laterality if laterality in ("R", "L", "B", "U") else None,
        pixel_spacing=_spacing(ds),
        windowing=windowing,
    )


def patient_pseudonym(salt: str, patient_id: str) -> str:
    """The catalogue's id for a DICOM PatientID: ``dcm-`` + 24 hex of sha256(salt:id) (SECURITY.md)."""
    return f"dcm-{hashlib.sha256(f'{salt}:{patient_id}'.encode()).hexdigest()[:24]}"


def salted(salt: str, kind: str, value: str, n: int = 16) -> str:
    """``kind-<n hex>`` of sha256(salt:kind:value): stable per catalogue, useless without the salt."""
    return f"{kind}-{hashlib.sha256(f'{salt}:{kind}:{value}'.encode()).hexdigest()[:n]}"


def site_value(institution: str | None, *, salt: str, site_mode: str) -> str | None:
    """The site a film came from, per XRAY_SITE_FROM_DICOM: a salted hash, the name, or nothing."""
    if not institution or site_mode == "off":
        return None
    return institution if site_mode == "name" else salted(salt, "site", institution)


def catalogue_fields(f: DicomFacts, *, salt: str, site_mode: str) -> dict:
    """The images-table columns for one DICOM film (study and, by default, site as salted hashes)."""
    device = " ".join(p for p in (f.manufacturer, f.model) if p) or None
    return {
        "site": site_value(f.institution, salt=salt, site_mode=site_mode),
        "device": device[:128] if device else None,
        "sex": f.sex,
        "age_years": f.age_years,
        "study_hash": salted(salt, "study", f.study_uid) if f.study_uid else None,
        "study_date": f.study_date,
        "view_position": f.view_position,
        "laterality": f.laterality,
        "pixel_spacing": f.pixel_spacing,
        "body_part": f.body_part,
        "modality": f.modality,
        "windowing": f.windowing,
    }
