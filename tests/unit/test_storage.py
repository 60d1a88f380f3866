"""The storage contract (xray_core.io.storage) on every backend.

Backends: the default local folder (fsutil: temp + fsync + rename), fsspec's local filesystem and
fsspec's memory filesystem (the stand-in for object stores in tests). A whole retrain cycle on
``memory://`` runs the backbone, so it is in tests/integration/test_storage_retrain.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from xray_core.io.storage import FsspecStorage, LocalStorage, Storage, get_storage, open_storage
from xray_core.settings import load_settings


@pytest.fixture(params=["local", "fsspec-file", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        yield LocalStorage(tmp_path / "root")
    elif request.param == "fsspec-file":
        yield FsspecStorage(fsspec.filesystem("file"), str(tmp_path / "root"))
    else:
        fs = fsspec.filesystem("memory")
        root = f"/xray-test-{uuid.uuid4().hex[:12]}"
        yield FsspecStorage(fs, root)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_write_read_exists_size(storage: Storage) -> None:
    assert not storage.exists("store/ab/x.png")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("store/ab/x.png")
    with pytest.raises(FileNotFoundError):
        storage.size("store/ab/x.png")
    storage.write_bytes("store/ab/x.png", b"hello")
    assert storage.exists("store/ab/x.png")
    assert storage.read_bytes("store/ab/x.png") == b"hello"
    assert storage.size("store/ab/x.png") == 5
    assert storage.has_prefix("store") and not storage.has_prefix("models")
    storage.write_bytes("store/ab/x.png", b"bye", durable=False)  # overwrite
    assert storage.read_bytes("store/ab/x.png") == b"bye"


def test_write_many_writes_every_file(storage: Storage) -> None:
    """Ingest's batched store write: every file complete under its final key, nothing else left."""
    items = [(f"store/{i % 3:02x}/f{i}.png", bytes([i]) * (1000 + i)) for i in range(7)]
    storage.write_many(items)
    assert storage.list("store") == sorted(key for key, _ in items)
    assert all(storage.read_bytes(key) == data for key, data in items)


def test_write_many_error_leaves_no_file_behind(tmp_path: Path) -> None:
    """A write that fails part-way (here: a folder that is a file) renames nothing and leaves no temp file."""
    storage = LocalStorage(tmp_path / "root")
    storage.write_bytes("store/xx", b"a file where a folder is needed")
    with pytest.raises(OSError):
        storage.write_many([("store/aa/one.png", b"1"), ("store/xx/two.png", b"2")])
    assert storage.list("store") == ["store/xx"]


def test_list_folders_delete(storage: Storage) -> None:
    for key in ("features/fp1/ab/a.safetensors", "features/fp1/cd/c.safetensors",
                "features/fp2/ef/e.safetensors", "models/1/card.json"):
        storage.write_bytes(key, key.encode())
    assert storage.list("features") == ["features/fp1/ab/a.safetensors", "features/fp1/cd/c.safetensors",
                                        "features/fp2/ef/e.safetensors"]
    assert storage.list("absent") == []
    assert storage.folders("features") == ["fp1", "fp2"]
    assert storage.folders("absent") == []
    assert not any(".tmp" in k for k in storage.list())  # no temp file is left after a write
    child = storage.child("features")
    assert child.list("fp2") == ["fp2/ef/e.safetensors"]
    assert child.read_bytes("fp2/ef/e.safetensors") == b"features/fp2/ef/e.safetensors"
    storage.delete("features/fp1/ab/a.safetensors")
    storage.delete("features/fp1/ab/a.safetensors")  # a missing file is not an error
    assert not storage.exists("features/fp1/ab/a.safetensors")
    storage.delete_prefix("features")
    assert storage.list("features") == [] and storage.list("models") == ["models/1/card.json"]


def test_total_size_is_every_file_below_a_prefix(storage: Storage) -> None:
    """What the quarantine cap is seeded from (one listing per ingest, not one request per file)."""
    assert storage.total_size("quarantine") == 0  # no folder yet
    storage.write_bytes("quarantine/ab/x.png", b"12345")
    storage.write_bytes("quarantine/old-name.png", b"123")
    storage.write_bytes("store/ab/y.png", b"not counted")
    assert storage.total_size("quarantine") == 8


