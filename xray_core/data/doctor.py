"""``xray doctor``: check a home after a crash or a full disk, and repair only what is safe to repair.

What it checks: the catalogue itself (SQLite: the main file's header, the WAL, ``PRAGMA quick_check``
or ``integrity_check``; PostgreSQL: that it answers), its schema revision against the newest
migration, and the files against the rows: store files no image row names (orphans), image rows
whose store file is missing (or, with ``verify``, whose bytes no longer match their sha256),
quarantine files no rejection row names and rejection rows whose copy is missing, and model
checkpoint folders against the models table. Everything is read through the storage abstraction, so
``XRAY_STORAGE_URL=memory://`` or ``s3://`` homes are reconciled too.

Reports open SQLite read-only (``mode=ro``: not even the close-time checkpoint runs), so a report
changes nothing. Repairs (:mod:`xray_core.data.doctor_repair`) run only when asked, after a backup.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from db.engine import header_problem, make_engine, open_sqlite, open_through_wal, sqlite_sidecars
from db.schema import Image, Model, Rejection, Source
from db.urls import mask_url, sqlite_file
from xray_core.data.images import DEFAULT_MAX_PIXELS, decode_image
from xray_core.data.sources import owner_alive
from xray_core.errors import ImageRejected
from xray_core.io.storage import Storage, get_storage
from xray_core.settings import Settings

SAMPLE = 20  # paths listed per finding; the count is always whole
REPAIRABLE = ("catalogue_wal_only", "store_orphan", "quarantine_orphan")  # what --repair may fix
MODEL_FILES = ("head.safetensors", "card.json")


@dataclass
class Finding:
    """One kind of problem, with how many things have it and the first few of them."""

    code: str  # stable: catalogue_damaged, catalogue_wal_only, store_orphan, store_missing, ...
    detail: str
    count: int = 1
    examples: list[str] = field(default_factory=list)
    repaired: str | None = None  # what --repair did about it; None = still there

    @property
    def open(self) -> bool:
        return self.repaired is None


@dataclass
class Catalogue:
    """What doctor learnt about the database itself."""

    backend: str
    where: str  # the file (SQLite) or the URL without password
    readable: bool = False
    check: str | None = None  # "quick_check ok", or why not
    revision: str | None = None
    head: str | None = None
    files: dict[str, int] = field(default_factory=dict)  # SQLite: name -> bytes


@dataclass
class DoctorReport:
    catalogue: Catalogue
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    backup: str | None = None  # the dated folder --repair kept its copies (and moved orphans) in

    @property
    def healthy(self) -> bool:
        return not any(f.open for f in self.findings)

    @property
    def repairable(self) -> bool:
        """Whether --repair has something to do (the other findings are reported only)."""
        return any(f.open and f.code in REPAIRABLE for f in self.findings)

    def find(self, code: str) -> Finding | None:
        return next((f for f in self.findings if f.code == code), None)

    def as_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "repairable": self.repairable, "catalogue": asdict(self.catalogue),
                "counts": self.counts,
                "findings": [{**asdict(f), "open": f.open} for f in self.findings],
                "notes": self.notes, "backup": self.backup}


def sqlite_path(settings: Settings) -> Path | None:
    """The catalogue file of a SQLite URL (None for another database, or an in-memory one)."""
    return sqlite_file(settings.database_url)


def examine(settings: Settings, *, verify: bool = False) -> DoctorReport:
    """Check the catalogue and reconcile it with the files; changes nothing (see the module docstring).

    ``verify``: SQLite's full ``integrity_check`` instead of ``quick_check``, and every store and
    checkpoint file hashed against its row (reads every byte: minutes on a large store)."""
    path = sqlite_path(settings)
    report = DoctorReport(_examine_sqlite(path) if path else Catalogue(
        backend=make_url(settings.database_url).get_backend_name(),
        where=mask_url(settings.database_url)))
    storage = get_storage(settings)
    if path is not None and not path.exists():
        files = storage.list("store")
        report.notes.append(f"no catalogue at {path} yet (the first ingest creates it)")
        if files:
            report.findings.append(Finding(
                "catalogue_missing", f"the store holds {len(files)} files but there is no catalogue at "
                f"{path}; restore it from a backup", len(files)))
        return report
    if path is not None:
        _sqlite_findings(report, path, verify)
    if not report.catalogue.readable and path is not None:
        return report
    try:
        with read_only_engine(settings, path) as engine:
            _revision(report, engine)
            if report.find("schema_missing") is None:
                reconcile(report, engine, storage, verify=verify)
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
        report.findings.append(Finding("catalogue_unreadable", f"the catalogue cannot be read "
                                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"))
    return report


def _examine_sqlite(path: Path) -> Catalogue:
    cat = Catalogue(backend="sqlite", where=str(path))
    for p in [path, *sqlite_sidecars(path)]:
        cat.files[p.name] = p.stat().st_size if p.exists() else 0
    return cat


def _sqlite_findings(report: DoctorReport, path: Path, verify: bool) -> None:
    """The file-level state of a SQLite catalogue: damaged, only whole through its WAL, or fine."""
    cat = report.catalogue
    problem = header_problem(path)
    wal = Path(f"{path}-wal")
    through_wal = problem is not None and problem.startswith("truncated") and wal.exists() \
        and wal.stat().st_size > 0
    check = "integrity_check" if verify else "quick_check"
    why = problem if problem is not None and not through_wal else \
        open_through_wal(path, checkpoint=False, check=check)
    if why is not None:
        files = " ".join(str(p) for p in [path, *sqlite_sidecars(path)])
        report.findings.append(Finding(
            "catalogue_damaged", f"the catalogue {path} is {_damage(why, problem, through_wal)}. "
            f"Reported only (--repair never moves it): restore it from a backup, or move it with its -wal "
            f"and -shm together to start a new one (mkdir {path}.damaged && mv {files} {path}.damaged/)"))
        return
    cat.readable, cat.check = True, f"{check} ok"
    if through_wal:
        report.findings.append(Finding(
            "catalogue_wal_only", f"the main file {path.name} is {problem}, but every committed row is in "
            f"{wal.name} ({wal.stat().st_size:,} bytes) and SQLite reads it whole (a checkpoint ran out of "
            "space); --repair checkpoints the WAL into the main file once space allows"))


def _damage(why: str, problem: str | None, through_wal: bool) -> str:
    if through_wal:
        return f"damaged: its main file is {problem} and, with its WAL, {why}"
    return why if why == problem else f"damaged: {why}"


@contextlib.contextmanager
def read_only_engine(settings: Settings, path: Path | None) -> Iterator[Engine]:
    """SQLite through ``mode=ro`` (reads the WAL, never checkpoints); another database as configured
    (doctor only reads). Never :func:`db.get_engine`: that would upgrade the schema first."""
    if path is not None:
        engine = create_engine("sqlite://", creator=lambda: open_sqlite(path, read_only=True))
    else:
        engine = make_engine(settings.database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _revision(report: DoctorReport, engine: Engine) -> None:
    """The schema revision against the newest migration: behind is fine (the next command upgrades
    it); none at all, or one this code does not know, is a finding."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from db.engine import alembic_config

    cat = report.catalogue
    with engine.connect() as conn:
        cat.revision = MigrationContext.configure(conn).get_current_revision()
    cat.readable = True
    cat.check = cat.check or "connected"
    scripts = ScriptDirectory.from_config(alembic_config(engine))
    cat.head = scripts.get_current_head()
    known = {s.revision for s in scripts.walk_revisions()}
    if cat.revision is None:
        report.findings.append(Finding(
            "schema_missing", "the database has no schema revision (not a catalogue, or never created); "
            "check XRAY_DATABASE_URL"))
    elif cat.revision not in known:
        report.findings.append(Finding(
            "schema_unknown", f"schema revision {cat.revision} is not one this code knows (newest "
            f"{cat.head}): written by a newer xray-retrain? Upgrade it"))


