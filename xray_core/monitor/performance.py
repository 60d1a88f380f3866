"""Performance before labels: confidence-based performance estimation (CBPE, the idea of NannyML).

If the model's probabilities are calibrated, film i has the positive label with probability p_i, so at
the operating threshold t every film's contribution to the confusion matrix is known *in expectation*:
a film predicted positive (p_i >= t) is a true positive with probability p_i and a false positive with
1 - p_i; one predicted negative is a false negative with p_i and a true negative with 1 - p_i. Summing
over the batch gives the expected confusion matrix, hence expected accuracy, sensitivity and
specificity. Expected AUROC weights every ordered pair of films (i as the positive, j != i as the
negative) by p_i (1 - p_j): the area under the ROC curve with fractional labels. As in NannyML, each
ratio is a ratio of expectations, not the expectation of the ratio (close for batches of tens of films).

Hand-written (a few lines of numpy) rather than imported: ``nannyml`` is not installed or pinned here,
and it would bring pandas-heavy dependencies for four sums.

Assumptions, stated wherever the estimate is shown: the probabilities are calibrated (temperature
scaling on the validation films) and P(label | film) has not changed since training: only the mix of
films may change (covariate or label shift). A batch whose drift tests warn breaks the second
assumption as far as anyone can tell, so the estimate beside a drift flag is marked unreliable.
The standard deviation is that of the realised accuracy if the assumptions hold (a Poisson-binomial
sum of each film's chance of being right): the noise floor of any comparison with labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ASSUMPTION = "assumes calibrated probabilities and no change in P(label | film)"
UNRELIABLE = "unreliable: the batch's drift tests warn, so P(label | film) may have changed"


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den > 0 else None


def expected_auroc(p: np.ndarray, scores: np.ndarray | None = None) -> float | None:
    """Expected AUROC of ``scores`` (default ``p``) when film i is positive with probability ``p[i]``:
    sum over pairs i != j of p_i (1 - p_j) [s_i > s_j] (ties count half), over sum of p_i (1 - p_j).
    O(n log n) by sorting; None when the batch cannot have both classes."""
    p = np.asarray(p, dtype=np.float64)
    s = p if scores is None else np.asarray(scores, dtype=np.float64)
    if len(p) < 2:
        return None
    uniq, inv = np.unique(s, return_inverse=True)
    pos = np.bincount(inv, weights=p, minlength=len(uniq))  # expected positives at each distinct score
    neg = np.bincount(inv, weights=1.0 - p, minlength=len(uniq))
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # expected negatives strictly below each score
    self_pairs = float(np.sum(p * (1.0 - p)))  # i paired with itself: a tie, excluded from both sums
    wins = float(np.sum(pos * below) + 0.5 * (np.sum(pos * neg) - self_pairs))
    pairs = float(pos.sum() * neg.sum() - self_pairs)
    return _ratio(wins, pairs)


def estimate(probs: np.ndarray, *, threshold: float | np.ndarray | None, positive: int | None,
             drift: bool | None = None) -> dict[str, Any]:
    """The expected performance of a batch from its calibrated probabilities ``(n, classes)``.

    Binary (``positive`` and ``threshold`` given): accuracy, sensitivity and specificity at the
    threshold (one, or one per film when films come from several models), and AUROC. More classes:
    accuracy of the arg-max and the macro one-vs-rest AUROC.
    ``drift``: the batch's drift verdict (None: not tested); True marks the estimate unreliable."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    out: dict[str, Any] = {"n": n, "method": "CBPE", "assumption": ASSUMPTION,
                           "reliable": drift is not True, "note": UNRELIABLE if drift else None}
    if n == 0:
        return {**out, "accuracy": None, "accuracy_sd": None, "auroc": None}
    if positive is not None and threshold is not None:
        p = probs[:, positive]
        called = p >= threshold
        tp, fp = float(p[called].sum()), float((1 - p[called]).sum())
        fn, tn = float(p[~called].sum()), float((1 - p[~called]).sum())
        right = np.where(called, p, 1 - p)  # each film's chance of being called correctly
        out.update(sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
                   expected_positive_rate=_ratio(tp + fn, n), auroc=expected_auroc(p))
    else:
        right = probs.max(axis=1)
        per_class = [expected_auroc(probs[:, c]) for c in range(probs.shape[1])]
        known = [a for a in per_class if a is not None]
        out["auroc"] = round(float(np.mean(known)), 4) if known else None
    out["accuracy"] = round(float(right.mean()), 4)
    out["accuracy_sd"] = round(float(np.sqrt(np.sum(right * (1 - right))) / n), 4)
    return out


