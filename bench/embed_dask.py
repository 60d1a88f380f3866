"""Embedding throughput: single process vs the Dask fan-out with 1 and 2 local workers.

Same images (synthetic 512² PNGs), same settings, cold feature cache each time. Prints one JSON line
and writes bench/results/embed_dask.json. On one 2-core host, 2 workers each computing with the same
thread count as the parent (the price of byte-identical features) oversubscribe the cores: the number
measured here is the overhead of the fan-out, not the gain of adding hosts.

    python bench/embed_dask.py [--n 160] [--size 64] [--views 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from publish import publish  # noqa: E402 - bench/ is on sys.path when a benchmark runs as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=160, help="images")
    parser.add_argument("--size", type=int, default=64, help="input size in pixels")
    parser.add_argument("--views", type=int, default=2, help="augmented views per training image")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xray-bench-dask-"))
    os.environ.update({"XRAY_HOME": str(tmp / "home"),
                       "XRAY_BACKBONE_WEIGHTS": "random", "XRAY_DEVICE": "cpu",
                       "XRAY_INPUT_SIZE": str(args.size), "XRAY_VIEWS": str(args.views),
                       "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    sys.path.insert(0, str(ROOT))
    import torch

    from flows.embed import run_parallel_embed
    from xray_core.data import snapshot
    from xray_core.data.ingest import ingest_source
    from xray_core.data.synthetic import write_dataset
    from xray_core.model.backbone import load_backbone
    from xray_core.pipeline import embed
    from xray_core.settings import load_settings

    settings = load_settings()
    write_dataset(tmp / "src", patients_per_label=args.n // 2, images_per_patient=1, size=512, seed=0)
    ingest_source(tmp / "src", settings=settings)
    data = snapshot.load_split_data(settings)
    snapshot = str(snapshot.save_snapshot(tmp / "split.json", data))
    load_backbone(settings)  # loading and hashing the weights is excluded everywhere

    # Start Prefect's ephemeral server once, outside the timings (a deployment has a running server).
    run_parallel_embed(settings.with_overrides(embed_dask_workers=1), snapshot)

    results = {}
    for name, workers in (("single_process", 0), ("dask_1_worker", 1), ("dask_2_workers", 2)):
        shutil.rmtree(settings.features_dir, ignore_errors=True)
        start = time.perf_counter()
        if workers == 0:
            stats = embed.embed_step(settings, data)
        else:
            stats = run_parallel_embed(settings.with_overrides(embed_dask_workers=workers), snapshot)
        seconds = time.perf_counter() - start
        compute = max(stats.get("shard_seconds", [stats["seconds"]]))
        results[name] = {"seconds": round(seconds, 2), "pairs": stats["computed"],
                         "pairs_per_s": round(stats["computed"] / seconds, 2),
                         "embedding_seconds": round(compute, 2),  # slowest shard, cluster start excluded
                         "embedding_pairs_per_s": round(stats["computed"] / compute, 2)}
    out = {"name": "embed_dask", "images": len(data.train) + len(data.val) + len(data.test),
           "input_size": args.size, "views": args.views, "cpu_count": os.cpu_count(),
           "torch_threads_per_worker": torch.get_num_threads(), **results,
           "embedding_ratio_2_vs_1_workers": round(results["dask_2_workers"]["embedding_pairs_per_s"]
                                                   / results["dask_1_worker"]["embedding_pairs_per_s"], 2),
           "wall_ratio_2_vs_1_workers": round(results["dask_2_workers"]["pairs_per_s"]
                                              / results["dask_1_worker"]["pairs_per_s"], 2),
           "note": "seconds/pairs_per_s include starting a local Dask cluster and its workers (importing "
                   "torch, loading the backbone); embedding_* is the slowest shard's own embedding time"}
    publish("embed_dask", out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
