"""Engine factory, session scope and schema upgrade-to-head.

SQLite is configured for a catalogue that several processes use at once: WAL journal, foreign keys
on, a busy timeout, and every transaction opened with ``BEGIN IMMEDIATE`` so that two writers queue
instead of failing half-way with "database is locked" on a read-to-write upgrade.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from db.urls import sqlite_file

SQLITE_BUSY_TIMEOUT_MS = 60_000
PG_LOCK_KEY = 0x58524159  # "XRAY": the advisory lock every catalogue transaction takes on PostgreSQL

SQLITE_MAGIC = b"SQLite format 3\x00"
IN_BLOCK = 900  # values per IN (...) list: under SQLite's oldest bound-parameter limit (999)
T = TypeVar("T")

_engines: dict[str, Engine] = {}
_upgraded: set[str] = set()
_lock = threading.Lock()


_inherited_pools: list[object] = []  # in a forked child: the parent's pools, kept so they are never closed


def in_blocks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """``values`` in order, ``IN_BLOCK`` at a time: one ``IN (...)`` list each, within every database's
    bound-parameter limit (SQLite's oldest is 999)."""
    for at in range(0, len(values), IN_BLOCK):
        yield values[at:at + IN_BLOCK]


def _after_fork_in_child() -> None:
    """In a forked child (ingest workers, any ``fork``): leave the parent's pooled database connections
    to the parent. SQLAlchemy's way, ``engine.dispose(close=False)``: the engine starts a new pool, so the
    child never uses or ends a transaction of a connection the parent holds (SQLite forbids carrying one
    across ``fork``). The old pool is kept referenced, not dropped: collected, its connections would be
    closed here, and a PostgreSQL driver closing a copied connection may say goodbye on the parent's
    socket. The lock is new too: the parent may have held it while another of its threads forked."""
    global _lock
    _lock = threading.Lock()
    for engine in _engines.values():
        _inherited_pools.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # DB-API connection and record
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    """Writers queue on PostgreSQL as they do on SQLite: each transaction first takes one
    transaction-scoped advisory lock, so check-then-insert steps (ingest's sha256 check, the
    champion switch) cannot interleave between processes. Released at commit or rollback."""

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})")


class CatalogueFileError(RuntimeError):
    """The SQLite catalogue file exists but is not a whole SQLite database (0 bytes, truncated, or
    another kind of file). Raised instead of opening it: SQLite would silently turn a 0-byte file
    into a new, empty catalogue, and a truncated one fails later with a bare "malformed" error."""


def sqlite_sidecars(path: Path) -> list[Path]:
    """The ``-wal`` and ``-shm`` files beside the catalogue that exist: they are part of the database
    (committed rows may live only in the WAL), so they move, copy and restore together with it."""
    return [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def damaged_advice(path: Path) -> str:
    """What to do with a catalogue that cannot be used. Never "move the main file" alone: with a
    ``-wal`` beside it that drops every row committed since the last checkpoint (issue 23)."""
    files = " ".join(str(p) for p in [path, *sqlite_sidecars(path)])
    together = "the main file and its -wal/-shm together" if sqlite_sidecars(path) else "it"
    return (f"Run `xray doctor` to see what is wrong (`xray doctor --repair` keeps a copy before it changes "
            f"anything); or restore it from a backup, or move {together} aside to start a new catalogue "
            f"(mkdir {path}.damaged && mv {files} {path}.damaged/); nothing was changed")


def header_problem(path: Path) -> str | None:
    """Why the main file alone cannot be a whole SQLite database, or None when its header is consistent.

    Reads only the 100-byte header (https://www.sqlite.org/fileformat.html#the_database_header):
    the magic string, the page size (offset 16) and the in-header page count (offset 28, valid when
    the version-valid-for number at 92 equals the change counter at 24). A file shorter than page
    size x page count, or not a whole number of pages, is short: cut, or (with a WAL beside it) a
    checkpoint that ran out of space after rewriting page 1 (the WAL still holds every page).
    """
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes), not a SQLite database"
    with open(path, "rb") as fh:
        header = fh.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return "not a SQLite database (no SQLite header)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    counted = header[24:28] == header[92:96] and pages > 0
    if page_size < 512 or size % page_size or (counted and size < pages * page_size):
        expected = f"{pages * page_size:,} bytes" if counted else f"a multiple of {page_size} bytes"
        return f"truncated ({size:,} bytes; its header says {expected})"
    return None


def open_sqlite(path: Path, *, read_only: bool = False):  # -> sqlite3.Connection
    """A plain sqlite3 connection to the catalogue file. ``read_only`` opens it with ``mode=ro``: it
    still reads through the WAL, but never checkpoints (not even when it closes), so a report changes
    nothing on disk."""
    import sqlite3

    target, uri = (f"{Path(path).resolve().as_uri()}?mode=ro", True) if read_only else (str(path), False)
    return sqlite3.connect(target, uri=uri, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)


