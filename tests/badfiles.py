"""A corpus of broken and of valid-but-unusual image files, for the decoder's and ingest's tests.

Not a test module: tests import :func:`make_bad_corpus` and :func:`make_good_variants`.

The bad corpus assumes the test settings ``min_side=32`` (XRAY_MIN_IMAGE_SIDE) and
``max_pixels=4_000_000`` (:data:`CORPUS_MAX_PIXELS`): the "real" bombs hold 4.2 million genuine pixels,
which only counts as a bomb under that small limit. Every file has distinct bytes, so ingest sees
each as a separate source file.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from xray_core.data.synthetic import make_xray, write_dicom

CORPUS_MIN_SIDE = 32
CORPUS_MAX_PIXELS = 4_000_000

# file name -> reason code decode_image must give (under the limits above). Static, so tests can be
# parametrized at collection time; make_bad_corpus checks it writes exactly these files.
BAD_CASES: dict[str, str] = {
    "empty.png": "empty_file",
    "truncated.png": "truncated",
    "truncated.jpeg": "truncated",
    "text.png": "not_an_image",
    "image.gif": "unsupported_format",
    "image.bmp": "unsupported_format",
    "image.tiff": "unsupported_format",
    "image.webp": "unsupported_format",
    "tiny.png": "too_small",
    "constant.png": "constant_image",
    "blank.png": "blank_image",
    "bomb_header.png": "decompression_bomb",
    "bomb_real.png": "decompression_bomb",
    "bomb_real.jpeg": "decompression_bomb",
    "garbage.dcm": "unreadable_dicom",
    "nopixels.dcm": "dicom_no_pixels",
    "mpeg2.dcm": "unsupported_format",
}

# file name -> what decode_image must report (width/height after EXIF orientation; DICOM bit_depth
# is BitsStored).
GOOD_CASES: dict[str, dict] = {
    "l8.png": {"width": 80, "height": 64, "bit_depth": 8, "format": "png"},
    "l16.png": {"width": 64, "height": 72, "bit_depth": 16, "format": "png"},
    "rgb.jpeg": {"width": 72, "height": 64, "bit_depth": 8, "format": "jpeg"},
    "rgba.png": {"width": 64, "height": 64, "bit_depth": 8, "format": "png"},
    "la.png": {"width": 64, "height": 70, "bit_depth": 8, "format": "png"},
    "palette.png": {"width": 64, "height": 64, "bit_depth": 8, "format": "png"},
    "cmyk.jpeg": {"width": 72, "height": 64, "bit_depth": 8, "format": "jpeg"},
    "exif6.jpeg": {"width": 64, "height": 96, "bit_depth": 8, "format": "jpeg"},
    "mono1.dcm": {"width": 64, "height": 80, "bit_depth": 12, "format": "dicom"},
    "mono2.dcm": {"width": 64, "height": 80, "bit_depth": 12, "format": "dicom"},
    "mono2_16bit.dcm": {"width": 64, "height": 64, "bit_depth": 16, "format": "dicom"},
}


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _xray(size: int, seed: int) -> np.ndarray:
    return make_xray("normal", size=size, rng=np.random.default_rng(seed), patient_seed=seed)


def blank_film(side: int, share: float) -> np.ndarray:
    """A ``side`` x ``side`` uint8 film with ``share`` of its pixels at one grey (a blank exposure) and
    the rest a gradient of other values (so it is not constant)."""
    arr = np.full(side * side, 40, dtype=np.uint8)
    rest = side * side - int(round(share * side * side))
    arr[:rest] = 41 + np.arange(rest) % 200
    return arr.reshape(side, side)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose IHDR (valid CRC) declares ``width`` x ``height`` 8-bit grey pixels.

    The pixel data is a few zero rows, not the declared billions: a decoder that trusts the header
    and allocates first would run out of memory, which is the attack.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _mpeg2_dicom(path: Path) -> None:
    """A DICOM whose transfer syntax (MPEG-2 video) pydicom has no pixel decoder for."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4.1"  # Video Photographic Image
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = MPEG2MPML
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "bad-mpeg2"
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(range(60))])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def make_bad_corpus(root: Path, *, label: str = "normal") -> dict[str, str]:
    """Write one file per rejection case into ``root/<label>/``; return {file name: reason code}."""
    folder = Path(root) / label
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    expected: dict[str, str] = {}

    def add(name: str, data: bytes, reason: str) -> None:
        files[name] = data
        expected[name] = reason

    add("empty.png", b"", "empty_file")
    whole_png = _png(_xray(64, 1))
    add("truncated.png", whole_png[: len(whole_png) * 6 // 10], "truncated")
    whole_jpeg = _encode(Image.fromarray(_xray(64, 2)), "JPEG", quality=90)
    add("truncated.jpeg", whole_jpeg[: len(whole_jpeg) * 6 // 10], "truncated")
    add("text.png", b"patient notes: this is a text file renamed to .png\n", "not_an_image")
    picture = Image.fromarray(_xray(64, 3))
    add("image.gif", _encode(picture, "GIF"), "unsupported_format")
    add("image.bmp", _encode(picture, "BMP"), "unsupported_format")
    add("image.tiff", _encode(picture, "TIFF"), "unsupported_format")
    # Only the RIFF/WEBP magic matters: the format is refused before any decoding.
    add("image.webp", b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8 " + bytes(22), "unsupported_format")
    add("tiny.png", _png(_xray(8, 4)), "too_small")
    add("constant.png", _png(np.full((64, 64), 128, dtype=np.uint8)), "constant_image")
    add("blank.png", _png(blank_film(64, 0.995)), "blank_image")
    add("bomb_header.png", header_bomb_png(), "decompression_bomb")
    # 2100 x 2000 = 4.2 M real pixels > CORPUS_MAX_PIXELS; a smooth gradient keeps the files small.
    gradient = np.add.outer(np.arange(2000) % 256, np.arange(2100) % 256).astype(np.uint8)
    add("bomb_real.png", _png(gradient), "decompression_bomb")
    add("bomb_real.jpeg", _encode(Image.fromarray(gradient), "JPEG", quality=50), "decompression_bomb")
    # DICM marker, then bytes that are no DICOM file meta at all.
    garbage = np.random.default_rng(5).integers(0, 256, 400, dtype=np.uint8).tobytes()
    add("garbage.dcm", b"\0" * 128 + b"DICM" + garbage, "unreadable_dicom")

    for name, data in files.items():
        (folder / name).write_bytes(data)
    write_dicom(folder / "nopixels.dcm", np.zeros((64, 64), np.uint16),
                patient_id="bad-nopixels", with_pixels=False)
    expected["nopixels.dcm"] = "dicom_no_pixels"
    _mpeg2_dicom(folder / "mpeg2.dcm")
    expected["mpeg2.dcm"] = "unsupported_format"
    assert expected == BAD_CASES, "make_bad_corpus and BAD_CASES disagree"
    return dict(expected)


def make_good_variants(root: Path, label: str = "normal") -> dict[str, dict]:
    """Write valid images in every supported flavour into ``root/<label>/``.

    Returns {file name: {"width", "height", "bit_depth", "format"}} as :func:`decode_image` must
    report them (width/height after EXIF orientation; DICOM bit_depth = BitsStored): GOOD_CASES.
    Covers PIL modes L, I;16, RGB, RGBA, LA, P and CMYK, EXIF orientation 6, and DICOM MONOCHROME1
    (with rescale slope/intercept, 12-bit), MONOCHROME2 12-bit and 16-bit.
    """
    folder = Path(root) / label
    folder.mkdir(parents=True, exist_ok=True)
    base = _xray(96, 10)  # 96x96 uint8, cropped below to non-square sizes
    expected: dict[str, dict] = {}

    def add(name: str, data: bytes | None, width: int, height: int, bit_depth: int, fmt: str) -> None:
        if data is not None:
            (folder / name).write_bytes(data)
        expected[name] = {"width": width, "height": height, "bit_depth": bit_depth, "format": fmt}

    add("l8.png", _png(base[:64, :80]), 80, 64, 8, "png")
    wide16 = (base[:72, :64].astype(np.uint16) * 257 + np.arange(64, dtype=np.uint16)).astype(np.uint16)
    add("l16.png", _png(wide16), 64, 72, 16, "png")
    rgb = np.stack([base[:64, :72], base[1:65, :72], base[2:66, :72]], axis=-1)
    add("rgb.jpeg", _encode(Image.fromarray(rgb), "JPEG", quality=95), 72, 64, 8, "jpeg")
    rgba = np.dstack([rgb[:, :64], np.full((64, 64), 200, np.uint8)])
    add("rgba.png", _png(rgba), 64, 64, 8, "png")
    add("la.png", _encode(Image.fromarray(base[:70, :64]).convert("LA"), "PNG"), 64, 70, 8, "png")
    add("palette.png", _encode(Image.fromarray(rgb[:, :64]).quantize(64), "PNG"), 64, 64, 8, "png")
    add("cmyk.jpeg", _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), 72, 64, 8, "jpeg")
    # Stored 96 wide x 64 high; EXIF orientation 6 means "rotate 90 degrees clockwise to display".
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif6.jpeg",
        _encode(Image.fromarray(base[:64, :96]), "JPEG", quality=95, exif=exif), 64, 96, 8, "jpeg")
    # Same 12-bit data twice: MONOCHROME1 (with a rescale) must decode to 1 - MONOCHROME2.
    data12 = base[:80, :64].astype(np.uint16) * 16
    write_dicom(folder / "mono1.dcm", data12, patient_id="PAT-MONO1", photometric="MONOCHROME1",
                slope=2.0, intercept=-1024.0, view="AP", bits_stored=12)
    add("mono1.dcm", None, 64, 80, 12, "dicom")
    write_dicom(folder / "mono2.dcm", data12, patient_id="PAT-MONO2", photometric="MONOCHROME2",
                view="PA", bits_stored=12)
    add("mono2.dcm", None, 64, 80, 12, "dicom")
    write_dicom(folder / "mono2_16bit.dcm", base[:64, :64].astype(np.uint16) * 257,
                patient_id="PAT-16", view=None)
    add("mono2_16bit.dcm", None, 64, 64, 16, "dicom")
    assert expected == GOOD_CASES, "make_good_variants and GOOD_CASES disagree"
    return {name: dict(exp) for name, exp in expected.items()}