def running_ingests(conn: Any) -> list[int]:
    """Sources of ingests still running (their process alive): their newest files may lack rows yet."""
    sources = conn.execute(select(Source.id, Source.counts).where(Source.status == "running"))
    return [s.id for s in sources if owner_alive(s.counts)]


def reconcile(report: DoctorReport, engine: Engine, storage: Storage, *, verify: bool = False) -> None:
    """Store, quarantine and model files against the rows that name them (see the module docstring)."""
    with engine.connect() as conn:
        images = conn.execute(select(Image.stored_path, Image.sha256, Image.stored_sha256)).all()
        quarantined = {r[0] for r in conn.execute(select(Rejection.quarantine_path)) if r[0]}
        models = conn.execute(select(Model.id, Model.checkpoint_dir, Model.checkpoint_sha256,
                                     Model.card_sha256, Model.pruned_at)).all()
        running = running_ingests(conn)
    store_files = set(storage.list("store"))
    quarantine_files = set(storage.list("quarantine"))
    named = {r.stored_path for r in images}
    report.counts.update(images=len(images), store_files=len(store_files),
                         rejections_with_copy=len(quarantined), quarantine_files=len(quarantine_files),
                         models=len(models))
    if running:
        report.notes.append(f"ingest running (source {', '.join(map(str, running))}): its newest store and "
                            "quarantine files may not have their rows yet")
    _add(report, "store_orphan", sorted(store_files - named),
         "store files no image row names (moved aside by --repair, never deleted)")
    _add(report, "store_missing", sorted(named - store_files),
         "image rows whose store file is missing (reported only: restore the files from a backup)")
    _add(report, "quarantine_orphan", sorted(quarantine_files - quarantined),
         "quarantine files no rejection row names (moved aside by --repair, never deleted)")
    _add(report, "quarantine_missing", sorted(quarantined - quarantine_files),
         "rejection rows whose quarantine copy is missing (reported only)")
    if verify:
        altered, implausible = [], []
        for r in images:
            if r.stored_path not in store_files:
                continue
            data = storage.read_bytes(r.stored_path)
            # A de-identified DICOM's store copy has its own sha256 (stored_sha256); others are the original.
            if hashlib.sha256(data).hexdigest() != (r.stored_sha256 or r.sha256):
                altered.append(r.stored_path)
            elif (why := _implausible(data)) is not None:
                implausible.append(f"{r.stored_path} ({why})")
        _add(report, "store_altered", altered,
             "store files whose bytes no longer match their row's sha256 (reported only)")
        _add(report, "store_implausible", implausible,
             "stored films today's ingest would refuse (blank or truncated), accepted by an older ingest; "
             "retrains still use them (reported only: judge them, and re-label or restore as needed)")
    _models(report, storage, models, verify)


