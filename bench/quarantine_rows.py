"""What does a hostile manifest cost the quarantine? (a benchmark, not a test)

The export issue 23 found: a manifest of N rows naming one film with alternating labels, so every second
row is a ``label_conflict``. Ingested into a fresh XRAY_HOME (a temp folder), in this process
(XRAY_INGEST_WORKERS=1), twice: with the default XRAY_QUARANTINE_MAX_BYTES, then with a cap below the
film's size. Reports seconds, rows/s, rejection rows, and the files and bytes under quarantine/.

The film: ../shared/data/cxr-sample/normal/IM-0629-0001-0001.jpeg (948,018 bytes, the size of the
film the hostile pass used) when present, else a 64 px synthetic PNG.

Runs on any checkout (the summary's ``quarantine`` counts are absent before content addressing), so
the same command measures an older commit: ``PYTHONPATH=<old checkout> python bench/quarantine_rows.py``.
Prints one JSON line and writes bench/results/quarantine_rows.json (``--name`` to change it).

    python bench/quarantine_rows.py [--n 10000] [--name quarantine_rows]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from publish import publish  # bench/ is on sys.path when a benchmark runs as a script

from db import dispose_engines
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray
from xray_core.settings import load_settings

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-sample"
REAL_FILM = SAMPLE / "normal" / "IM-0629-0001-0001.jpeg"


def _film() -> tuple[bytes, str]:
    if REAL_FILM.is_file():
        return REAL_FILM.read_bytes(), "film.jpeg"
    buf = io.BytesIO()
    pixels = make_xray("normal", size=64, rng=np.random.default_rng(0), patient_seed=0)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue(), "film.png"


def _run(root: Path, n: int, cap: int | None) -> dict:
    home = root / f"home-{cap}"
    env = {**os.environ, "XRAY_HOME": str(home), "XRAY_INGEST_WORKERS": "1"}
    if cap is not None:
        env["XRAY_QUARANTINE_MAX_BYTES"] = str(cap)
    settings = load_settings(env)
    dispose_engines()
    start = time.perf_counter()
    summary = ingest_source(root / "batch", manifest=root / "batch" / "manifest.csv", settings=settings)
    seconds = time.perf_counter() - start
    files = [p for p in (home / "quarantine").rglob("*") if p.is_file()]
    dispose_engines()
    return {"cap": cap, "seconds": round(seconds, 1), "rows_per_s": round(n / seconds),
            "added": summary.added, "rejected": summary.rejected, "quarantine_files": len(files),
            "quarantine_bytes": sum(p.stat().st_size for p in files),
            "summary_quarantine": getattr(summary, "quarantine", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="manifest rows, all naming one film")
    parser.add_argument("--name", default="quarantine_rows", help="bench/results/<name>.json")
    args = parser.parse_args()
    film, name = _film()
    with tempfile.TemporaryDirectory(prefix="xray-bench-quarantine-") as tmp:
        root = Path(tmp)
        (root / "batch").mkdir()
        (root / "batch" / name).write_bytes(film)
        with open(root / "batch" / "manifest.csv", "w", encoding="utf-8") as fh:
            fh.write("file,label\n")
            fh.writelines(f"{name},{('normal', 'pneumonia')[i % 2]}\n" for i in range(args.n))
        runs = [_run(root, args.n, None), _run(root, args.n, len(film) - 1)]
    publish(args.name, {"rows": args.n, "film_bytes": len(film), "film": name,
                        "python": sys.version.split()[0], "load_average": os.getloadavg(), "runs": runs})


if __name__ == "__main__":
    main()
