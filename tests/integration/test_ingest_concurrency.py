"""Two `xray ingest` processes at once into one fresh XRAY_HOME: nothing lost, nothing doubled.

Each process imports everything first, says it is ready, then waits for a shared "go" file, so the
two ingests really overlap (schema creation on the fresh catalogue included) instead of running one
after the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT, TEST_ENV

from xray_core.data.synthetic import write_dataset

# Import first (seconds), then start both ingests on the same signal.
RUNNER = """
import os, pathlib, sys, time
import xray_core.data.ingest, xray_core.report.terminal
from xray_cli.main import main
go = pathlib.Path(sys.argv[1])
(go.parent / f"ready.{os.getpid()}").touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
sys.exit(main(sys.argv[2:]))
"""


def _files(root: Path) -> dict[str, Path]:
    """sha256 -> a path, for every image file under ``root``."""
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in root.rglob("*.png")}


def _ingest_both(home: Path, go: Path, sources: list[Path], url: str) -> list[dict]:
    # Each ingest prepares its files in two worker processes: one writer per ingest all the same.
    # Near copies off: these 40 px synthetic films hold two cross-patient pairs within 3 pHash bits,
    # which one ingest quarantines or not depending on whether the other's rows were committed before
    # it loaded its near-copy index; this test is about exact duplicates.
    env = {**os.environ, **TEST_ENV, "XRAY_HOME": str(home), "XRAY_DATABASE_URL": url,
           "XRAY_INGEST_WORKERS": "2", "XRAY_NEAR_COPY_DISTANCE": "-1"}
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(go), "ingest", str(src), "--json"],
                              cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for src in sources]
    deadline = time.monotonic() + 60
    while len(list(go.parent.glob("ready.*"))) < len(procs) and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            break  # one died while importing: its exit status is reported below
        time.sleep(0.01)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ingest failed (exit {proc.returncode}): {err[-2000:]}"
        results.append(json.loads(out))
    return results


def _overlapping(tmp: Path) -> tuple[list[Path], int]:
    """Source A; source B holds half of A's files (same bytes, same labels) and files of its own."""
    a, b = tmp / "a", tmp / "b"
    write_dataset(a, patients_per_label=12, images_per_patient=3, size=40, seed=0)
    write_dataset(b, patients_per_label=6, images_per_patient=3, size=40, seed=1, patient_offset=100)
    shared = sorted(a.rglob("*.png"))[::2]
    for path in shared:
        shutil.copy(path, b / path.relative_to(a))  # same name: same patient id either way
    return [a, b], len(shared)


def _disjoint(tmp: Path) -> tuple[list[Path], int]:
    a, b = tmp / "a", tmp / "b"
    write_dataset(a, patients_per_label=12, images_per_patient=3, size=40, seed=0)
    write_dataset(b, patients_per_label=12, images_per_patient=3, size=40, seed=1, patient_offset=100)
    return [a, b], 0


@pytest.mark.parametrize("make_sources", [_overlapping, _disjoint], ids=["overlapping", "disjoint"])
def test_two_processes_ingest_at_once(tmp_path: Path, make_sources, database_url: str) -> None:
    sources, n_shared = make_sources(tmp_path)
    expected = {}
    for src in sources:
        expected.update(_files(src))
    n_files = sum(len(list(src.rglob("*.png"))) for src in sources)
    assert n_files == len(expected) + n_shared
    home = tmp_path / "home"

    (tmp_path / "signals").mkdir()
    results = _ingest_both(home, tmp_path / "signals" / "go", sources, database_url)

    # Every distinct image is added by exactly one of the two; the other saw the shared ones as duplicates.
    assert sum(r["added"] for r in results) == len(expected)
    assert sum(r["duplicates"] for r in results) == n_shared
    assert all(r["rejected"] == 0 and r["skipped_unchanged"] == 0 for r in results)
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    with engine.connect() as con:
        q = lambda sql: con.exec_driver_sql(sql)
        if engine.dialect.name == "sqlite":
            assert q("PRAGMA integrity_check").scalar() == "ok"
        rows = q("SELECT sha256, stored_path FROM images").fetchall()
        assert sorted(sha for sha, _ in rows) == sorted(expected)  # none lost, none twice
        assert q("SELECT sha256 FROM images GROUP BY sha256 HAVING count(*) > 1").fetchall() == []
        assert q("SELECT count(*) FROM rejections").scalar() == 0
        assert q("SELECT count(*) FROM seen_files").scalar() == n_files
        runs = q("SELECT status, started_at, finished_at FROM sources ORDER BY id").fetchall()
        assert [status for status, _, _ in runs] == ["done", "done"]
        (_, start1, end1), (_, start2, end2) = runs
        assert start1 < end2 and start2 < end1, "the two ingests did not overlap in time"
        # Every patient got exactly one split, and both processes' patients are there.
        patients = dict(q("SELECT patient_id, split FROM patients").fetchall())
        names = {p.name.split("_")[0] for src in sources for p in src.rglob("*.png")}
        assert set(patients) == names and None not in patients.values()
        assert q("SELECT count(*) FROM images i LEFT JOIN patients p ON p.patient_id = i.patient_id "
                 "WHERE p.split IS NULL").scalar() == 0
    engine.dispose()
    for sha, stored in rows:
        assert hashlib.sha256((home / stored).read_bytes()).hexdigest() == sha
