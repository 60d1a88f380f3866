"""Where originals, features and models live: a local folder (default) or any fsspec URL.

Code names files by *key*, a path relative to the storage root with ``/`` separators
(``store/ab/<sha>.png``, ``features/<fp>/ab/<sha>.safetensors``, ``models/3/head.safetensors``), and
uses only the few operations below, so the same code runs on local disk, NFS, ``memory://`` (tests)
and object stores (``s3://``, ``gs://``; their fsspec package, e.g. s3fs, is installed by the user).

Atomic writes, per backend (the README has the table):

* local folders, ``file://`` URLs and plain paths (NFS included): temp file + fsync + rename + folder
  fsync (:mod:`xray_core.io.fsutil`): readers see the old or the complete new file, even after a crash;
* fsspec filesystems that rename (fsspec's local and memory ones): ``pipe_file`` to a temp key, then
  ``mv`` over the final key; no fsync (memory is process-local and for tests only);
* object stores (no rename): one ``pipe_file`` per file: a single PUT is atomic on S3/GCS (readers see
  the old or the whole new object). A "folder rename" is a copy, verified byte for byte, then a delete
  of the source; the registry names the folder in the catalogue only after that.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

from xray_core.faults import crash_point
from xray_core.io.fsutil import atomic_copy, atomic_write_bytes, atomic_write_many, fsync_dir, private_dir

# fsspec protocols whose mv is a rename: a reader never sees a partly written file under the key.
RENAME_PROTOCOLS = frozenset({"file", "local", "memory"})


class Storage:
    """Files by relative key under one root. Missing keys raise FileNotFoundError on read/size."""

    url: str  # the root, for messages

    def child(self, prefix: str) -> Storage:
        """The same storage rooted at ``prefix`` (e.g. ``features``)."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Write atomically: readers see the old content or all of ``data`` (see the module docstring).

        ``durable=False`` skips fsync where there is one (for content verified on every read)."""
        raise NotImplementedError

    def write_many(self, items: builtins.list[tuple[str, bytes]]) -> None:
        """:meth:`write_bytes` of several files; durable all together when it returns (locally, their
        fsyncs are batched: :func:`~xray_core.io.fsutil.atomic_write_many`)."""
        for key, data in items:
            self.write_bytes(key, data)

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a file."""
        raise NotImplementedError

    def exists_now(self, key: str) -> bool:
        """Whether ``key`` is a file, asked of the storage itself rather than a cache: what a writer checks,
        under the catalogue's lock, before a row names a file another ingest may have just removed."""
        return self.exists(key)

    def has_prefix(self, prefix: str) -> bool:
        """Whether anything (a file or a "folder") exists at ``prefix``."""
        raise NotImplementedError

    def size(self, key: str) -> int:
        """Bytes of the file ``key``."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove the file ``key``; a missing one is not an error."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything below ``prefix``; errors are ignored (used for clean-up)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of every file below ``prefix`` (relative to this storage's root)."""
        raise NotImplementedError

    def folders(self, prefix: str = "") -> builtins.list[str]:  # `list` is the method above
        """Sorted names of the immediate sub-folders of ``prefix``."""
        raise NotImplementedError

    def total_size(self, prefix: str) -> int:
        """Bytes of every file below ``prefix`` (0 when there is none), in one listing: callers that
        need a folder's size keep a running total from this rather than asking per file."""
        return sum(self.size(key) for key in self.list(prefix))

    def copy(self, src: str, dst: str) -> None:
        """Copy the file ``src`` to ``dst`` atomically."""
        self.write_bytes(dst, self.read_bytes(src))

    def rename_prefix(self, src: str, dst: str) -> None:
        """Move the "folder" ``src`` to ``dst`` (which must not exist)."""
        raise NotImplementedError

    def url_for(self, key: str) -> str:
        """Where ``key`` lives, for messages."""
        return f"{self.url.rstrip('/')}/{key}"

    def local_path(self, key: str) -> Path | None:
        """The real file of ``key`` on a local backend; None elsewhere."""
        return None