def open_through_wal(path: Path, *, checkpoint: bool = True, check: str = "quick_check") -> str | None:
    """Let SQLite itself judge a catalogue whose committed pages may live in its WAL.

    Opens it read-only (SQLite reads through the WAL; nothing on disk changes, so a damaged file
    stays exactly as it was for whoever recovers it) and runs ``PRAGMA quick_check`` (or
    ``check="integrity_check"``). Only when that passes and ``checkpoint`` is set, a read-write
    connection runs a PASSIVE checkpoint (never waits for other connections). A checkpoint that fails
    for lack of space is not fatal: every row stays readable through the WAL, and the next open
    retries it. Returns None when SQLite reads the database whole, else why it cannot (damaged).
    """
    import sqlite3

    try:
        conn = open_sqlite(path, read_only=True)
    except sqlite3.Error as exc:
        return f"SQLite cannot open it ({exc})"
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {check}").fetchall()]
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise  # another process holds it: not damage; the caller's error says so
        return f"SQLite cannot read it ({exc})"
    except sqlite3.DatabaseError as exc:
        return f"SQLite cannot read it ({exc})"
    finally:
        conn.close()
    if rows != ["ok"]:
        return f"PRAGMA {check} failed: {'; '.join(map(str, rows[:3]))}"
    if checkpoint:
        try:
            conn = open_sqlite(path)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                conn.close()
        except sqlite3.OperationalError:
            pass  # SQLITE_FULL or busy: the WAL keeps the rows; a later open checkpoints them
    return None


def check_sqlite_file(path: Path) -> None:
    """Raise CatalogueFileError when ``path`` exists but cannot be a whole SQLite database.

    A 0-byte file and a file that is not SQLite are refused from the header alone (SQLite would make
    a new empty catalogue of the first). A main file shorter than its header says is refused only
    when no non-empty ``-wal`` sits beside it; with one, SQLite opens it through the WAL, checkpoints
    when space allows and runs ``PRAGMA quick_check`` (:func:`open_through_wal`): after a full disk
    the committed rows live in the WAL and must not be declared lost. No schema is read or changed.
    """
    try:
        problem = header_problem(path)
    except FileNotFoundError:
        return
    if problem is None:
        return
    wal = Path(f"{path}-wal")
    if problem.startswith("truncated") and wal.exists() and wal.stat().st_size > 0:
        why = open_through_wal(path)
        if why is None:
            return
        problem = f"damaged: its main file is {problem} and {why}"
    raise CatalogueFileError(f"the catalogue {path} is {problem}; it was not replaced by a new empty one. "
                             f"{damaged_advice(path)}")


def make_engine(url: str) -> Engine:
    """A new engine for ``url``; SQLite files get their folder created and the pragmas above."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    engine = create_engine(url, pool_pre_ping=True)
    if parsed.get_backend_name() == "postgresql":
        _configure_postgresql(engine)
    return engine


def get_engine(url: str) -> Engine:
    """The process's engine for ``url``, created and upgraded to the newest schema on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = make_engine(url)
            _engines[url] = engine
        if url not in _upgraded:
            upgrade_to_head(engine)
            _upgraded.add(url)
        return engine


def dispose_engines() -> None:
    """Close every cached engine (tests call this between catalogues)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _upgraded.clear()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise schema upgrades between processes (two first-time users of one SQLite file)."""
    database = sqlite_file(engine.url)
    if database is not None:
        lock_path = database.with_suffix(".migrate.lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif engine.url.get_backend_name() == "postgresql":
        # A session-level lock on a raw DB-API connection (outside SQLAlchemy's begin hook above).
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(f"SELECT pg_advisory_lock({PG_LOCK_KEY + 1})")
            raw.commit()
            try:
                yield
            finally:
                cur.execute(f"SELECT pg_advisory_unlock({PG_LOCK_KEY + 1})")
                raw.commit()
        finally:
            raw.close()
    else:
        yield


def alembic_config(engine: Engine):  # -> alembic.config.Config
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def migrate(engine: Engine, revision: str, *, downgrade: bool = False) -> None:
    """Run Alembic's upgrade (or downgrade) to ``revision`` on ``engine`` in one transaction."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if downgrade else command.upgrade)(cfg, revision)


def upgrade_to_head(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a no-op when it already is)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with _migration_lock(engine):
        database = sqlite_file(engine.url)
        if database is not None:
            # Under the migration lock: a first-time creator holds it until the schema is committed,
            # so a 0-byte file seen here is not one that another process is just creating.
            check_sqlite_file(database)
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        migrate(engine, "head")


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception."""
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
