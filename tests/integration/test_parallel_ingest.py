"""Parallel ingest (XRAY_INGEST_WORKERS, xray_core.data.ingest_pool): the same per-file outcomes,
rows and files with worker processes as in one process, and a worker killed mid-batch fails the
ingest cleanly (nothing half-written; the next ingest completes).

Integration lane: each test starts worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from badfiles import CORPUS_MAX_PIXELS, make_bad_corpus, make_good_variants
from conftest import TEST_ENV
from sqlalchemy import select

from db import dispose_engines, session_scope
from db.schema import Image, Patient, Rejection, SeenFile
from xray_core.data import ingest, ingest_pool
from xray_core.data.catalogue import open_catalogue
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import write_dataset
from xray_core.settings import Settings, load_settings

pytestmark = pytest.mark.sqlite_only  # homes of their own, compared file by file

ROOT = Path(__file__).resolve().parents[2]


def _settings(home: Path, workers: int, **env: str) -> Settings:
    return load_settings({**TEST_ENV, "XRAY_HOME": str(home), "XRAY_MAX_PIXELS": str(CORPUS_MAX_PIXELS),
                          "XRAY_INGEST_WORKERS": str(workers), **env})


def _unique(rel: str | None) -> str | None:
    """A quarantine name without its random part (quarantine/<sha16>-<random>-<name>)."""
    return re.sub(r"^(quarantine/[^-]+)-[0-9a-f]{8}-", r"\1-*-", rel) if rel else rel


def _outcomes(settings: Settings) -> dict:
    """Every row an ingest writes (less ids, times and random name parts) and every store/quarantine
    file's sha256."""
    with session_scope(open_catalogue(settings)) as s:
        images = sorted(s.execute(select(
            Image.sha256, Image.stored_path, Image.label, Image.patient_id, Image.original_name, Image.width,
            Image.height, Image.bit_depth, Image.format, Image.phash, Image.view, Image.site)).all())
        rejections = sorted((*row[:4], _unique(row[4])) for row in s.execute(select(
            Rejection.path, Rejection.sha256, Rejection.reason, Rejection.detail, Rejection.quarantine_path)))
        seen = sorted(s.execute(select(SeenFile.path, SeenFile.size, SeenFile.mtime_ns, SeenFile.label_key,
                                       SeenFile.sha256, SeenFile.outcome)).all())
        patients = sorted(s.execute(select(Patient.patient_id, Patient.id_source, Patient.split)).all())
    files = {_unique(str(p.relative_to(settings.home))): hashlib.sha256(p.read_bytes()).hexdigest()
             for sub in ("store", "quarantine") for p in (settings.home / sub).rglob("*") if p.is_file()}
    return {"images": images, "rejections": rejections, "seen": seen, "patients": patients, "files": files}


