"""db.urls: the one database-URL check (start-up and settings) and the one password mask."""

from __future__ import annotations

import pytest

from db.urls import DatabaseUrlError, check_database_url, mask_url
from xray_core.rules import is_database_url


@pytest.mark.parametrize("url", ["sqlite:///catalogue.db", "sqlite:////abs/x.db",
                                 "postgresql+psycopg://u@h/db"])
def test_urls_we_can_open_pass(url: str) -> None:
    check_database_url(url)
    assert is_database_url(url)


@pytest.mark.parametrize("url, why", [
    ("catalogue.db", "is not a database URL we can open (Could not parse"),
    ("", "is not a database URL we can open (Could not parse"),
    ("nosuch://h/db", "is not a database URL we can open (Can't load plugin: sqlalchemy.dialects:nosuch"),
    ("postgresql://u@h:abc/db", "is not a database URL we can open (invalid literal for int()"),
])
def test_urls_we_cannot_open_say_why(url: str, why: str) -> None:
    with pytest.raises(DatabaseUrlError) as err:
        check_database_url(url)
    assert str(err.value).startswith(why)
    assert not is_database_url(url)  # the settings check is the same check


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://alice:s3cret@db.example/xray", "postgresql+psycopg://alice:***@db.example/xray"),
    ("sqlite:////var/xray/catalogue.db", "sqlite:////var/xray/catalogue.db"),
    ("not a url", "'not a url'"),
    ("", "''"),
    ("postgresql://u:pw@h:abc/db", "'postgresql://u:***@h:abc/db'"),  # bad port: still masked
])
def test_mask_url_hides_the_password_and_never_raises(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize("url, path", [
    ("sqlite:////var/xray/catalogue.db", "/var/xray/catalogue.db"),
    ("sqlite:///relative.db", "relative.db"),
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("postgresql+psycopg://u@h/db", None),
    ("not a url", None),
])
def test_sqlite_file_is_the_file_a_sqlite_url_names(url: str, path: str | None) -> None:
    from pathlib import Path

    from db.urls import sqlite_file

    assert sqlite_file(url) == (None if path is None else Path(path))
