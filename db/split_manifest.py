"""Split manifests: a model version's training and validation image ids as one content-addressed value.

Lineage used to be one ``model_images`` row per image per version: with a million catalogued films and
a nightly retrain, a million rows a night for sets that barely change. A manifest is the sorted ids
of each role, named by the sha256 of a canonical text, written once and shared by every version whose
sets are identical (a retrain that learned nothing new points at its parent's manifest).

Canonical text (what the name hashes; independent of how the body is stored)::

    xray-split-manifest/1
    train:<id>,<id>,...   (ascending)
    val:<id>,<id>,...     (ascending)

Body (``ENCODING``): per role, a little-endian uint32 count and the gaps between ascending ids as
uint32, all zlib-compressed: catalogue ids are dense, so the gaps are mostly small and a 100k-image
set takes kilobytes instead of 100k rows.

Lives in ``db`` (not ``xray_core``) because migration 0003s converts old rows with it. The
``encoding`` column names the format, so a later format can still read these bodies.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable

import numpy as np

ENCODING = "gaps-u32-zlib/1"
ROLES = ("train", "val")
_HEADER = "xray-split-manifest/1"


def _sorted_ids(ids: Iterable[int], role: str) -> np.ndarray:
    arr = np.unique(np.fromiter((int(i) for i in ids), dtype=np.int64))
    if arr.size and (arr[0] < 1 or arr[-1] > 0xFFFFFFFF):
        raise ValueError(f"{role} image ids must be catalogue ids from 1 to 2**32-1")
    return arr


def canonical_sha256(train: np.ndarray, val: np.ndarray) -> str:
    """sha256 of the canonical text of two ascending id arrays."""
    digest = hashlib.sha256(_HEADER.encode())
    for role, ids in zip(ROLES, (train, val)):
        digest.update(f"\n{role}:".encode())
        digest.update(",".join(map(str, ids.tolist())).encode())
    return digest.hexdigest()


def encode(train_ids: Iterable[int], val_ids: Iterable[int]) -> tuple[str, bytes, int, int]:
    """(sha256, body, n_train, n_val) of a manifest. An image in both roles is refused (ValueError):
    a validation film that also trained the head would make every validation number optimistic."""
    train, val = _sorted_ids(train_ids, "train"), _sorted_ids(val_ids, "val")
    both = np.intersect1d(train, val)
    if both.size:
        raise ValueError(f"{both.size} image(s) are in both train and val (e.g. image {int(both[0])})")
    parts = []
    for ids in (train, val):
        gaps = np.diff(ids, prepend=0).astype("<u4")
        parts.append(struct.pack("<I", ids.size) + gaps.tobytes())
    return canonical_sha256(train, val), zlib.compress(b"".join(parts), 9), int(train.size), int(val.size)


def decode(body: bytes, encoding: str = ENCODING) -> dict[str, list[int]]:
    """{"train": [...], "val": [...]} (ascending ids) of a stored body."""
    if encoding != ENCODING:
        raise ValueError(f"unknown split manifest encoding {encoding!r}; this version reads {ENCODING}")
    raw = zlib.decompress(body)
    out: dict[str, list[int]] = {}
    offset = 0
    for role in ROLES:
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        gaps = np.frombuffer(raw, dtype="<u4", count=n, offset=offset)
        offset += 4 * n
        out[role] = np.cumsum(gaps, dtype=np.int64).tolist()
    return out
