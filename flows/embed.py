"""Parallel embedding: the missing (image, view) pairs fanned out over Dask workers.

The retrain flow uses this subflow when ``XRAY_EMBED_DASK_WORKERS`` > 0. With ``XRAY_DASK_ADDRESS``
it joins an existing Dask cluster (workers on several hosts sharing the store and features: XRAY_HOME
on shared storage, or XRAY_STORAGE_URL);
otherwise it starts a local cluster of that many worker processes. Needs the ``dask`` extra
(``pip install -e .[dask]``: prefect-dask).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.common import transient_io
from xray_core.data.snapshot import load_snapshot
from xray_core.io.allowed_roots import confine_to
from xray_core.pipeline.embed import embed_shard, merge_embed_stats
from xray_core.settings import Settings, get_settings


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=transient_io, cache_policy=NO_CACHE)
def embed_shard_task(snapshot: str, shard: int, shards: int, threads: int,
                     precision: str | None = None) -> dict[str, Any]:
    """Embed the missing pairs of one shard of the run's images."""
    return embed_shard(get_settings(), load_snapshot(Path(snapshot)), shard, shards, threads=threads,
                       precision=precision)


@flow(name="embed-parallel")
def embed_parallel(snapshot: str, shards: int, threads: int = 1,
                   precision: str | None = None) -> dict[str, Any]:
    """Map the shards over the flow's task runner (a DaskTaskRunner) and merge their stats.

    ``snapshot`` must be a run's split under XRAY_HOME/reports (where the retrain flow writes it) or in
    the allowed roots; any other path is refused (PathRefusedError) before a worker reads it."""
    settings = get_settings()
    snapshot = confine_to(settings, snapshot, settings.reports_dir, name="snapshot")
    start = time.perf_counter()
    futures = embed_shard_task.map(snapshot, list(range(shards)), unmapped(shards), unmapped(threads),
                                   unmapped(precision))
    return merge_embed_stats([f.result() for f in futures], time.perf_counter() - start)


def dask_task_runner(settings: Settings):  # -> prefect_dask.DaskTaskRunner
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - the extra is installed by the Makefile
        raise ImportError("XRAY_EMBED_DASK_WORKERS needs the dask extra: pip install -e '.[dask]'") from exc
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.embed_dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def run_parallel_embed(settings: Settings, snapshot: str, *, threads: int | None = None) -> dict[str, Any]:
    """Run :func:`embed_parallel` on Dask.

    Each worker computes with the same number of torch threads as this process (or ``threads``) and
    this process's resolved ``XRAY_EMBED_PRECISION``: CPU convolution results depend in their last
    bits on the thread count, so equal counts are what makes the shards' features byte-identical to
    the single-process path.
    On one host that oversubscribes the cores; the speed-up comes from more hosts (XRAY_DASK_ADDRESS).
    """
    import torch

    from xray_core.model.device import pick_device, pick_precision

    shards = settings.embed_dask_workers
    threads = threads or torch.get_num_threads()
    precision = pick_precision(settings.embed_precision, pick_device(settings.device))
    runner = dask_task_runner(settings)
    return embed_parallel.with_options(task_runner=runner)(snapshot, shards, threads, precision)
