"""How long do ``xray doctor`` and the WAL-aware catalogue check take? (a benchmark, not a test)

A fresh home gets N image rows (bulk-inserted, like bench/catalogue_scale.py) and N store files of
2 KB random bytes filed under their sha256, one orphan and one missing file. Then, timed:

  examine         ``xray doctor`` (quick_check, revision, store/quarantine/models reconciliation);
  examine_verify  ``xray doctor --verify`` (integrity_check, every store file hashed);
  wal_only_check  the catalogue left as a full disk leaves it (main file = page 1, every page in the
                  WAL), then ``check_sqlite_file``: SQLite opens it read-only, quick_check, checkpoint;
  repair          ``xray doctor --repair`` on that state (backup copy, checkpoint, orphan moved).

Prints one JSON line and writes bench/results/doctor.json.

    python bench/doctor.py [--n 20000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from publish import publish  # bench/ is on sys.path when a benchmark runs as a script
from sqlalchemy import insert

from db import dispose_engines, session_scope
from db.engine import check_sqlite_file
from db.schema import Image, Patient, Source
from xray_core.data.catalogue import open_catalogue
from xray_core.data.doctor import examine
from xray_core.data.doctor_repair import repair
from xray_core.settings import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from catalogue_faults import make_wal_only  # the tests' own builder of the full-disk state


def _fill(settings, n: int) -> None:
    engine = open_catalogue(settings)
    rng = os.urandom
    images, patients = [], []
    for i in range(n):
        data = rng(2048)
        sha = hashlib.sha256(data).hexdigest()
        rel = f"store/{sha[:2]}/{sha}.png"
        (settings.home / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings.home / rel).write_bytes(data)
        patients.append({"patient_id": f"p{i}", "id_source": "filename", "split": "train"})
        images.append({"sha256": sha, "stored_path": rel, "label": "normal",
                       "patient_id": f"p{i}", "width": 64, "height": 64, "bit_depth": 8, "format": "png",
                       "phash": i, "original_name": f"{i}.png", "source_id": 1})
    with session_scope(engine) as s:
        s.add(Source(kind="folder", path="/bench", status="done"))
        s.flush()
        s.execute(insert(Patient), patients)
        s.execute(insert(Image), images)


def _timed(result: dict, key: str, fn):
    start = time.perf_counter()
    out = fn()
    result[f"{key}_s"] = round(time.perf_counter() - start, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"XRAY_HOME": str(Path(tmp) / "home"), "XRAY_PATIENT_SALT": "bench"})
        settings = load_settings()
        _fill(settings, args.n)
        db_file = settings.home / "catalogue.db"
        wal = Path(f"{db_file}-wal").read_bytes()  # written since creation: every page is in it
        dispose_engines()
        stored = sorted((settings.home / "store").rglob("*.png"))
        stored[0].unlink()
        (settings.home / "store" / "zz").mkdir()
        (settings.home / "store" / "zz" / "orphan.png").write_bytes(b"orphan")
        result: dict = {"n_images": args.n, "wal_bytes": len(wal)}
        report = _timed(result, "examine", lambda: examine(settings))
        result["examine_findings"] = sorted(f.code for f in report.findings)
        _timed(result, "examine_verify", lambda: examine(settings, verify=True))
        make_wal_only(db_file, wal)
        result["wal_only_main_bytes"] = db_file.stat().st_size
        report = _timed(result, "repair", lambda: repair(settings))
        result["repair_findings"] = {f.code: f.repaired is not None for f in report.findings}
        make_wal_only(db_file, wal)
        _timed(result, "wal_only_check", lambda: check_sqlite_file(db_file))
        result["main_bytes_after_check"] = db_file.stat().st_size
    publish("doctor", result)


if __name__ == "__main__":
    main()
