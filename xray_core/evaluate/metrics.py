"""Test-set metrics, the operating threshold, and patient-clustered bootstrap intervals (numpy only).

Two implementations of the same metrics live here on purpose:

* :func:`compute_metrics` is the plain, readable one: it scores one test set and is what reports show.
* :class:`_Plan` scores *many bootstrap resamples at once*. A resample is a vector of per-image
  multiplicities (how often the image's patient was drawn), so every metric becomes a weighted sum
  and 1000 resamples are a few matrix products instead of 1000 Python calls. The tests check that both
  give identical numbers on materialised resamples.

Resampling is by patient, not by image: the images of one patient are correlated (same lungs, often
several views or follow-ups), so treating them as independent would make intervals too narrow.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

PAIRED_METRICS = ("macro_auroc", "balanced_accuracy", "sensitivity_at_specificity")
PER_CLASS_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc")
# Top-level metrics that get bootstrap intervals (per-class ones are added per label).
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc", "brier", "ece", "sensitivity_at_specificity")

# Exact comparisons of ratios of integer counts against a float target (e.g. 9/10 >= 0.9) must not
# flip on the last bit; counts are integers, so anything closer than this is equality.
_EPS = 1e-12
# Cap on the elements of one (resamples x images) weight block, ~32 MB of float64.
_BLOCK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------------
# small helpers


def positive_index(labels: Sequence[str], negative_label: str = "normal") -> int | None:
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


def disease_indices(labels: Sequence[str], negative_label: str = "normal") -> list[int]:
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


def _json_float(x: Any) -> float | None:
    """A plain float, or None for nan/inf (JSON has no nan)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
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


