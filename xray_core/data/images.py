"""Decode one X-ray file (PNG, JPEG or DICOM) into a checked grayscale array.

Every file the system ingests passes :func:`decode_image`; a file it cannot use raises
:class:`~xray_core.errors.ImageRejected` with a stable ``reason`` code (stored in the rejections table)
and a ``detail`` sentence saying what was found and what is allowed:

``empty_file`` · ``not_an_image`` · ``unsupported_format`` · ``truncated`` · ``decompression_bomb`` ·
``too_small`` · ``constant_image`` · ``blank_image`` · ``unreadable_dicom`` · ``dicom_no_pixels`` ·
``wrong_modality`` · ``not_chest`` (the DICOM steps and their reasons live in :mod:`xray_core.data.dicom`)

The output is one convention for every format (torchxrayvision's single checked normalisation):
float32, shape (H, W), 0 = black, 1 = white, EXIF orientation applied; DICOM windowed (VOI LUT,
window centre/width or a percentile window) with MONOCHROME1 / INVERSE inverted. A JPEG above
:data:`REDUCED_DECODE_PIXELS` is decoded reduced (``DecodedImage.scale``), to bound memory. Global
PIL state (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``) and pydicom's config are never changed:
other code in the process may rely on them.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from xray_core.data import dicom
from xray_core.data.dicom import DicomFacts, DicomPolicy
from xray_core.data.plausibility import check_blank, check_jpeg_fill, check_png_rows
from xray_core.errors import ImageRejected
from xray_core.io.fsutil import printable
from xray_core.settings import setting_default

SUPPORTED_FORMATS = ("png", "jpeg", "dicom")
_ALLOWED = "only PNG, JPEG and DICOM (.dcm) X-rays are supported"

# Same bomb limit as the settings' default, so a stored original that ingest accepted always reloads.
DEFAULT_MAX_PIXELS: int = setting_default("max_pixels")

# ITU-R BT.601 luma, the weights PIL's own RGB -> L conversion uses, but kept in float.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_BAND_PIXELS = 1 << 20  # pixels leave PIL in bands of about 1 M (12 MB as float32 RGB)

# A JPEG declaring more pixels than this is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling via
# Image.draft), whichever first fits: decoding memory stays near that of a 25 MP film. Chest films are
# under 20 MP, so every ordinary film is decoded at full size, to exactly the pixels it always had.
REDUCED_DECODE_PIXELS: int = 25_000_000

_EXIF_ORIENTATION = 0x0112
_PNG_TEXT_LIMIT = PngImagePlugin.MAX_TEXT_CHUNK  # read, never changed (global PIL state)

# What a corrupt or cut-off PNG/JPEG raises inside PIL's decoders (PIL reports broken chunks as
# SyntaxError, short data as OSError, bad zlib streams as zlib.error, short headers as struct.error).
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class DecodedImage:
    """One decoded, validated image. ``pixels`` is what every later stage sees."""

    pixels: np.ndarray  # float32 (H, W) in [0, 1], 0 = black; MONOCHROME1 inverted, EXIF applied
    width: int  # pixels, after EXIF orientation
    height: int
    bit_depth: int  # 8 or 16 for PNG/JPEG; DICOM BitsStored (e.g. 12)
    format: str  # "png" | "jpeg" | "dicom"
    dicom_patient_id: str | None  # raw DICOM PatientID: the caller hashes it; never log or store it
    view: str | None  # DICOM ViewPosition, e.g. "PA"; None for PNG/JPEG or when absent
    dicom: DicomFacts | None = None  # acquisition facts (raw: hash before storing); None for PNG/JPEG
    scale: int = 1  # 1, or 2/4/8 for a JPEG above REDUCED_DECODE_PIXELS: pixels is width/scale wide


def sniff_format(data: bytes) -> str | None:
    """Name the image format from its magic bytes, or None if the bytes are not a known image.

    Returns "png", "jpeg", "dicom" (supported) or "gif", "bmp", "tiff", "webp", "jpeg2000" (known but
    unsupported). DICOM is tested first: its 128-byte preamble may legally hold another format's
    header (dual-personality TIFF/DICOM files).
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    # "BM" alone is two letters of text; also require a known DIB header size at offset 14.
    if data.startswith(b"BM") and len(data) >= 18:
        if struct.unpack_from("<I", data, 14)[0] in (12, 16, 40, 52, 56, 64, 108, 124):
            return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or data.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    return None


