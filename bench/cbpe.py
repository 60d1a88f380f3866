"""Performance before labels: is the CBPE estimate right? (a benchmark, not a test)

:func:`xray_core.monitor.performance.estimate` turns a batch's calibrated probabilities into expected
accuracy, sensitivity, specificity (at the model's threshold) and AUROC. Here the estimate is set
beside the realised value, computed from the labels it never saw.

In distribution: the real paediatric sample (``cxr-sample``, 120 films) is cross-fitted by patient
(``--folds`` stratified group folds, repeated ``--reps`` times with new folds): each fold's films are
predicted by a model fitted without them (train_step's head on the other folds: linear recipe,
temperature and Youden threshold on a patient-grouped validation quarter). Batches of ``--batch``
films are drawn without replacement from the 120 held-out predictions (each film with its own model's
threshold); ``--batches`` per repetition. Random-init densenet161 at 64 px, the project's cache.

Foreign films, where the assumption (no change in P(label | film)) is not expected to hold:

* ``adult_site``: all 42 films of ``cxr-adult-covid`` predicted by each fold's model (covid19 counts
  as the disease class, pneumonia; normal as normal);
* ``restyled_real``: each held-out paediatric film with the synthetic far site's contrast curve and
  border, predicted by its own fold's model, in batches of ``--batch``.

Reported per case: mean error (estimate - realised) with a 95% interval over batches, mean absolute
error, the share of batches within +-0.05, and the noise floor (mean standard deviation of a batch's
realised accuracy if the estimate's assumptions hold: no estimate can beat it batch by batch).

    python bench/cbpe.py [--reps 5] [--folds 5] [--batch 50] [--batches 40] [--home DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from drift import DEFAULT_DATA, features, fit_model, restyle
from publish import publish, read_manifest
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

ADULT = DEFAULT_DATA.parent / "cxr-adult-covid"
KEYS = ("accuracy", "sensitivity", "specificity", "auroc")
WITHIN = 0.05


def compare(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Estimate vs realised over batches: per metric the mean error and its spread, the MAE, and for
    accuracy the share within +-WITHIN and the noise floor."""
    out: dict[str, Any] = {"batches": len(pairs), "films_per_batch": int(np.mean([r["n"] for _, r in pairs]))}
    for key in KEYS:
        d = np.array([e[key] - r[key] for e, r in pairs if e.get(key) is not None and r.get(key) is not None])
        if not len(d):
            continue
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        est = [e[key] for e, _ in pairs if e.get(key) is not None]
        real = [r[key] for _, r in pairs if r.get(key) is not None]
        out[key] = {"estimated_mean": round(float(np.mean(est)), 4),
                    "realised_mean": round(float(np.mean(real)), 4),
                    "mean_error": round(float(d.mean()), 4),
                    "mean_error_95ci": [round(float(d.mean() - half), 4), round(float(d.mean() + half), 4)],
                    "mean_abs_error": round(float(np.abs(d).mean()), 4)}
    acc = np.array([e["accuracy"] - r["accuracy"] for e, r in pairs])
    out["accuracy"]["share_within_0.05"] = round(float(np.mean(np.abs(acc) <= WITHIN)), 4)
    out["accuracy"]["noise_floor_sd"] = round(float(np.mean([e["accuracy_sd"] for e, _ in pairs])), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="cross-fitting repetitions (default 5)")
    parser.add_argument("--folds", type=int, default=5, help="patient folds (default 5)")
    parser.add_argument("--batch", type=int, default=50, help="films per batch (default 50)")
    parser.add_argument("--batches", type=int, default=40, help="batches per repetition (default 40)")
    parser.add_argument("--home", default=None, help="keep the feature cache in this XRAY_HOME")
    args = parser.parse_args()

    from xray_core.model.train import predict_proba
    from xray_core.monitor.performance import estimate, realised
    from xray_core.settings import load_settings

    rows, labels, y, groups = read_manifest(DEFAULT_DATA)
    adult_rows, adult_labels, _, _ = read_manifest(ADULT)
    disease = labels.index("pneumonia")
    adult_y = np.array([disease if r["label"] != "normal" else labels.index("normal") for r in adult_rows])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xray-cbpe-") as tmp:
        home = Path(args.home or tmp)
        settings = load_settings({"XRAY_HOME": str(home), "XRAY_BACKBONE_WEIGHTS": "random",
                                  "XRAY_DEVICE": "cpu", "XRAY_INPUT_SIZE": "64", "XRAY_VIEWS": "2",
                                  "XRAY_PATIENT_SALT": "bench"})
        x_eval, x_views = features(settings, [DEFAULT_DATA / r["file"] for r in rows], [1, 2])
        adult_x = features(settings, [ADULT / r["file"] for r in adult_rows], [])[0]
        (home / "restyled").mkdir(parents=True, exist_ok=True)
        restyled_x = features(settings, [restyle(DEFAULT_DATA / r["file"], home / "restyled" / f"{i}.png", 96)
                                         for i, r in enumerate(rows)], [])[0]
    embed_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    cases: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {"in_distribution": [], "adult_site": [],
                                                                     "restyled_real": []}
    for rep in range(args.reps):
        probs, restyled_probs = np.zeros((len(y), len(labels))), np.zeros((len(y), len(labels)))
        thresholds = np.zeros(len(y))
        folds = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=rep)
        for fit, held in folds.split(x_eval, y, groups):
            tr_rel, va_rel = next(GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=rep)
                                  .split(x_eval[fit], y[fit], groups[fit]))
            head, threshold = fit_model(settings, x_views, x_eval, y, fit[tr_rel], fit[va_rel], len(labels))
            probs[held] = predict_proba(head, x_eval[held])
            restyled_probs[held] = predict_proba(head, restyled_x[held])
            thresholds[held] = threshold
            adult_p = predict_proba(head, adult_x)
            cases["adult_site"].append((estimate(adult_p, threshold=threshold, positive=disease),
                                        realised(adult_p, adult_y, threshold=threshold, positive=disease)))
        rng = np.random.default_rng([11, rep])
        for _ in range(args.batches):
            pick = rng.choice(len(y), args.batch, replace=False)
            for name, p in (("in_distribution", probs), ("restyled_real", restyled_probs)):
                cases[name].append((estimate(p[pick], threshold=thresholds[pick], positive=disease),
                                    realised(p[pick], y[pick], threshold=thresholds[pick], positive=disease)))
    fit_s = time.perf_counter() - t1

    result = {"benchmark": "cbpe", "reps": args.reps, "folds": args.folds, "batch": args.batch,
              "input_size": 64, "backbone": "densenet161 random-init", "positive": labels[disease],
              "adult_label_map": {"covid19": "pneumonia", "normal": "normal"},
              "within": WITHIN, **{name: compare(pairs) for name, pairs in cases.items()},
              "embed_seconds": round(embed_s, 1), "fit_seconds": round(fit_s, 1),
              "machine": platform.machine(), "python": platform.python_version()}
    publish("cbpe", result)


if __name__ == "__main__":
    main()