def _models(report: DoctorReport, storage: Storage, models: Sequence[Any], verify: bool) -> None:
    missing, altered = [], []
    for _version, folder, head_sha, card_sha, pruned_at in models:
        if not folder or pruned_at is not None:  # xray gc deleted its files on purpose; its row stays
            continue
        for name, expected in zip(MODEL_FILES, (head_sha, card_sha)):
            key = f"{folder}/{name}"
            if not storage.exists(key):
                missing.append(key)
            elif verify and _sha(storage, key) != expected:
                altered.append(key)
    _add(report, "model_file_missing", missing, "checkpoint files a models row names that are missing "
         "(reported only: that version cannot be loaded)")
    _add(report, "model_file_altered", altered, "checkpoint files whose sha256 differs from the models row")
    named = {str(m.checkpoint_dir).rstrip("/").rpartition("/")[2] for m in models if m.checkpoint_dir}
    # .staging and .orphaned are the registry's own: a save in progress, folders it moved aside.
    unnamed = [f"models/{f}" for f in storage.folders("models") if not f.startswith(".") and f not in named]
    _add(report, "model_folder_orphan", unnamed, "model folders no models row names (reported only: a save "
         "killed before its commit leaves one; they are never loaded)")


def _implausible(data: bytes) -> str | None:
    """The reason today's decode checks (blank, truncated) give for a stored film, or None.

    Stored films are decoded without these checks (``images.decode_stored``), so that a check added
    after a film was accepted never makes every retrain fail; this is where they are reported."""
    try:
        decode_image(data, min_side=1, max_pixels=DEFAULT_MAX_PIXELS)
    except ImageRejected as exc:
        return exc.reason if exc.reason in ("blank_image", "truncated") else None
    return None


def _sha(storage: Storage, key: str) -> str:
    return hashlib.sha256(storage.read_bytes(key)).hexdigest()


def _add(report: DoctorReport, code: str, items: list[str], detail: str) -> None:
    if items:
        report.findings.append(Finding(code, detail, len(items), list(items[:SAMPLE])))


def orphan_keys(storage: Storage, engine: Engine) -> Iterator[str]:
    """Every orphaned store and quarantine key, recomputed (the report keeps only examples)."""
    with engine.connect() as conn:
        named = {r[0] for r in conn.execute(select(Image.stored_path))}
        named |= {r[0] for r in conn.execute(select(Rejection.quarantine_path)) if r[0]}
    for prefix in ("store", "quarantine"):
        yield from (k for k in storage.list(prefix) if k not in named)
