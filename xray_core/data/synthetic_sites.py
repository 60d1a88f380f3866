"""Synthetic *sites*: the same synthetic anatomy, made the way one hospital or collection makes films.

Real collections differ in ways that have nothing to do with disease: film size, bit depth, contrast
curve, a black border from the digitiser, a burned-in text marker ("PORTABLE", a side marker). A
model can learn those instead of the lungs. :class:`SiteStyle` describes one site's habits, and
:func:`write_site_dataset` writes a labelled folder of films made that way, for the audit's and the
slices' tests and benchmarks (a confounded collection is one where a label comes from one site only).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xray_core.data.synthetic import SyntheticRecord, make_xray

_STREAM = 0x51E5  # an rng stream of its own: site styling never shifts the anatomy streams


@dataclass(frozen=True)
class SiteStyle:
    """How one site makes its films (every field is an acquisition habit, not anatomy)."""

    name: str
    size: int = 64  # square side in pixels
    bit_depth: int = 8  # 8 or 16 (PNG)
    gamma: float = 1.0  # contrast curve applied to [0, 1] intensities
    border: int = 0  # pixels of black frame (a digitiser's mask)
    marker: str = ""  # burned-in text in the top-left corner, e.g. "PORTABLE"
    fmt: str = "png"  # png | jpeg (8-bit only)
    signal: float = 1.0  # disease-signal strength: the finding's brightness scale (0: none)


def styled_xray(label: str, style: SiteStyle, *, rng: np.random.Generator, patient_seed: int) -> np.ndarray:
    """One film of ``label`` as ``style`` makes it: uint8 or uint16 array (size, size)."""
    base = make_xray(label, size=style.size, rng=rng, patient_seed=patient_seed,
                     signal=style.signal).astype(np.float64) / 255.0
    img = np.clip(base, 0.0, 1.0) ** style.gamma
    if style.border:
        b = style.border
        img[:b, :], img[-b:, :], img[:, :b], img[:, -b:] = 0.0, 0.0, 0.0, 0.0
    if style.marker:
        canvas = Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L")
        ImageDraw.Draw(canvas).text((style.border + 2, style.border + 1), style.marker, fill=255)
        img = np.asarray(canvas, dtype=np.float64) / 255.0
    if style.bit_depth == 16:
        return np.rint(img * 65535).astype(np.uint16)
    return np.rint(img * 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = BytesIO()
    if pixels.dtype == np.uint16:
        Image.fromarray(pixels).save(buf, format="PNG")  # uint16 -> I;16
    elif fmt == "jpeg":
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=92)
    else:
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_site_dataset(root: Path, style: SiteStyle, *, labels: tuple[str, ...] = ("normal", "pneumonia"),
                       patients_per_label: int = 6, images_per_patient: int = 1, seed: int = 0,
                       patient_offset: int = 0, manifest: bool = True) -> list[SyntheticRecord]:
    """Write ``root/<label>/<site>-p{N}_{k}.png`` films of ``style`` (and a manifest with a ``site``
    column when ``manifest``). Patient ids carry the site's name, so two sites never share a patient."""
    root = Path(root)
    records: list[SyntheticRecord] = []
    seen: set[bytes] = set()
    ext = "jpg" if style.fmt == "jpeg" and style.bit_depth == 8 else "png"
    for li, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        for j in range(patients_per_label):
            n = patient_offset + li * patients_per_label + j
            patient_id = f"{style.name}-p{n}"
            patient_seed = int(np.random.default_rng([_STREAM, seed, n]).integers(0, 2**62))
            for k in range(images_per_patient):
                rng = np.random.default_rng([_STREAM, seed, n, k, 1])
                while True:
                    data = _encode(styled_xray(label, style, rng=rng, patient_seed=patient_seed), style.fmt)
                    digest = hashlib.sha256(data).digest()
                    if digest not in seen:
                        break
                seen.add(digest)
                path = root / label / f"{patient_id}_{k}.{ext}"
                path.write_bytes(data)
                records.append(SyntheticRecord(path=path, label=label, patient_id=patient_id))
    if manifest:
        with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "label", "patient_id", "site"])
            for rec in records:
                writer.writerow([rec.path.relative_to(root).as_posix(), rec.label,
                                 rec.patient_id, style.name])
    return records


__all__ = ["SiteStyle", "styled_xray", "write_site_dataset"]
