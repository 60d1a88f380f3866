"""Resource limits: a full disk while writing cache files, checkpoints or store files, and the memory
cap on embedding.

A full disk is simulated where the operating system reports it: the file object that
``fsutil.atomic_write_bytes``/``atomic_copy`` writes through takes part of the data and then raises
``OSError(ENOSPC)`` (or EDQUOT), exactly as ``write(2)`` does on a full file system. Each case checks
that the error is a StorageFullError naming the path and the space, that no temp file is left, that
what was there before is unchanged, and that the same call succeeds once space is back.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from db import session_scope
from db.schema import Image, Model, Rejection, Source
from xray_core.data.catalogue import open_catalogue
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray
from xray_core.errors import StorageFullError, XrayError
from xray_core.model.backbone import Backbone, effective_batch_size, load_backbone
from xray_core.model.features import EmbedItem, FeatureCache
from xray_core.model.train import build_head
from xray_core.registry.versions import champion_version, load_model, record_decision, save_model
from xray_core.settings import Settings, load_settings

# --------------------------------------------------------------------------- the full disk


class _FullFile:
    """A writable file on a disk that fills up: the write takes half of the data, then ENOSPC."""

    def __init__(self, fh: io.BufferedWriter, code: int) -> None:
        self._fh, self._code = fh, code

    def write(self, data: bytes) -> int:
        self._fh.write(bytes(data[: len(data) // 2]))
        self._fh.flush()
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name: str):  # flush, fileno, close, ... of the real file
        return getattr(self._fh, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


class DiskFull:
    """Make the ``nth`` and later files opened for writing by fsutil hit a full disk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, nth: int = 1, code: int = errno.ENOSPC) -> None:
        self.opened = 0
        real_fdopen = os.fdopen

        def fdopen(fd: int, mode: str = "r", *args, **kwargs):
            fh = real_fdopen(fd, mode, *args, **kwargs)
            if "w" not in mode:
                return fh
            self.opened += 1
            return _FullFile(fh, code) if self.opened >= nth else fh

        self._mp = monkeypatch
        monkeypatch.setattr("xray_core.io.fsutil.os.fdopen", fdopen)

    def freed(self) -> None:
        self._mp.undo()


def temp_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def png_bytes(seed: int) -> bytes:
    arr = make_xray("normal" if seed % 2 else "pneumonia", size=64, rng=np.random.default_rng(seed),
                    patient_seed=seed)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_batch(root: Path, seeds: range) -> dict[str, bytes]:
    out = {}
    for seed in seeds:
        label = "normal" if seed % 2 else "pneumonia"
        path = root / label / f"person{seed}_x.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(seed))
        out[str(path)] = path.read_bytes()
    return out


def image_rows(settings: Settings) -> list[tuple]:
    with session_scope(open_catalogue(settings)) as s:
        return [tuple(getattr(i, c.key) for c in Image.__table__.columns) for i in s.scalars(select(Image))]


def assert_clear(err: pytest.ExceptionInfo, path_part: str, code: int = errno.ENOSPC) -> None:
    message = str(err.value)
    assert isinstance(err.value, XrayError)
    assert os.strerror(code) in message  # "No space left on device" / "Disk quota exceeded"
    assert ("disk full" if code == errno.ENOSPC else "quota") in message
    assert path_part in message and "bytes free" in message
    assert err.value.__cause__.errno == code


# --------------------------------------------------------------------------- (a) the feature cache


@pytest.fixture
def stored(settings: Settings, tmp_path: Path) -> list[EmbedItem]:
    write_batch(tmp_path / "src", range(4))
    ingest_source(tmp_path / "src", settings=settings)
    with session_scope(open_catalogue(settings)) as s:
        return [EmbedItem(i.sha256, settings.home / i.stored_path)
                for i in s.scalars(select(Image).order_by(Image.id))]


def cache_files(cache: FeatureCache) -> dict[str, bytes]:
    return {str(p.relative_to(cache.root)): p.read_bytes() for p in cache.root.rglob("*.safetensors")}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_while_writing_the_feature_cache(settings: Settings, stored,
                                                   monkeypatch, code: int) -> None:
    cache = FeatureCache(load_backbone(settings), settings)
    cache.ensure(stored[:2], [0])
    before = cache_files(cache)
    assert len(before) == 2

    disk = DiskFull(monkeypatch, code=code)
    with pytest.raises(StorageFullError) as err:
        cache.ensure(stored, [0, 1])  # the first write rewrites an existing file with a new view
    assert_clear(err, str(cache.root), code)
    assert cache_files(cache) == before, "a cache file changed although its write failed"
    assert temp_files(settings.features_dir) == []
    assert cache.coverage([i.sha256 for i in stored[:2]], [0])["pairs_needed"] == 0

    disk.freed()
    stats = cache.ensure(stored, [0, 1])
    assert (stats.cached, stats.computed) == (2, 6)
    assert cache.coverage([i.sha256 for i in stored], [0, 1])["pairs_needed"] == 0


# --------------------------------------------------------------------------- (b) a checkpoint

