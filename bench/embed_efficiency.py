"""How much of the embedding pipeline's time is the backbone itself? (a benchmark, not a test)

Measures, side by side in one process with the same torch threads and batch size:
  (a) images/s of ``FeatureCache.ensure`` on a cold cache, view 0 only, decoding 512x512 PNGs,
      preprocessing, embedding and writing verified safetensors files included;
  (b) images/s of the bare ``Backbone.embed`` on ready-made input tensors.
``ratio`` = a / b: 1.0 means decoding, preprocessing and cache writes cost nothing beside the
backbone; much lower means the pipeline, not the model, is the bottleneck.

Prints one JSON line and writes bench/results/embed_efficiency.json. Uses ``random`` backbone
weights by default (no download needed; the speed of densenet161 does not depend on its weights).

    python bench/embed_efficiency.py [--n 64] [--size 64] [--batch 16] [--workers 0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from publish import publish  # bench/ is on sys.path when a benchmark runs as a script

from xray_core.io.fsutil import sha256_file
from xray_core.model.backbone import effective_batch_size, load_backbone
from xray_core.model.features import EmbedItem, FeatureCache
from xray_core.settings import load_settings


def write_images(folder: Path, n: int, side: int, seed: int = 0) -> list[EmbedItem]:
    """n distinct X-ray-ish 8-bit grayscale PNGs (smooth body shape + noise), side x side pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side] / side
    body = np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.55) / 0.45) ** 2))
    items = []
    for i in range(n):
        img = 0.15 + 0.6 * body + 0.08 * rng.standard_normal((side, side))
        pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        path = folder / f"img{i:05d}.png"
        Image.fromarray(pixels, mode="L").save(path)
        items.append(EmbedItem(sha256=sha256_file(path), path=path.resolve()))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--size", type=int, default=64, help="backbone input size in pixels (default 64)")
    parser.add_argument("--batch", type=int, default=16, help="embedding batch size (default 16)")
    parser.add_argument("--image-side", type=int, default=512,
                        help="side of the synthetic PNGs (default 512)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader decode workers (default 0)")
    parser.add_argument("--weights", default="random", help="XRAY_BACKBONE_WEIGHTS (default random)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved repetitions; best kept (default 3)")
    parser.add_argument("--device", default="auto", help="XRAY_DEVICE (default auto)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="xray-bench-") as tmp:
        home = Path(tmp) / "home"
        settings = load_settings({
            "XRAY_HOME": str(home),
            "XRAY_BACKBONE_WEIGHTS": args.weights,
            "XRAY_DEVICE": args.device,
            "XRAY_INPUT_SIZE": str(args.size),
            "XRAY_EMBED_BATCH_SIZE": str(args.batch),
            "XRAY_EMBED_WORKERS": str(args.workers),
        })
        items = write_images(Path(tmp) / "images", args.n, args.image_side)
        backbone = load_backbone(settings)
        batch = effective_batch_size(settings)
        ready = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        for _ in range(2):  # warm-up: first calls pay for kernel selection / allocator growth
            backbone.embed(ready)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()

        # Interleave the two measurements and keep each one's best run: on a shared machine the
        # minimum is the least disturbed estimate of what the code itself costs.
        batches = math.ceil(args.n / batch)
        pipeline_runs, bare_runs = [], []
        for rep in range(args.repeat):
            run_settings = settings.with_overrides(features_dir=home / f"features-{rep}")  # cold cache
            start = time.perf_counter()
            stats = FeatureCache(backbone, run_settings).ensure(items, [0])
            pipeline_runs.append(time.perf_counter() - start)
            assert stats.computed == args.n, stats
            start = time.perf_counter()
            for _ in range(batches):
                backbone.embed(ready)  # returns on the CPU, so CUDA work is finished when it returns
            bare_runs.append(time.perf_counter() - start)
        pipeline_s, bare_s = min(pipeline_runs), min(bare_runs)

    pipeline_ips = args.n / pipeline_s
    bare_ips = batches * batch / bare_s
    result = {
        "name": "embed_efficiency",
        "n_images": args.n,
        "image_side": args.image_side,
        "input_size": args.size,
        "batch_size": batch,
        "embed_workers": args.workers,
        "weights": args.weights,
        "device": str(backbone.device),
        "torch_threads": torch.get_num_threads(),
        "ensure_seconds": round(pipeline_s, 3),
        "ensure_images_per_s": round(pipeline_ips, 2),
        "bare_embed_seconds": round(bare_s, 3),
        "bare_embed_images_per_s": round(bare_ips, 2),
        "ratio": round(pipeline_ips / bare_ips, 3),
        "repeats": args.repeat,
        "ensure_seconds_all": [round(x, 3) for x in pipeline_runs],
        "bare_embed_seconds_all": [round(x, 3) for x in bare_runs],
        "loadavg_1m": round(os.getloadavg()[0], 2),  # context: other work on the machine skews timings
    }
    # The default run (64 px) is embed_efficiency.json; other input sizes get their own file.
    publish("embed_efficiency" if args.size == 64 else f"embed_efficiency_{args.size}", result)


if __name__ == "__main__":
    main()
