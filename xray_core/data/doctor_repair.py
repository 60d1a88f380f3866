"""``xray doctor --repair``: the few repairs that lose nothing, each after a backup.

* A copy first: the catalogue's files as they were (main file, ``-wal``, ``-shm``, copied, never
  moved) and, when SQLite can read it, a consistent copy made with SQLite's backup API, in
  ``XRAY_HOME/doctor/<UTC time>/``. No copy (a full disk), no repair.
* The WAL checkpointed into the main file (``wal_checkpoint(TRUNCATE)``), so the main file is whole
  again. A failure for lack of space changes nothing: the rows stay readable through the WAL.
* Orphaned store and quarantine files moved into that same dated folder (``orphans/<key>``), never
  deleted. Not while an ingest is running (its files are written before its rows), and no store file
  at all when the catalogue has no image rows (a lost catalogue would make every file an orphan).

Never repaired, only reported: rows whose file is missing or altered (a backup has them), a
damaged catalogue (restore it; the report says how), model folders without a row.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from db.engine import header_problem, open_sqlite, sqlite_sidecars
from xray_core.data.doctor import (
    DoctorReport,
    examine,
    orphan_keys,
    read_only_engine,
    running_ingests,
    sqlite_path,
)
from xray_core.errors import StorageFullError
from xray_core.io.fsutil import atomic_write_bytes
from xray_core.io.storage import LocalStorage, Storage, get_storage
from xray_core.settings import Settings


def repair(settings: Settings, *, verify: bool = False) -> DoctorReport:
    """Examine, back up, repair what ``doctor.REPAIRABLE`` names, then examine again to confirm.

    Returns the first report with ``repaired`` set on what was fixed; a finding the second
    examination still shows stays open, so the exit code never claims a repair that did not hold."""
    report = examine(settings, verify=verify)
    if not report.repairable:
        report.notes.append("nothing to repair" if report.healthy else
                            "nothing --repair may fix: see each finding for what to do")
        return report
    folder = _dated_folder(Path(settings.home) / "doctor")
    report.backup = str(folder)
    path = sqlite_path(settings)
    if path is None:
        report.notes.append("no database copy was made (not SQLite: use the database's own backup, e.g. "
                            "pg_dump); only files were moved, into the dated folder")
    else:
        _backup_sqlite(path, folder, readable=report.catalogue.readable)
        wal_only = report.find("catalogue_wal_only")
        if wal_only is not None:
            wal_only.repaired = _checkpoint(path)
    _move_orphans(report, settings, folder)
    after = examine(settings, verify=verify)
    for finding in report.findings:
        if finding.repaired and after.find(finding.code) is not None:
            finding.repaired = None  # did not hold (e.g. a new orphan meanwhile): still a problem
            report.notes.append(f"{finding.code}: still found after the repair")
    return report


def _dated_folder(base: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        folder = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}/{stamp}: too many doctor folders this second")


def _backup_sqlite(path: Path, folder: Path, *, readable: bool) -> None:
    """Copy the catalogue's files as they are, then (if SQLite reads it) a consistent copy.

    StorageFullError when the copy does not fit: the partial copy is removed and nothing else was
    changed, so the user frees space and runs again."""
    try:
        (folder / "original").mkdir()
        for p in [path, *sqlite_sidecars(path)]:
            shutil.copy2(p, folder / "original" / p.name)
        if readable:
            src, dst = open_sqlite(path), sqlite3.connect(str(folder / "catalogue.db"))
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
    except (OSError, sqlite3.OperationalError) as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "full" in str(exc)
        shutil.rmtree(folder, ignore_errors=True)  # our own partial copy, nothing of the user's
        if full:
            raise StorageFullError(f"no space to keep a copy of the catalogue in {folder} before repairing "
                                   f"({exc}); nothing was changed. Free space and run `xray doctor --repair` "
                                   "again") from exc
        raise


def _checkpoint(path: Path) -> str | None:
    """Copy every WAL page into the main file; what was done, or None when it could not be."""
    try:
        conn = open_sqlite(path)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return None  # SQLITE_FULL most likely: the WAL still holds every row
    if busy or header_problem(path) is not None:
        return None
    return f"checkpointed the WAL into {path.name} (whole again: {path.stat().st_size:,} bytes)"


def _move_orphans(report: DoctorReport, settings: Settings, folder: Path) -> None:
    codes = {"store": report.find("store_orphan"), "quarantine": report.find("quarantine_orphan")}
    if not any(codes.values()):
        return
    if any(note.startswith("ingest running") for note in report.notes):
        report.notes.append("orphans not moved: an ingest is running; run --repair again when it is done")
        return
    if report.counts.get("images", 0) == 0 and codes["store"] is not None:
        report.notes.append("store files not moved: the catalogue has no image rows (restore the catalogue "
                            "from a backup first; moving would empty the store)")
        codes["store"] = None
    storage = get_storage(settings)
    moved = {"store": 0, "quarantine": 0}
    with read_only_engine(settings, sqlite_path(settings)) as engine:
        # Again now, not only as examined: the backup may have taken minutes, and an ingest started
        # meanwhile writes its store files before their rows.
        with engine.connect() as conn:
            running = running_ingests(conn)
        if running:
            report.notes.append(f"orphans not moved: an ingest started meanwhile (source "
                                f"{', '.join(map(str, running))}); run --repair again when it is done")
            return
        keys = list(orphan_keys(storage, engine))
    for key in keys:
        area = key.split("/", 1)[0]
        if codes.get(area) is not None:
            _move(storage, key, folder / "orphans" / key)
            moved[area] += 1
    for area, finding in codes.items():
        if finding is not None and moved[area]:
            finding.repaired = f"moved {moved[area]} files to {folder / 'orphans' / area}"


def _move(storage: Storage, key: str, dest: Path) -> None:
    """Move one file out of the storage into ``dest``: a rename locally, else copy, verify, delete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(storage, LocalStorage):
        shutil.move(storage.local_path(key), dest)
        return
    data = storage.read_bytes(key)
    atomic_write_bytes(dest, data)
    if dest.read_bytes() != data:
        raise OSError(f"the copy of {storage.url_for(key)} at {dest} does not match; the original was kept")
    storage.delete(key)