def _summary(summary) -> dict:  # summary: an IngestSummary
    return {k: v for k, v in summary.as_dict().items() if k not in ("seconds", "source_id")}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The bad-input corpus, every good flavour (DICOM included), an exact duplicate and a label conflict."""
    src = tmp_path_factory.mktemp("parallel") / "src"
    make_bad_corpus(src, label="normal")
    make_good_variants(src, label="pneumonia")
    write_dataset(src, patients_per_label=3, images_per_patient=2, size=48, seed=5)
    first = sorted((src / "normal").glob("person*.png"))[0]
    shutil.copy(first, src / "normal" / "copy_of_first.png")  # duplicate: same bytes, same label
    shutil.copy(first, src / "pneumonia" / "conflict.png")  # the same bytes under another label
    return src


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_one_and_two_workers_give_the_same_outcomes(source: Path, tmp_path: Path, method: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked workers (a process without other threads, e.g. ``xray ingest``) and workers from a
    forkserver (a process with threads, e.g. a Prefect flow run) alike."""
    if method == "fork" and ingest_pool.start_method() != "fork":
        pytest.skip("another thread runs in this test process: workers are not forked from it")
    used: list[str] = []
    monkeypatch.setattr(ingest_pool, "start_method", lambda: used.append(method) or method)
    groups: list[int] = []  # files per write group, of the ingest running now
    write_group = ingest._write_group
    monkeypatch.setattr(ingest, "_write_group", lambda engine, settings, source_id, group, *rest: (
        groups.append(len(group)), write_group(engine, settings, source_id, group, *rest))[1])
    progress: dict[int, list] = {1: [], 2: []}
    results, sizes = {}, {}
    for workers in (1, 2):
        settings = _settings(tmp_path / f"home{workers}", workers)
        summary = ingest_source(source, settings=settings,
                                progress=lambda d, t, w=workers: progress[w].append((d, t)))
        results[workers] = (_summary(summary), _outcomes(settings))
        sizes[workers], groups[:] = groups[:], []
        dispose_engines()
    one, two = results[1], results[2]
    assert (one[0]["added"] > 0 and one[0]["duplicates"] == 1
            and one[0]["rejected_by_reason"]["label_conflict"] == 1)
    assert two[0] == one[0]
    for table in one[1]:
        assert two[1][table] == one[1][table], table
    total = one[0]["files"]
    assert progress[2] == progress[1] == [(i, total) for i in range(1, total + 1)]
    assert used and set(used) == {method}  # the pool started the chosen way
    # Groups of GROUP_SIZE files in one process; with workers, the last files are written in smaller
    # groups while the workers finish (ingest.tail_group), the last one of a few files.
    assert total > ingest.GROUP_SIZE and sum(sizes[1]) == sum(sizes[2]) == total - one[0]["skipped_unchanged"]
    assert sizes[1] == [ingest.GROUP_SIZE] * (len(sizes[1]) - 1) + [sizes[1][-1]]
    assert max(sizes[2]) <= ingest.GROUP_SIZE and len(sizes[2]) > len(sizes[1]), sizes
    assert sizes[2][-1] <= ingest.TAIL_GROUP < sizes[1][-1], sizes


BLAS_CHECK = """
import json, os, threading
import numpy as np
from threadpoolctl import threadpool_info
from xray_core.data import ingest_pool
from xray_core.settings import get_settings

def blas_limits():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

def in_worker():  # after a matrix product large enough for BLAS to split
    np.ones((400, 400)) @ np.ones((400, 400))
    return blas_limits(), len(os.listdir("/proc/self/task")), threading.active_count()

before = blas_limits()
with ingest_pool.PreparePool(2, get_settings(), None, lambda sha: None) as pool:
    executor = pool._pool()
    seen = [executor.submit(in_worker).result() for _ in range(4)]
print(json.dumps({"method": ingest_pool.start_method(), "before": before, "after": blas_limits(),
                  "workers": seen}))
"""


def test_forked_workers_start_no_blas_thread_and_the_limit_is_restored(tmp_path: Path) -> None:
    """A forked worker inherits one BLAS thread from the pool (PreparePool._fork_workers) instead of
    setting it itself, which would start an OpenBLAS thread that spins (~0.1 s of CPU) before it
    sleeps; the ingesting process gets its own limit back when the pool closes. In a process of its
    own, with two BLAS threads (the tests otherwise run with one)."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("no /proc: threads are not counted")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_")}
    env.update({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"})
    done = subprocess.run([sys.executable, "-c", BLAS_CHECK], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["method"] == "fork" and max(got["before"]) == 2
    assert got["after"] == got["before"]
    for blas, tasks, python_threads in got["workers"]:
        assert set(blas) == {1}
        assert tasks == python_threads  # no native (BLAS) thread besides the Python ones


def test_a_fork_that_fails_while_starting_workers_stops_those_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If forking the workers fails partway (``fork`` out of memory after the first worker), the workers
    already forked are killed and reaped before the error goes on: their executor's manager thread never
    started, so a shutdown alone would leave them waiting for work and this process waiting for them at
    exit. The BLAS limit is restored when the pool closes."""
    import errno
    import multiprocessing
    from multiprocessing.context import ForkProcess

    if ingest_pool.start_method() != "fork":
        pytest.skip("another thread runs in this test process: workers are not forked from it")
    real, starts = ForkProcess.start, []

    def start(self):
        starts.append(self)
        if len(starts) > 1:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(self)

    monkeypatch.setattr(ForkProcess, "start", start)
    settings = _settings(tmp_path / "home", 2)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        with ingest_pool.PreparePool(2, settings, None, lambda sha: None) as pool:
            pool._fork_workers()
    assert len(starts) == 2 and starts[0].exitcode is not None  # the first worker was forked, and is gone
    assert multiprocessing.active_children() == []
    assert pool._blas_limit is None and pool._executor is None


