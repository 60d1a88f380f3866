"""The environment every ``xray`` command checks before it starts: XRAY_HOME, the database and storage
URLs, and (for commands that run a flow) the Prefect server.

Its own module so that the command parser in :mod:`xray_cli.main` stays short.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from xray_core.errors import UsageError
from xray_core.io.fsutil import require_utf8_args
from xray_core.settings import get_settings


def use_flow() -> bool:
    """Run as a Prefect flow when a Prefect server is configured, so the run shows in the UI."""
    return bool(os.environ.get("PREFECT_API_URL"))


# Commands that run a Prefect flow when PREFECT_API_URL is set (see _use_flow), and review, which answers
# a paused run through that API.
FLOW_COMMANDS = {"ingest", "predict", "retrain", "demo", "monitor", "review"}


def check_environment(command: str, args: argparse.Namespace) -> None:
    """Refuse, with a message naming the setting, an environment every command would trip over.

    Each of these used to end in a Python traceback from deep inside SQLAlchemy, fsspec or httpx:
    XRAY_HOME that is a file or cannot be written, an XRAY_DATABASE_URL or XRAY_STORAGE_URL that is
    not a URL we can open, and (for commands that run a flow) a PREFECT_API_URL nobody answers.
    """
    settings = get_settings()  # SettingsError (exit 2) for an invalid XRAY_* value
    home = Path(settings.home)
    if os.path.lexists(home) and not home.is_dir():
        raise UsageError(f"XRAY_HOME={home} is not a folder (it is a file or a broken link); point XRAY_HOME "
                         "at a folder (it is created when missing)")
    if home.is_dir() and not os.access(home, os.W_OK | os.X_OK):
        raise UsageError(f"XRAY_HOME={home} is not writable by this user; the catalogue, store and reports "
                         "are written there (SQLite needs write access even to read). Fix its permissions "
                         "or point XRAY_HOME at a writable folder")
    _check_database_url(settings.database_url)
    # The raw value: settings strip trailing slashes, which turns "bogus://" into a local folder "bogus:".
    _check_storage_url(os.environ.get("XRAY_STORAGE_URL", "").strip()
                       or getattr(settings, "storage_url", None))
    local_retrain = command == "retrain" and getattr(args, "local", False)
    if command in FLOW_COMMANDS and use_flow() and not local_retrain:
        require_utf8_args({k: v for k, v in vars(args).items() if k not in ("command", "json", "debug")})
        _check_prefect_api(os.environ["PREFECT_API_URL"])


def _check_database_url(url: str) -> None:
    from db.urls import ALLOWED_DATABASE_URLS, DatabaseUrlError, check_database_url, mask_url

    try:
        check_database_url(url)
    except DatabaseUrlError as exc:
        raise UsageError(f"XRAY_DATABASE_URL={mask_url(url)} {exc}; use {ALLOWED_DATABASE_URLS} (or unset it)"
                         ) from None


def _check_storage_url(url: str | None) -> None:
    if not url:
        return
    import re

    from xray_core.io.storage import open_storage

    try:
        if "://" not in url and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", url):
            raise ValueError("a URL scheme without '//'")
        open_storage(url)
    except (ValueError, ImportError, OSError) as exc:
        raise UsageError(f"XRAY_STORAGE_URL={url!r} cannot be opened ({type(exc).__name__}: {exc}); use a "
                         "folder, file:///path, memory://name, or s3://bucket/prefix with s3fs installed "
                         "(or unset it to use XRAY_HOME)") from None


def _check_prefect_api(url: str) -> None:
    """A quick GET of ``<PREFECT_API_URL>/health``: Prefect itself would retry for minutes and then
    print a long traceback."""
    import urllib.error
    import urllib.request

    health = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=5) as resp:  # the user's own server URL
            resp.read(64)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"PREFECT_API_URL={url} does not answer ({reason}); start the server (make serve), "
                         "or unset PREFECT_API_URL to run without Prefect (retrain: --local)") from None
