"""Calibrate the near-copy rule (XRAY_NEAR_COPY_DISTANCE) on the real films beside the project.

How many pHash bits does a re-encoded or resized copy of a film move, and how close do two *different*
patients' films come? Prints one JSON line and writes bench/results/near_copies.json.

    python bench/near_copies.py
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.publish import publish  # noqa: E402 - after ROOT is on sys.path (run as a script)
from xray_core.data.images import hamming, perceptual_hash  # noqa: E402 - after ROOT is on sys.path

SETS = {"paediatric": ROOT.parent / "shared" / "data" / "cxr-sample",
        "adult": ROOT.parent / "shared" / "data" / "cxr-adult-covid"}


def _films(folder: Path) -> list[tuple[np.ndarray, str]]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [(np.asarray(Image.open(folder / r["file"]).convert("L")), r["patient_id"]) for r in rows]


def _copies(gray: np.ndarray) -> dict[str, np.ndarray]:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=75)
    h, w = gray.shape
    return {"jpeg_q75": np.asarray(Image.open(buf).convert("L")),
            "resize_half": np.asarray(Image.fromarray(gray).resize((w // 2, h // 2), Image.BILINEAR)),
            "crop_2pct": gray[h // 50: h - h // 50, w // 50: w - w // 50]}


def main() -> None:
    out: dict[str, object] = {"benchmark": "near_copies", "hash": "64-bit DCT pHash (xray_core.data.images)"}
    for name, folder in SETS.items():
        if not (folder / "manifest.csv").is_file():
            out[name] = "absent"
            continue
        films = _films(folder)
        hashes = [perceptual_hash(g) for g, _ in films]
        other = [hamming(hashes[i], hashes[j]) for i, j in itertools.combinations(range(len(films)), 2)
                 if films[i][1] != films[j][1]]
        moved: dict[str, list[int]] = {}
        for (gray, _), h in zip(films, hashes):
            for kind, copy in _copies(gray).items():
                moved.setdefault(kind, []).append(hamming(h, perceptual_hash(copy)))
        out[name] = {"films": len(films), "different_patient_pairs": len(other),
                     "closest_different_patients": int(min(other)),
                     "different_patient_pairs_within": {d: int(sum(x <= d for x in other))
                                                        for d in (2, 3, 4, 6)},
                     "copy_bits_moved_max": {k: int(max(v)) for k, v in moved.items()},
                     "copy_bits_moved_median": {k: float(np.median(v)) for k, v in moved.items()}}
    publish("near_copies", out)


if __name__ == "__main__":
    main()
