"""Is a decoded film whole and plausible? Checks that Pillow's own decoding does not make.

Pillow decodes some incomplete files without an error: libjpeg fills the missing blocks of a JPEG
whose scan ends early (a cut file with an end marker, a header declaring more rows than its data) and
only warns, and a PNG whose compressed stream ends cleanly before its last row leaves those rows black.
:func:`check_jpeg_fill` and :func:`check_png_rows` find both (``truncated``); :func:`check_blank`
refuses a film that is almost entirely one value (``blank_image``). :mod:`xray_core.data.images`
calls them while decoding.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from xray_core.errors import ImageRejected

# More than this share of the pixels at one value is a blank film (a detector fault, an empty cassette,
# a placeholder), not an X-ray. The 162 real films in shared/data peak at 0.074 (a black border).
BLANK_FRACTION: float = 0.99

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
# Adam7 passes as (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20  # counting a PNG's inflated bytes keeps at most this many at a time


def check_blank(pixels: np.ndarray) -> None:
    """Refuse a film with more than :data:`BLANK_FRACTION` of its pixels at one value (``blank_image``)."""
    if not could_be_blank(pixels):
        return  # most films: a few slices' medians already rule it out (the same verdict, ~20x cheaper)
    share, value = dominant_share(pixels)
    if share > BLANK_FRACTION:
        raise ImageRejected(
            "blank_image",
            f"{share:.2%} of the pixels have one value ({value:.3f} on a 0..1 scale); at most "
            f"{BLANK_FRACTION:.0%} may: a blank or failed exposure is not an X-ray",
        )


def _slices(pixels: np.ndarray, blocks: int) -> list[np.ndarray]:
    flat = np.asarray(pixels).reshape(-1)
    return np.array_split(flat, min(blocks, flat.size))


def _median(part: np.ndarray) -> float:
    return np.partition(part, len(part) // 2)[len(part) // 2]


def could_be_blank(pixels: np.ndarray, *, blocks: int = 64) -> bool:
    """False when no value can hold more than :data:`BLANK_FRACTION` of the pixels, judged from as few
    of :func:`dominant_share`'s slice medians as that takes; True when that needs a full look.

    Exact: a value holding more than 99% of the pixels is the median of all but at most one of the 64
    slices (see :func:`dominant_share`), so medians that no single value matches in all but one
    (three distinct ones, or two pairs) prove the film is not blank. Slices are visited from the
    middle of the film outwards (borders are often one flat value). Used only for the verdict:
    a film that may be blank goes through :func:`dominant_share` as before (the reported share and
    value are its)."""
    # The "all but one slice" argument needs the share >= 0.985 (below it two slices' medians can move):
    # checked here, so lowering BLANK_FRACTION cannot quietly pass blank films the full count refuses.
    if BLANK_FRACTION < 0.985 or blocks != 64:
        return True
    slices = _slices(pixels, blocks)
    seen: dict[float, int] = {}
    for i in _middle_out(len(slices)):
        m = _median(slices[i])
        seen[m] = seen.get(m, 0) + 1
        if len(seen) > 2 or (len(seen) == 2 and min(seen.values()) > 1):
            return False
    return True


def _middle_out(n: int) -> list[int]:
    """0..n-1 ordered middle first, then alternately further up and down (every index once)."""
    mid = n // 2
    order = [mid]
    for step in range(1, n):
        order += [i for i in (mid - step, mid + step) if 0 <= i < n]
    return order[:n]


def dominant_share(pixels: np.ndarray, *, blocks: int = 64) -> tuple[float, float]:
    """(share of the pixels equal to a candidate value, that value), the candidate being the most
    frequent median of ``blocks`` equal slices of the pixels.

    Whenever one value holds more than 99% of the pixels, the candidate is that value, so the blank
    test is exact: such a value holds more than half of at least 63 of 64 slices, so it is their
    median. O(n), without sorting the whole image or a histogram of float values.
    """
    flat = np.asarray(pixels).reshape(-1)
    medians = np.array([_median(s) for s in _slices(flat, blocks)])
    values, counts = np.unique(medians, return_counts=True)
    value = values[counts.argmax()]
    return float(np.count_nonzero(flat == value)) / flat.size, float(value)


def check_jpeg_fill(im: Image.Image, scale: int) -> None:
    """Refuse a JPEG whose entropy-coded data ran out before its last MCU row (``truncated``).

    When a scan ends early (a cut file with an end marker, or a header declaring more rows than the data
    holds), libjpeg only warns (Pillow does not expose the warning) and fills every missing block with
    zero coefficients: mid-grey, exactly 128 in every channel. A film whose bottom MCU row(s) are all
    exactly 128 is that fill; a real exposure has noise or structure there.
    """
    if im.mode not in ("L", "RGB"):
        return  # other modes (CMYK, ...) are not checked: rare for X-rays
    width, height = im.size
    # One MCU row: 8 pixels times the largest vertical sampling factor, divided by the draft scale.
    mcu = max(1, 8 * max((v for _, _, v, _ in getattr(im, "layer", [])), default=1) // scale)
    if height <= mcu or not _rows_are_fill(im, height - mcu, height):
        return
    # Rejected whatever follows: one full-size copy (at most REDUCED_DECODE_PIXELS) to size the fill.
    arr = np.asarray(im)
    fill = (arr == 128).reshape(height, -1).all(axis=1)
    rows = height - int(np.flatnonzero(~fill)[-1]) - 1 if not fill.all() else height
    reduced = f" (decoded at 1/{scale} scale)" if scale > 1 else ""
    raise ImageRejected(
        "truncated",
        f"the JPEG's pixel data ends early: its last {rows} of {height} decoded rows{reduced} are the "
        "decoder's flat grey fill for missing data (every pixel exactly 128); re-export the complete file",
    )


def _rows_are_fill(im: Image.Image, top: int, bottom: int) -> bool:
    band = np.asarray(im.crop((0, top, im.size[0], bottom)))
    return bool(band.size) and bool((band == 128).all())


def check_png_rows(data: bytes, width: int, height: int) -> None:
    """Refuse a PNG whose compressed pixel stream (IDAT) ends before its last row (``truncated``).

    A zlib stream that is complete but short (valid CRCs, an IEND) is decoded by Pillow without an
    error: the missing rows stay black. Inflating the IDAT data again, counting bytes without keeping
    them, says how many scanlines the file really holds.
    """
    depth, colour, interlace = data[24], data[25], data[28]
    bits = depth * _PNG_CHANNELS.get(colour, 1)
    passes = _ADAM7 if interlace == 1 else ((0, 0, 1, 1),)
    needed = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            needed += h * (1 + -(-(w * bits) // 8))
    inflater = zlib.decompressobj()
    got = 0
    for chunk in _png_idat(data):
        pending = chunk
        while True:
            out = len(inflater.decompress(pending, _INFLATE_STEP))
            got += out
            if got >= needed:
                return
            pending = inflater.unconsumed_tail
            # A full step with no input left may still hold output inside zlib: ask again.
            if not pending and out < _INFLATE_STEP:
                break
    rows = got * height // needed if needed else 0
    raise ImageRejected(
        "truncated",
        f"the PNG's pixel data ends early: its compressed stream holds {got} of the {needed} bytes that "
        f"{width}x{height} pixels need (about {rows} of {height} rows); re-export the complete file",
    )


def _png_idat(data: bytes) -> Iterator[bytes]:
    """The IDAT chunks' payloads, in file order (Pillow has already checked the chunk structure)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            yield data[pos + 8 : pos + 8 + length]
        elif kind == b"IEND":
            return
        pos += 12 + length
