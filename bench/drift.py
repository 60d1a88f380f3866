"""Do the monitor's warnings fire when they should, and stay quiet when they should? (a benchmark, not a test)

In-distribution source: the real sample (``../shared/data/cxr-sample``, 120 films of 2 labels) through a
random-init densenet161 at 64 px (the only backbone offline), features from the project's own cache.
Each of ``--reps`` repetitions draws a fresh patient-grouped split of the real sample (60% train,
20% validation, 20% held out), fits a head as ``train_step`` does (linear recipe, temperature on
validation, Youden threshold) and builds the model's reference exactly as ``train_step`` does
(:func:`xray_core.monitor.reference.build_reference`: OOD threshold calibrated on the validation films
and the training films' eval view, cross-fitted by patient fold). Then, per repetition:

* **same distribution**: the held-out real films (every film its own patient, as in ``predict``) are
  checked by :func:`xray_core.monitor.drift.check_batch`. The real sample is too small for 50-film
  held-out batches; the batch is what is held out (about 24 films). A warning is a false alarm.
* **shifted site**: 50 films of a synthetic site (:mod:`xray_core.data.synthetic_sites`: another size,
  contrast and a black border), checked the same way. A warning is a detection.
* **restyled real films**: the held-out real films with the same site's contrast curve and border
  applied: the same anatomy, only the acquisition changed (a harder case than synthetic films).

OOD flag rates are pooled over repetitions: in-distribution = held-out real films; OOD = the shifted
site's films and the restyled ones. Only measured numbers are reported.

    python bench/drift.py [--reps 20] [--size 64] [--batch 50] [--data DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from publish import publish, read_manifest  # bench/ is on sys.path when a benchmark runs as a script
from sklearn.model_selection import GroupShuffleSplit

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = PROJECT.parent / "shared" / "data" / "cxr-sample"
GAMMA, BORDER = 2.2, 6  # the shifted site's contrast curve and border (pixels at its 96 px size)


def features(settings, files: list[Path], views: list[int]) -> list[np.ndarray]:
    from xray_core.io.fsutil import sha256_file
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import EmbedItem, FeatureCache

    cache = FeatureCache(load_backbone(settings), settings)
    items = [EmbedItem(sha256=sha256_file(f), path=f.resolve()) for f in files]
    cache.ensure(items, sorted({0, *views}))
    shas = [i.sha256 for i in items]
    return [cache.load(shas, 0), cache.load_views(shas, views) if views else None]


def restyle(src: Path, dst: Path, size: int) -> Path:
    """A real film as the shifted site would acquire it: resized, contrast curve, black border."""
    with Image.open(src) as im:
        img = np.asarray(im.convert("L").resize((size, size)), dtype=np.float64) / 255.0
    img = img**GAMMA
    img[:BORDER, :], img[-BORDER:, :], img[:, :BORDER], img[:, -BORDER:] = 0.0, 0.0, 0.0, 0.0
    Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(dst)
    return dst


ADULT = DEFAULT_DATA.parent / "cxr-adult-covid"


def bench_settings(home: Path) -> Any:
    """The settings the monitoring benches embed real films with: random-init backbone, 64 px, 2 views."""
    from xray_core.settings import load_settings

    return load_settings({"XRAY_HOME": str(home), "XRAY_BACKBONE_WEIGHTS": "random", "XRAY_DEVICE": "cpu",
                          "XRAY_INPUT_SIZE": "64", "XRAY_VIEWS": "2", "XRAY_PATIENT_SALT": "bench"})


def real_sets(settings: Any, home: Path, rows: list[dict[str, str]],
              adult_rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(paediatric eval view, paediatric views 1-2, adult eval view, restyled paediatric eval view):
    the real feature sets bench/cbpe.py and bench/drift_power.py share."""
    x_eval, x_views = features(settings, [DEFAULT_DATA / r["file"] for r in rows], [1, 2])
    adult_x = features(settings, [ADULT / r["file"] for r in adult_rows], [])[0]
    (home / "restyled").mkdir(parents=True, exist_ok=True)
    restyled_x = features(settings, [restyle(DEFAULT_DATA / r["file"], home / "restyled" / f"{i}.png", 96)
                                     for i, r in enumerate(rows)], [])[0]
    return x_eval, x_views, adult_x, restyled_x


