"""Power of the batch drift test against batch size, and its false-alarm rate (a benchmark, not a test).

The model and reference are built as ``bench/drift.py`` builds them (same helpers): each repetition
draws a fresh patient-grouped split of the real paediatric sample (60% train, 20% validation, 20%
held out), fits train_step's head and builds the reference; random-init densenet161 at 64 px, features
from the project's cache (nothing downloads). Each batch is checked by
:func:`xray_core.monitor.drift.check_batch` (MMD, KS, OOD excess; Bonferroni, so the batch warns when
any p < alpha / 3) with alpha = ``--alpha`` (0.05; the project's default XRAY_DRIFT_ALPHA is 0.01 and
its power is reported too, from the same p-values).

Real films (``real``), sampled WITHOUT replacement, so n is capped at what the data hold (larger n are
not measured: duplicated films would make the permutation test's null wrong):

* ``adult_site``: ``cxr-adult-covid`` (42 adult films, 25 patients; patients permuted as wholes);
  n = 10, 20 and all 42;
* ``restyled_real``: the held-out paediatric films with the synthetic far site's contrast curve and
  black border (same anatomy, another acquisition); n = 10 and 20 (of ~24 held out);
* ``prevalence_real``: held-out paediatric films with the label mix changed (``--prevalence`` of them
  pneumonia; the reference is ~50%); only n = 10 fits the ~12 films of a label held out (and not in
  every repetition: ``reps`` says how many);
* ``no_shift_real``: held-out paediatric films as they are: a warning is a false alarm.

Synthetic films (``synthetic``) for the whole grid n = 10, 20, 50, 100, 200, which 120 real films
cannot give: a head and reference on a synthetic home site (:mod:`xray_core.data.synthetic_sites`,
120 training and 40 validation films per repetition), then batches of fresh home films (no shift; and
the label mix changed) and of the synthetic far site.

    python bench/drift_power.py [--reps 20] [--alpha 0.05] [--home DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from drift import BORDER, DEFAULT_DATA, GAMMA, features, fit_model, restyle
from publish import RESULTS, publish, read_manifest
from sklearn.model_selection import GroupShuffleSplit

ADULT = DEFAULT_DATA.parent / "cxr-adult-covid"
GRID = (10, 20, 50, 100, 200)
HOME_PER_LABEL = 360  # synthetic home films per label: 160 fit a model, the rest are batches
FAR_PER_LABEL = 110


def build(settings: Any, x_views: np.ndarray, x_eval: np.ndarray, y: np.ndarray, groups: np.ndarray,
          tr: np.ndarray, va: np.ndarray, n_classes: int, seed: int) -> tuple[Any, Any, float]:
    """train_step's head and the model's reference, as bench/drift.py builds them."""
    from xray_core.model.train import predict_proba
    from xray_core.monitor.reference import build_reference

    head, threshold = fit_model(settings, x_views, x_eval, y, tr, va, n_classes)
    ref = build_reference(x_views[tr], x_eval[va], groups[va].astype(str), predict_proba(head, x_eval[va]),
                          y[va], mean=head.feature_mean.numpy(), std=head.feature_std.numpy(),
                          quantile=settings.ood_quantile, seed=seed, train_eval=x_eval[tr],
                          train_groups=groups[tr].astype(str))
    return head, ref, threshold


def pvalues(check: dict[str, Any]) -> list[float]:
    return [check["mmd_p"], check["ks_p"], check["ood_p"]]


def pick_mix(y: np.ndarray, pool: np.ndarray, n: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """n films of ``pool`` with round(share * n) positives (label 1); empty when the pool is too small."""
    pos, neg = pool[y[pool] == 1], pool[y[pool] == 0]
    k = int(round(share * n))
    if k > len(pos) or n - k > len(neg):
        return np.zeros(0, dtype=int)
    return np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)])


def summarise(pvals: dict[tuple[str, int], list[list[float]]], alpha: float,
              project_alpha: float) -> dict[str, list[dict[str, Any]]]:
    """Per scenario, one row per n: the warning rate at alpha and at the project's alpha, per test."""
    from scipy.stats import binomtest

    out: dict[str, list[dict[str, Any]]] = {}
    for (scenario, n), reps in sorted(pvals.items()):
        p = np.asarray(reps)
        warns = (p < alpha / 3).any(axis=1)
        lo, hi = binomtest(int(warns.sum()), len(p)).proportion_ci(method="wilson")
        out.setdefault(scenario, []).append({
            "n": n, "reps": len(p), "rate": round(float(warns.mean()), 4),
            "rate_95ci": [round(float(lo), 4), round(float(hi), 4)],
            "rate_at_project_alpha": round(float((p < project_alpha / 3).any(axis=1).mean()), 4),
            "by_test": {k: round(float((p[:, i] < alpha / 3).mean()), 4)
                        for i, k in enumerate(("input_shift", "output_shift", "ood_excess"))}})
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, panel in zip(axes, ("real", "synthetic")):
        for i, (scenario, rows) in enumerate(result[panel].items()):
            ns, rates = [r["n"] for r in rows], [r["rate"] for r in rows]
            err = np.array([[r["rate"] - r["rate_95ci"][0], r["rate_95ci"][1] - r["rate"]] for r in rows]).T
            ax.errorbar(ns, rates, yerr=err, marker="o", capsize=3, color=f"C{i}", label=scenario)
        ax.axhline(0.8, color="0.6", ls=":", lw=1)
        ax.axhline(result["alpha"], color="0.6", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(GRID, [str(n) for n in GRID])
        ax.set_xlabel("films in the batch (n)")
        ax.set_title(f"{panel} films ({result['reps']} reps; dotted 0.8, dashed alpha)")
        ax.legend(fontsize=8, loc="center right")
    axes[0].set_ylabel(f"share of batches warned (alpha {result['alpha']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="repetitions per scenario and n (default 20)")
    parser.add_argument("--alpha", type=float, default=0.05, help="the batch test's alpha (default 0.05)")
    parser.add_argument("--prevalence", type=float, default=0.8,
                        help="share of pneumonia films in a prevalence-change batch (default 0.8)")
    parser.add_argument("--home", default=None, help="keep the feature cache in this XRAY_HOME")
    args = parser.parse_args()

    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
    from xray_core.model.train import predict_proba
    from xray_core.monitor.drift import check_batch
    from xray_core.settings import load_settings

    rows, labels, y, groups = read_manifest(DEFAULT_DATA)
    adult_rows, _, _, adult_groups = read_manifest(ADULT)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xray-power-") as tmp:
        home = Path(args.home or tmp)
        settings = load_settings({"XRAY_HOME": str(home), "XRAY_BACKBONE_WEIGHTS": "random",
                                  "XRAY_DEVICE": "cpu", "XRAY_INPUT_SIZE": "64", "XRAY_VIEWS": "2",
                                  "XRAY_PATIENT_SALT": "bench"})
        x_eval, x_views = features(settings, [DEFAULT_DATA / r["file"] for r in rows], [1, 2])
        adult_x = features(settings, [ADULT / r["file"] for r in adult_rows], [])[0]
        (home / "restyled").mkdir(parents=True, exist_ok=True)
        restyled_x = features(settings, [restyle(DEFAULT_DATA / r["file"], home / "restyled" / f"{i}.png", 96)
                                         for i, r in enumerate(rows)], [])[0]
        recs = write_site_dataset(home / "syn-home", SiteStyle(name="home", size=64),
                                  patients_per_label=HOME_PER_LABEL, seed=1, manifest=False)
        s_eval, s_views = features(settings, [r.path for r in recs], [1, 2])
        s_y = np.array([labels.index(r.label) for r in recs])
        s_groups = np.array([r.patient_id for r in recs])
        far = write_site_dataset(home / "syn-far", SiteStyle(name="far", size=96, gamma=GAMMA, border=BORDER),
                                 patients_per_label=FAR_PER_LABEL, seed=2, manifest=False)
        far_x = features(settings, [r.path for r in far], [])[0]
    embed_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    common = dict(labels=labels, positive=1, alpha=args.alpha, permutations=settings.drift_permutations)
    real: dict[tuple[str, int], list[list[float]]] = {}
    synthetic: dict[tuple[str, int], list[list[float]]] = {}
    for rep in range(args.reps):
        rng = np.random.default_rng([7, rep])
        fit, held = next(GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=rep)
                         .split(x_eval, y, groups))
        tr_rel, va_rel = next(GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=rep)
                              .split(x_eval[fit], y[fit], groups[fit]))
        head, ref, threshold = build(settings, x_views, x_eval, y, groups, fit[tr_rel], fit[va_rel],
                                     len(labels), rep)

        def check(xs: np.ndarray, grp: np.ndarray | None, h: Any = head, r: Any = ref,
                  t: float = threshold, seed: int = rep) -> list[float]:
            return pvalues(check_batch(r, xs, predict_proba(h, xs), threshold=t, groups=grp, seed=seed,
                                       **common))

        for n in sorted({10, 20, len(adult_x)}):
            pick = rng.choice(len(adult_x), n, replace=False)
            real.setdefault(("adult_site", n), []).append(check(adult_x[pick], adult_groups[pick]))
        for n in (10, 20):
            pick = rng.choice(held, n, replace=False)
            real.setdefault(("restyled_real", n), []).append(check(restyled_x[pick], groups[pick]))
            real.setdefault(("no_shift_real", n), []).append(check(x_eval[pick], groups[pick]))
        pick = pick_mix(y, held, 10, args.prevalence, rng)  # 20 would need 16 held-out pneumonia films
        if len(pick):
            real.setdefault(("prevalence_real", 10), []).append(check(x_eval[pick], groups[pick]))

        order = rng.permutation(len(s_eval))  # synthetic: 120 train, 40 validation, the rest batches
        tr, va, rest = order[:120], order[120:160], order[160:]
        s_head, s_ref, s_threshold = build(settings, s_views, s_eval, s_y, s_groups, tr, va, len(labels), rep)
        for n in GRID:
            for scenario, pick, xs in (
                    ("no_shift", rng.choice(rest, n, replace=False), s_eval),
                    ("prevalence", pick_mix(s_y, rest, n, args.prevalence, rng), s_eval),
                    ("far_site", rng.choice(len(far_x), n, replace=False), far_x)):
                synthetic.setdefault((scenario, n), []).append(
                    check(xs[pick], None, s_head, s_ref, s_threshold))
        print(f"rep {rep + 1}/{args.reps} done ({time.perf_counter() - t1:.0f} s)", flush=True)
    check_s = time.perf_counter() - t1

    result = {
        "benchmark": "drift_power", "reps": args.reps, "alpha": args.alpha,
        "project_alpha": settings.drift_alpha, "permutations": settings.drift_permutations,
        "input_size": 64, "backbone": "densenet161 random-init", "prevalence_share": args.prevalence,
        "sampling": "without replacement: n capped at the films available (adult site: 42; held-out "
                    "paediatric films: ~24, so 20; the real prevalence change: 10)",
        "films": {"paediatric": len(rows), "adult": len(adult_x), "synthetic_home": len(s_eval),
                  "synthetic_far": len(far_x)},
        "real": summarise(real, args.alpha, settings.drift_alpha),
        "synthetic": summarise(synthetic, args.alpha, settings.drift_alpha),
        "embed_seconds": round(embed_s, 1), "check_seconds": round(check_s, 1),
        "machine": platform.machine(), "python": platform.python_version(),
    }
    plot(result, RESULTS / "drift_power.png")
    publish("drift_power", result)


if __name__ == "__main__":
    main()
