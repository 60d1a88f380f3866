"""Ingest runs as rows of ``sources``: who runs one (host and pid), and closing the ones a killed
process left ``running`` (what they wrote stays: every group of rows was committed whole)."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

from sqlalchemy import select

from db.schema import Source


def ingest_owner() -> dict[str, object]:
    """Who runs an ingest (host and pid), kept in its source row's ``counts`` until it finishes, so
    that a row left ``running`` by a killed process can be told from one still running."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def owner_alive(counts: dict | None) -> bool:
    """Whether the ingest that owns a ``running`` source row may still be running. A row from another
    host (or from before owners were recorded) is assumed alive: only a provably dead owner is closed."""
    owner = (counts or {}).get("owner") if isinstance(counts, dict) else None
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError, OverflowError):
        return True
    return True


def close_interrupted_ingests(s) -> list[int]:  # s: a Session
    """Mark ``running`` sources whose process is gone as ``interrupted`` (what they had written stays:
    every group was committed whole). Returns their ids."""
    closed = []
    for src in s.scalars(select(Source).where(Source.status == "running")):
        if not owner_alive(src.counts):
            src.status, src.finished_at = "interrupted", datetime.now(UTC)
            closed.append(src.id)
    return closed
