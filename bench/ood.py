"""Which per-film OOD score tells real foreign films from held-out in-distribution ones? (a benchmark)

Features: the project's own embedding and feature cache, random-init densenet161 (nothing downloads),
view 0 only (the eval view; prediction scores it, and at 224 px on 2 cores every view costs minutes).
In-distribution: the paediatric films of ``cxr-sample`` held out by patient-grouped cross-fitting
(``--folds`` stratified group folds, ``--reps`` shuffles). Inside each fold's fitting part, as
``train_step`` does: a patient-grouped train / validation split (75 / 25), each score fitted on the
training films, calibrated on the validation films plus every training film scored by a scorer fitted
without its own patients' inner fold (5 folds); the held-out fold is never seen. Foreign: every film of
``cxr-adult-covid`` and a synthetic shifted site (:mod:`xray_core.data.synthetic_sites`, 96 px, gamma
2.2, black border), scored by every fold's model.

Scores: today's T²+Q (:class:`xray_core.monitor.ood.OodBasis`); kNN distance on L2-normalised
features (k in 1, 5, 10, 20); class-conditional Mahalanobis with a shared Ledoit-Wolf covariance;
the energy of the linear head's logits (C=0.1, no temperature); and the Bonferroni-corrected smaller
conformal p-value of T²+Q and kNN k=10 (the grid's middle, fixed before any number was seen).

Reported per score and foreign set: AUROC (held-out in-distribution vs foreign, raw scores, per fold,
averaged); TPR at 5% false flags (pooled conformal p-values, the largest p-level that flags at most 5%
of the held-out in-distribution films); and the deployed flag ``p <= --alpha``: its false-flag rate on
held-out in-distribution films and its detection rate on foreign ones. 95% intervals: percentile
bootstrap over films (both groups resampled, ``--boot`` times). Nothing is tuned to the two real sites
beyond choosing among the listed scores and k.

    python bench/ood.py [--size 64|224] [--reps 3] [--home DIR]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from publish import publish, read_manifest  # bench/ is on sys.path when a benchmark runs as a script

PROJECT = Path(__file__).resolve().parent.parent
SHARED = PROJECT.parent / "shared" / "data"
KS = (1, 5, 10, 20)
Scorer = Callable[[np.ndarray], np.ndarray]
Fitter = Callable[[np.ndarray, np.ndarray], Scorer]


def features(settings, files: list[Path]) -> np.ndarray:
    """View-0 features of ``files`` through the project's cache (embedded once per fingerprint)."""
    from xray_core.io.fsutil import sha256_file
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import EmbedItem, FeatureCache

    cache = FeatureCache(load_backbone(settings), settings)
    items = [EmbedItem(sha256=sha256_file(f), path=f.resolve()) for f in files]
    cache.ensure(items, [0])
    return cache.load([i.sha256 for i in items], 0).astype(np.float64)


def fitters() -> dict[str, Fitter]:
    from xray_core.model.recipes import candidate_recipes, fit_recipe
    from xray_core.model.train import HeadConfig, predict_logits
    from xray_core.monitor.ood import fit_basis
    from xray_core.monitor.reference import MAX_COMPONENTS
    from xray_core.monitor.scores import energy, fit_class_mahalanobis, fit_knn
    from xray_core.settings import load_settings

    config = HeadConfig.from_settings(load_settings({}))
    (linear,) = candidate_recipes(config, choice="linear", l2_grid=(0.1,))

    def energy_fit(x: np.ndarray, y: np.ndarray) -> Scorer:
        head, _ = fit_recipe(linear, x[:, None], y, x[:1], y[:1], int(y.max()) + 1)
        return lambda z: energy(predict_logits(head, z))

    out: dict[str, Fitter] = {"t2q": lambda x, y: fit_basis(x, max_components=MAX_COMPONENTS).scores}
    for k in KS:
        out[f"knn{k}"] = lambda x, y, k=k: fit_knn(x, k=k).scores
    out["mahalanobis"] = lambda x, y: fit_class_mahalanobis(x, y).scores
    out["energy"] = energy_fit
    return out