def fit_model(settings, x_views, x_eval, y, tr, va, n_classes):
    """train_step's head on one split: linear recipe, temperature on validation, Youden threshold."""
    from xray_core.evaluate.metrics import choose_threshold
    from xray_core.model.calibrate import fit_temperature
    from xray_core.model.recipes import candidate_recipes, fit_recipe
    from xray_core.model.train import HeadConfig, predict_logits, predict_proba

    (recipe,) = candidate_recipes(HeadConfig.from_settings(settings), choice="linear", l2_grid=(0.1,))
    train_x = np.concatenate([x_eval[tr][:, None], x_views[tr]], axis=1)  # column 0: the eval view
    head, _ = fit_recipe(recipe, train_x, y[tr], x_eval[va], y[va], n_classes)
    head.set_temperature(fit_temperature(predict_logits(head, x_eval[va]), y[va]))
    return head, choose_threshold(y[va] == 1, predict_proba(head, x_eval[va])[:, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="repetitions (splits, batches) (default 20)")
    parser.add_argument("--size", type=int, default=64, help="backbone input size in pixels (default 64)")
    parser.add_argument("--views", type=int, default=2, help="K augmented training views (default 2)")
    parser.add_argument("--batch", type=int, default=50, help="films per shifted-site batch (default 50)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with manifest.csv")
    parser.add_argument("--home", default=None,
                        help="keep the feature cache in this XRAY_HOME (default: a temp dir)")
    args = parser.parse_args()

    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
    from xray_core.model.train import predict_proba
    from xray_core.monitor.drift import check_batch
    from xray_core.monitor.reference import build_reference
    from xray_core.settings import load_settings

    data = Path(args.data)
    rows, labels, y, groups = read_manifest(data)
    views = list(range(1, args.views + 1))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xray-drift-") as tmp:
        tmp = args.home or tmp
        settings = load_settings({"XRAY_HOME": tmp, "XRAY_BACKBONE_WEIGHTS": "random", "XRAY_DEVICE": "cpu",
                                  "XRAY_INPUT_SIZE": str(args.size), "XRAY_VIEWS": str(args.views),
                                  "XRAY_PATIENT_SALT": "bench"})
        x_eval, x_views = features(settings, [data / r["file"] for r in rows], views)
        style = SiteStyle(name="far", size=96, gamma=GAMMA, border=BORDER)
        site_x = []
        for rep in range(args.reps):
            folder = Path(tmp) / f"site-{rep}"
            folder.mkdir(parents=True, exist_ok=True)
            recs = write_site_dataset(folder, style, patients_per_label=args.batch // 2,
                                      seed=rep, manifest=False)
            site_x.append(features(settings, [r.path for r in recs], [])[0])
        restyled_dir = Path(tmp) / "restyled"
        restyled_dir.mkdir(parents=True, exist_ok=True)
        restyled_x = features(settings, [restyle(data / r["file"], restyled_dir / f"{i}.png", 96)
                                         for i, r in enumerate(rows)], [])[0]
        embed_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        same, site, restyled = [], [], []
        ood_in, ood_site, ood_restyled = [], [], []
        calibrated = []  # films the OOD threshold was calibrated on, per repetition
        common = dict(labels=labels, positive=1, alpha=settings.drift_alpha,
                      permutations=settings.drift_permutations)
        for rep in range(args.reps):
            outer = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=rep)
            fit, held = next(outer.split(x_eval, y, groups))
            inner = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=rep)
            tr_rel, va_rel = next(inner.split(x_eval[fit], y[fit], groups[fit]))
            tr, va = fit[tr_rel], fit[va_rel]
            head, threshold = fit_model(settings, x_views, x_eval, y, tr, va, len(labels))
            ref = build_reference(x_views[tr], x_eval[va], groups[va].astype(str),
                                  predict_proba(head, x_eval[va]), y[va], mean=head.feature_mean.numpy(),
                                  std=head.feature_std.numpy(), quantile=settings.ood_quantile, seed=rep,
                                  train_eval=x_eval[tr], train_groups=groups[tr].astype(str))
            calibrated.append(ref.calibration["n"])
            for xs, out, flags in ((x_eval[held], same, ood_in), (site_x[rep], site, ood_site),
                                   (restyled_x[held], restyled, ood_restyled)):
                check = check_batch(ref, xs, predict_proba(head, xs), threshold=threshold, seed=rep, **common)
                out.append(check)
                flags.append((check["ood_flagged"], check["n"]))
        check_s = time.perf_counter() - t1

    def rate(checks, key="drift"):
        return round(float(np.mean([bool(c[key]) for c in checks])), 4)

    def flag_rate(pairs):
        return round(sum(k for k, _ in pairs) / max(sum(n for _, n in pairs), 1), 4)

    result = {
        "benchmark": "drift", "reps": args.reps, "input_size": args.size, "views": args.views,
        "backbone": "densenet161 random-init", "alpha": settings.drift_alpha,
        "permutations": settings.drift_permutations, "ood_quantile": settings.ood_quantile,
        "in_distribution_batch_films": int(np.mean([c["n"] for c in same])),
        "shifted_batch_films": int(np.mean([c["n"] for c in site])),
        "shifted_site": {"size": 96, "gamma": GAMMA, "border": BORDER},
        "false_alarm_rate": rate(same),
        "false_alarm_by_test": {k: rate(same, k) for k in ("input_shift", "output_shift", "ood_excess")},
        "detection_rate_synthetic_site": rate(site),
        "detection_by_test_synthetic_site": {k: rate(site, k)
                                             for k in ("input_shift", "output_shift", "ood_excess")},
        "detection_rate_restyled_real": rate(restyled),
        "detection_by_test_restyled_real": {k: rate(restyled, k)
                                            for k in ("input_shift", "output_shift", "ood_excess")},
        "ood_calibration_films": int(np.mean(calibrated)),
        "ood_flag_rate_in_distribution": flag_rate(ood_in),
        "ood_flag_rate_synthetic_site": flag_rate(ood_site),
        "ood_flag_rate_restyled_real": flag_rate(ood_restyled),
        "embed_seconds": round(embed_s, 1), "check_seconds": round(check_s, 1),
        "machine": platform.machine(), "python": platform.python_version(),
    }
    publish("drift", result)


if __name__ == "__main__":
    main()