def decode_image(data: bytes, *, min_side: int, max_pixels: int,
                 policy: DicomPolicy | None = None) -> DecodedImage:
    """Decode and validate one file's bytes; raise ImageRejected if it cannot be used.

    ``min_side``: the shorter side must be at least this many pixels. ``max_pixels``: width*height
    declared by the header above this is refused before any pixel is decoded (a small file can
    declare a huge image and exhaust memory: a decompression bomb). ``policy``: which DICOM
    modalities and body parts are accepted (ingest passes the settings'); None checks neither.
    """
    return _decode(data, min_side=min_side, max_pixels=max_pixels, policy=policy)


def load_grayscale(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a stored original (already validated at ingest) to float32 (H, W) in [0, 1].

    Same conversion as :func:`decode_image`, so features see exactly what ingest checked; there is no
    minimum side here because the settings may have changed since the image was accepted.
    """
    return decode_stored(Path(path).read_bytes(), max_pixels=max_pixels)


def decode_stored(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`load_grayscale` for bytes already read (from :mod:`xray_core.io.storage`, any backend).

    Without the plausibility checks (blank, truncated): a stored film was accepted by the ingest of its
    day, and a check added since must not make it undecodable (every retrain would then fail to embed
    it, with no command to take it out). ``xray doctor --verify`` lists stored films today's checks
    would refuse."""
    return _decode(data, min_side=1, max_pixels=max_pixels, plausible=False).pixels


def _decode(data: bytes, *, min_side: int, max_pixels: int, policy: DicomPolicy | None = None,
            plausible: bool = True) -> DecodedImage:
    if len(data) == 0:
        raise ImageRejected("empty_file", f"the file is empty (0 bytes); {_ALLOWED}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(
            "not_an_image",
            f"the file does not start with the signature of any image format; {_ALLOWED}",
        )
    if fmt not in SUPPORTED_FORMATS:
        raise ImageRejected("unsupported_format", f"the file is a {fmt.upper()} image; {_ALLOWED}")
    if fmt == "dicom":
        image = _decode_dicom(data, min_side=min_side, max_pixels=max_pixels, policy=policy)
    else:
        image = _decode_pil(data, fmt, min_side=min_side, max_pixels=max_pixels, plausible=plausible)
    pixels = image.pixels
    if pixels.max() == pixels.min():
        raise ImageRejected(
            "constant_image",
            f"every pixel has the same value ({image.width}x{image.height}); an X-ray needs contrast",
        )
    if plausible:
        check_blank(pixels)
    return image


def _check_size(width: int, height: int, *, min_side: int, max_pixels: int, fmt: str) -> None:
    """Refuse bombs and tiny images from the declared size, before decoding pixels."""
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"the {fmt.upper()} header declares {width}x{height} = {width * height} pixels; "
            f"at most {max_pixels} pixels are allowed (XRAY_MAX_PIXELS)",
        )
    if min(width, height) < min_side:
        raise ImageRejected(
            "too_small",
            f"the image is {width}x{height} pixels; both sides must be at least {min_side} "
            "(XRAY_MIN_IMAGE_SIDE)",
        )


def _decode_pil(data: bytes, fmt: str, *, min_side: int, max_pixels: int,
                plausible: bool = True) -> DecodedImage:
    # Pillow reports some findings as warnings (DecompressionBombWarning above its own limit, corrupt
    # EXIF, ...). They are recorded for this call only and dropped instead of reaching stderr: the
    # decision is XRAY_MAX_PIXELS's and the checks below; a global filter would hide other code's warnings.
    # (catch_warnings swaps process-wide state while it runs: decoding runs in one thread per process.)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            # formats=: only the plugin the magic bytes named may parse the file.
            im = Image.open(BytesIO(data), formats=[fmt.upper()])
        except Image.DecompressionBombError as exc:
            # PIL's own guard fires inside open() for sizes above twice its global limit.
            raise ImageRejected(
                "decompression_bomb",
                f"the {fmt.upper()} header declares more pixels than PIL's safety limit ({exc}); "
                f"at most {max_pixels} pixels are allowed (XRAY_MAX_PIXELS)",
            ) from None
        except (UnidentifiedImageError, *_PIL_DECODE_ERRORS) as exc:
            raise _pil_rejection(exc, fmt, "header is cut off or corrupt; the file cannot be read") from None
        with im:
            width, height = im.size
            # Checked before any pixel is decoded or expanded (RGBA, 16-bit): the header alone decides.
            _check_size(width, height, min_side=min_side, max_pixels=max_pixels, fmt=fmt)
            try:
                scale = _draft(im) if fmt == "jpeg" else 1
                im.load()  # full decode now: LOAD_TRUNCATED_IMAGES stays False, so short data raises
                if plausible and fmt == "png":
                    check_png_rows(data, width, height)
                elif plausible:
                    check_jpeg_fill(im, scale)
                if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # a quarter turn swaps the sides
                    width, height = height, width
                ImageOps.exif_transpose(im, in_place=True)
                pixels, bit_depth = _pil_to_gray(im)
            except _PIL_DECODE_ERRORS as exc:
                what = "pixel data is cut off or corrupt; re-export the complete file"
                raise _pil_rejection(exc, fmt, what) from None
    return DecodedImage(
        pixels=pixels,
        width=width,
        height=height,
        bit_depth=bit_depth,
        format=fmt,
        dicom_patient_id=None,
        view=None,
        scale=scale,
    )


