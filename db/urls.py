"""Database URLs as users write them: the one check that a URL can be opened, the one way to show it
without its password (``xray status``, ``xray doctor``, start-up errors) and the one reading of the
SQLite file a URL names (engine, doctor, ``predict --out``)."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ALLOWED_DATABASE_URLS = "e.g. sqlite:////abs/path/catalogue.db or postgresql+psycopg://user@host/db"


class DatabaseUrlError(ValueError):
    """A database URL SQLAlchemy cannot parse, of an unknown dialect, or whose dialect cannot load."""


def check_database_url(url: str) -> None:
    """Raise DatabaseUrlError unless SQLAlchemy parses ``url`` and knows its dialect.

    The database driver itself is imported only on connect, so a missing ``psycopg`` shows there; an
    ImportError here means the dialect module itself failed to load. A bad port (``host:abc``) is a
    ValueError from the parser, and an unknown dialect a NoSuchModuleError (an ArgumentError).
    """
    try:
        make_url(url).get_dialect()
    except (ArgumentError, ValueError) as exc:
        raise DatabaseUrlError(f"is not a database URL we can open ({exc})") from None
    except ImportError as exc:
        raise DatabaseUrlError(f"needs a driver that is not installed ({exc})") from None


_USERINFO = re.compile(r"//[^/@]*@")
_USER_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")  # scheme://user:password@ in what SQLAlchemy refused


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL; None for another database, an in-memory one, or a string
    that is not a URL (that fails clearly where the catalogue is opened)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database)
    return None


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``. A string SQLAlchemy cannot parse comes back
    quoted, so an empty or blank value is visible in a message, with anything that looks like
    ``user:password@`` masked all the same (``postgresql://u:pw@h:abc/db`` has a bad port, not no
    password)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return repr(_USER_PASSWORD.sub(r"\1***@", url))


def mask_userinfo(url: str) -> str:
    """``url`` with any ``//user:password@`` or ``//token@`` part replaced by ``//***@``: an fsspec
    storage URL (``s3://key:secret@bucket/xray``) carries its credentials there, user name included."""
    return _USERINFO.sub("//***@", url)


__all__ = ["ALLOWED_DATABASE_URLS", "DatabaseUrlError", "check_database_url", "mask_url", "mask_userinfo",
           "sqlite_file"]