def test_copy_and_rename_prefix(storage: Storage) -> None:
    storage.write_bytes("store/ab/x.png", b"original")
    storage.copy("store/ab/x.png", "quarantine/x.png")
    assert storage.read_bytes("quarantine/x.png") == b"original"
    storage.write_bytes(".staging/u1/head.safetensors", b"head")
    storage.write_bytes(".staging/u1/card.json", b"{}")
    storage.rename_prefix(".staging/u1", "3")
    assert storage.list("3") == ["3/card.json", "3/head.safetensors"]
    assert storage.read_bytes("3/head.safetensors") == b"head"
    assert storage.list(".staging") == [] and not storage.has_prefix(".staging/u1")
    with pytest.raises(FileNotFoundError):
        storage.rename_prefix(".staging/absent", "4")


def test_failed_overwrite_keeps_old_content(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails midway leaves the previous file intact and no temp file behind."""
    storage.write_bytes("models/1/head.safetensors", b"old content")
    if isinstance(storage, FsspecStorage):
        real = storage.fs.pipe_file

        def broken(path: str, value: bytes, **kwargs) -> None:
            real(path, value[: len(value) // 2], **kwargs)  # half the bytes reach the temp key
            raise OSError("connection reset")

        monkeypatch.setattr(storage.fs, "pipe_file", broken)
    else:
        def broken_replace(src: str, dst: str) -> None:
            raise OSError("injected failure before the rename")

        monkeypatch.setattr("xray_core.io.fsutil.os.replace", broken_replace)
    with pytest.raises(OSError):
        storage.write_bytes("models/1/head.safetensors", b"new content, much longer than before")
    monkeypatch.undo()
    assert storage.read_bytes("models/1/head.safetensors") == b"old content"
    assert storage.list("models") == ["models/1/head.safetensors"]


def test_object_store_writes_once_and_copies_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without rename (an object store): one pipe_file per file, folder rename = verified copy + delete."""
    fs = fsspec.filesystem("memory")
    root = f"/xray-test-{uuid.uuid4().hex[:12]}"
    storage = FsspecStorage(fs, root)
    storage.renames = False  # behave as s3fs/gcsfs would: no mv
    puts: list[str] = []
    real = fs.pipe_file
    monkeypatch.setattr(fs, "pipe_file",
                        lambda path, value, **kw: (puts.append(path), real(path, value, **kw)))
    monkeypatch.setattr(fs, "mv", lambda *a, **kw: pytest.fail("an object store has no rename"))
    try:
        storage.write_bytes(".staging/u/head.safetensors", b"head")
        assert puts == [f"{root}/.staging/u/head.safetensors"]  # straight to the final key
        storage.rename_prefix(".staging/u", "7")
        assert storage.list() == ["7/head.safetensors"]
        assert storage.read_bytes("7/head.safetensors") == b"head"
    finally:
        monkeypatch.undo()
        fs.rm(root, recursive=True)


def test_open_storage_and_settings(tmp_path: Path) -> None:
    local = open_storage(f"file://{tmp_path / 'nfs'}")
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "nfs"  # fsync guarantees kept
    assert isinstance(open_storage("memory://xray-open"), FsspecStorage)
    home = tmp_path / "home"
    settings = load_settings({"XRAY_HOME": str(home)})
    assert settings.storage_url is None
    assert isinstance(get_storage(settings), LocalStorage) and get_storage(settings).root == home
    assert get_storage(settings, "features").root == home / "features"
    assert get_storage(settings, "models").root == home / "models"
    remote = load_settings({"XRAY_HOME": str(home), "XRAY_STORAGE_URL": "memory://bucket/xray/"})
    assert remote.storage_url == "memory://bucket/xray"
    assert get_storage(remote, "models").url_for("3/card.json") == "memory://bucket/xray/models/3/card.json"
    secret = load_settings({"XRAY_HOME": str(home), "XRAY_STORAGE_URL": "s3://key:secret@bucket/xray"})
    assert "secret" not in str(secret.public_dict())


def test_exists_now_asks_the_storage_not_a_cache(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ingest writer checks before a row names a store file another ingest may have removed
    (xray_core.data.store_guard.restore): a stale cached "yes" would commit a row naming a missing file."""
    storage.write_bytes("store/ab/x.png", b"x")
    assert storage.exists_now("store/ab/x.png") and not storage.exists_now("store/ab/y.png")
    assert not storage.exists_now("store")  # a folder is not a file
    if isinstance(storage, FsspecStorage):
        invalidated: list[str] = []
        real = storage.fs.invalidate_cache
        monkeypatch.setattr(storage.fs, "invalidate_cache",
                            lambda path=None: invalidated.append(path) or real(path))
        storage.delete("store/ab/x.png")
        assert not storage.exists_now("store/ab/x.png") and invalidated  # asked afresh
