"""The feature cache: each (image, view) is embedded once per backbone fingerprint and kept on disk.

Layout: ``<features>/<fingerprint>/<sha[:2]>/<sha>.safetensors``, one file per image, holding a
float16 tensor ``v<k>`` of shape (2208,) for each cached view k, and metadata
``{"fingerprint", "feature_dim", "sha256_<k>": sha256 of v<k>'s bytes}``. float16 halves the disk
and read cost; the head is trained in float32 from it (``load*`` returns float32, or with
``dtype=np.float16`` the stored values themselves: the train step holds them so, at half the memory).

``<features>`` is ``XRAY_HOME/features`` or ``<XRAY_STORAGE_URL>/features`` (:mod:`xray_core.io.storage`).
Files are written atomically (see that module, per backend) as soon as all of an image's views are
embedded, so an interrupted run keeps everything finished so far and resumes where it stopped.
Every read verifies every view's digest: a truncated, bit-flipped or foreign file is treated as
missing and recomputed, never used.

Embedding streams: a DataLoader decodes images (``XRAY_EMBED_WORKERS`` processes) while the backbone
runs; only the current batch of inputs is held, and features leave memory once their file is written.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xray_core.errors import XrayError
from xray_core.faults import crash_point
from xray_core.io.fsutil import sha256_bytes
from xray_core.io.storage import LocalStorage, Storage, get_storage
from xray_core.model.backbone import FEATURE_DIM, Backbone, effective_batch_size, fingerprint

_VIEW_KEY = re.compile(r"^v(\d+)$")


class FeatureCacheError(XrayError):
    """Cached features needed by a step are missing, or embedding an image failed."""


class StoreIntegrityError(FeatureCacheError):
    """A stored original no longer hashes to its sha256: features would come from other pixels."""


@dataclass(frozen=True)
class EmbedItem:
    """One image to embed: its content hash and where its stored original is.

    ``key`` (the catalogue's ``stored_path``, e.g. ``store/ab/<sha>.png``) reads the original through
    :func:`xray_core.io.storage.get_storage`, whatever the backend; without it ``path`` is read directly.
    """

    sha256: str
    path: Path
    key: str | None = None


@dataclass
class EmbedStats:
    """What one :meth:`FeatureCache.ensure` call did. Counts are (image, view) pairs unless noted."""

    requested: int  # unique images x requested views
    cached: int  # pairs already on disk and verified
    computed: int  # pairs embedded now (includes recomputed_corrupt)
    recomputed_corrupt: int  # pairs whose file was corrupt or truncated, embedded again
    images: int  # images decoded and embedded now (those with at least one computed pair)
    seconds: float  # wall time of the call


@dataclass
class _Entry:
    """What is on disk for one image: verified views, and which ones failed verification."""

    valid: dict[int, np.ndarray] = field(default_factory=dict)  # view -> (2208,) float16
    corrupt: set[int] = field(default_factory=set)  # views present but failing verification
    unreadable: bool = False  # the file exists but cannot be parsed or belongs elsewhere

    def is_corrupt(self, view: int) -> bool:
        return self.unreadable or view in self.corrupt


class _ViewsDataset(Dataset):
    """Decode one image and build its missing views; errors are returned, not raised.

    Returning the error keeps its message intact across worker processes (a custom exception
    raised in a worker is re-created by the DataLoader and can lose its arguments).
    """

    def __init__(self, jobs: list[tuple[str, str, tuple[int, ...], str | None]], settings: Any) -> None:
        self.jobs = jobs
        self.settings = settings

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from xray_core.data.catalogue import (
            stored_sha256_of,  # asked only after a mismatch (de-identified DICOM)
        )
        from xray_core.data.images import decode_stored
        from xray_core.model.preprocess import make_view

        sha, path, views, key = self.jobs[index]
        try:
            store = get_storage(self.settings)
            data = store.read_bytes(key) if key else Path(path).read_bytes()
            if (key and (actual := sha256_bytes(data)) != sha
                    and actual != stored_sha256_of(self.settings, sha)):
                evidence = f"quarantine/store-mismatch/{sha}-{actual[:12]}"
                store.copy(key, evidence)  # kept for inspection; the entry stays, so every run refuses it
                return {"sha": sha, "path": path, "views": views, "x": None, "error": None, "mismatch": (
                    f"store entry {key} holds bytes with sha256 {actual[:12]}…, not {sha[:12]}…: it was "
                    f"replaced or corrupted. A copy is in {evidence}; restore {key} from a backup")}
            # Same pixel cap as ingest, so an image ingest accepted under a raised cap still loads.
            gray = decode_stored(data, max_pixels=self.settings.max_pixels)
            x = torch.stack([make_view(gray, v, sha, self.settings) for v in views])
            return {"sha": sha, "path": path, "views": views, "x": x, "error": None}
        except Exception as exc:  # noqa: BLE001 - reported by the main process as FeatureCacheError
            return {"sha": sha, "path": path, "views": views, "x": None,
                    "error": f"{type(exc).__name__}: {exc}"}


def _identity(sample: Any) -> Any:  # collate_fn with batch_size=None: one sample, not a list
    return sample


class FeatureCache:
    """Cached backbone features for one backbone fingerprint (see the module docstring)."""

    def __init__(self, backbone: Backbone, settings: Any) -> None:
        from xray_core.model.preprocess import spec_dict

        # Features are filed under the backbone's fingerprint, which includes the preprocessing
        # spec; settings with another spec would file wrong features under it.
        own = fingerprint(backbone.weights_sha256, spec_dict(settings),
                          backbone.precision, backbone.device.type)
        if backbone.weights_sha256 and own != backbone.fingerprint:
            raise FeatureCacheError(
                "the settings' preprocessing (input size, augmentation) differs from the one the backbone "
                "was loaded with; load the backbone with the same settings (load_backbone(settings))"
            )
        self.backbone = backbone
        self.settings = settings
        self.storage = get_storage(settings, "features")
        self.root = Path(settings.features_dir) / backbone.fingerprint  # the local layout (path_for)

    # -- paths and files ------------------------------------------------------------------------

    def key_for(self, sha256: str) -> str:
        """The file's key in :attr:`storage` (relative to the features area)."""
        return f"{self.backbone.fingerprint}/{sha256[:2]}/{sha256}.safetensors"

    def path_for(self, sha256: str) -> Path:
        """The file on local disk (default storage; under XRAY_STORAGE_URL see :meth:`key_for`)."""
        return self.root / sha256[:2] / f"{sha256}.safetensors"

    def _read(self, sha256: str) -> _Entry:
        try:
            data = self.storage.read_bytes(self.key_for(sha256))
        except FileNotFoundError:
            return _Entry()
        return self._parse(data)

    def _parse(self, data: bytes) -> _Entry:
        from safetensors.numpy import load as st_load

        entry = _Entry()
        try:
            n = int.from_bytes(data[:8], "little")
            if len(data) < 8 or 8 + n > len(data):
                raise ValueError("truncated header")
            meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
            tensors = st_load(data)
        except Exception:  # noqa: BLE001 - any parse failure means: not usable, recompute
            entry.unreadable = True
            return entry
        if (meta.get("fingerprint") != self.backbone.fingerprint
                or meta.get("feature_dim") != str(FEATURE_DIM)):
            entry.unreadable = True
            return entry
        for name, arr in tensors.items():
            match = _VIEW_KEY.match(name)
            if not match:
                continue
            view = int(match.group(1))
            ok = (
                arr.dtype == np.float16
                and arr.shape == (FEATURE_DIM,)
                and meta.get(f"sha256_{view}") == sha256_bytes(arr.tobytes())
            )
            if ok:
                entry.valid[view] = arr
            else:
                entry.corrupt.add(view)
        for key in meta:  # a digest without its tensor: the tensor was lost
            if key.startswith("sha256_") and key[7:].isdigit() and f"v{int(key[7:])}" not in tensors:
                entry.corrupt.add(int(key[7:]))
        return entry

    def _write(self, sha256: str, new: dict[int, np.ndarray]) -> None:
        """Merge ``new`` views with the verified ones already on disk and rewrite atomically."""
        from safetensors.numpy import save as st_save

        merged = dict(self._read(sha256).valid)  # re-read: another run may have added views meanwhile
        merged.update(new)
        tensors: dict[str, np.ndarray] = {}
        meta = {"fingerprint": self.backbone.fingerprint, "feature_dim": str(FEATURE_DIM)}
        for view in sorted(merged):
            arr = np.ascontiguousarray(merged[view], dtype=np.float16)
            tensors[f"v{view}"] = arr
            meta[f"sha256_{view}"] = sha256_bytes(arr.tobytes())
        # No fsync: every read re-checks each view's sha256, so a file a power cut left incomplete is
        # detected and recomputed; the rename still keeps readers from ever seeing a partial file.
        self.storage.write_bytes(self.key_for(sha256), st_save(tensors, metadata=meta), durable=False)
        crash_point("features.file_written")

    # -- public API -----------------------------------------------------------------------------

    def ensure(
        self,
        items: Sequence[EmbedItem],
        views: Sequence[int],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> EmbedStats:
        """Embed every (item, view) pair not yet cached; return what was done.

        ``progress(done_images, total_images)`` is called once after planning (images already
        complete count as done) and after each image's file is written, ending at the total.
        Raises FeatureCacheError after the run if some originals could not be decoded; every
        other image is embedded and cached first, so a rerun only retries the failures.
        """
        start = time.perf_counter()
        wanted = _check_views(views)
        unique: dict[str, EmbedItem] = {}
        for item in items:
            unique.setdefault(item.sha256, item)
        cached = corrupt = 0
        jobs: list[tuple[str, str, tuple[int, ...], str | None]] = []
        for sha, item in unique.items():
            entry = self._read(sha)
            missing = tuple(v for v in wanted if v not in entry.valid)
            cached += len(wanted) - len(missing)
            corrupt += sum(1 for v in missing if entry.is_corrupt(v))
            if missing:
                jobs.append((sha, str(Path(item.path).resolve()), missing, item.key))
        total = len(unique)
        if progress is not None:
            progress(total - len(jobs), total)
        if jobs:
            self._embed(jobs, done=total - len(jobs), total=total, progress=progress)
        return EmbedStats(
            requested=total * len(wanted),
            cached=cached,
            computed=sum(len(j[2]) for j in jobs),
            recomputed_corrupt=corrupt,
            images=len(jobs),
            seconds=time.perf_counter() - start,
        )

    def _embed(
        self,
        jobs: list[tuple[str, str, tuple[int, ...], str | None]],
        *,
        done: int,
        total: int,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        workers = int(self.settings.embed_workers)
        loader = DataLoader(
            _ViewsDataset(jobs, self.settings),
            batch_size=None,  # one sample = one image with all its missing views
            shuffle=False,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=self.backbone.device.type == "cuda",
            prefetch_factor=2 if workers > 0 else None,
        )
        batch_size = effective_batch_size(self.settings)
        need = {sha: len(views) for sha, _, views, _ in jobs}
        pending: dict[str, dict[int, np.ndarray]] = {}  # finished views of images not yet written
        inputs: list[torch.Tensor] = []
        owners: list[tuple[str, int]] = []

        def flush() -> None:
            nonlocal done
            if not inputs:
                return
            feats = self.backbone.embed(torch.stack(inputs)).numpy().astype(np.float16)
            if not np.isfinite(feats).all():
                raise FeatureCacheError(
                    "the backbone produced non-finite features (overflow in float16?); "
                    f"weights {self.backbone.weights!r} are not usable for caching"
                )
            for (sha, view), row in zip(owners, feats):
                pending.setdefault(sha, {})[view] = row.copy()
                if len(pending[sha]) == need[sha]:
                    self._write(sha, pending.pop(sha))
                    done += 1
                    if progress is not None:
                        progress(done, total)
            inputs.clear()
            owners.clear()

        failed: list[str] = []
        mismatched: list[str] = []
        for sample in loader:
            if sample.get("mismatch"):
                mismatched.append(sample["mismatch"])
                continue
            if sample["error"] is not None:
                # Keep going: one unreadable original should not throw away the rest of the run.
                failed.append(f"{sample['sha']} ({sample['path']}): {sample['error']}")
                continue
            for view, x in zip(sample["views"], sample["x"]):
                inputs.append(x)
                owners.append((sample["sha"], view))
                if len(inputs) >= batch_size:
                    flush()
        flush()
        if mismatched:
            raise StoreIntegrityError(f"{len(mismatched)} stored original(s) failed verification; the others "
                                      f"were cached. First: {mismatched[0]}")
        if failed:
            raise FeatureCacheError(
                f"cannot embed {len(failed)} image(s); the others were cached. First: {failed[0]}"
            )

    def put(self, sha256: str, features: dict[int, np.ndarray]) -> None:
        """File features computed outside :meth:`ensure` (``xray predict`` embeds view 0 of films it has
        not seen), merged with the views already cached, so a film predicted once is embedded once:
        when it later arrives labelled, its view 0 is already here. Rounded to float16 as every cached
        view is."""
        bad = [v for v, arr in features.items() if v < 0 or np.shape(arr) != (FEATURE_DIM,)]
        if bad:
            raise FeatureCacheError(f"features for view(s) {bad} must be vectors of {FEATURE_DIM} values "
                                    "for views 0 and above")
        self._write(sha256, {int(v): np.asarray(arr, dtype=np.float16) for v, arr in features.items()})

    def load(self, sha256s: Sequence[str], view: int, *, dtype: type[np.floating] = np.float32) -> np.ndarray:
        """(n, 2208) features of ``view`` for each image, in order (float32 unless ``dtype``);
        FeatureCacheError if any is missing."""
        return self.load_views(sha256s, [view], dtype=dtype)[:, 0, :]

    def load_views(self, sha256s: Sequence[str], views: Sequence[int], *,
                   dtype: type[np.floating] = np.float32) -> np.ndarray:
        """(n, len(views), 2208) float32 (or ``dtype``); FeatureCacheError naming the missing pairs if any.

        ``dtype=np.float16``: the cached values themselves at half the memory. Converting them to float32
        or float64 later gives exactly what a float32 load gives: both hold every float16 value."""
        wanted = [int(v) for v in views]
        out = np.empty((len(sha256s), len(wanted), FEATURE_DIM), dtype=dtype)
        missing: list[str] = []
        for i, sha in enumerate(sha256s):
            entry = self._read(sha)
            for j, view in enumerate(wanted):
                arr = entry.valid.get(view)
                if arr is None:
                    missing.append(f"{sha[:12]}/v{view}")
                else:
                    out[i, j] = arr
        if missing:
            raise FeatureCacheError(
                f"{len(missing)} (image, view) feature(s) are not cached for backbone "
                f"{self.backbone.fingerprint[:12]} (e.g. {', '.join(missing[:3])}); "
                "run FeatureCache.ensure on these images first (xray retrain does)"
            )
        return out

    def coverage(self, sha256s: Sequence[str], views: Sequence[int]) -> dict[str, int]:
        """How much of (images x views) is cached: images, complete images, pairs total/cached/needed.

        ``pairs_needed`` is the number still to embed (total - cached).
        """
        wanted = _check_views(views)
        unique = list(dict.fromkeys(sha256s))
        complete = cached = 0
        for sha in unique:
            entry = self._read(sha)
            have = sum(1 for v in wanted if v in entry.valid)
            cached += have
            complete += have == len(wanted)
        total = len(unique) * len(wanted)
        return {"images": len(unique), "complete": complete, "pairs_total": total, "pairs_cached": cached,
                "pairs_needed": total - cached}


def _check_views(views: Sequence[int]) -> list[int]:
    wanted = sorted({int(v) for v in views})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"views must be a non-empty list of numbers >= 0 (0 = eval view), got {list(views)}")
    return wanted


def cache_summary(features: Path | Storage) -> list[dict[str, Any]]:
    """One row per backbone fingerprint folder: files, bytes stored, images cached (for ``xray status``).

    ``features``: the features folder, or its storage (``get_storage(settings, "features")``)."""
    storage = features if isinstance(features, Storage) else LocalStorage(Path(features))
    rows = []
    for fp in storage.folders():
        files = n_bytes = images = 0
        for key in storage.list(fp):
            name = key.rpartition("/")[2]
            files += 1
            n_bytes += storage.size(key)
            images += name.endswith(".safetensors") and not name.startswith(".")
        rows.append({"fingerprint": fp, "path": storage.url_for(fp), "files": files,
                     "bytes": n_bytes, "images": images})
    return rows


__all__ = ["EmbedItem", "EmbedStats", "FeatureCache", "FeatureCacheError", "cache_summary"]
