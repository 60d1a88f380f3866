"""Decoding fully and checking plausibility (issue 23, items 4 and 8): truncated pixel data that Pillow
accepts, blank films, metadata-chunk bombs, Pillow's warnings, and the bounded-memory decode path.

The hostile cases also run through a real ingest and predict in tests/integration/test_hostile_input.py.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from io import BytesIO

import numpy as np
import pytest
from badfiles import blank_film
from PIL import Image

from xray_core.data import images
from xray_core.data.images import decode_image
from xray_core.data.plausibility import BLANK_FRACTION, could_be_blank, dominant_share
from xray_core.data.synthetic import make_xray
from xray_core.errors import ImageRejected


def _xray(size: int, seed: int = 3) -> np.ndarray:
    return make_xray("normal", size=size, rng=np.random.default_rng(seed), patient_seed=seed)


def _encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, raw: bytes, *, depth: int = 8, colour: int = 0,
         interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _scanlines(arr: np.ndarray) -> bytes:
    """Filter type 0 (None) before every row."""
    return b"".join(b"\x00" + row.tobytes() for row in arr)


def _decode(data: bytes, **kwargs) -> images.DecodedImage:
    return decode_image(data, min_side=32, max_pixels=kwargs.pop("max_pixels", 10**7), **kwargs)


def _reason(data: bytes, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        _decode(data, **kwargs)
    return info.value


# ---- truncated pixel data that Pillow decodes without an error -------------------------------------


def test_jpeg_cut_with_an_end_marker_is_truncated() -> None:
    whole = _encode(_xray(256), "JPEG", quality=90)
    assert _decode(whole).width == 256
    cut = whole[: len(whole) * 6 // 10] + b"\xff\xd9"
    Image.open(BytesIO(cut)).load()  # Pillow itself accepts it (libjpeg fills the rest and only warns)
    rej = _reason(cut)
    assert rej.reason == "truncated" and "ends early" in rej.detail and "of 256 decoded rows" in rej.detail


def test_jpeg_header_declaring_more_rows_than_its_data_is_truncated() -> None:
    data = bytearray(_encode(_xray(64), "JPEG", quality=90))
    struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, 2000, 2000)
    rej = _reason(bytes(data))
    assert rej.reason == "truncated" and "of 2000 decoded rows" in rej.detail


def test_png_whose_idat_stream_is_short_is_truncated() -> None:
    arr = _xray(128)
    assert _decode(_png(128, 128, _scanlines(arr))).height == 128
    short = _png(128, 128, _scanlines(arr[:64]))  # a complete zlib stream of half the rows, valid CRCs
    Image.open(BytesIO(short)).load()  # Pillow accepts it: the missing rows stay black
    rej = _reason(short)
    assert rej.reason == "truncated" and "about 64 of 128 rows" in rej.detail


def _adam7(arr: np.ndarray) -> bytes:
    """An interlaced (Adam7) 8-bit grey PNG's raw stream: every pass's rows, filter 0."""
    out = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            out += _scanlines(sub)
    return out


def test_interlaced_png_row_count_follows_adam7() -> None:
    arr = _xray(67)[:, :61]  # odd sides: some passes are narrower than others
    raw = _adam7(arr)
    decoded = _decode(_png(61, 67, raw, interlace=1)).pixels
    np.testing.assert_array_equal(decoded, arr.astype(np.float32) / 255.0)
    assert _reason(_png(61, 67, raw[: len(raw) - 40], interlace=1)).reason == "truncated"


def test_16bit_rgba_png_decodes_to_luma() -> None:
    rgb = _xray(64).astype(np.uint16) * 257
    rgba = np.dstack([rgb, rgb // 2, rgb, np.full_like(rgb, 65535)]).astype(">u2")
    image = _decode(_png(64, 64, _scanlines(rgba.reshape(64, -1)), depth=16, colour=6))
    assert (image.width, image.height, image.bit_depth) == (64, 64, 8)  # Pillow keeps 8 bits of RGBA
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0


# ---- blank films ------------------------------------------------------------------------------------


@pytest.mark.parametrize("share, blank", [(0.995, True), (0.9905, True), (0.985, False), (0.5, False)])
def test_a_film_mostly_one_value_is_blank(share: float, blank: bool) -> None:
    data = _encode(blank_film(128, share), "PNG")
    if blank:
        rej = _reason(data)
        assert rej.reason == "blank_image" and f"at most {BLANK_FRACTION:.0%}" in rej.detail
    else:
        assert _decode(data).width == 128


def test_constant_stays_constant_image() -> None:
    assert _reason(_encode(np.full((64, 64), 7, np.uint8), "PNG")).reason == "constant_image"


def test_dominant_share_is_exact_when_a_value_holds_most_pixels() -> None:
    rng = np.random.default_rng(0)
    arr = rng.random(100_000).astype(np.float32)
    arr[rng.permutation(arr.size)[: 99_200]] = 0.25  # 99.2%, scattered
    share, value = dominant_share(arr)
    assert value == np.float32(0.25) and share == pytest.approx(np.mean(arr == np.float32(0.25)))
    ordered = np.sort(arr)  # the same pixels in one run: slices see the value unevenly
    assert dominant_share(ordered) == (share, value)


def _arrangements(share: float, seed: int) -> list[np.ndarray]:
    """Pixels with ``share`` of them at one value, laid out scattered, in one run, as a run that starts
    in the middle, and with every other value in one slice (the case the shortcut must not miss)."""
    rng = np.random.default_rng(seed)
    n = 13 * 479  # slices of unequal lengths (64 * 97 + 19)
    arr = rng.random(n).astype(np.float32)
    scattered = arr.copy()
    scattered[rng.permutation(n)[: int(share * n)]] = 0.25
    ordered = np.sort(scattered)
    middle = np.roll(ordered, n // 2)
    one_slice = np.full(n, 0.25, np.float32)  # the others, all brighter, from the middle slice (32) on
    others = n - int(share * n)
    start = sum(len(part) for part in np.array_split(arr, 64)[:32])
    one_slice[start : start + others] = 0.5 + arr[:others] / 2
    return [scattered, ordered, middle, one_slice, scattered.reshape(-1, 13)]


@pytest.mark.parametrize("share", [0.9995, 0.995, 0.9905, 0.99, 0.985, 0.95, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_blank_shortcut_never_changes_a_verdict(share: float, seed: int) -> None:
    """could_be_blank only skips dominant_share where its verdict is 'not blank' anyway."""
    for arr in _arrangements(share, seed):
        blank = dominant_share(arr)[0] > BLANK_FRACTION
        assert could_be_blank(arr) or not blank
        assert blank == (share > BLANK_FRACTION)  # dominant_share itself is exact


def test_the_blank_shortcut_decides_an_ordinary_film_from_a_few_slices(monkeypatch) -> None:
    from xray_core.data import plausibility

    looked: list[int] = []
    real = plausibility._median
    monkeypatch.setattr(plausibility, "_median", lambda part: looked.append(len(part)) or real(part))
    assert not could_be_blank(_xray(256).astype(np.float32) / 255.0)
    assert 3 <= len(looked) <= 8  # of 64 slices
    looked.clear()
    assert could_be_blank(blank_film(128, 0.995).astype(np.float32)) and len(looked) == 64


# ---- metadata-chunk bombs and Pillow's warnings ----------------------------------------------------


def _with_chunk(png: bytes, kind: bytes, payload: bytes, *, before_idat: bool) -> bytes:
    at = png.index(b"IDAT") - 4 if before_idat else png.rindex(b"IEND") - 4
    return png[:at] + _chunk(kind, payload) + png[at:]


_BOMB = zlib.compress(b"A" * (16 * 1024 * 1024), 9)  # 16 MB inflated, far above PIL's 1 MB per chunk


@pytest.mark.parametrize("kind, payload, before_idat", [
    (b"zTXt", b"Comment\x00\x00" + _BOMB, False),
    (b"zTXt", b"Comment\x00\x00" + _BOMB, True),
    (b"iTXt", b"Comment\x00\x01\x00\x00\x00" + _BOMB, False),
    (b"iCCP", b"icc\x00\x00" + _BOMB, True),
])
def test_metadata_chunk_bomb_is_a_decompression_bomb(kind: bytes, payload: bytes, before_idat: bool) -> None:
    data = _with_chunk(_encode(_xray(64), "PNG"), kind, payload, before_idat=before_idat)
    rej = _reason(data)
    assert rej.reason == "decompression_bomb", rej.detail
    assert "metadata chunk" in rej.detail


def test_pillow_warnings_never_leave_the_decode_call(recwarn: pytest.WarningsRecorder) -> None:
    # Above PIL's warning limit (MAX_IMAGE_PIXELS) and below twice it and XRAY_MAX_PIXELS.
    data = bytearray(_encode(_xray(64), "JPEG", quality=90))
    struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, 9500, 9500)
    assert 9500 * 9500 > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping the decode call would raise here
        rej = _reason(bytes(data), max_pixels=100_000_000)
    assert rej.reason == "truncated"
    assert not recwarn.list


# ---- the decode path: reduced above the budget, identical below it ---------------------------------


def test_jpeg_above_the_budget_is_decoded_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_xray(256), "JPEG", quality=90)
    full = _decode(data)
    assert full.scale == 1 and full.pixels.shape == (256, 256)
    monkeypatch.setattr(images, "REDUCED_DECODE_PIXELS", 128 * 128)
    half = _decode(data)
    assert half.scale == 2 and half.pixels.shape == (128, 128) and (half.width, half.height) == (256, 256)
    monkeypatch.setattr(images, "REDUCED_DECODE_PIXELS", 40 * 40)
    assert _decode(data).scale == 8  # 1/4 would still be 64 x 64 > 1600 pixels


def test_png_is_never_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "REDUCED_DECODE_PIXELS", 16)
    image = _decode(_encode(_xray(64), "PNG"))
    assert image.scale == 1 and image.pixels.shape == (64, 64)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_goes_to_the_same_float_luma_as_before(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Banded conversion gives bit-identical pixels to the one-shot (H, W, 3) float32 chain it replaced
    (feature caches are keyed by the file's sha256, so a film's pixels must never change)."""
    rgb = np.random.default_rng(1).integers(0, 256, (300, 1500, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    expected = (rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    monkeypatch.setattr(images, "_BAND_PIXELS", 7 * 1500)  # bands of 7 rows, the last one short
    np.testing.assert_array_equal(_decode(_encode(rgb, "PNG")).pixels, expected)


def test_the_blank_shortcut_stands_down_where_its_proof_does_not_hold(monkeypatch) -> None:
    """Below a 0.985 share two slices' medians can move, so a lowered BLANK_FRACTION sends every film to
    the full count rather than letting the shortcut pass a blank one."""
    from xray_core.data import plausibility

    film = _xray(256).astype(np.float32) / 255.0
    assert not plausibility.could_be_blank(film)
    monkeypatch.setattr(plausibility, "BLANK_FRACTION", 0.98)
    assert plausibility.could_be_blank(film)
