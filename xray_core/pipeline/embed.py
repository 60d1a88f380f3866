"""Embedding for a run: every (image, view) pair the next training and evaluation need, into the
feature cache; also sharded, for fan-out over Dask workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xray_core.data.snapshot import SplitData
from xray_core.pipeline.features import embed_items, train_views
from xray_core.settings import Settings

EmbedProgress = Callable[[int, int], None]


def embed_step(settings: Settings, data: SplitData, progress: EmbedProgress | None = None) -> dict[str, Any]:
    """Embed every missing (image, view) pair the next training and evaluation need."""
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache

    backbone = load_backbone(settings)
    cache = FeatureCache(backbone, settings)
    total = len(data.train) + len(data.val) + len(data.test)
    calls_before = backbone.calls  # the backbone is cached per process: count this run's forwards only

    def _progress(offset: int) -> EmbedProgress | None:
        if progress is None:
            return None
        return lambda done, _n: progress(offset + done, total)

    # Training films: views 0..K. The eval view 0 trains the linear recipes and calibrates the
    # reference's OOD threshold (scored as prediction scores films); the MLP also samples 1..K.
    stats_train = cache.ensure(embed_items(settings, data.train),
                               train_views(settings), progress=_progress(0))
    stats_eval = cache.ensure(embed_items(settings, data.val + data.test), [0],
                              progress=_progress(len(data.train)))
    merged = {k: getattr(stats_train, k) + getattr(stats_eval, k)
              for k in ("requested", "cached", "computed", "recomputed_corrupt", "images")}
    merged["seconds"] = round(stats_train.seconds + stats_eval.seconds, 3)
    merged["backbone_fingerprint"] = backbone.fingerprint
    merged["backbone_random_init"] = backbone.random_init
    merged["backbone_calls"] = backbone.calls - calls_before
    return merged


def shard_of(sha256: str, shards: int) -> int:
    """The shard an image belongs to: stable, and independent of the image's position in the split."""
    return int(sha256[:8], 16) % shards


def embed_shard(settings: Settings, data: SplitData, shard: int, shards: int, *,
                threads: int | None = None, precision: str | None = None) -> dict[str, Any]:
    """:func:`embed_step` for the images of one shard (for fan-out over Dask workers).

    Features do not depend on how images are batched (see ``Backbone.embed``), so any sharding
    caches byte-identical files to the single-process path, given the same thread count and
    precision: ``precision`` is the coordinator's resolved one, so a worker host whose hardware
    would resolve ``auto`` differently still files its features under the run's fingerprint.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)  # n workers on one host share its cores
    if precision:
        settings = settings.with_overrides(embed_precision=precision)
    pick = lambda rows: [r for r in rows if shard_of(r.sha256, shards) == shard]
    stats = embed_step(settings, SplitData(data.labels, pick(data.train), pick(data.val), pick(data.test)))
    return {**stats, "shard": shard, "torch_threads": torch.get_num_threads()}


def merge_embed_stats(parts: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One embed summary from the shards' (wall time measured by the caller)."""
    merged = {k: sum(p[k] for p in parts)
              for k in ("requested", "cached", "computed", "recomputed_corrupt", "images")}
    first = parts[0]
    return {**merged, "seconds": round(seconds, 3), "backbone_fingerprint": first["backbone_fingerprint"],
            "backbone_random_init": first["backbone_random_init"],
            "backbone_calls": sum(p["backbone_calls"] for p in parts), "shards": len(parts),
            "shard_seconds": [p["seconds"] for p in parts],
            "threads": [p.get("torch_threads") for p in parts]}
