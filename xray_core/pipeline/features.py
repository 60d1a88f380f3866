"""The cached features of a split's rows: which (image, view) pairs a run embeds and trains on, and
loading them from the feature cache of the current backbone."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from xray_core.data.snapshot import Row
from xray_core.settings import Settings


def embed_items(settings: Settings, rows: Sequence[Row]) -> list:
    from xray_core.model.features import EmbedItem

    return [EmbedItem(sha256=r.sha256, path=settings.home / r.stored_path, key=r.stored_path) for r in rows]


def train_views(settings: Settings) -> list[int]:
    """The views cached for training images: the eval view 0 first, then the augmented views 1..K.

    The linear recipes train on the eval view (what they are scored on) and the MLP on all of them
    (see :mod:`xray_core.model.recipes`); k-fold recipe selection scores a held-out training image
    on its eval view, as prediction will.
    """
    return [0, *range(1, settings.views + 1)]


def features_for(settings: Settings, rows: list[Row], views: list[int] | None = None, *,
                 dtype: type[np.floating] = np.float32) -> np.ndarray:
    """The cached features of ``rows``: (n, 2208) of the eval view, or (n, len(views), 2208). ``dtype``
    float16 holds the cached values as they are stored, at half float32's memory (the train step's)."""
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache

    cache = FeatureCache(load_backbone(settings), settings)
    shas = [r.sha256 for r in rows]
    if views is None:
        return cache.load(shas, 0, dtype=dtype)
    return cache.load_views(shas, views, dtype=dtype)


def features_sha256(x_train: np.ndarray, x_val: np.ndarray) -> str:
    """sha256 of the float32 training and validation features a head was fitted on, in row order: tells
    ``xray reproduce`` whether the cache still holds the very features (re-embedded ones may differ)."""
    digest = hashlib.sha256()
    for x in (x_train, x_val):
        digest.update(str(x.shape).encode())
        for start in range(0, len(x), 4096):  # the same bytes in order, without a copy of all of them
            digest.update(np.ascontiguousarray(x[start:start + 4096], dtype=np.float32).tobytes())
    return digest.hexdigest()
