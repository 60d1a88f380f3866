"""How does the catalogue behave at 100k-1M images? (a benchmark, not a test; SQLite only)

Synthetic catalogue rows are inserted straight into a fresh catalogue (no image files: none of the
timed queries opens one): N images of N/2 patients with splits 70/15/15, random 64-bit pHashes.
Then, on that catalogue:

  status      ``catalogue_summary`` (what ``xray status`` shows, the near-duplicate scan included);
  split       10k new patients (one image each) assigned by ``assign_splits``, in one transaction;
  near        the ingest near-copy check (``NearCopyIndex.closest_other_patient``) for new films
              against the N catalogued ones: index load timed whole, then ``--near-queries`` queries
              timed and extrapolated to 10k (each query is one linear scan of N hashes);
  lineage     bytes per version at N training/validation images: the old ``model_images`` rows
              (measured as SQLite pages of a table holding them) against one split manifest body.

Prints one JSON line and writes bench/results/catalogue_scale.json.

    python bench/catalogue_scale.py [--n 100000] [--near-queries 200]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from db import dispose_engines, session_scope
from db.split_manifest import encode
from xray_core.data.admission import NearCopyIndex
from xray_core.data.catalogue import catalogue_summary, open_catalogue
from xray_core.data.split import assign_splits
from xray_core.settings import load_settings

from publish import publish  # bench/ is on sys.path when a benchmark runs as a script

NEW_PATIENTS = 10_000


def _log(message: str) -> None:
    sys.stderr.write(f"[bench catalogue_scale] {message}\n")
    sys.stderr.flush()


def _fill(db: Path, n: int, rng: np.random.Generator) -> None:
    """N images of N/2 patients, straight into the tables (one transaction, executemany)."""
    con = sqlite3.connect(db)
    try:
        con.execute("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                    "VALUES (1, 'folder', '/synthetic', 'done', '2026-01-01 00:00:00', '{}')")
        n_pat = max(1, n // 2)
        splits = rng.choice(["train", "val", "test"], size=n_pat, p=[0.70, 0.15, 0.15])
        con.executemany("INSERT INTO patients (patient_id, id_source, split) VALUES (?, 'filename', ?)",
                        ((f"p{i}", str(s)) for i, s in enumerate(splits)))
        phash = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
        labels = rng.choice(["normal", "pneumonia"], size=n)
        con.executemany(
            "INSERT INTO images (id, sha256, stored_path, label, patient_id, view, width, height, bit_depth, "
            "format, phash, original_name, source_id, added_at) VALUES (?, ?, 'store/x.png', ?, ?, 'PA', 1024, "
            "1024, 8, 'png', ?, ?, 1, '2026-01-01 00:00:00')",
            ((i + 1, f"{i:064x}", str(labels[i]), f"p{i % n_pat}", int(phash[i]), f"f{i}.png") for i in range(n)))
        con.commit()
    finally:
        con.close()


def _model_images_bytes(tmp: Path, n_train: int, n_val: int) -> int:
    """SQLite bytes of one version's old lineage rows (table + primary-key index)."""
    db = tmp / "lineage-rows.db"
    con = sqlite3.connect(db)
    try:
        con.execute("CREATE TABLE model_images (model_id INTEGER NOT NULL, image_id INTEGER NOT NULL, "
                    "role VARCHAR(8) NOT NULL, PRIMARY KEY (model_id, image_id))")
        con.commit()
        before = con.execute("PRAGMA page_count").fetchone()[0]
        con.executemany("INSERT INTO model_images VALUES (1, ?, ?)",
                        ((i + 1, "train" if i < n_train else "val") for i in range(n_train + n_val)))
        con.commit()
        pages = con.execute("PRAGMA page_count").fetchone()[0] - before
        return pages * con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="catalogued images (default 100000)")
    parser.add_argument("--near-queries", type=int, default=200, help="near-copy queries timed (default 200)")
    parser.add_argument("--workdir", help="folder for XRAY_HOME (default: a temp folder, removed)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result: dict = {"name": "catalogue_scale", "images": args.n, "database": "sqlite", "cpu_count": os.cpu_count(),
                    "load_average_start": round(os.getloadavg()[0], 2)}

    with tempfile.TemporaryDirectory(prefix="bench-catalogue-", dir=args.workdir) as tmp:
        tmp_path = Path(tmp)
        settings = load_settings({"XRAY_HOME": str(tmp_path / "home"), "XRAY_PATIENT_SALT": "bench"})
        open_catalogue(settings)  # schema at head
        dispose_engines()
        t0 = time.perf_counter()
        _fill(settings.home / "catalogue.db", args.n, rng)
        result["fill_seconds"] = round(time.perf_counter() - t0, 1)
        _log(f"{args.n} rows in {result['fill_seconds']} s")

        t0 = time.perf_counter()
        summary = catalogue_summary(settings)
        result["status_seconds"] = round(time.perf_counter() - t0, 2)
        assert summary["images"] == args.n
        _log(f"status {result['status_seconds']} s")

        con = sqlite3.connect(settings.home / "catalogue.db")
        con.executemany("INSERT INTO patients (patient_id, id_source) VALUES (?, 'filename')",
                        ((f"new{i}",) for i in range(NEW_PATIENTS)))
        con.executemany("INSERT INTO images (id, sha256, stored_path, label, patient_id, view, width, height, "
                        "bit_depth, format, phash, original_name, source_id, added_at) VALUES (?, ?, 'store/x.png', "
                        "'normal', ?, 'PA', 1024, 1024, 8, 'png', 0, 'n.png', 1, '2026-01-02 00:00:00')",
                        ((args.n + i + 1, f"n{i:063x}", f"new{i}") for i in range(NEW_PATIENTS)))
        con.commit()
        con.close()
        t0 = time.perf_counter()
        with session_scope(open_catalogue(settings)) as s:
            assigned = assign_splits(s, ratios=settings.split_ratios, seed=settings.split_seed)
        result["split_10k_new_patients_seconds"] = round(time.perf_counter() - t0, 2)
        assert sum(assigned.values()) == NEW_PATIENTS
        _log(f"split {result['split_10k_new_patients_seconds']} s")

        t0 = time.perf_counter()
        with session_scope(open_catalogue(settings)) as s:
            index = NearCopyIndex.load(s)
        result["near_index_load_seconds"] = round(time.perf_counter() - t0, 2)
        queries = rng.integers(0, 2**64 - 1, size=args.near_queries, dtype=np.uint64)
        t0 = time.perf_counter()
        for q in queries:
            index.closest_other_patient(int(q), "nobody", 3)
        per_query = (time.perf_counter() - t0) / args.near_queries
        result["near_seconds_per_query"] = round(per_query, 4)
        result["near_10k_queries_seconds_extrapolated"] = round(result["near_index_load_seconds"]
                                                                + per_query * 10_000, 1)
        _log(f"near: {per_query * 1000:.1f} ms/query")
        dispose_engines()

        n_val = args.n * 15 // 100
        n_train = args.n * 70 // 100
        ids = rng.permutation(np.arange(1, args.n + 1))
        _, body, _, _ = encode(ids[:n_train].tolist(), ids[n_train:n_train + n_val].tolist())
        result["lineage_bytes_per_version_rows"] = _model_images_bytes(tmp_path, n_train, n_val)
        result["lineage_bytes_per_version_manifest"] = len(body) + 64  # body + the version's reference
        result["lineage_bytes_per_version_unchanged_sets"] = 64  # a retrain on the same sets: the reference
        result["lineage_images_per_version"] = n_train + n_val
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    publish("catalogue_scale", result)


if __name__ == "__main__":
    main()