IN_DIM, HIDDEN = 8, (4,)
CARD = {"labels": ["normal", "pneumonia"], "threshold": 0.5, "input_size": 32,
        "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "backbone_fingerprint": "b" * 64, "backbone_weights": "random",
        "head": {"in_dim": IN_DIM, "hidden": list(HIDDEN), "dropout": 0.0},
        "training_set_fingerprint": "t" * 64}


def _save(settings: Settings) -> int:
    state = build_head(IN_DIM, 2, hidden=HIDDEN, dropout=0.0).state_dict()
    return save_model(settings, state_dict=state, card=dict(CARD), train_image_ids=[], val_image_ids=[])


@pytest.mark.parametrize("nth", [1, 2], ids=["head", "card"])
def test_disk_full_while_writing_a_checkpoint(settings: Settings, monkeypatch, nth: int) -> None:
    first = _save(settings)
    record_decision(settings, challenger=first, decision="promote", rationale="first", metrics={},
                    trigger="cli", promote=True)
    files_before = {p: p.read_bytes() for p in settings.models_dir.rglob("*") if p.is_file()}

    disk = DiskFull(monkeypatch, nth=nth)
    with pytest.raises(StorageFullError) as err:
        _save(settings)
    assert_clear(err, ".staging")
    with session_scope(open_catalogue(settings)) as s:
        assert champion_version(s) == first
        assert list(s.scalars(select(Model.id))) == [first]  # no row for the failed version
    assert {p: p.read_bytes() for p in settings.models_dir.rglob("*") if p.is_file()} == files_before
    assert not any((settings.models_dir / ".staging").glob("*")), "a half-staged checkpoint was left"
    load_model(settings, first)  # the champion still verifies

    disk.freed()
    assert _save(settings) == first + 1


# --------------------------------------------------------------------------- (c) the ingest store


@pytest.mark.parametrize("where", ["store", "quarantine"])
def test_disk_full_while_ingesting_stops_with_a_clear_error(settings: Settings, tmp_path: Path, monkeypatch,
                                                            where: str) -> None:
    write_batch(tmp_path / "earlier", range(100, 102))
    ingest_source(tmp_path / "earlier", settings=settings)
    rows_before = image_rows(settings)
    store_before = {p: p.read_bytes() for p in (settings.home / "store").rglob("*") if p.is_file()}

    new = write_batch(tmp_path / "new", range(6))
    if where == "quarantine":
        (tmp_path / "new" / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    disk = DiskFull(monkeypatch, nth=2 if where == "store" else 7)  # 6 store writes, then the quarantine copy
    with pytest.raises(StorageFullError) as err:
        ingest_source(tmp_path / "new", settings=settings)
    assert_clear(err, str(settings.home / where))

    assert image_rows(settings) == rows_before, "catalogued images changed"
    for path, data in store_before.items():
        assert path.read_bytes() == data
    assert temp_files(settings.home) == []
    with session_scope(open_catalogue(settings)) as s:
        statuses = [src.status for src in s.scalars(select(Source).order_by(Source.id))]
        rejections = list(s.scalars(select(Rejection)))
    assert statuses == ["done", "failed"]
    assert rejections == [], "the full disk was blamed on the files (rejections written)"

    disk.freed()
    again = ingest_source(tmp_path / "new", settings=settings)
    assert again.added == len(new)
    assert again.rejected == (1 if where == "quarantine" else 0)


# --------------------------------------------------------------------------- memory cap on embedding


@pytest.mark.parametrize("memory_mb, size, expected", [
    (2048, 224, 16),  # the default cap fits the default batch
    (100, 224, 2),  # 100 MB / (3*224*224*4 B * 64) = 2 views
    (1, 224, 1),  # never below one view
    (1, 32, 1),
])
def test_xray_embed_memory_mb_caps_the_batch(memory_mb: int, size: int, expected: int) -> None:
    settings = load_settings({"XRAY_EMBED_MEMORY_MB": str(memory_mb), "XRAY_INPUT_SIZE": str(size),
                              "XRAY_EMBED_BATCH_SIZE": "16", "XRAY_HOME": "/nonexistent"})
    assert effective_batch_size(settings) == expected


def test_a_small_memory_cap_makes_the_backbone_see_smaller_batches(settings: Settings,
                                                                   stored, monkeypatch) -> None:
    # At 32 px one view is 3*32*32*4 B * 64 = 786,432 B: a 2 MB cap allows 2 views per call.
    capped = settings.with_overrides(embed_memory_mb=2, embed_batch_size=16)
    assert effective_batch_size(capped) == 2 < effective_batch_size(settings)
    sizes: list[int] = []
    real_embed = Backbone.embed

    def spy(self: Backbone, batch):
        sizes.append(int(batch.shape[0]))
        return real_embed(self, batch)

    monkeypatch.setattr(Backbone, "embed", spy)
    FeatureCache(load_backbone(capped), capped).ensure(stored, [0, 1])
    assert sizes and max(sizes) <= 2 and sum(sizes) == 2 * len(stored)
