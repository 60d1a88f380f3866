"""Test-set point metrics and the operating threshold (numpy only).

:func:`compute_metrics` is the plain, readable implementation: it scores one test set and is what
reports show. Intervals (the patient-clustered bootstrap and its exact fallback) live in
:mod:`xray_core.evaluate.intervals`, which re-scores many resamples at once with a vectorised twin of
these metrics and imports this module, never the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from xray_core.settings import PROMOTION_METRICS, setting_default

# the declared defaults of XRAY_NEGATIVE_LABEL and XRAY_TARGET_SPECIFICITY
NEGATIVE_LABEL: str = setting_default("negative_label")
TARGET_SPECIFICITY: float = setting_default("target_specificity")

PAIRED_METRICS: tuple[str, ...] = PROMOTION_METRICS  # the paired bootstrap supports every promotion metric
PER_CLASS_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc")

# Exact comparisons of ratios of integer counts against a float target (e.g. 9/10 >= 0.9) must not
# flip on the last bit; counts are integers, so anything closer than this is equality.
EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# small helpers


def positive_index(labels: Sequence[str], negative_label: str = NEGATIVE_LABEL) -> int | None:
    """Index of the positive (disease) class for a 2-class problem; None for any other class count.

    The positive class is the one that is not ``negative_label``; when neither label is the negative
    one, index 1 (the usual "second class is the event" convention).
    """
    labels = list(labels)
    if len(labels) != 2:
        return None
    if negative_label in labels:
        return 1 - labels.index(negative_label)
    return 1


def disease_indices(labels: Sequence[str], negative_label: str = NEGATIVE_LABEL) -> list[int]:
    """Indices of the disease classes: every class except ``negative_label``.

    Without a negative label, a 2-class problem has one disease class (index 1) and a multi-class
    problem treats every class as a disease class.
    """
    labels = list(labels)
    if negative_label in labels:
        return [i for i, lab in enumerate(labels) if lab != negative_label]
    if len(labels) == 2:
        return [1]
    return list(range(len(labels)))


def json_float(x: Any) -> float | None:
    """A plain float, or None for nan/inf (JSON has no nan)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def check_inputs(y_true: np.ndarray, probs: np.ndarray,
                 labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be a 2-D (images, classes) array, got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must be 1-D with one entry per row of probs: {y.shape} vs {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("no test images: metrics need at least one")
    if p.shape[1] != len(labels):
        raise ValueError(f"probs has {p.shape[1]} columns but there are {len(labels)} labels {list(labels)}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices into labels")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= len(labels):
        raise ValueError(f"y_true has class indices outside 0..{len(labels) - 1}")
    if not np.all(np.isfinite(p)) or np.any(p < -1e-6):
        raise ValueError("probs must be finite and non-negative (pass softmax probabilities, not logits)")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("every row of probs must sum to 1 (pass softmax probabilities, not logits)")
    return y.astype(np.int64), p


# --------------------------------------------------------------------------------------------------
# threshold and predictions


def choose_threshold(y_true: np.ndarray, p_positive: np.ndarray, *,
                     target_sensitivity: float | None = None) -> float:
    """Operating threshold that maximises Youden's J = sensitivity + specificity - 1.

    ``y_true`` is 1 (or True) for images of the positive (disease) class, 0 otherwise;
    ``p_positive`` the model's probability of that class. Candidates are the observed scores (an
    image is called positive when ``p >= threshold``), so the threshold is a value the model really
    produced. Among equally good thresholds the smallest wins: at equal J it calls more images
    positive, and for a screening tool a missed disease costs more than a false alarm.
    With only one class present J is undefined and 0.5 (the argmax rule) is returned.

    With ``target_sensitivity`` (XRAY_TARGET_SENSITIVITY) the threshold is instead the largest
    observed score whose sensitivity reaches the target: the most specific operating point that
    still catches that share of the disease.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(p_positive, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true and p_positive must be 1-D of equal length: {y.shape} vs {s.shape}")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return 0.5
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    tp = np.cumsum(y_desc)
    fp = np.cumsum(~y_desc)
    # the last position of each run of equal scores = "everything >= this score is positive"
    last = np.r_[np.flatnonzero(np.diff(s_desc) != 0), s_desc.size - 1]
    if target_sensitivity is not None:
        reached = np.flatnonzero(tp[last] / n_pos >= target_sensitivity - EPS)
        return float(s_desc[last[reached[0]]])  # the lowest score always reaches sensitivity 1
    j = tp[last] / n_pos - fp[last] / n_neg
    best = np.flatnonzero(j >= j.max() - EPS)
    # scores are descending, so the largest position among the best is the smallest threshold
    return float(s_desc[last[best[-1]]])


def predict_labels(
    probs: np.ndarray, *, threshold: float | None = None, positive_index: int | None = None
) -> np.ndarray:
    """Predicted class indices.

    Two classes with a threshold and a positive index: positive when ``probs[:, positive_index] >=
    threshold``, else the other class (the threshold is tuned for sensitivity/specificity, argmax
    would fix it at 0.5). Otherwise, and for multi-class, the argmax (ties go to the lower index).
    """
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be a 2-D (images, classes) array, got shape {p.shape}")
    if p.shape[1] == 2 and threshold is not None and positive_index is not None:
        if positive_index not in (0, 1):
            raise ValueError(f"positive_index must be 0 or 1 for two classes, got {positive_index}")
        return np.where(p[:, positive_index] >= threshold, positive_index,
                        1 - positive_index).astype(np.int64)
    return np.argmax(p, axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# scalar metrics (the plain implementation)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs) != 0) + 1]
    ends = np.r_[starts[1:], xs.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(y_binary: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative).

    Mann-Whitney U from mid-ranks, so a tied positive/negative pair counts 1/2. nan when either class
    is absent (the area is undefined, not 0.5).
    """
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _midranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def sensitivity_at_specificity(y_binary: np.ndarray, score: np.ndarray, target: float = 0.9) -> float:
    """Sensitivity at the smallest threshold whose specificity is at least ``target``.

    Candidate thresholds are the observed scores plus +inf (call nothing positive, specificity 1), so
    a threshold always exists; the smallest one is the most sensitive. nan if a class is absent.
    """
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if pos.size == 0 or neg.size == 0:
        return math.nan
    candidates = np.r_[np.unique(s), np.inf]
    spec = np.searchsorted(neg, candidates, side="left") / neg.size  # negatives strictly below
    k = int(np.argmax(spec >= target - EPS))
    return float(1.0 - np.searchsorted(pos, candidates[k], side="left") / pos.size)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE of the argmax prediction: sum over equal-width confidence bins of |accuracy - confidence|
    weighted by the bin's share of images. Bins are [k/bins, (k+1)/bins), the last one closed."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    which = np.clip((conf * bins).astype(np.int64), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    *,
    threshold: float | None,
    negative_label: str = NEGATIVE_LABEL,
    ece_bins: int = 10,
    target_specificity: float = TARGET_SPECIFICITY,
) -> dict:
    """Every test-set metric of one model, as a JSON-able dict (floats, ints, lists; nan -> None).

    ``y_true`` are class indices into ``labels``; ``probs`` the (n, C) softmax output. With two
    classes and a ``threshold`` the positive (disease) class is predicted when its probability is at
    least the threshold; otherwise (and for multi-class, where ``threshold`` is ignored and recorded
    as None) the argmax.

    Keys: ``n``, ``labels``, ``threshold``, ``accuracy``, ``balanced_accuracy`` (mean recall over
    classes present: robust to class imbalance), ``macro_auroc`` (mean one-vs-rest AUROC over classes
    present), ``per_class`` {label: sensitivity, specificity, ppv, npv, f1, auroc, support},
    ``confusion_matrix`` (rows true, columns predicted, in label order), ``ece`` (calibration of the
    argmax confidence, independent of the threshold), ``brier`` (multi-class, 0 = perfect, 2 = worst),
    ``sensitivity_at_specificity`` (binary: of the positive class; multi-class: mean over disease
    classes of the one-vs-rest value) with ``target_specificity``, and ``disease_labels``.
    """
    labels = list(labels)
    y, p = check_inputs(y_true, probs, labels)
    n, n_classes = p.shape
    pos_idx = positive_index(labels, negative_label)
    used_threshold = float(threshold) if (pos_idx is not None and threshold is not None) else None
    pred = predict_labels(p, threshold=used_threshold, positive_index=pos_idx)

    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)

    per_class: dict[str, dict[str, Any]] = {}
    recalls, aurocs = [], []
    for c, label in enumerate(labels):
        tp = int(cm[c, c])
        fn = int(cm[c, :].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = n - tp - fn - fp
        sens = _ratio(tp, tp + fn)
        auc = auroc(y == c, p[:, c])
        if tp + fn > 0:
            recalls.append(sens)
        if not math.isnan(auc):
            aurocs.append(auc)
        per_class[label] = {
            "sensitivity": json_float(sens),
            "specificity": json_float(_ratio(tn, tn + fp)),
            "ppv": json_float(_ratio(tp, tp + fp)),
            "npv": json_float(_ratio(tn, tn + fn)),
            "f1": json_float(_ratio(2 * tp, 2 * tp + fp + fn)),
            "auroc": json_float(auc),
            "support": tp + fn,
        }

    onehot = np.eye(n_classes)[y]
    diseases = disease_indices(labels, negative_label)
    sas = [sensitivity_at_specificity(y == c, p[:, c], target_specificity) for c in diseases]
    sas = [v for v in sas if not math.isnan(v)]

    return {
        "n": int(n),
        "labels": labels,
        "threshold": used_threshold,
        "accuracy": json_float(np.trace(cm) / n),
        "balanced_accuracy": json_float(np.mean(recalls)),
        "macro_auroc": json_float(np.mean(aurocs)) if aurocs else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": json_float(expected_calibration_error(p, y, ece_bins)),
        "brier": json_float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "sensitivity_at_specificity": json_float(np.mean(sas)) if sas else None,
        "target_specificity": float(target_specificity),
        "disease_labels": [labels[c] for c in diseases],
    }


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the squared distance between the probability
    vector and the one-hot truth (0 = perfect, 2 = worst)."""
    p = np.asarray(probs, dtype=np.float64)
    return float(np.mean(np.sum((p - np.eye(p.shape[1])[np.asarray(y)]) ** 2, axis=1)))


__all__ = [
    "PAIRED_METRICS",
    "auroc",
    "brier_score",
    "check_inputs",
    "choose_threshold",
    "compute_metrics",
    "disease_indices",
    "expected_calibration_error",
    "json_float",
    "positive_index",
    "predict_labels",
    "sensitivity_at_specificity",
]