def calibrated(fit: Fitter, x, y, groups, tr, va, seed: int) -> tuple[Scorer, np.ndarray]:
    """The scorer fitted on ``tr`` and its calibration scores: ``va`` + ``tr`` cross-fitted by patient."""
    from sklearn.model_selection import GroupKFold

    scorer = fit(x[tr], y[tr])
    cross = np.empty(len(tr))
    for a, b in GroupKFold(n_splits=5, shuffle=True, random_state=seed).split(tr, groups=groups[tr]):
        cross[b] = fit(x[tr][a], y[tr][a])(x[tr][b])
    return scorer, np.concatenate([scorer(x[va]), cross])


def auroc_boot(blocks, w_in: np.ndarray, w_out: np.ndarray) -> np.ndarray:
    """Mean over blocks (held-out indices, in-dist scores, foreign scores) of the weighted AUROC."""
    total = np.zeros(len(w_in))
    for held, s_in, s_out in blocks:
        m = (s_out[None, :] > s_in[:, None]) + 0.5 * (s_out[None, :] == s_in[:, None])
        wi, wo = w_in[:, held], w_out
        total += np.einsum("bi,ij,bj->b", wi, m, wo) / (wi.sum(1) * wo.sum(1))
    return total / len(blocks)


def rates(p_in: np.ndarray, p_out: np.ndarray, w_in, w_out, alpha: float) -> dict[str, np.ndarray]:
    """Flag rates from pooled p-values (rows: films, columns: repeats), per bootstrap weight row."""
    levels = np.unique(np.concatenate([p_in.ravel(), p_out.ravel()]))
    c_in = (p_in[:, :, None] <= levels).sum(1)  # films x levels
    c_out = (p_out[:, :, None] <= levels).sum(1)
    fpr = (w_in @ c_in) / (w_in.sum(1, keepdims=True) * p_in.shape[1])
    tpr = (w_out @ c_out) / (w_out.sum(1, keepdims=True) * p_out.shape[1])
    ok = fpr <= 0.05 + 1e-12
    at = np.where(ok.any(1), levels.size - 1 - np.argmax(ok[:, ::-1], axis=1), -1)
    tpr5 = np.where(at >= 0, tpr[np.arange(len(at)), np.maximum(at, 0)], 0.0)
    flag_in = (w_in @ (p_in <= alpha).sum(1)) / (w_in.sum(1) * p_in.shape[1])
    flag_out = (w_out @ (p_out <= alpha).sum(1)) / (w_out.sum(1) * p_out.shape[1])
    return {"tpr_at_5pct_false_flags": tpr5, "flag_false_rate": flag_in, "flag_detection_rate": flag_out}