def test_files_examined_while_the_catalogue_opens_are_dropped_when_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked workers begin on the first files before the catalogue is open (PreparePool.prefetch),
    unless the catalogue may have seen files under the source (a re-scan); a prefetched file then
    found unchanged is dropped, as skipped."""
    if ingest_pool.start_method() != "fork":
        pytest.skip("another thread runs in this test process: workers are not forked from it")
    from xray_core.data.catalogue import may_have_seen

    src = tmp_path / "src"
    write_dataset(src, patients_per_label=3, images_per_patient=2, size=48, seed=11)  # 12 films
    ahead: list[int] = []
    real = ingest_pool.PreparePool.prefetch

    def spy(self, candidates):
        out = real(self, candidates)
        ahead.append(len(self._ahead))
        return out

    monkeypatch.setattr(ingest_pool.PreparePool, "prefetch", spy)
    settings = _settings(tmp_path / "home", 2)
    root = f"{src}/"
    assert not may_have_seen(settings, root)  # no catalogue yet
    first = ingest_source(src, settings=settings)
    assert may_have_seen(settings, root) and not may_have_seen(settings, f"{tmp_path}/elsewhere/")
    assert not may_have_seen(settings, f"{src}x/")  # shares a prefix, not the folder
    stored = _outcomes(settings)
    again = ingest_source(src, settings=settings)  # a re-scan: nothing prefetched
    monkeypatch.setattr(ingest, "may_have_seen", lambda settings, root: False)
    forced = ingest_source(src, settings=settings)  # prefetched, then every file found unchanged
    assert _outcomes(settings) == stored
    dispose_engines()
    assert ahead == [12, 12]  # the first ingest and the forced one began every file early
    assert first.added == 12
    for rescan in (again, forced):
        assert (rescan.skipped_unchanged, rescan.added, rescan.rejected) == (12, 0, 0)


def test_workers_are_forked_only_from_a_process_without_other_threads() -> None:
    assert ingest_pool.start_method() in ("fork", "forkserver")  # Linux: both exist
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert ingest_pool.start_method() == "forkserver"
    finally:
        stop.set()
        other.join()


def test_a_known_film_is_a_duplicate_even_where_its_decode_would_now_fail(
        source: Path, tmp_path: Path) -> None:
    """In one process a catalogued sha256 is never decoded again; workers decode it anyway, and the
    writer must discard what that decode said (here: too_small under a raised XRAY_MIN_IMAGE_SIDE)."""
    copies = tmp_path / "again" / "normal"
    copies.mkdir(parents=True)
    for path in sorted((source / "normal").glob("person*.png"))[:3]:
        shutil.copy(path, copies / f"renamed_{path.name}")
    outcomes = {}
    for workers in (1, 2):
        home = tmp_path / f"home{workers}"
        ingest_source(source, settings=_settings(home, workers))
        again = ingest_source(tmp_path / "again", settings=_settings(home, workers, XRAY_MIN_IMAGE_SIDE="64"))
        outcomes[workers] = _summary(again)
        dispose_engines()
    assert outcomes[1]["duplicates"] == 3 and outcomes[1]["rejected"] == 0
    assert {k: v for k, v in outcomes[2].items() if k != "source"} == \
           {k: v for k, v in outcomes[1].items() if k != "source"}


def _ingest_subprocess(home: Path, src: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_")}
    env.update({**TEST_ENV, "XRAY_HOME": str(home), "XRAY_INGEST_WORKERS": "2", "PYTHONPATH": str(ROOT)})
    if kill_at:
        env["XRAY_FAULT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "xray_cli.main", "ingest", str(src)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


# TERM: a forked worker must not inherit the CLI's handler (SIGTERM -> an exception sent back as a result).
@pytest.mark.parametrize("signal_name", ["KILL", "TERM"])
def test_a_worker_killed_mid_batch_fails_the_ingest_and_the_rerun_completes(tmp_path: Path,
                                                                            signal_name: str) -> None:
    src = tmp_path / "src"
    write_dataset(src, patients_per_label=12, images_per_patient=2, size=48, seed=9)  # 48 files
    reference = tmp_path / "reference"
    done = _ingest_subprocess(reference, src, None)
    assert done.returncode == 0, done.stderr[-3000:]

    home = tmp_path / "home"
    killed = _ingest_subprocess(home, src, f"ingest.worker_prepared:3:{signal_name}")  # each at its 3rd file
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "worker process died" in killed.stderr
    con = sqlite3.connect(home / "catalogue.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT status FROM sources").fetchall() == [("failed",)]
        for sha, rel in con.execute("SELECT sha256, stored_path FROM images"):  # rows name complete files
            assert hashlib.sha256((home / rel).read_bytes()).hexdigest() == sha
    finally:
        con.close()

    got, expected = _rerun_matches(home, src, reference)
    assert got["files"] == expected["files"]


def _rerun_matches(home: Path, src: Path, reference: Path) -> tuple[dict, dict]:
    """Ingest ``src`` again into the killed ``home``: it succeeds, and its images and patients are an
    uninterrupted ingest's (``reference``); returns both outcomes for the caller's further checks."""
    again = _ingest_subprocess(home, src, None)
    assert again.returncode == 0, again.stderr[-3000:]
    expected = _outcomes(_settings(reference, 2))
    got = _outcomes(_settings(home, 2))
    dispose_engines()
    assert got["images"] == expected["images"] and got["patients"] == expected["patients"]
    return got, expected


def test_a_killed_ingest_leaves_no_worker_behind(tmp_path: Path) -> None:
    """SIGKILL of the ingesting process itself: its workers exit on their own (they would otherwise
    hold its output pipes open, and this ``subprocess.run`` would hit its timeout)."""
    src = tmp_path / "src"
    write_dataset(src, patients_per_label=12, images_per_patient=2, size=48, seed=9)
    killed = _ingest_subprocess(tmp_path / "home", src, "ingest.store_written:3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    again = _ingest_subprocess(tmp_path / "home", src, None)
    assert again.returncode == 0, again.stderr[-3000:]


# A write group (xray_core.data.ingest.GROUP_SIZE = 32 files; with workers the last ones in halves,
# ingest.tail_group: here 24, 12, 6, 4, 2) writes its store files with their fsyncs batched, then its
# rows in one transaction.
# Killed anywhere inside a group: the catalogue holds whole groups only, every row names a complete
# store file, no final-named store file is partial, and the next ingest completes with the same rows
# and files as an uninterrupted one.
MID_GROUP_KILLS = [
    "fsutil.tmp_written:3",  # first group: 2 store files renamed, the others fsynced temp files
    "ingest.store_written:5",  # first group's store files all durable, none of its rows written
    "ingest.group_row:40",  # third group: the first two (36 rows) committed, 4 of its rows added
]


@pytest.mark.parametrize("kill_at", MID_GROUP_KILLS)
def test_a_kill_inside_a_write_group_leaves_a_valid_catalogue(kill_at: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_dataset(src, patients_per_label=12, images_per_patient=2, size=48, seed=9)  # 48 files: 5 groups
    reference = tmp_path / "reference"
    assert _ingest_subprocess(reference, src, None).returncode == 0

    home = tmp_path / "home"
    killed = _ingest_subprocess(home, src, kill_at)
    assert killed.returncode == -9, killed.stderr[-3000:]
    con = sqlite3.connect(home / "catalogue.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute("SELECT sha256, stored_path FROM images").fetchall()
    finally:
        con.close()
    assert len(rows) == (36 if kill_at.startswith("ingest.group_row") else 0)  # whole groups only
    for sha, rel in rows:  # rows name complete files
        assert hashlib.sha256((home / rel).read_bytes()).hexdigest() == sha
    for path in (home / "store").rglob("*"):  # no final-named store file is partial
        if path.is_file() and not path.name.startswith("."):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name.split(".")[0]

    got, expected = _rerun_matches(home, src, reference)
    assert got["seen"] == expected["seen"]
    leftovers = set(got["files"]) - set(expected["files"])  # temp files a kill left: xray doctor lists them
    assert {k: v for k, v in got["files"].items() if k not in leftovers} == expected["files"]
    assert all(Path(k).name.startswith(".") and k.endswith(".tmp") for k in leftovers)
    assert bool(leftovers) == kill_at.startswith("fsutil.tmp_written")
