"""Per-film out-of-distribution score: how unlike the model's training films one film's features are.

The score is the classic PCA monitoring pair, summed so one number ranks films:

* Hotelling's T² in the PCA space of the standardised training features, divided by the number of
  components (a film that is extreme *along* the directions training varied in), plus
* the squared reconstruction residual (Q / SPE) divided by its training mean (a film that varies in
  directions training never did: another scanner, a border, a different body part).

Both parts are ~1 for a typical training film. Mahalanobis in the PCA space alone misses shifts
orthogonal to the kept components, which is exactly what a foreign collection produces, hence Q.
sklearn's PCA supplies the basis; the two sums are one line of numpy each, so nothing hand-written
beyond them. The threshold is a quantile of the validation films' scores (XRAY_OOD_QUANTILE), so about
``1 - quantile`` of in-distribution films are flagged by construction.
"""

from __future__ import annotations

import numpy as np


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The head's own normalisation: ``(x - mean) / std`` per dimension, float64."""
    return (np.asarray(x, dtype=np.float64) - mean) / std


def project(z: np.ndarray, pca_mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Coordinates of standardised rows in the PCA basis (n x k)."""
    return (z - pca_mean) @ components.T


def ood_parts(z: np.ndarray, pca_mean: np.ndarray, components: np.ndarray,
              variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T² / k, raw squared residual) of standardised rows ``z``."""
    t = project(z, pca_mean, components)
    t2 = (t**2 / np.maximum(variance, 1e-12)).sum(axis=1) / max(len(variance), 1)
    residual = (z - pca_mean) - t @ components
    return t2, (residual**2).sum(axis=1)


def ood_scores(z: np.ndarray, pca_mean: np.ndarray, components: np.ndarray, variance: np.ndarray,
               residual_scale: float) -> np.ndarray:
    """One score per row: T²/k + Q/mean training Q (both ~1 in distribution; larger is stranger)."""
    t2, q = ood_parts(z, pca_mean, components, variance)
    return t2 + q / max(residual_scale, 1e-12)


def calibrate_threshold(val_scores: np.ndarray, quantile: float) -> float:
    """The score below which ``quantile`` of the model's own validation films fall."""
    if len(val_scores) == 0:
        return float("inf")
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), quantile, method="higher"))


def summary_line(flagged: int, total: int) -> str:
    """The sentence predict, status and the reports print."""
    return f"{flagged} of {total} films look unlike this model's training data"
