"""How does the catalogue behave at 100k-1M images, on SQLite and PostgreSQL? (a benchmark, not a test)

Synthetic catalogue rows are inserted straight into a fresh catalogue (no image files: none of the
timed queries opens one): N images of N/2 patients with splits 70/15/15 and random 64-bit pHashes,
of which 0.2% are planted near copies (1-6 bits from another patient's film), so ``near_pairs`` and
the status listing have pairs to find. Then, on that catalogue:

  backfill    ``near_pairs`` filled for the N images at once (what migration 0005 does to a catalogue);
  status      ``status_report`` (all of ``xray status``), and ``catalogue_summary`` inside it;
  split       10k new patients (one image each) assigned by ``assign_splits``, in one transaction;
  near        the ingest near-copy work for 10k new films (1% of them near copies) against the N
              catalogued: index load, then per film the verdict query (XRAY_NEAR_COPY_DISTANCE=3),
              ``record_near_pairs`` (6 bits) and ``add``, in one transaction, all 10k timed;
  skip        the retrain skip check: ``load_split_data`` + ``nothing_new_since_champion`` against a
              champion trained on exactly the current train/val sets (backbone loaded beforehand);
              and the recipe's whole way there after ingest (``skip_run_path``): freeze the split to
              split.json, read it back, the catalogue summary for the run's notes, the check;
  show        ``model_lineage`` (``xray models show``) of that champion: N x 0.85 images listed;
  lineage     bytes per version at N training/validation images: the old ``model_images`` rows
              (measured as SQLite pages of a table holding them) against one split manifest body.

Prints one JSON line and writes bench/results/catalogue_scale[-<suffix>].json.

    python bench/catalogue_scale.py [--n 100000] [--database-url postgresql+psycopg://...] [--suffix 1m]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from publish import publish  # bench/ is on sys.path when a benchmark runs as a script
from sqlalchemy import text

from db import dispose_engines, session_scope
from db.near_pairs import backfill_near_pairs
from db.schema import Model
from db.split_manifest import encode
from xray_core.data.admission import NearCopyIndex, record_near_pairs
from xray_core.data.catalogue import catalogue_summary, open_catalogue
from xray_core.data.split import assign_splits
from xray_core.settings import load_settings

NEW = 10_000
PLANTED = 0.002  # share of catalogued films that are near copies of another patient's film


def _log(message: str) -> None:
    sys.stderr.write(f"[bench catalogue_scale] {message}\n")
    sys.stderr.flush()


def _near_copy(h: np.ndarray, rng: np.random.Generator, max_bits: int) -> np.ndarray:
    """``h`` with 1..max_bits random bits flipped in each value (the same bit twice: fewer)."""
    out, flips = h.copy(), rng.integers(1, max_bits + 1, size=len(h))
    for step in range(max_bits):
        bit = np.uint64(1) << rng.integers(0, 64, size=len(h)).astype(np.uint64)
        out ^= np.where(step < flips, bit, np.uint64(0))
    return out


def _bulk(engine, table: str, columns: list[str], rows) -> None:
    """Rows straight in: COPY on PostgreSQL, executemany on SQLite (one transaction)."""
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "postgresql":
            with raw.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cur = raw.cursor()  # the engine's connections are in autocommit mode: one BEGIN for all rows
            cur.execute("BEGIN")
            cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                            f"({', '.join('?' * len(columns))})",
                            rows)
            cur.execute("COMMIT")
        raw.commit()
    finally:
        raw.close()


IMAGE_COLUMNS = ["id", "sha256", "stored_path", "label", "patient_id", "view", "width", "height", "bit_depth",
                 "format", "phash", "original_name", "source_id", "added_at"]


def _fill(engine, n: int, rng: np.random.Generator) -> None:
    """N images of N/2 patients, PLANTED of them near copies of another patient's film."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                          "VALUES (1, 'folder', '/synthetic', 'done', '2026-01-01 00:00:00', '{}')"))
    n_pat = max(1, n // 2)
    splits = rng.choice(["train", "val", "test"], size=n_pat, p=[0.70, 0.15, 0.15])
    _bulk(engine, "patients", ["patient_id", "id_source", "split"],
          ((f"p{i}", "filename", str(s)) for i, s in enumerate(splits)))
    phash = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    copies = rng.choice(n, size=int(n * PLANTED), replace=False)
    # image k+1 is another patient's (k+1 % n_pat)
    phash[copies] = _near_copy(phash[(copies + 1) % n], rng, 6)
    signed = phash.view(np.int64)
    labels = rng.choice(["normal", "pneumonia"], size=n)
    _bulk(engine, "images", IMAGE_COLUMNS,
          ((i + 1, f"{i:064x}", "store/x.png", str(labels[i]), f"p{i % n_pat}", "PA", 1024, 1024, 8, "png",
            int(signed[i]), f"f{i}.png", 1, "2026-01-01 00:00:00") for i in range(n)))
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT setval('images_id_seq', :n)"), {"n": n + NEW})
            conn.execute(text("ANALYZE"))


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


def _timed(result: dict, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    result[key] = round(time.perf_counter() - t0, 2)
    _log(f"{key} {result[key]}")
    return out


def _near_10k(settings, n: int, rng: np.random.Generator, result: dict) -> None:
    """The ingest's near-copy work for NEW films, as ``_write_group`` does it (verdict, record, add);
    the pairs are not written (the films are not), which ingest does with each film in its group."""
    engine = open_catalogue(settings)
    index = _timed(result, "near_index_load_seconds", lambda: _load_index(engine))
    existing = _catalogued_hashes(engine)
    new = rng.integers(0, 2**64 - 1, size=NEW, dtype=np.uint64, endpoint=True)
    planted = rng.choice(NEW, size=NEW // 100, replace=False)
    new[planted] = _near_copy(existing[rng.choice(n, size=len(planted))], rng, 3)
    verdicts = pairs = 0
    t0 = time.perf_counter()
    with session_scope(engine) as s, s.no_autoflush:  # the films themselves are not written here
        for k, value in enumerate(new.view(np.int64)):
            image_id = n + k + 1  # the id the film would get
            verdicts += bool(index.other_patients_within(int(value), f"new{k}", 3, s))
            pairs += record_near_pairs(s, index, image_id, int(value), f"new{k}")
            index.add(image_id, int(value), f"new{k}", f"new{k}.png")
        s.expunge_all()  # the pairs name films that were not written (ingest would flush them with the film)
    result["near_10k_films_seconds"] = round(time.perf_counter() - t0, 2)
    result["near_10k_films_with_copies"] = verdicts
    result["near_10k_pairs_found"] = pairs
    _log(f"near: {result['near_10k_films_seconds']} s for {NEW} films ({verdicts} with a near copy)")


def _catalogued_hashes(engine) -> np.ndarray:
    with engine.connect() as conn:
        return np.array(conn.execute(text("SELECT phash FROM images ORDER BY id")).scalars().all(),
                        dtype=np.int64).view(np.uint64)


def _load_index(engine) -> NearCopyIndex:
    with session_scope(engine) as s:
        return NearCopyIndex.load(s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="catalogued images (default 100000)")
    parser.add_argument("--database-url",
                        help="a PostgreSQL server (any database on it): the benchmark creates "
                        "a new database there and drops it at the end (default: a new SQLite file)")
    parser.add_argument("--suffix", default="", help="results file catalogue_scale-<suffix>.json")
    parser.add_argument("--workdir", help="folder for XRAY_HOME (default: a temp folder, removed)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result: dict = {"name": "catalogue_scale", "images": args.n, "cpu_count": os.cpu_count(),
                    "load_average_start": round(os.getloadavg()[0], 2)}

    with tempfile.TemporaryDirectory(prefix="bench-catalogue-", dir=args.workdir) as tmp:
        tmp_path = Path(tmp)
        env = {"XRAY_HOME": str(tmp_path / "home"), "XRAY_PATIENT_SALT": "bench",
               "XRAY_BACKBONE_WEIGHTS": "random"}
        if args.database_url:
            env["XRAY_DATABASE_URL"] = _new_database(args.database_url)
        settings = load_settings(env)
        engine = open_catalogue(settings)  # schema at head
        result["database"] = engine.dialect.name
        _timed(result, "fill_seconds", lambda: _fill(engine, args.n, rng))
        with engine.begin() as conn:
            result["near_pairs"] = _timed(result, "near_pairs_backfill_seconds",
                                          lambda: backfill_near_pairs(conn))

        from xray_core.report.status import status_report

        # Twice: the first call pays the imports and first connections of a new `xray status` process.
        _timed(result, "status_first_call_seconds", lambda: status_report(settings))
        report = _timed(result, "status_seconds", lambda: status_report(settings))
        assert report["catalogue"]["images"] == args.n
        result["status_pairs_across_splits"] = report["catalogue"]["near_duplicates"]["pairs_across_splits"]
        _timed(result, "status_catalogue_summary_seconds", lambda: catalogue_summary(settings))
        _near_10k(settings, args.n, rng, result)

        _bulk(engine, "patients", ["patient_id", "id_source"], ((f"new{i}", "filename") for i in range(NEW)))
        _bulk(engine, "images", IMAGE_COLUMNS,
              ((args.n + i + 1, f"n{i:063x}", "store/x.png", "normal", f"new{i}",
                "PA", 1024, 1024, 8, "png", 0, "n.png", 1, "2026-01-02 00:00:00") for i in range(NEW)))

        def split() -> dict:
            with session_scope(engine) as s:
                return assign_splits(s, ratios=settings.split_ratios, seed=settings.split_seed)

        assert sum(_timed(result, "split_10k_new_patients_seconds", split).values()) == NEW
        _skip_and_show(settings, engine, result)

        n_val, n_train = args.n * 15 // 100, args.n * 70 // 100
        ids = rng.permutation(np.arange(1, args.n + 1))
        _, body, _, _ = encode(ids[:n_train].tolist(), ids[n_train:n_train + n_val].tolist())
        result["lineage_bytes_per_version_rows"] = _model_images_bytes(tmp_path, n_train, n_val)
        result["lineage_bytes_per_version_manifest"] = len(body) + 64  # body + the version's reference
        result["lineage_bytes_per_version_unchanged_sets"] = 64  # a retrain on the same sets: the reference
        result["lineage_images_per_version"] = n_train + n_val
        dispose_engines()
        if args.database_url:
            _drop_database(args.database_url)
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    publish("catalogue_scale" + (f"-{args.suffix}" if args.suffix else ""), result)


BENCH_DB = f"xray_bench_catalogue_{os.getpid()}"


def _new_database(server_url: str) -> str:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {BENCH_DB}"))
    admin.dispose()
    return make_url(server_url).set(database=BENCH_DB).render_as_string(hide_password=False)


def _drop_database(server_url: str) -> None:
    from sqlalchemy import create_engine

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {BENCH_DB}"))
    admin.dispose()


def _skip_and_show(settings, engine, result: dict) -> None:
    """A champion trained on exactly the current train/val sets, then the skip check and its lineage."""
    from xray_core.data.snapshot import load_split_data, training_set_fingerprint
    from xray_core.model.backbone import load_backbone
    from xray_core.pipeline.recipe import freeze_split
    from xray_core.pipeline.unchanged import TRAINING_SETTINGS, nothing_new_since_champion
    from xray_core.registry.listing import model_lineage
    from xray_core.registry.manifests import put_split_manifest

    backbone = load_backbone(settings).fingerprint  # loaded once per process in a real run too
    data = load_split_data(settings)
    now = settings.public_dict()
    with session_scope(engine) as s:
        manifest = put_split_manifest(s, [r.id for r in data.train], [r.id for r in data.val])
        s.add(Model(id=1, status="champion", checkpoint_dir="models/1", checkpoint_sha256="0" * 64,
                    card_sha256="0" * 64, backbone_fingerprint=backbone, backbone_weights="random",
                    training_set_fingerprint=training_set_fingerprint(data), labels=data.labels,
                    config={k: now.get(k) for k in TRAINING_SETTINGS}, split_manifest=manifest))
    why = _timed(result, "skip_check_seconds",
                 lambda: nothing_new_since_champion(settings, load_split_data(settings)))
    assert why is not None and why.startswith("nothing new"), why

    def skipped_run() -> str | None:  # the recipe's way to the same decision (pipeline.recipe)
        data = freeze_split(settings, str(settings.home / "reports" / "bench")).load()
        catalogue_summary(settings)  # the run's near-duplicate and label-history notes
        return nothing_new_since_champion(settings, data)

    assert _timed(result, "skip_run_path_seconds", skipped_run) == why
    shown = _timed(result, "models_show_seconds", lambda: model_lineage(settings, 1))
    result["models_show_images"] = sum(len(v) for v in shown["images"].values())
    result["models_show_json_bytes"] = len(json.dumps(shown, default=str))


if __name__ == "__main__":
    main()
