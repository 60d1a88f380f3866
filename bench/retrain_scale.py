"""A whole retrain at hospital scale: N synthetic films through every step, timed and measured per step.

    python bench/retrain_scale.py --n 100000     # also --n 20000 and --n 2000 for quick runs

1. **Feature distribution** (once per workdir): the real films of /work/shared/data/cxr-sample and
   cxr-adult-covid are embedded at 64 px by the random-init backbone (views 0..4, as a run caches them),
   and per (label, site) group a mean, a low-rank covariance (the group's top principal components) and
   an isotropic residual are fitted to the eval view; the augmented views are the eval view plus a
   per-dimension residual fitted on the real (view k - view 0) differences.
2. **Catalogue**: N films of N/2 patients, two films each, every patient drawn into one real
   (label, site) group with the real groups' proportions; width, height and view vary by site as real
   collections do. Rows go straight into a fresh catalogue (as ``bench/catalogue_scale.py`` does) and
   ``assign_splits`` splits the patients. Features are drawn from the fitted distribution and filed in
   the feature cache with ``FeatureCache.put`` (the cache's own format), so the backbone never runs N times.
3. **Stored files**: no step reads a film's pixels when its features are cached, except the report's
   Grad-CAM heatmaps (4 films) and the audit's ``file_bytes`` (a stat). Every catalogue row points at one
   of 8 real films, downscaled to 64 px PNGs under ``store/bench/``; their bytes do not hash to the
   rows' synthetic sha256, which nothing checks while features are cached.
4. **Cold run**: ``run_retrain`` with a :class:`~xray_core.pipeline.timing.TimedExecutor`, no champion.
   **Warm run**: +10% films (new patients), then the drift check of the arrivals (the ``drift`` step, run
   here beside the retrain because the arrivals were inserted, not ingested) and a second retrain with
   the first model as champion (promoted by hand when the policy did not promote it).

On a shared machine run it with ``OMP_NUM_THREADS=1``: under a load average of 5 on 2 cores, one MLP
training step (batch 32, 2208 -> 512 -> 3) cost 88 ms of CPU with two torch threads spinning against other
work and 9.6 ms with one. The result records ``torch_threads``.

Per step: wall, CPU seconds and peak RSS (the step's own: ``TimedExecutor``); ``outside_steps`` is the
run's wall time not inside a step (lock, catalogue notes, test-set reuse count). Prints one JSON line and
writes ``bench/results/retrain_scale_<n>.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from publish import RESULTS, publish  # bench/ is on sys.path when a benchmark runs as a script
from sqlalchemy import text

from db import dispose_engines, session_scope
from xray_core.settings import load_settings

DATA = Path("/work/shared/data")
SETS = ("cxr-sample", "cxr-adult-covid")
RANK = 8  # principal components per (label, site) group
# Share of films whose features are drawn from the other label of their site: the fitted groups are far
# apart (the real sample's AUROC is ~0.97; without this the synthetic one is 1.000), so some films look
# like their site's other label, as hard cases do.
CONFUSED = 0.08
STORED_FILES = 8
SITE_SHAPES = {"kermany": [(2048, 1648), (1800, 1400), (2200, 1900)],
               "ieee8023-collection": [(1024, 1024), (880, 720), (1200, 1000)]}
SITE_VIEWS = {"kermany": ["PA"], "ieee8023-collection": ["AP", "PA", "AP Supine"]}


def _log(message: str) -> None:
    sys.stderr.write(f"[bench retrain_scale {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _env(home: Path) -> dict[str, str]:
    return {"XRAY_HOME": str(home), "XRAY_PATIENT_SALT": "bench", "XRAY_BACKBONE_WEIGHTS": "random",
            "XRAY_INPUT_SIZE": "64"}


# --------------------------------------------------------------------------- the fitted distribution


def _real_films() -> list[tuple[Path, str, str]]:
    """(file, label, site) of every real film; cxr-sample has no site column: its collection is Kermany."""
    films = []
    for name in SETS:
        with open(DATA / name / "manifest.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                films.append((DATA / name / row["file"], row["label"], row.get("site") or "kermany"))
    return films


def fit_distribution(workdir: Path) -> dict[str, Any]:
    """Per (label, site): mean, low-rank basis and scales, residual std of the eval view; per dimension:
    the std of (augmented view - eval view). Cached in ``workdir/fit.npz``."""
    cached = workdir / "fit.npz"
    if cached.is_file():
        z = np.load(cached, allow_pickle=False)
        return {k: z[k] for k in z.files}
    from xray_core.io.fsutil import sha256_bytes
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import EmbedItem, FeatureCache

    settings = load_settings(_env(workdir / "fit-home"))
    films = _real_films()
    items = [EmbedItem(sha256=sha256_bytes(p.read_bytes()), path=p) for p, _, _ in films]
    cache = FeatureCache(load_backbone(settings), settings)
    views = [0, *range(1, settings.views + 1)]
    t0 = time.perf_counter()
    cache.ensure(items, views)
    _log(f"embedded {len(items)} real films x {len(views)} views at 64 px in "
         f"{time.perf_counter() - t0:.0f} s")
    x = cache.load_views([i.sha256 for i in items], views).astype(np.float64)
    keys = [f"{label}|{site}" for _, label, site in films]
    groups = sorted(set(keys))
    dim = x.shape[-1]
    means, bases, scales, noise, counts = [], [], [], [], []
    for g in groups:
        xg = x[[k == g for k in keys], 0]
        mean = xg.mean(axis=0)
        centred = xg - mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        r = min(RANK, max(0, len(xg) - 1))
        basis, scale = np.zeros((RANK, dim)), np.zeros(RANK)
        basis[:r], scale[:r] = vt[:r], s[:r] / np.sqrt(max(1, len(xg) - 1))
        resid = centred - centred @ vt[:r].T @ vt[:r]
        means.append(mean), bases.append(basis), scales.append(scale), counts.append(len(xg))
        noise.append(np.sqrt((resid ** 2).sum() / max(1, (len(xg) - 1) * dim)))
    out = {"groups": np.array(groups), "counts": np.array(counts), "mean": np.array(means),
           "basis": np.array(bases), "scale": np.array(scales), "noise": np.array(noise),
           "view_std": (x[:, 1:] - x[:, :1]).reshape(-1, dim).std(axis=0)}
    np.savez(cached, **out)
    return out


def draw_features(fit: dict[str, Any], group: np.ndarray, views: int, rng: np.random.Generator) -> np.ndarray:
    """(n, views, D) float16 features for films of the given group indices."""
    n, dim = len(group), fit["mean"].shape[1]
    z = rng.standard_normal((n, RANK)) * fit["scale"][group]
    x0 = fit["mean"][group] + np.einsum("nr,nrd->nd", z, fit["basis"][group])
    x0 += rng.standard_normal((n, dim)) * fit["noise"][group][:, None]
    out = np.repeat(x0[:, None, :], views, axis=1)
    out[:, 1:] += rng.standard_normal((n, views - 1, dim)) * fit["view_std"]
    return out.astype(np.float16)


# --------------------------------------------------------------------------- the synthetic catalogue


def _stored_files(home: Path) -> list[str]:
    """STORED_FILES real films as 64 px PNGs in the store; the keys every row points at, round robin."""
    from PIL import Image as PILImage

    folder = home / "store" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    films = _real_films()
    for k, (path, _, _) in enumerate(films[:: max(1, len(films) // STORED_FILES)][:STORED_FILES]):
        with PILImage.open(path) as im:
            buf = io.BytesIO()
            im.convert("L").resize((64, 64)).save(buf, format="PNG")
        (folder / f"{k}.png").write_bytes(buf.getvalue())
        keys.append(f"store/bench/{k}.png")
    return keys


def _bulk(engine: Any, table: str, columns: list[str], rows: Any) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("BEGIN")
        marks = ", ".join("?" * len(columns))
        cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
        cur.execute("COMMIT")
        raw.commit()
    finally:
        raw.close()


COLUMNS = ["id", "sha256", "stored_path", "label", "patient_id", "view", "width", "height", "bit_depth",
           "format", "phash", "original_name", "source_id", "added_at", "site", "sex", "age_years"]


def add_films(settings: Any, fit: dict[str, Any], *, first_id: int, n: int, patient_prefix: str,
              rng: np.random.Generator, stored: list[str]) -> None:
    """n films of n/2 new patients into the catalogue, their splits assigned and features cached."""
    from xray_core.data.catalogue import open_catalogue
    from xray_core.data.split import assign_splits
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache

    # added now: the warm run's drift check takes the films added since the champion was made
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    engine = open_catalogue(settings)
    groups = [str(g).split("|") for g in fit["groups"]]
    n_pat = max(1, n // 2)
    p_group = rng.choice(len(groups), size=n_pat, p=fit["counts"] / fit["counts"].sum())
    patient = np.arange(n) % n_pat
    group = p_group[patient]
    site_of = [site for _, site in groups]
    partner = np.array([next((j for j in range(len(groups)) if j != i and site_of[j] == site_of[i]), i)
                        for i in range(len(groups))])
    look = np.where(rng.random(n) < CONFUSED, partner[group], group)  # the group a film's features mimic
    with engine.begin() as conn:
        conn.execute(text("INSERT OR IGNORE INTO sources (id, kind, path, status, started_at, counts) "
                          "VALUES (1, 'folder', '/synthetic', 'done', '2026-01-01 00:00:00', '{}')"))
    _bulk(engine, "patients", ["patient_id", "id_source"],
          ((f"{patient_prefix}{i}", "filename") for i in range(n_pat)))
    phash = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    shape_pick, view_pick = rng.integers(0, 3, size=n), rng.integers(0, 3, size=n)
    sex, age = rng.choice(["M", "F"], size=n), rng.integers(18, 95, size=n)

    def row(i: int) -> tuple:
        label, site = groups[group[i]]
        w, h = SITE_SHAPES[site][shape_pick[i]]
        views = SITE_VIEWS[site]
        return (first_id + i, f"{first_id + i:064x}", stored[i % len(stored)], label,
                f"{patient_prefix}{patient[i]}", views[view_pick[i] % len(views)], w, h, 8, "png",
                int(phash[i]), f"f{first_id + i}.png", 1, stamp, site, str(sex[i]), float(age[i]))

    _bulk(engine, "images", COLUMNS, (row(i) for i in range(n)))
    with session_scope(engine) as s:
        assign_splits(s, ratios=settings.split_ratios, seed=settings.split_seed)
    cache = FeatureCache(load_backbone(settings), settings)
    views = settings.views + 1
    chunk = 2000
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        feats = draw_features(fit, look[start:stop], views, rng)
        for i in range(start, stop):
            cache.put(f"{first_id + i:064x}", {v: feats[i - start, v] for v in range(views)})


# --------------------------------------------------------------------------- the timed runs


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timed_retrain(settings: Any, label: str, *, extra: list[Any] | None = None) -> dict[str, Any]:
    from xray_core.pipeline.cycle import run_retrain
    from xray_core.pipeline.recipe import RetrainRequest
    from xray_core.pipeline.timing import TimedExecutor

    run = TimedExecutor()
    t0 = time.perf_counter()
    for fn in extra or []:  # steps run beside the retrain (the drift check of inserted arrivals)
        run.step(fn)(settings, None)
    t1 = time.perf_counter()
    result = run_retrain(settings, RetrainRequest(trigger="test", force=True), run)
    total = time.perf_counter() - t1
    inside = sum(r.seconds for r in run.records if r.step != "drift")
    out = {"state": result.state, "decision": result.decision.decision if result.decision else None,
           "version": result.version, "split": result.split_counts,
           "seconds": round(total + (t1 - t0), 2), "retrain_seconds": round(total, 2),
           "outside_steps_seconds": round(total - inside, 2),
           "steps": [r.as_dict() for r in run.records], "process_peak_rss_mb": _peak_mb(),
           "macro_auroc": (result.challenger_eval.metrics.get("macro_auroc")
                           if result.challenger_eval else None)}
    for r in run.records:
        _log(f"  {label} {r.step}: {r.seconds:.1f} s wall, {r.cpu_seconds:.1f} s CPU, "
             f"{r.peak_rss_mb:.0f} MB peak")
    slowest = max(run.records, key=lambda r: r.seconds)
    _log(f"{label}: {result.state} in {out['seconds']} s; slowest step {slowest.step} {slowest.seconds} s; "
         f"peak step RSS {max(r.peak_rss_mb for r in run.records)} MB")
    return out


def _champion(settings: Any) -> int | None:
    from xray_core.pipeline.unchanged import current_champion

    return current_champion(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="films in the catalogue (default 100000)")
    parser.add_argument("--workdir", default="/tmp/bench-retrain-scale",
                        help="kept between runs: the fitted distribution (fit.npz); home-<n> is recreated")
    parser.add_argument("--keep", action="store_true", help="keep XRAY_HOME (home-<n>) afterwards")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import torch

    result: dict[str, Any] = {"name": "retrain_scale", "films": args.n, "cpu_count": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(),  # outside the train step (settings)
                              "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    fit = fit_distribution(workdir)
    result["fit"] = {"groups": {str(g): int(c) for g, c in zip(fit["groups"], fit["counts"])}, "rank": RANK,
                     "input_size": 64, "backbone": "random-init densenet161"}
    home = workdir / f"home-{args.n}"
    shutil.rmtree(home, ignore_errors=True)
    settings = load_settings(_env(home))
    rng = np.random.default_rng(0)
    result["settings"] = {k: settings.public_dict().get(k) for k in
                          ("views", "bootstrap_samples", "head_recipe", "epochs", "drift_permutations",
                           "recipe_folds", "memory_mb", "train_threads")}
    stored = _stored_files(home)
    t0 = time.perf_counter()
    add_films(settings, fit, first_id=1, n=args.n, patient_prefix="p", rng=rng, stored=stored)
    result["build_seconds"] = round(time.perf_counter() - t0, 1)
    _log(f"catalogue and features of {args.n} films in {result['build_seconds']} s")
    result["cold"] = timed_retrain(settings, "cold")
    if _champion(settings) is None and result["cold"]["version"]:
        from xray_core.registry.versions import promote_manually

        promote_manually(settings, result["cold"]["version"], reason="bench: a champion for the warm run")
        result["cold"]["promoted_by_hand"] = True
    # what the cold run measured, kept should the warm run not finish (a long run killed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"retrain_scale_{args.n}.partial.json").write_text(json.dumps(result, indent=2, default=str))
    arrivals = args.n // 10
    t0 = time.perf_counter()
    add_films(settings, fit, first_id=args.n + 1, n=arrivals, patient_prefix="q", rng=rng, stored=stored)
    result["arrivals"] = arrivals
    result["arrivals_build_seconds"] = round(time.perf_counter() - t0, 1)
    from xray_core.pipeline.recipe import check_arrivals

    result["warm"] = timed_retrain(settings, "warm", extra=[check_arrivals])
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    dispose_engines()
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    publish(f"retrain_scale_{args.n}", result)
    (RESULTS / f"retrain_scale_{args.n}.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
