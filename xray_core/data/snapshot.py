"""The data a run works on: the patient-grouped split frozen in a snapshot, its fingerprints and the
label indices of its rows (the cached features of those rows: :mod:`xray_core.pipeline.features`).

A run freezes the split once (``split.json`` in its report folder) so every step, and the report, see
the same images even while another process ingests more.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from db import session_scope
from xray_core.data.catalogue import Row, open_catalogue, split_image_rows
from xray_core.errors import NotEnoughDataError
from xray_core.settings import Settings


@dataclass(frozen=True)
class SplitData:
    labels: list[str]  # class order of the model to train: sorted labels present in train
    train: list[Row]
    val: list[Row]
    test: list[Row]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name in ("train", "val", "test"):
            rows = getattr(self, name)
            out[name] = {label: sum(1 for r in rows if r[3] == label) for label in self.labels}
        return out


def load_split_data(settings: Settings) -> SplitData:
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        train, val, test = (split_image_rows(s, name) for name in ("train", "val", "test"))
    labels = sorted({r[3] for r in train})
    if len(labels) < 2:
        raise NotEnoughDataError(
            f"training needs images of at least 2 labels in the train split; found {labels or 'none'}. "
            "Ingest more data (xray ingest PATH)")
    return SplitData(labels, train, [r for r in val if r[3] in labels], [r for r in test if r[3] in labels])


def set_fingerprint(rows: list[Row], *, role: str) -> str:
    """sha256 over the sorted (sha256, label) pairs: identifies an exact image set and its labels."""
    h = hashlib.sha256(role.encode())
    for sha, label in sorted((r[1], r[3]) for r in rows):
        h.update(f"{sha}:{label}\n".encode())
    return h.hexdigest()


def training_set_fingerprint(data: SplitData) -> str:
    return hashlib.sha256((set_fingerprint(data.train, role="train")
                           + set_fingerprint(data.val, role="val")).encode()).hexdigest()


def fingerprint_test_set(rows: list[Row]) -> str:
    return set_fingerprint(rows, role="test")








def label_indices(rows: list[Row], labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[r[3]] for r in rows], dtype=np.int64)


def write_json(path: Path, payload: Any) -> None:
    from xray_core.io.fsutil import atomic_write_text, json_text

    atomic_write_text(path, json_text(payload, indent=2, default=str))


def save_snapshot(path: Path, data: SplitData) -> Path:
    """Freeze the split a run works on, so every step (and the report) sees the same images even
    while another process ingests more."""
    write_json(path, {"labels": data.labels, "train": data.train, "val": data.val, "test": data.test})
    return path


def load_snapshot(path: Path) -> SplitData:
    raw = json.loads(Path(path).read_text())
    return SplitData(raw["labels"], *([Row._make(r) for r in raw[k]] for k in ("train", "val", "test")))
