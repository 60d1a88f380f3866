"""Catalogues in the states a full disk leaves them in (issue 23), for test_doctor and the hostile list.

A SQLite checkpoint copies WAL pages into the main file in page order: page 1 (whose header now
claims the whole database) fits in the file as it is, the next page needs a new block, and on a full
disk that write fails. What is left is a main file cut at one page whose header claims more, and a
WAL that still holds every committed page. :func:`make_wal_only` builds exactly that;
:func:`small_filesystem` lets a real file system produce it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from db import dispose_engines
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray
from xray_core.settings import Settings

WAL_HEADER, FRAME_HEADER = 32, 24


def write_films(root: Path, seeds: range) -> int:
    """PNG films under ``root/<label>/``; returns how many."""
    for seed in seeds:
        label = "normal" if seed % 2 else "pneumonia"
        arr = make_xray(label, size=64, rng=np.random.default_rng(seed), patient_seed=seed)
        buf = io.BytesIO()
        PILImage.fromarray(arr).save(buf, format="PNG")
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"person{seed}_x.png").write_bytes(buf.getvalue())
    return len(seeds)


def newest_page_one(wal: bytes) -> bytes:
    """The last committed copy of page 1 in a WAL file (https://www.sqlite.org/fileformat.html#walformat)."""
    page_size = struct.unpack(">I", wal[8:12])[0]
    page, candidate, off = None, None, WAL_HEADER
    while off + FRAME_HEADER + page_size <= len(wal):
        number, commit = struct.unpack(">II", wal[off:off + 8])
        if number == 1:
            candidate = wal[off + FRAME_HEADER:off + FRAME_HEADER + page_size]
        if commit and candidate is not None:
            page = candidate
        off += FRAME_HEADER + page_size
    assert page is not None, "the WAL holds no committed page 1"
    return page


def make_wal_only(db_file: Path, wal: bytes) -> None:
    """The report's state: main file = page 1 only (its header claiming every page), the WAL beside it."""
    db_file.write_bytes(newest_page_one(wal))
    Path(f"{db_file}-wal").write_bytes(wal)
    Path(f"{db_file}-shm").unlink(missing_ok=True)  # SQLite rebuilds the index from the WAL


def catalogue_with_wal_only(settings: Settings, src: Path, n: int = 6) -> int:
    """Ingest ``n`` films, then leave the catalogue as a full disk does (see the module docstring).

    The WAL is read while this process's connections are open (nothing checkpointed yet: the
    catalogue was created in WAL mode, so every page since then is in it). Returns ``n``."""
    write_films(src, range(n))
    ingest_source(src, settings=settings)
    db_file = settings.home / "catalogue.db"
    wal = Path(f"{db_file}-wal").read_bytes()
    dispose_engines()  # the last connection checkpoints and removes the WAL; we put it back
    make_wal_only(db_file, wal)
    return n


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (root only); skips where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"xray-test-{uuid.uuid4().hex[:6]}",
                           str(where)], capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'}); "
                    "needs root or CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        dispose_engines()
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Write a ballast file until the file system has no block left; returns it (delete it to free)."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as fh:
        for chunk in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    fh.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        with contextlib.suppress(OSError):
            os.fsync(fh.fileno())
    return ballast