def _pil_rejection(exc: BaseException, fmt: str, what: str) -> ImageRejected:
    """The reason for an error PIL raised while parsing or decoding: a text or ICC chunk that inflates
    past PIL's cap (``ValueError: Decompressed data too large ...``, ``Too much memory used in text
    chunks``) is a decompression bomb, not a cut-off file; anything else is ``truncated``."""
    message = str(exc)
    lower = message.lower()
    if isinstance(exc, ValueError) and ("too large" in lower or "too much memory" in lower):
        return ImageRejected(
            "decompression_bomb",
            f"a compressed {fmt.upper()} metadata chunk (zTXt, iTXt or iCCP) inflates beyond PIL's limit of "
            f"{_PNG_TEXT_LIMIT} bytes per chunk ({message}); only images with small metadata are accepted",
        )
    return ImageRejected("truncated", f"the {fmt.upper()} {what} ({message})")


def _draft(im: Image.Image) -> int:
    """Decode a JPEG above :data:`REDUCED_DECODE_PIXELS` at 1/2, 1/4 or 1/8 scale; return the factor.

    libjpeg scales in the DCT domain, so a 50 MP film never exists at full size in memory. Films at
    or below the budget are decoded at full size, exactly as before (the feature cache is keyed by the
    file's sha256, so its pixels must not change).
    """
    width, height = im.size
    scale = 1
    while scale < 8 and -(-width // scale) * -(-height // scale) > REDUCED_DECODE_PIXELS:
        scale *= 2
    if scale > 1:
        im.draft(None, (width // scale, height // scale))
    return scale


def _pil_to_gray(im: Image.Image) -> tuple[np.ndarray, int]:
    """Any PIL mode -> float32 (H, W) in [0, 1] and the source bit depth (8 or 16).

    Memory: one channel is taken inside PIL and rows are copied out in bands of about 1 M pixels, so
    the peak is the PIL image plus the float32 result; colour never exists as a float32 (H, W, 3).
    The arithmetic per pixel is unchanged (same dtype, same operations), so pixels are identical.
    """
    mode = im.mode
    if mode.startswith("I;16"):  # 16-bit PNG: keep every one of the 65536 levels
        return _scaled(im, 65535.0), 16
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 65535:  # 16-bit data that PIL widened to 32-bit
            return (arr / 65535.0).astype(np.float32), 16
        return _minmax(arr), 16
    if mode == "F":
        return _minmax(np.asarray(im).astype(np.float64)), 16
    if mode == "L":
        return _scaled(im, 255.0), 8
    if mode in ("LA", "La"):  # alpha is ignored: an X-ray's grey level is the L channel
        return _scaled(im.getchannel("L"), 255.0), 8
    if mode == "1":
        return _scaled(im.convert("L"), 255.0), 8
    # RGB, RGBA, P, PA, CMYK, YCbCr, ...: colour -> float luminance (alpha dropped)
    rgb = im if mode in ("RGB", "RGBA") else im.convert("RGB")
    out = np.empty((rgb.height, rgb.width), dtype=np.float32)
    for top, band in _bands(rgb):
        np.matmul(band[..., :3].astype(np.float32), _LUMA, out=out[top : top + len(band)])
    out /= 255.0
    return out, 8


def _bands(im: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, array) for bands of about :data:`_BAND_PIXELS` pixels, top to bottom."""
    step = max(1, _BAND_PIXELS // max(1, im.width))
    for top in range(0, im.height, step):
        yield top, np.asarray(im.crop((0, top, im.width, min(im.height, top + step))))


def _scaled(im: Image.Image, full: float) -> np.ndarray:
    """A one-channel image as ``float32 / full``, built band by band into one float32 array."""
    out = np.empty((im.height, im.width), dtype=np.float32)
    for top, band in _bands(im):
        out[top : top + len(band)] = band
    out /= full
    return out


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Window to the image's own min..max; a constant image stays 0 (caught as constant_image)."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr = (arr - lo) / (hi - lo)
    else:
        arr = np.zeros_like(arr)
    return arr.astype(np.float32)


def _decode_dicom(data: bytes, *, min_side: int, max_pixels: int, policy: DicomPolicy | None) -> DecodedImage:
    """Parse → size check (before any pixel is decoded) → decoder → modality/body part → window → facts."""
    ds = dicom.read_dataset(data)
    rows, cols = dicom.image_size(ds)
    _check_size(cols, rows, min_side=min_side, max_pixels=max_pixels, fmt="dicom")
    dicom.check_decoder(ds)  # a syntax nobody can decode is unsupported_format, whatever the modality
    if policy is not None:
        dicom.check_acquisition(ds, policy)
    pixels, method = dicom.render(ds)
    try:
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    except dicom.DICOM_ERRORS:
        bits = 16
    patient_id = str(ds.get("PatientID", "") or "").strip() or None
    # ViewPosition is a DICOM code string (at most 16 characters); a hostile file may hold anything,
    # and the catalogue's view column holds 32 (PostgreSQL would refuse more and fail the batch).
    view = printable(str(ds.get("ViewPosition", "") or "").strip())[:16] or None
    return DecodedImage(
        pixels=pixels.astype(np.float32, copy=False),
        width=cols,
        height=rows,
        bit_depth=bits,
        format="dicom",
        dicom_patient_id=patient_id,
        view=view,
        dicom=dicom.facts(ds, method),
    )


# ---- perceptual hash -------------------------------------------------------------------------

_HASH_SIDE = 32  # pHash: shrink to 32x32, keep the 8x8 lowest frequencies
_HASH_KEEP = 8
_U64 = (1 << 64) - 1


def _box_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix averaging each output cell's share of the input (area resampling).

    Area averaging (not point sampling) makes the hash stable under resizing and pixel noise.
    """
    edges = np.linspace(0.0, n_in, n_out + 1)
    starts = np.arange(n_in, dtype=np.float64)
    ends = starts + 1.0
    overlap = np.clip(np.minimum(ends[None, :], edges[1:, None])
                      - np.maximum(starts[None, :], edges[:-1, None]), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C, so that C @ x @ C.T is the 2-D DCT of x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0, :] = np.sqrt(1.0 / n)
    return c


_DCT32 = _dct_matrix(_HASH_SIDE)


def perceptual_hash(pixels: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grayscale image, as a signed int64 (fits SQL BIGINT).

    Resize to 32x32 by area averaging, take the 2-D DCT, keep the top-left 8x8 coefficients and set
    one bit per coefficient above their median (row-major, first coefficient = most significant bit).
    Near-duplicates (re-encoded, resized, slightly noised) differ in a few bits; compare with
    :func:`hamming`.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"perceptual_hash needs a 2-D grayscale array, got shape {arr.shape}")
    # Row bands in float64, never the whole image (a 50 MP film would take 400 MB as float64).
    rows = _box_matrix(_HASH_SIDE, arr.shape[0])
    step = max(1, _BAND_PIXELS // arr.shape[1])
    small = np.zeros((_HASH_SIDE, arr.shape[1]))
    for top in range(0, arr.shape[0], step):
        small += rows[:, top : top + step] @ arr[top : top + step].astype(np.float64)
    small = small @ _box_matrix(_HASH_SIDE, arr.shape[1]).T
    low = (_DCT32 @ small @ _DCT32.T)[:_HASH_KEEP, :_HASH_KEEP].ravel()
    bits = low > np.median(low)
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes (signed or unsigned form)."""
    return ((a ^ b) & _U64).bit_count()


__all__ = ["DecodedImage", "DicomPolicy", "SUPPORTED_FORMATS", "DEFAULT_MAX_PIXELS", "REDUCED_DECODE_PIXELS",
           "decode_image", "load_grayscale", "decode_stored", "perceptual_hash", "hamming", "sniff_format"]