def summary(values: np.ndarray) -> list[float]:
    """[point (first row: unit weights), 2.5%, 97.5%] rounded."""
    return [round(float(values[0]), 3), round(float(np.percentile(values[1:], 2.5)), 3),
            round(float(np.percentile(values[1:], 97.5)), 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="backbone input size in pixels (default 64)")
    parser.add_argument("--reps", type=int, default=3, help="shuffles of the patient folds (default 3)")
    parser.add_argument("--folds", type=int, default=5, help="outer patient folds (default 5)")
    parser.add_argument("--alpha", type=float, default=0.05, help="the flag's level (default 0.05)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--site-films", type=int, default=50, help="synthetic site films (default 50)")
    parser.add_argument("--data", default=str(SHARED / "cxr-sample"), help="in-distribution folder")
    parser.add_argument("--foreign", default=str(SHARED / "cxr-adult-covid"), help="real foreign folder")
    parser.add_argument("--home", default=None, help="keep the feature cache in this XRAY_HOME")
    args = parser.parse_args()

    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
    from xray_core.monitor.scores import bonferroni_min, conformal_p
    from xray_core.settings import load_settings

    data, foreign = Path(args.data), Path(args.foreign)
    rows, labels, y, groups = read_manifest(data)
    groups = groups.astype(str)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xray-ood-") as tmp:
        home = args.home or tmp
        settings = load_settings({"XRAY_HOME": home, "XRAY_BACKBONE_WEIGHTS": "random", "XRAY_DEVICE": "cpu",
                                  "XRAY_INPUT_SIZE": str(args.size), "XRAY_PATIENT_SALT": "bench"})
        x = features(settings, [data / r["file"] for r in rows])
        f_rows = read_manifest(foreign)[0]
        site_dir = Path(home) / "ood-site"
        recs = write_site_dataset(site_dir, SiteStyle(name="far", size=96, gamma=2.2, border=6),
                                  patients_per_label=args.site_films // 2, seed=0, manifest=False)
        outside = {"adult": features(settings, [foreign / r["file"] for r in f_rows]),
                   "synthetic_site": features(settings, [r.path for r in recs])}
    embed_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    fits = fitters()
    names = [*fits, "t2q+knn10"]
    p_in = {n: np.zeros((len(x), args.reps)) for n in names}
    p_out = {n: {k: [] for k in outside} for n in names}
    blocks = {n: {k: [] for k in outside} for n in names}
    n_cal = []
    for rep in range(args.reps):
        outer = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=rep)
        for fold, (fit, held) in enumerate(outer.split(x, y, groups)):
            inner = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=100 * rep + fold)
            a, b = next(inner.split(fit, groups=groups[fit]))
            tr, va = fit[a], fit[b]
            ps: dict[str, dict[str, np.ndarray]] = {}
            for name, f in fits.items():
                scorer, cal = calibrated(f, x, y, groups, tr, va, seed=rep)
                s = {"in": scorer(x[held]), **{k: scorer(v) for k, v in outside.items()}}
                ps[name] = {k: conformal_p(cal, v) for k, v in s.items()}
                for k in outside:
                    blocks[name][k].append((held, s["in"], s[k]))
            n_cal.append(len(cal))
            ps["t2q+knn10"] = {k: bonferroni_min(ps["t2q"][k], ps["knn10"][k]) for k in ps["t2q"]}
            for k in outside:
                blocks["t2q+knn10"][k].append((held, -ps["t2q+knn10"]["in"], -ps["t2q+knn10"][k]))
            for name in names:
                p_in[name][held, rep] = ps[name]["in"]
                for k in outside:
                    p_out[name][k].append(ps[name][k])
            print(f"rep {rep} fold {fold}: {len(tr)} train, {len(va)} val, {len(held)} held out",
                  file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)

    def weights(n: int) -> np.ndarray:  # row 0: the point estimate; then bootstrap resamples of films
        return np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=args.boot)]).astype(float)

    w_in = weights(len(x))
    w_out = {k: weights(len(v)) for k, v in outside.items()}
    results: dict[str, dict] = {}
    for name in names:
        results[name] = {}
        for k in outside:
            po = np.stack(p_out[name][k], axis=1)  # films x (reps * folds)
            r = rates(p_in[name], po, w_in, w_out[k], args.alpha)
            results[name][k] = {"auroc": summary(auroc_boot(blocks[name][k], w_in, w_out[k])),
                                **{m: summary(v) for m, v in r.items()}}
    check_s = time.perf_counter() - t1
    combined = {n: np.mean([results[n][k]["auroc"][0] for k in outside]) for n in names}
    publish(f"ood_{args.size}", {
        "name": f"ood_{args.size}", "command": f"python bench/ood.py --size {args.size} --reps {args.reps}",
        "in_distribution": f"{data.name}: {len(x)} films, {len(set(groups))} patients, held out by "
                           f"{args.folds} patient folds x {args.reps} shuffles",
        "foreign": {"adult": f"{foreign.name}: {len(outside['adult'])} films",
                    "synthetic_site": f"{len(outside['synthetic_site'])} films, 96 px, gamma 2.2, border 6"},
        "calibration_films_per_fold": [int(min(n_cal)), int(max(n_cal))], "alpha": args.alpha,
        "intervals": f"95% percentile bootstrap over films ({args.boot} resamples)",
        "combination": "t2q+knn10: min(1, 2 min(p_t2q, p_knn10)) (Bonferroni-corrected)",
        "best_by_mean_auroc": max(combined, key=lambda n: combined[n]),
        "scores": results, "input_size": args.size, "backbone": "densenet161 random-init, view 0",
        "tuning": "none beyond choosing among the listed scores and k",
        "embed_s": round(embed_s, 1), "score_s": round(check_s, 1), "python": platform.python_version()})


if __name__ == "__main__":
    main()