def realised(probs: np.ndarray, y: np.ndarray, *, threshold: float | np.ndarray | None,
             positive: int | None) -> dict[str, Any]:
    """The same numbers from the labels ``y`` (class indices): what the estimate is checked against."""
    from sklearn.metrics import roc_auc_score

    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    n = len(y)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return {**out, "accuracy": None, "auroc": None}
    if positive is not None and threshold is not None:
        truth, called = y == positive, probs[:, positive] >= threshold
        out["accuracy"] = round(float(np.mean(truth == called)), 4)
        out["sensitivity"] = _ratio(float(np.sum(truth & called)), float(truth.sum()))
        out["specificity"] = _ratio(float(np.sum(~truth & ~called)), float((~truth).sum()))
        both = 0 < truth.sum() < n
        out["auroc"] = round(float(roc_auc_score(truth, probs[:, positive])), 4) if both else None
    else:
        out["accuracy"] = round(float(np.mean(probs.argmax(axis=1) == y)), 4)
        aucs = [roc_auc_score(y == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < np.sum(y == c) < n]
        out["auroc"] = round(float(np.mean(aucs)), 4) if aucs else None
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def estimate_line(est: dict[str, Any] | None) -> str:
    """``estimated accuracy 84% ± 5% (sensitivity 90%, specificity 75%, AUROC 0.91; assumes ...)``."""
    if not est or est.get("accuracy") is None:
        return "performance not estimated (no films)"
    parts = [f"sensitivity {_pct(est['sensitivity'])}" if "sensitivity" in est else None,
             f"specificity {_pct(est['specificity'])}" if "specificity" in est else None,
             f"AUROC {est['auroc']:.2f}" if est.get("auroc") is not None else None]
    detail = ", ".join(p for p in parts if p)
    line = (f"estimated accuracy {_pct(est['accuracy'])} ± {_pct(est['accuracy_sd'])} before labels"
            f" ({detail + '; ' if detail else ''}{est['assumption']})")
    return f"{line}; {est['note']}" if not est.get("reliable", True) else line


def beside_line(est: dict[str, Any], real: dict[str, Any]) -> str:
    """``accuracy estimated 84% (before labels), realised 80% on 50 labelled films[, unreliable]``."""
    flag = "" if est.get("reliable", True) else " (estimate marked unreliable: drift)"
    head = f"accuracy estimated {_pct(est.get('accuracy'))} before labels"
    if not real.get("n"):
        return f"{head}, not realised: {real.get('note')}"
    return f"{head}, realised {_pct(real.get('accuracy'))} on {real.get('n')} labelled films{flag}"


MAX_FILMS = 20_000  # films whose probabilities a check stores for a later comparison (~1.7 MB of JSON)
MIN_LABELLED = 5  # labelled films of an earlier batch needed to set a realised value beside its estimate


def film_record(shas: list[str], probs: np.ndarray, *, labels: list[str], threshold: float | None,
                positive: int | None) -> dict[str, Any]:
    """What a check stores so that, once its films are labelled, the realised value can be set beside
    its estimate: each film's sha256 and rounded probabilities, and the model's labels and threshold
    (at most MAX_FILMS films; ``truncated`` says when more were checked)."""
    keep = min(len(shas), MAX_FILMS)
    return {"labels": list(labels), "threshold": threshold, "positive": positive, "sha256": list(shas[:keep]),
            "probs": np.round(np.asarray(probs[:keep], dtype=np.float64), 4).tolist(),
            "truncated": len(shas) > keep}


def realise_record(record: dict[str, Any], reliable: bool, label_of: dict[str, str]) -> dict[str, Any] | None:
    """Estimate and realised value on the films of a stored ``record`` that are now labelled
    (``label_of``: sha256 -> catalogue label); None when fewer than MIN_LABELLED are. The estimate is
    recomputed on the same films, so both numbers describe the same films."""
    labels = list(record.get("labels") or [])
    pairs = [(i, labels.index(label_of[sha])) for i, sha in enumerate(record.get("sha256") or [])
             if label_of.get(sha) in labels]
    if len(pairs) < MIN_LABELLED:
        return None
    rows, y = np.array([i for i, _ in pairs]), np.array([c for _, c in pairs])
    probs = np.asarray(record["probs"], dtype=np.float64)[rows]
    kw: dict[str, Any] = {"threshold": record.get("threshold"), "positive": record.get("positive")}
    return {"labelled": len(pairs), "films": len(record["sha256"]),
            "estimate": estimate(probs, drift=not reliable, **kw), "realised": realised(probs, y, **kw)}


__all__ = ["ASSUMPTION", "MAX_FILMS", "MIN_LABELLED", "UNRELIABLE", "beside_line", "estimate",
           "estimate_line", "expected_auroc", "film_record", "realise_record", "realised"]
