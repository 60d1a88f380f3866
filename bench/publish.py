"""The benchmarks' one output contract: print one JSON line, write bench/results/<name>.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, result: dict[str, Any]) -> None:
    print(json.dumps(result, default=str))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def read_manifest(folder: Path) -> tuple[list[dict[str, str]], list[str], Any, Any]:
    """A sample's manifest: its rows, the sorted labels, label indices and patient ids (for grouped CV)."""
    import csv

    import numpy as np

    with open(Path(folder) / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels = sorted({r["label"] for r in rows})
    y = np.array([labels.index(r["label"]) for r in rows])
    groups = np.array([r["patient_id"] for r in rows], dtype=object)
    return rows, labels, y, groups
