"""The catalogue's storage layer: migrations equal the schema, SQLite pragmas, DB-enforced invariants."""

from __future__ import annotations

from datetime import UTC

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc, select, text

from db import get_engine, session_scope
from db.schema import Base, Model


@pytest.fixture
def engine(database_url):
    from db import dispose_engines

    dispose_engines()
    yield get_engine(database_url)
    dispose_engines()


def test_migrations_create_exactly_the_declared_schema(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_records_head(engine, database_url):
    from db import dispose_engines

    dispose_engines()
    again = get_engine(database_url)
    from alembic.script import ScriptDirectory

    from db.engine import alembic_config

    head = ScriptDirectory.from_config(alembic_config(again)).get_current_head()
    with again.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head == "0008"


@pytest.mark.sqlite_only
def test_sqlite_pragmas(engine):
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def _model(**kw) -> Model:
    base = dict(checkpoint_dir="m", checkpoint_sha256="0" * 64, card_sha256="0" * 64,
                backbone_fingerprint="f", backbone_weights="random", training_set_fingerprint="t",
                labels=["normal", "pneumonia"])
    return Model(**{**base, **kw})


def test_database_refuses_a_second_champion(engine):
    with session_scope(engine) as s:
        s.add(_model(status="champion"))
    with pytest.raises(exc.IntegrityError):
        with session_scope(engine) as s:
            s.add(_model(status="champion"))
    with session_scope(engine) as s:
        s.add(_model(status="retired"))
        s.add(_model(status="retired"))
    with session_scope(engine) as s:
        assert s.scalar(select(text("count(*)")).select_from(Model).where(Model.status == "champion")) == 1


def test_database_refuses_unknown_status_and_dangling_foreign_keys(engine):
    with pytest.raises(exc.IntegrityError):
        with session_scope(engine) as s:
            s.add(_model(status="best"))
    with pytest.raises(exc.IntegrityError):  # lineage naming a split manifest that does not exist
        with session_scope(engine) as s:
            s.add(_model(status="candidate", split_manifest="f" * 64))


def test_times_read_back_aware_utc_whatever_was_written(engine):
    """SQLite keeps no offset: a naive time is taken as UTC and an aware one is stored as its UTC
    instant, so every reader gets the same aware UTC time back and can compare it with utcnow()."""
    from datetime import datetime, timedelta, timezone

    naive = datetime(2026, 1, 2, 3, 4, 5)
    paris = datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))  # the same instant
    with session_scope(engine) as s:
        s.add_all([_model(status="retired", created_at=naive), _model(status="retired", created_at=paris)])
    with session_scope(engine) as s:
        times = s.scalars(select(Model.created_at).order_by(Model.id)).all()
        later = s.scalar(select(text("count(*)")).select_from(Model).where(Model.created_at >= paris))
    assert times == [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)] * 2
    assert all(t.tzinfo is UTC for t in times)
    assert later == 2  # the bound parameter is compared as the same UTC instant
