"""Engine factory, session scope and schema upgrade-to-head.

SQLite is configured for a catalogue that several processes use at once: WAL journal, foreign keys
on, a busy timeout, and every transaction opened with ``BEGIN IMMEDIATE`` so that two writers queue
instead of failing half-way with "database is locked" on a read-to-write upgrade.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 60_000
PG_LOCK_KEY = 0x58524159  # "XRAY": the advisory lock every catalogue transaction takes on PostgreSQL

SQLITE_MAGIC = b"SQLite format 3\x00"

_engines: dict[str, Engine] = {}
_upgraded: set[str] = set()
_lock = threading.Lock()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001 - DB-API objects
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    """Writers queue on PostgreSQL as they do on SQLite: each transaction first takes one
    transaction-scoped advisory lock, so check-then-insert steps (ingest's sha256 check, the
    champion switch) cannot interleave between processes. Released at commit or rollback."""

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})")


class CatalogueFileError(RuntimeError):
    """The SQLite catalogue file exists but is not a whole SQLite database (0 bytes, truncated, or
    another kind of file). Raised instead of opening it: SQLite would silently turn a 0-byte file
    into a new, empty catalogue, and a truncated one fails later with a bare "malformed" error."""


def check_sqlite_file(path: Path) -> None:
    """Raise CatalogueFileError when ``path`` exists but cannot be a whole SQLite database.

    Reads only the 100-byte header (https://www.sqlite.org/fileformat.html#the_database_header):
    the magic string, the page size (offset 16) and the in-header page count (offset 28, valid when
    the version-valid-for number at 92 equals the change counter at 24). A file shorter than page
    size x page count, or not a whole number of pages, was cut short. No schema is read or changed.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    advice = (f"Restore it from a backup, or move it aside to start a new catalogue (mv {path} {path}.damaged); "
              "nothing was changed")
    if size == 0:
        raise CatalogueFileError(f"the catalogue {path} is empty (0 bytes), not a SQLite database; it was "
                                 f"not replaced by a new empty one. {advice}")
    with open(path, "rb") as fh:
        header = fh.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise CatalogueFileError(f"the catalogue {path} is not a SQLite database (no SQLite header). {advice}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    counted = header[24:28] == header[92:96] and pages > 0
    if page_size < 512 or size % page_size or (counted and size < pages * page_size):
        expected = f"{pages * page_size:,} bytes" if counted else f"a multiple of {page_size} bytes"
        raise CatalogueFileError(f"the catalogue {path} is truncated ({size:,} bytes; its header says "
                                 f"{expected}). {advice}")


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
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        lock_path = Path(url.database).with_suffix(".migrate.lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif url.get_backend_name() == "postgresql":
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


def alembic_config(engine: Engine):  # noqa: ANN201 - alembic.config.Config
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
        url = engine.url
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            # Under the migration lock: a first-time creator holds it until the schema is committed,
            # so a 0-byte file seen here is not one that another process is just creating.
            check_sqlite_file(Path(url.database))
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
