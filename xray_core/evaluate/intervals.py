"""Patient-clustered bootstrap intervals, with exact binomial intervals where the bootstrap degenerates.

:class:`_Plan` scores *many bootstrap resamples at once*. A resample is a vector of per-image
multiplicities (how often the image's patient was drawn), so every metric becomes a weighted sum and
1000 resamples are a few matrix products instead of 1000 Python calls. The tests check that it gives
the same numbers as :func:`xray_core.evaluate.metrics.compute_metrics` on materialised resamples.

Resampling is by patient, not by image: the images of one patient are correlated (same lungs, often
several views or follow-ups), so treating them as independent would make intervals too narrow.

A bootstrap cannot put an interval around 0/23 or 23/23: every resample gives the same 0 or 1 and the
"interval" has zero width, which reports would show as certainty. For proportions (accuracy and each
class's sensitivity, specificity, PPV, NPV) a zero-width bootstrap interval is replaced by a Wilson
score interval (:func:`wilson_interval`, via ``scipy.stats.binomtest``) on the *patients* in the
denominator: a design effect with intra-patient correlation 1, i.e. n_eff = distinct patients,
conservative when patients contribute several images. AUROCs (per class and macro) get the same
treatment with n = the smaller class's patients. Each interval names its ``method``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import binomtest

from xray_core.evaluate.metrics import (
    EPS,
    PAIRED_METRICS,
    check_inputs,
    compute_metrics,
    disease_indices,
    json_float,
    positive_index,
    predict_labels,
)
from xray_core.settings import setting_default

# Top-level metrics that get bootstrap intervals (per-class ones are added per label).
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc", "brier", "ece",
                    "sensitivity_at_specificity")
# Cap on the elements of one (resamples x images) weight block, ~32 MB of float64.
_BLOCK_ELEMENTS = 4_000_000
# (resamples x images) float64 arrays alive at once while a block is scored (_Plan.evaluate): weights,
# their sorted copy, the positive and negative parts, cumulative sums. XRAY_MEMORY_MB / this bounds a block.
_BLOCK_ARRAYS = 8


def block_elements(memory_mb: int | None = None) -> int:
    """Elements of one resample block: at most _BLOCK_ELEMENTS, fewer under a small ``memory_mb`` budget.
    The resamples are the same whatever the block (one generator, drawn in order); only the arithmetic's
    grouping changes, by ~1e-16."""
    if memory_mb is None:
        return _BLOCK_ELEMENTS
    return max(1, min(_BLOCK_ELEMENTS, memory_mb * 2**20 // (8 * _BLOCK_ARRAYS)))


# --------------------------------------------------------------------------------------------------
# the vectorised engine: every metric for a block of weighted resamples at once


class _Plan:
    """Everything about one model's predictions that does not depend on the resample.

    :meth:`evaluate` takes a (B, n) matrix of image weights (multiplicities) and returns, per metric
    path, a (B,) array; nan where the metric is undefined in that resample.
    """

    def __init__(self, y: np.ndarray, probs: np.ndarray, pred: np.ndarray, labels: list[str],
                 diseases: list[int], target_specificity: float, ece_bins: int):
        n, n_classes = probs.shape
        self.labels = labels
        self.n_classes = n_classes
        self.diseases = diseases
        self.target = target_specificity
        # one column per confusion-matrix cell (true * C + predicted)
        self.cells = np.zeros((n, n_classes * n_classes))
        self.cells[np.arange(n), y * n_classes + pred] = 1.0
        self.brier = np.sum((probs - np.eye(n_classes)[y]) ** 2, axis=1)
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == y).astype(np.float64)
        which = np.clip((conf * ece_bins).astype(np.int64), 0, ece_bins - 1)
        # ECE = sum_b |sum_{i in b} w_i (correct_i - conf_i)| / sum_i w_i
        self.ece_terms = np.zeros((n, ece_bins))
        self.ece_terms[np.arange(n), which] = correct - conf
        # per class: images sorted by score, runs of tied scores, and who is positive
        self.sorted = []
        for c in range(n_classes):
            order = np.argsort(probs[:, c], kind="stable")
            s = probs[order, c]
            starts = np.r_[0, np.flatnonzero(np.diff(s) != 0) + 1]
            self.sorted.append((order, starts, (y[order] == c).astype(np.float64)))

    def _class_groups(self, w: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Weighted positive and negative counts per run of tied scores, ascending: (B, G) each."""
        order, starts, is_pos = self.sorted[c]
        ws = w[:, order]
        pos = np.add.reduceat(ws * is_pos, starts, axis=1)
        neg = np.add.reduceat(ws * (1.0 - is_pos), starts, axis=1)
        return pos, neg

    def evaluate(self, w: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        n_classes = self.n_classes
        total = w.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cm = (w @ self.cells).reshape(-1, n_classes, n_classes)
            diag = np.einsum("bii->bi", cm)
            rows, cols = cm.sum(axis=2), cm.sum(axis=1)
            out["accuracy"] = diag.sum(axis=1) / total
            out["brier"] = (w @ self.brier) / total
            out["ece"] = np.abs(w @ self.ece_terms).sum(axis=1) / total
            recalls, aurocs = [], []
            sas = {}
            for c, label in enumerate(self.labels):
                tp = diag[:, c]
                fn, fp = rows[:, c] - tp, cols[:, c] - tp
                tn = total - tp - fn - fp
                sens = _safe_div(tp, tp + fn)
                pos, neg = self._class_groups(w, c)
                n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
                below = np.cumsum(neg, axis=1) - neg
                auc = _safe_div((pos * (below + 0.5 * neg)).sum(axis=1), n_pos * n_neg)
                prefix = f"per_class.{label}."
                out[prefix + "sensitivity"] = sens
                out[prefix + "specificity"] = _safe_div(tn, tn + fp)
                out[prefix + "ppv"] = _safe_div(tp, tp + fp)
                out[prefix + "npv"] = _safe_div(tn, tn + fn)
                out[prefix + "f1"] = _safe_div(2 * tp, 2 * tp + fp + fn)
                out[prefix + "auroc"] = auc
                recalls.append(sens)
                aurocs.append(auc)
                if c in self.diseases:
                    sas[c] = self._sens_at_spec(pos, neg, n_pos, n_neg)
            out["balanced_accuracy"] = _nanmean_rows(np.stack(recalls, axis=1))
            out["macro_auroc"] = _nanmean_rows(np.stack(aurocs, axis=1))
            out["sensitivity_at_specificity"] = (
                _nanmean_rows(np.stack(list(sas.values()), axis=1)) if sas else np.full(total.shape, np.nan)
            )
        return out

    def _sens_at_spec(self, pos: np.ndarray, neg: np.ndarray, n_pos: np.ndarray,
                      n_neg: np.ndarray) -> np.ndarray:
        """Weighted twin of :func:`sensitivity_at_specificity`; threshold k = the k-th run (G = +inf)."""
        zeros = np.zeros((pos.shape[0], 1))
        neg_below = np.concatenate([zeros, np.cumsum(neg, axis=1)], axis=1)  # (B, G+1)
        pos_below = np.concatenate([zeros, np.cumsum(pos, axis=1)], axis=1)
        spec = _safe_div(neg_below, n_neg[:, None])
        k = np.argmax(spec >= self.target - EPS, axis=1)
        sens = 1.0 - np.take_along_axis(pos_below, k[:, None], axis=1)[:, 0] / n_pos
        return np.where((n_pos > 0) & (n_neg > 0), sens, np.nan)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Row means over finite entries; nan for a row with none (without numpy's empty-slice warning)."""
    ok = np.isfinite(x)
    count = ok.sum(axis=1)
    return np.where(count > 0, np.where(ok, x, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def _cluster_index(patient_ids: np.ndarray, n: int) -> np.ndarray:
    """Patient cluster number per image. An image without a patient id (None, nan, '') is its own
    cluster, so missing ids cannot silently merge unrelated images into one 'patient'."""
    ids = list(np.asarray(patient_ids, dtype=object).ravel())
    if len(ids) != n:
        raise ValueError(f"patient_ids has {len(ids)} entries for {n} images")
    keys = []
    for i, pid in enumerate(ids):
        missing = pid is None or pid == "" or (isinstance(pid, float) and math.isnan(pid))
        keys.append(f"\x00image-{i}" if missing else f"id:{pid}")
    return np.unique(np.asarray(keys), return_inverse=True)[1].ravel()


def _resample_weights(clusters: np.ndarray, n_samples: int, seed: int, memory_mb: int | None = None):
    """Yield (B, n) blocks of image weights: each row draws the patients with replacement (as many
    draws as there are patients) and gives every image its patient's draw count."""
    n_patients = int(clusters.max()) + 1
    rng = np.random.default_rng(seed)
    block = max(1, min(n_samples, block_elements(memory_mb) // max(clusters.size, n_patients)))
    done = 0
    while done < n_samples:
        b = min(block, n_samples - done)
        draws = rng.integers(0, n_patients, size=(b, n_patients))
        offsets = (np.arange(b) * n_patients)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=b * n_patients).reshape(b, n_patients)
        yield counts[:, clusters].astype(np.float64)
        done += b


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float | None, float | None, int]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None, 0
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi), int(finite.size)


def _check_bootstrap_args(n_samples: int, level: float) -> None:
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: need at least 1 bootstrap resample")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: the interval's coverage must be between 0 and 1, e.g. 0.95")


def _get_path(metrics: dict, path: str) -> float | None:
    node: Any = metrics
    for part in path.split(".", 2) if path.startswith("per_class.") else [path]:
        node = node[part]
    return node


def _plan_for(y, p, labels, threshold, negative_label, target_specificity, ece_bins) -> _Plan:
    pos_idx = positive_index(labels, negative_label)
    pred = predict_labels(p, threshold=threshold if pos_idx is not None else None, positive_index=pos_idx)
    return _Plan(y, p, pred, labels, disease_indices(labels, negative_label), target_specificity, ece_bins)


# --------------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_intervals(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    patient_ids: np.ndarray,
    *,
    threshold: float | None,
    negative_label: str = setting_default("negative_label"),
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    target_specificity: float = setting_default("target_specificity"),
    ece_bins: int = 10,
    memory_mb: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Patient-clustered percentile bootstrap intervals of one model's metrics.

    Returns ``{path: {"point", "low", "high", "n_used", "method"}}`` for accuracy, balanced_accuracy,
    macro_auroc, brier, ece, sensitivity_at_specificity and ``per_class.<label>.<sensitivity|
    specificity|ppv|npv|f1|auroc>``. ``point`` is :func:`compute_metrics` on the full test set;
    ``n_used`` counts the resamples where the metric was defined (a resample without any image of a
    class has no sensitivity for it and is skipped, not counted as 0). Seeded locally: the same
    seed gives the same intervals. ``method`` is "bootstrap", or "wilson" (with ``n_effective``
    patients) where the bootstrap interval had zero width; see the module docstring. ``memory_mb``
    (XRAY_MEMORY_MB) bounds the resample blocks (:func:`block_elements`).
    """
    labels = list(labels)
    _check_bootstrap_args(n_samples, level)
    y, p = check_inputs(y_true, probs, labels)
    clusters = _cluster_index(patient_ids, y.size)
    point = compute_metrics(y, p, labels, threshold=threshold, negative_label=negative_label,
                            ece_bins=ece_bins, target_specificity=target_specificity)
    plan = _plan_for(y, p, labels, threshold, negative_label, target_specificity, ece_bins)
    blocks = [plan.evaluate(w) for w in _resample_weights(clusters, n_samples, seed, memory_mb)]
    out: dict[str, dict[str, Any]] = {}
    for path in blocks[0]:
        lo, hi, used = _percentile_interval(np.concatenate([b[path] for b in blocks]), level)
        out[path] = {"point": json_float(_get_path(point, path)), "low": lo, "high": hi, "n_used": used,
                     "method": "bootstrap"}
    pred = predict_labels(p,
                          threshold=threshold if positive_index(labels, negative_label) is not None else None,
                          positive_index=positive_index(labels, negative_label))
    for path, n_eff in _patient_denominators(y, pred, labels, clusters).items():
        iv = out.get(path)
        if iv is None or iv["point"] is None or n_eff < 1:
            continue
        if iv["low"] is None or iv["high"] - iv["low"] <= EPS:  # every resample gave the same value
            lo, hi = wilson_interval(round(iv["point"] * n_eff), n_eff, level)
            iv.update(low=lo, high=hi, method="wilson", n_effective=n_eff)
    return out


def proportion_interval(hits: np.ndarray, patient_ids: np.ndarray, *, n_samples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, Any]:
    """The share of images with ``hits`` (one bool per image), with the same patient-clustered
    bootstrap as :func:`bootstrap_intervals`, and its Wilson interval on the patients where every
    resample gave the same share (0 of n, n of n). ``{"point", "low", "high", "n_used", "method"}``
    (plus ``n_effective`` for Wilson); all None for no images."""
    _check_bootstrap_args(n_samples, level)
    h = np.asarray(hits, dtype=np.float64).ravel()
    if h.size == 0:
        return {"point": None, "low": None, "high": None, "n_used": 0, "method": "bootstrap"}
    clusters = _cluster_index(patient_ids, h.size)
    shares = np.concatenate([(w @ h) / w.sum(axis=1) for w in _resample_weights(clusters, n_samples, seed)])
    lo, hi, used = _percentile_interval(shares, level)
    out: dict[str, Any] = {"point": float(h.mean()), "low": lo, "high": hi, "n_used": used,
                           "method": "bootstrap"}
    if lo is None or hi is None or hi - lo <= EPS:
        n_eff = int(clusters.max()) + 1
        lo, hi = wilson_interval(round(out["point"] * n_eff), n_eff, level)
        out.update(low=lo, high=hi, method="wilson", n_effective=n_eff)
    return out


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes``/``n`` (scipy.stats.binomtest); unlike a
    bootstrap it has non-zero width at 0/n and n/n."""
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _patient_denominators(y: np.ndarray, pred: np.ndarray, labels: list[str],
                          clusters: np.ndarray) -> dict[str, int]:
    """Per interval path, the number of distinct patients behind the proportion's denominator (the
    effective n under a design effect with intra-patient correlation 1); for an AUROC, the smaller
    class's patients."""
    def patients(mask: np.ndarray) -> int:
        return int(np.unique(clusters[mask]).size)

    out = {"accuracy": patients(np.ones_like(y, dtype=bool))}
    aucs = []
    for c, label in enumerate(labels):
        prefix = f"per_class.{label}."
        out[prefix + "sensitivity"] = patients(y == c)
        out[prefix + "specificity"] = patients(y != c)
        out[prefix + "ppv"] = patients(pred == c)
        out[prefix + "npv"] = patients(pred != c)
        out[prefix + "auroc"] = min(patients(y == c), patients(y != c))
        if out[prefix + "auroc"] > 0:
            aucs.append(out[prefix + "auroc"])
    out["macro_auroc"] = min(aucs) if aucs else 0
    return out


def paired_bootstrap_difference(
    y_true: np.ndarray,
    probs_challenger: np.ndarray,
    probs_champion: np.ndarray,
    labels: list[str],
    patient_ids: np.ndarray,
    *,
    metric: str,
    thresholds: tuple[float | None, float | None],
    negative_label: str = setting_default("negative_label"),
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    target_specificity: float = setting_default("target_specificity"),
    memory_mb: int | None = None,
) -> dict:
    """Challenger minus champion on the same test images, with a paired patient-clustered interval.

    Paired: each resample draws one set of patients and scores *both* models on it, so the interval
    reflects how the models differ on the same cases, which is much tighter (and more honest) than
    comparing two independent intervals. ``thresholds`` are (challenger, champion) operating
    thresholds, each model's own.

    Returns ``metric``, ``challenger``, ``champion`` (full-set values), ``difference`` (challenger -
    champion), ``low``/``high`` (percentile interval of the resampled differences; None if no
    resample defined it), ``n_samples_used``, ``n_samples``, ``level``, ``n_patients``,
    ``target_specificity`` and ``sensitivity_differences`` {disease label: {challenger, champion,
    difference, low, high}} for the policy's guardrail.
    """
    if metric not in PAIRED_METRICS:
        raise ValueError(f"Invalid comparison metric {metric!r}. Only {', '.join(PAIRED_METRICS)} "
                         "are supported.")
    labels = list(labels)
    _check_bootstrap_args(n_samples, level)
    y, p_new = check_inputs(y_true, probs_challenger, labels)
    _, p_old = check_inputs(y_true, probs_champion, labels)
    clusters = _cluster_index(patient_ids, y.size)
    kw: dict[str, Any] = dict(negative_label=negative_label, target_specificity=target_specificity)
    m_new = compute_metrics(y, p_new, labels, threshold=thresholds[0], **kw)
    m_old = compute_metrics(y, p_old, labels, threshold=thresholds[1], **kw)
    plan_new = _plan_for(y, p_new, labels, thresholds[0], negative_label, target_specificity, 10)
    plan_old = _plan_for(y, p_old, labels, thresholds[1], negative_label, target_specificity, 10)
    diseases = [labels[c] for c in disease_indices(labels, negative_label)]
    paths = [metric] + [f"per_class.{d}.sensitivity" for d in diseases]
    diffs: dict[str, list[np.ndarray]] = {path: [] for path in paths}
    for w in _resample_weights(clusters, n_samples, seed, memory_mb):
        new, old = plan_new.evaluate(w), plan_old.evaluate(w)
        for path in paths:
            diffs[path].append(new[path] - old[path])

    def summary(path: str) -> dict[str, Any]:
        a, b = _get_path(m_new, path), _get_path(m_old, path)
        lo, hi, used = _percentile_interval(np.concatenate(diffs[path]), level)
        diff = a - b if a is not None and b is not None else None
        return {"challenger": a, "champion": b, "difference": json_float(diff), "low": lo, "high": hi,
                "n_used": used}

    main = summary(metric)
    return {
        "metric": metric,
        "challenger": main["challenger"],
        "champion": main["champion"],
        "difference": main["difference"],
        "low": main["low"],
        "high": main["high"],
        "n_samples_used": main["n_used"],
        "n_samples": int(n_samples),
        "level": float(level),
        "n_patients": int(clusters.max()) + 1,
        "target_specificity": float(target_specificity),
        "sensitivity_differences": {d: summary(f"per_class.{d}.sensitivity") for d in diseases},
    }


__all__ = ["INTERVAL_METRICS", "bootstrap_intervals", "paired_bootstrap_difference", "proportion_interval",
           "wilson_interval"]
