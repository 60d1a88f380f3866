"""How fast is ingest? (a benchmark, not a test)

Two measurements in fresh XRAY_HOMEs (a temp folder), on the CPU:
  (1) first ingest of N distinct SIZE x SIZE 8-bit PNG X-rays: images/s, every step included (stat,
      read, sha256, decode and validate, perceptual hash, fsynced copy into the store, catalogue rows,
      split assignment), once per XRAY_INGEST_WORKERS value in --workers (default 1,2), each into a
      home of its own, so the speed-up of worker processes is measured side by side in one run. The
      load average before and after is reported: on a shared machine other people's work takes cores;
  (2) re-scan of RESCAN_N unchanged files: the nightly case where almost nothing is new. The files are
      small (64 x 64) because only stat() and the catalogue lookup should run; they are ingested once
      first (reported, not the headline), then the second ingest of the same folder is timed: every
      file must come back as skipped_unchanged.
Also times ``catalogue_summary`` (what ``xray status`` shows, near-duplicate search included) on the
resulting catalogue of N + RESCAN_N images.

Images: a few patients' anatomies from ``xray_core.data.synthetic.make_xray`` (0.2 s each at 1024 px), each
image that anatomy plus its own detector noise, so every file has distinct bytes (generation is not
timed and runs on all cores).

Prints one JSON line and writes bench/results/ingest.json.

    python bench/ingest.py [--n 1000] [--size 1024] [--rescan-n 10000] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from publish import publish  # bench/ is on sys.path when a benchmark runs as a script

from db import dispose_engines
from xray_core.data.catalogue import catalogue_summary
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray
from xray_core.settings import load_settings

LABELS = ("normal", "pneumonia")
N_ANATOMIES = 16  # distinct make_xray bases per (label, size); every image adds its own noise


@functools.lru_cache(maxsize=2 * N_ANATOMIES)
def _base(label: str, size: int, anatomy: int) -> np.ndarray:
    rng = np.random.default_rng([7, anatomy])
    return make_xray(label, size=size, rng=rng, patient_seed=anatomy).astype(np.int16)


def _write_one(args: tuple[Path, int, int, int]) -> None:
    """Image ``i``: patient i % N_ANATOMIES's anatomy + fresh noise (sigma 2 grey levels)."""
    folder, i, size, seed = args
    label = LABELS[i % len(LABELS)]
    anatomy = (i // len(LABELS)) % N_ANATOMIES
    noise = np.random.default_rng([seed, i]).normal(0.0, 2.0, size=(size, size))
    pixels = np.clip(_base(label, size, anatomy) + np.rint(noise), 0, 255).astype(np.uint8)
    # File names carry the patient id the default XRAY_PATIENT_REGEX extracts (person{N}).
    path = folder / label / f"person{seed * 100_000 + anatomy * 2 + i % 2}_{i:06d}.png"
    Image.fromarray(pixels, mode="L").save(path, format="PNG")


def write_images(folder: Path, n: int, size: int, seed: int) -> None:
    for label in LABELS:
        (folder / label).mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i, size, seed) for i in range(n)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(_write_one, jobs, chunksize=max(1, n // (8 * (os.cpu_count() or 1)))):
            pass


def _log(message: str) -> None:
    sys.stderr.write(f"[bench ingest] {message}\n")
    sys.stderr.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="images for the first ingest (default 1000)")
    parser.add_argument("--size", type=int, default=1024, help="their side in pixels (default 1024)")
    parser.add_argument("--rescan-n", type=int, default=10_000,
                        help="unchanged files to re-scan (default 10000)")
    parser.add_argument("--rescan-size", type=int, default=64, help="their side in pixels (default 64)")
    parser.add_argument("--workers", default="1,2",
                        help="XRAY_INGEST_WORKERS values for the first ingest, compared (default 1,2)")
    parser.add_argument("--workdir",
                        help="folder for sources and XRAY_HOME (default: a temp folder, removed)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.workdir) as tmp:
        tmp_path = Path(tmp)
        workers = [int(w) for w in args.workers.split(",")]

        def settings_for(w: int, **extra: str):  # -> Settings
            return load_settings({"XRAY_HOME": str(tmp_path / f"home-{w}"), "XRAY_PATIENT_SALT": "bench",
                                  "XRAY_MIN_IMAGE_SIDE": str(min(64, args.rescan_size, args.size)),
                                  "XRAY_INGEST_WORKERS": str(w), **extra})

        _log(f"writing {args.n} {args.size}x{args.size} PNGs ...")
        t0 = time.perf_counter()
        write_images(tmp_path / "big", args.n, args.size, seed=1)
        big_bytes = sum(p.stat().st_size for p in (tmp_path / "big").rglob("*.png"))
        _log(f"  written in {time.perf_counter() - t0:.1f} s ({big_bytes / 2**20:.0f} MiB)")
        load_before = os.getloadavg()
        per_workers: dict[str, float] = {}
        for w in workers:
            settings = settings_for(w)
            _log(f"  ingesting with XRAY_INGEST_WORKERS={w} ...")
            t0 = time.perf_counter()
            first = ingest_source(tmp_path / "big", settings=settings)
            first_s = time.perf_counter() - t0
            if first.added != args.n:
                raise SystemExit(f"first ingest added {first.added} of {args.n} images: {first.as_dict()}")
            per_workers[str(w)] = round(args.n / first_s, 2)
            _log(f"  {first_s:.1f} s = {args.n / first_s:.1f} images/s")
        load_after = os.getloadavg()

        # The small re-scan films share 16 anatomies, so many are near copies of another patient's
        # film (quarantined, not re-scanned as added): the check is off for this part.
        settings = settings_for(workers[-1], XRAY_NEAR_COPY_DISTANCE="-1")
        _log(f"writing {args.rescan_n} {args.rescan_size}x{args.rescan_size} PNGs ...")
        write_images(tmp_path / "many", args.rescan_n, args.rescan_size, seed=2)
        _log("  first ingest of them (setup, timed separately) ...")
        t0 = time.perf_counter()
        setup = ingest_source(tmp_path / "many", settings=settings)
        setup_s = time.perf_counter() - t0
        if setup.added != args.rescan_n:
            raise SystemExit(f"setup ingest added {setup.added} of {args.rescan_n}: {setup.as_dict()}")
        _log(f"  {setup_s:.1f} s; re-scanning ...")
        t0 = time.perf_counter()
        rescan = ingest_source(tmp_path / "many", settings=settings)
        rescan_s = time.perf_counter() - t0
        if rescan.skipped_unchanged != args.rescan_n or rescan.added or rescan.duplicates or rescan.rejected:
            raise SystemExit(f"re-scan did not skip every unchanged file: {rescan.as_dict()}")
        _log(f"  {rescan_s:.2f} s")

        t0 = time.perf_counter()
        summary = catalogue_summary(settings)
        status_s = time.perf_counter() - t0
        dispose_engines()

    base = per_workers.get("1")
    result = {
        "name": "ingest",
        "first_ingest_images_per_s": round(args.n / first_s, 2),
        "images_per_s_by_workers": per_workers,
        "speedup_vs_1_worker": {w: round(v / base, 2) for w, v in per_workers.items()} if base else None,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "first_ingest_n": args.n,
        "image_size": args.size,
        "rescan_files": args.rescan_n,
        "rescan_seconds": round(rescan_s, 3),
        "rescan_files_per_s": round(args.rescan_n / rescan_s, 1),
        "first_ingest_seconds": round(first_s, 2),
        "first_ingest_mib_per_s": round(big_bytes / 2**20 / first_s, 2),
        "rescan_setup_ingest_seconds": round(setup_s, 2),
        "rescan_setup_images_per_s": round(args.rescan_n / setup_s, 1),
        "rescan_image_size": args.rescan_size,
        "status_seconds": round(status_s, 3),
        "status_images": summary["images"],
        "cpu_count": os.cpu_count(),
    }
    publish("ingest", result)


if __name__ == "__main__":
    main()