class LocalStorage(Storage):
    """A local (or NFS-mounted) folder, written with :mod:`xray_core.io.fsutil`'s crash-safe functions.

    ``private``: the folder to create owner-only (0700, :func:`~xray_core.io.fsutil.private_dir`)
    before the first write, when it does not exist yet: the feature cache's and the models' roots.
    Reading never creates it.
    """

    def __init__(self, root: Path, *, private: Path | None = None) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.private = private
        self._private_ready = private is None

    def _p(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _writable(self, key: str) -> Path:
        if not self._private_ready and self.private is not None:
            private_dir(self.private)
            self._private_ready = True
        return self._p(key)

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._p(prefix), private=self.private)

    def write_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        atomic_write_bytes(self._writable(key), data, durable=durable)

    def write_many(self, items: builtins.list[tuple[str, bytes]]) -> None:
        atomic_write_many([(self._writable(key), data) for key, data in items])

    def read_bytes(self, key: str) -> bytes:
        return self._p(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def exists_now(self, key: str) -> bool:
        # Opening, unlike a stat, makes an NFS client ask the server (close-to-open consistency): a stat may
        # answer from attributes cached before another host removed the file (docs/operations.md, NFS homes).
        try:
            fd = os.open(self._p(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def has_prefix(self, prefix: str) -> bool:
        return self._p(prefix).exists()

    def size(self, key: str) -> int:
        return self._p(key).stat().st_size

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._p(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def folders(self, prefix: str = "") -> builtins.list[str]:  # `list` is the method above
        base = self._p(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def total_size(self, prefix: str) -> int:
        total = 0
        for dirpath, _, filenames in os.walk(self._p(prefix)):  # no folder: nothing to walk, 0
            for name in filenames:
                with contextlib.suppress(OSError):  # removed meanwhile
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def copy(self, src: str, dst: str) -> None:
        atomic_copy(self._p(src), self._writable(dst))  # streamed: memory stays bounded

    def rename_prefix(self, src: str, dst: str) -> None:
        target = self._writable(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._p(src), target)  # one rename: the folder appears whole or not at all
        fsync_dir(target.parent)

    def url_for(self, key: str) -> str:
        return str(self._p(key))

    def local_path(self, key: str) -> Path:
        return self._p(key)


class FsspecStorage(Storage):
    """A folder on an fsspec filesystem: memory (tests), object stores (s3, gcs), anything fsspec opens."""

    def __init__(self, fs: Any, root: str, *, url: str | None = None) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.renames = bool(RENAME_PROTOCOLS.intersection(protocols))  # else: an object store
        self.url = url or f"{protocols[0]}://{self.root.lstrip('/')}"

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def child(self, prefix: str) -> FsspecStorage:
        return FsspecStorage(self.fs, self._p(prefix), url=self.url_for(prefix))

    def write_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        path = self._p(key)
        if not self.renames:
            self.fs.pipe_file(path, data)  # one PUT: the old object or the whole new one
            return
        parent, _, name = path.rpartition("/")
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            self.fs.pipe_file(tmp, data)
            crash_point("fsutil.tmp_written")
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._p(key))

    def exists(self, key: str) -> bool:
        return bool(self.fs.isfile(self._p(key)))

    def exists_now(self, key: str) -> bool:
        path = self._p(key)
        self.fs.invalidate_cache(path)  # s3fs/gcsfs may answer from a folder listing cached long ago
        return bool(self.fs.isfile(path))

    def has_prefix(self, prefix: str) -> bool:
        return self.exists(prefix) or bool(self.list(prefix))

    def size(self, key: str) -> int:
        path = self._p(key)
        if not self.fs.isfile(path):
            raise FileNotFoundError(self.url_for(key))
        return int(self.fs.size(path))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._p(key))

    def delete_prefix(self, prefix: str) -> None:
        with contextlib.suppress(Exception):
            if self.fs.exists(self._p(prefix)):
                self.fs.rm(self._p(prefix), recursive=True)

    def list(self, prefix: str = "") -> list[str]:
        try:
            found = self.fs.find(self._p(prefix))
        except FileNotFoundError:
            return []
        start = len(self.root.lstrip("/")) + 1
        return sorted(p.lstrip("/")[start:] for p in found)

    def folders(self, prefix: str = "") -> builtins.list[str]:  # `list` is the method above
        try:
            entries = self.fs.ls(self._p(prefix), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rpartition("/")[2]
                      for e in entries if e.get("type") == "directory")

    def total_size(self, prefix: str) -> int:
        try:
            # One listing with sizes, not a request per file.
            return int(self.fs.du(self._p(prefix), total=True))
        except FileNotFoundError:
            return 0

    def rename_prefix(self, src: str, dst: str) -> None:
        keys = self.list(src)
        if not keys:
            raise FileNotFoundError(self.url_for(src))
        # Copy every file, check each copy byte for byte, and only then delete the source: the
        # caller (the registry) names ``dst`` only after this returns, so a failure or a crash in
        # between leaves an unnamed folder, never a named one with missing files.
        for key in keys:
            data = self.read_bytes(key)
            target = dst + key[len(src):]
            self.write_bytes(target, data)
            if self.read_bytes(target) != data:
                raise OSError(f"copy of {self.url_for(key)} to {self.url_for(target)} does not match")
        self.delete_prefix(src)


@functools.lru_cache(maxsize=16)
def open_storage(url: str) -> Storage:
    """Storage for a URL or path; plain paths and ``file://`` URLs get :class:`LocalStorage` (fsync).

    Any other URL needs its fsspec implementation installed (``s3://``: s3fs, ``gs://``: gcsfs).
    """
    if "://" not in url:
        return LocalStorage(Path(url).expanduser().resolve())
    if url.startswith("file://"):
        return LocalStorage(Path(url[len("file://"):]).expanduser().resolve())
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return FsspecStorage(fs, root, url=url.rstrip("/"))


def get_storage(settings: Any, area: str | None = None) -> Storage:
    """Storage for XRAY_STORAGE_URL (default: XRAY_HOME), or for one of its areas.

    ``area`` ``"features"`` or ``"models"``: locally the settings' ``features_dir`` / ``models_dir``
    (so an override of those still works); under a URL, ``<url>/features`` or ``<url>/models``.
    Keys of the whole storage (``area=None``) are the catalogue's relative paths (``store/...``).
    """
    url = getattr(settings, "storage_url", None)
    if not url:
        if area is None:
            return LocalStorage(settings.home)
        root = {"features": settings.features_dir, "models": settings.models_dir}[area]
        return LocalStorage(root, private=Path(root))  # created 0700, as store/ and quarantine/ are
    base = open_storage(url)
    return base if area is None else base.child(area)


__all__ = ["Storage", "LocalStorage", "FsspecStorage", "RENAME_PROTOCOLS", "open_storage", "get_storage"]