def choose_threshold(y_true: np.ndarray, p_positive: np.ndarray) -> float:
    """Operating threshold that maximises Youden's J = sensitivity + specificity - 1.

    ``y_true`` is 1 (or True) for images of the positive (disease) class, 0 otherwise;
    ``p_positive`` the model's probability of that class. Candidates are the observed scores (an
    image is called positive when ``p >= threshold``), so the threshold is a value the model really
    produced. Among equally good thresholds the smallest wins: at equal J it calls more images
    positive, and for a screening tool a missed disease costs more than a false alarm.
    With only one class present J is undefined and 0.5 (the argmax rule) is returned.
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
    j = tp[last] / n_pos - fp[last] / n_neg
    best = np.flatnonzero(j >= j.max() - _EPS)
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
        return np.where(p[:, positive_index] >= threshold, positive_index, 1 - positive_index).astype(np.int64)
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
    k = int(np.argmax(spec >= target - _EPS))
    return float(1.0 - np.searchsorted(pos, candidates[k], side="left") / pos.size)


def _expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int) -> float:
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
    negative_label: str = "normal",
    ece_bins: int = 10,
    target_specificity: float = 0.9,
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
    y, p = _check_inputs(y_true, probs, labels)
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
            "sensitivity": _json_float(sens),
            "specificity": _json_float(_ratio(tn, tn + fp)),
            "ppv": _json_float(_ratio(tp, tp + fp)),
            "npv": _json_float(_ratio(tn, tn + fn)),
            "f1": _json_float(_ratio(2 * tp, 2 * tp + fp + fn)),
            "auroc": _json_float(auc),
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
        "accuracy": _json_float(np.trace(cm) / n),
        "balanced_accuracy": _json_float(np.mean(recalls)),
        "macro_auroc": _json_float(np.mean(aurocs)) if aurocs else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": _json_float(_expected_calibration_error(p, y, ece_bins)),
        "brier": _json_float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "sensitivity_at_specificity": _json_float(np.mean(sas)) if sas else None,
        "target_specificity": float(target_specificity),
        "disease_labels": [labels[c] for c in diseases],
    }


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

    def _sens_at_spec(self, pos: np.ndarray, neg: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
        """Weighted twin of :func:`sensitivity_at_specificity`; threshold k = the k-th run (G = +inf)."""
        zeros = np.zeros((pos.shape[0], 1))
        neg_below = np.concatenate([zeros, np.cumsum(neg, axis=1)], axis=1)  # (B, G+1)
        pos_below = np.concatenate([zeros, np.cumsum(pos, axis=1)], axis=1)
        spec = _safe_div(neg_below, n_neg[:, None])
        k = np.argmax(spec >= self.target - _EPS, axis=1)
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


def _resample_weights(clusters: np.ndarray, n_samples: int, seed: int):
    """Yield (B, n) blocks of image weights: each row draws the patients with replacement (as many
    draws as there are patients) and gives every image its patient's draw count."""
    n_patients = int(clusters.max()) + 1
    rng = np.random.default_rng(seed)
    block = max(1, min(n_samples, _BLOCK_ELEMENTS // max(clusters.size, n_patients)))
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
    negative_label: str = "normal",
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    target_specificity: float = 0.9,
    ece_bins: int = 10,
) -> dict[str, dict[str, float | int | None]]:
    """Patient-clustered percentile bootstrap intervals of one model's metrics.

    Returns ``{path: {"point", "low", "high", "n_used"}}`` for accuracy, balanced_accuracy,
    macro_auroc, brier, ece, sensitivity_at_specificity and ``per_class.<label>.<sensitivity|
    specificity|ppv|npv|f1|auroc>``. ``point`` is :func:`compute_metrics` on the full test set;
    ``n_used`` counts the resamples where the metric was defined (a resample without any image of a
    class has no sensitivity for it and is skipped, not counted as 0). Seeded locally: the same
    seed gives the same intervals.
    """
    labels = list(labels)
    _check_bootstrap_args(n_samples, level)
    y, p = _check_inputs(y_true, probs, labels)
    clusters = _cluster_index(patient_ids, y.size)
    point = compute_metrics(y, p, labels, threshold=threshold, negative_label=negative_label,
                            ece_bins=ece_bins, target_specificity=target_specificity)
    plan = _plan_for(y, p, labels, threshold, negative_label, target_specificity, ece_bins)
    blocks = [plan.evaluate(w) for w in _resample_weights(clusters, n_samples, seed)]
    out: dict[str, dict[str, float | int | None]] = {}
    for path in blocks[0]:
        lo, hi, used = _percentile_interval(np.concatenate([b[path] for b in blocks]), level)
        out[path] = {"point": _json_float(_get_path(point, path)), "low": lo, "high": hi, "n_used": used}
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
    negative_label: str = "normal",
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    target_specificity: float = 0.9,
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
        raise ValueError(f"Invalid comparison metric {metric!r}. Only {', '.join(PAIRED_METRICS)} are supported.")
    labels = list(labels)
    _check_bootstrap_args(n_samples, level)
    y, p_new = _check_inputs(y_true, probs_challenger, labels)
    _, p_old = _check_inputs(y_true, probs_champion, labels)
    clusters = _cluster_index(patient_ids, y.size)
    kw = dict(negative_label=negative_label, target_specificity=target_specificity)
    m_new = compute_metrics(y, p_new, labels, threshold=thresholds[0], **kw)
    m_old = compute_metrics(y, p_old, labels, threshold=thresholds[1], **kw)
    plan_new = _plan_for(y, p_new, labels, thresholds[0], negative_label, target_specificity, 10)
    plan_old = _plan_for(y, p_old, labels, thresholds[1], negative_label, target_specificity, 10)
    diseases = [labels[c] for c in disease_indices(labels, negative_label)]
    paths = [metric] + [f"per_class.{d}.sensitivity" for d in diseases]
    diffs: dict[str, list[np.ndarray]] = {path: [] for path in paths}
    for w in _resample_weights(clusters, n_samples, seed):
        new, old = plan_new.evaluate(w), plan_old.evaluate(w)
        for path in paths:
            diffs[path].append(new[path] - old[path])

    def summary(path: str) -> dict[str, Any]:
        a, b = _get_path(m_new, path), _get_path(m_old, path)
        lo, hi, used = _percentile_interval(np.concatenate(diffs[path]), level)
        diff = a - b if a is not None and b is not None else None
        return {"challenger": a, "champion": b, "difference": _json_float(diff), "low": lo, "high": hi,
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


__all__ = [
    "PAIRED_METRICS",
    "auroc",
    "bootstrap_intervals",
    "choose_threshold",
    "compute_metrics",
    "disease_indices",
    "paired_bootstrap_difference",
    "positive_index",
    "predict_labels",
    "sensitivity_at_specificity",
]
