"""Per-film OOD scores beside today's T² + Q (:mod:`.ood`), compared on real films by ``bench/ood.py``.

Each score is "larger is stranger" and is turned into a flag the same way: a split-conformal p-value
against in-distribution calibration scores (:func:`conformal_p`), flagged at ``p <= alpha``.

* **kNN** (Sun et al., ICML 2022): distance from a film's L2-normalised features to its k-th nearest
  L2-normalised training film. No density model, no Gaussian assumption: a film far from every
  training film scores high whichever direction it lies in.
* **Class-conditional Mahalanobis** (Lee et al., NeurIPS 2018): the smallest Mahalanobis distance to a
  class mean, with one covariance shared by the classes (sklearn's Ledoit-Wolf shrinkage: a few dozen
  films per class cannot estimate 2208 x 2208 otherwise). Computed in the low-rank form below, so a
  precision matrix of d x d is never held.
* **Energy** (Liu et al., NeurIPS 2020) of the head's logits: ``-logsumexp(logits)``.
* **Bonferroni min-p** (:func:`bonferroni_min`): the smaller of two conformal p-values, times two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows divided by their Euclidean norm (float64); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass(frozen=True)
class KnnScorer:
    """kNN distance on L2-normalised features: the k-th smallest distance to the stored training rows."""

    rows: np.ndarray  # (m, d) L2-normalised training rows
    k: int  # which neighbour's distance is the score (1 = the nearest)

    def scores(self, x: np.ndarray) -> np.ndarray:
        z = l2_normalise(x)
        rows = np.asarray(self.rows, dtype=np.float64)
        d2 = np.maximum(2.0 - 2.0 * (z @ rows.T), 0.0)  # |a - b|² of unit vectors
        k = min(max(self.k, 1), rows.shape[0])
        return np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])


def fit_knn(rows: np.ndarray, *, k: int, max_rows: int | None = None, seed: int = 0) -> KnnScorer:
    """A :class:`KnnScorer` over training rows (films, d); at most ``max_rows`` of them (seeded subset).

    The normalised rows are rounded through float16, as a reference stores them, so a film scores the
    same before and after the reference is saved."""
    rows = np.asarray(rows)
    if max_rows is not None and len(rows) > max_rows:  # picked before the float64 copy: the same rows
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False))]
    return KnnScorer(rows=l2_normalise(rows).astype(np.float16).astype(np.float64), k=int(k))


ScoreFn = Callable[[np.ndarray], np.ndarray]


def crossfit(x: np.ndarray, groups: np.ndarray, fit: Callable[[np.ndarray], ScoreFn], *,
             folds: int, fit_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Each row's score from a scorer fitted (``fit(rows)`` -> scoring function) without its own
    patients' fold (sklearn ``GroupKFold``): held out, a training film looks as new as a new film.
    ``fit_rows(indices)``: the rows a fold's scorer is fitted on (default ``x[indices]``; format 2 fits
    on every view of those films while ``x`` holds the view that is scored). Empty when there are fewer
    than two patients."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups, dtype=str)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        return np.zeros(0)
    out = np.empty(len(x), dtype=np.float64)
    for a, b in GroupKFold(n_splits=min(folds, n_groups)).split(x, groups=groups):
        out[b] = fit(x[a] if fit_rows is None else fit_rows(a))(x[b])
    return out


@dataclass(frozen=True)
class ClassMahalanobis:
    """min over classes of (x - mean_c)ᵀ Σ⁻¹ (x - mean_c), Σ = (1 - s) S + s μ I (Ledoit-Wolf).

    S is the pooled within-class covariance of n rows, of rank < n, so Σ⁻¹ is kept as the
    eigenvectors U of S (d x r) with Σ's eigenvalues there, plus 1 / (s μ) outside U's span.
    """

    means: np.ndarray  # (classes, d)
    basis: np.ndarray  # (r, d) eigenvectors of the pooled within-class covariance
    eigen: np.ndarray  # (r,) the shrunk covariance's eigenvalues along them
    floor: float  # the shrunk covariance's eigenvalue outside the basis (s μ)

    def scores(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        out = np.full(len(x), np.inf)
        for m in self.means:
            dx = x - m
            t = dx @ self.basis.T
            inside = (t**2 / self.eigen).sum(axis=1)
            outside = ((dx**2).sum(axis=1) - (t**2).sum(axis=1)) / self.floor
            out = np.minimum(out, inside + np.maximum(outside, 0.0))
        return out


def fit_class_mahalanobis(rows: np.ndarray, labels: np.ndarray) -> ClassMahalanobis:
    """Class means and one Ledoit-Wolf covariance of the class-centred rows (sklearn's shrinkage)."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    rows, labels = np.asarray(rows, dtype=np.float64), np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([rows[labels == c].mean(axis=0) for c in classes])
    centred = rows - means[np.searchsorted(classes, labels)]
    shrinkage = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
    n = len(centred)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    lam = sv**2 / n  # eigenvalues of S = centredᵀ centred / n
    mu = float((centred**2).sum() / n / centred.shape[1])  # trace(S) / d
    floor = max(shrinkage * mu, 1e-12)
    keep = lam > 1e-12 * max(float(lam.max(initial=0.0)), 1e-300)
    return ClassMahalanobis(means=means, basis=vt[keep], eigen=(1 - shrinkage) * lam[keep] + floor,
                            floor=floor)


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score of logits (n, classes): ``-logsumexp`` per row, larger = less like training."""
    from scipy.special import logsumexp

    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def conformal_p(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(1 + calibration scores >= s) / (n + 1) per score: P(p <= a) <= a for an exchangeable film."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    at_least = len(cal) - np.searchsorted(cal, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + at_least) / (len(cal) + 1.0)


def bonferroni_min(*p_values: np.ndarray) -> np.ndarray:
    """min(1, m · min_i p_i) of m p-values per film: still a valid p-value, whatever their dependence."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in p_values])
    return np.minimum(1.0, len(p_values) * stacked.min(axis=0))
