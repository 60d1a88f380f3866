"""Per-film out-of-distribution scores of references format 1 and 2, and the flag every format uses.

**The flag** (:class:`FlagRule`, :func:`flag_cut`): a film is out of distribution when its conformal
p-value among the reference's calibration scores is at most XRAY_OOD_ALPHA (0.05), or, when
XRAY_OOD_QUANTILE is set explicitly, the stricter alternative: its score is above that conformal
quantile. :func:`coarse_note` says when too few calibration films resolve the level. Format 3's score
(kNN, opt-in with XRAY_OOD_SCORE=knn; bench/ood.py found it tied with T² + Q) is in :mod:`.scores`.

The format-2 score (the default, XRAY_OOD_SCORE=t2q) is the classic PCA monitoring pair, summed so one
number ranks films:

* Hotelling's T² in the PCA space of the training features, divided by the number of components (a
  film that is extreme *along* the directions training varied in), plus
* the squared reconstruction residual (Q / SPE) divided by its training mean (a film that varies in
  directions training never did: another scanner, a border, a different body part).

Both parts are ~1 for a typical training film. Mahalanobis in the PCA space alone misses shifts
orthogonal to the kept components, which is exactly what a foreign collection produces, hence Q.

Two scorers share that form. Format-1 references (models saved before :class:`OodBasis`) score
features standardised per dimension by the head's normaliser (:func:`ood_scores`), and keep doing so.
From format 2 on, :class:`OodBasis` scores raw features centred and divided by *one* global scale, with
a Ledoit-Wolf (sklearn) precision for T². Per-dimension standardisation divides near-constant
dimensions by a tiny std, so noise there dominates Q and in-distribution scores get a long tail that
shifted films hide in (bench/drift.py's features and splits, 20 of them: shifted-site films above the
largest in-distribution score 70% standardised vs 100% with one scale; restyled real films 53% vs 97%).
Shrinkage steadies the smallest of k variances estimated from ~100-150 rows.

The threshold (format 2) is a split-conformal quantile (:func:`conformal_threshold`) of many
in-distribution scores: the validation films, scored by the model's basis, plus every training film
scored by a basis fitted without its own patients' fold (:func:`crossfit_scores`). A quantile of the
~20 validation films alone is really their maximum, and noisy. sklearn supplies PCA, Ledoit-Wolf and
the folds; the sums are a line of numpy each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ROWS_PER_COMPONENT = 4  # training rows per PCA component of the format-2 scorer, at least


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


MIN_AT_CUT = 5  # calibration films at or beyond the flag's cut for it to resolve alpha (else "coarse")


@dataclass(frozen=True)
class FlagRule:
    """When one film counts as out of distribution.

    By default ``ood_p <= alpha`` (XRAY_OOD_ALPHA): about ``alpha`` of in-distribution films are
    flagged. With ``quantile`` (XRAY_OOD_QUANTILE, only when set explicitly) the stricter alternative:
    a score above that conformal quantile of the calibration scores (at most ``1 - quantile`` flagged).
    """

    alpha: float = 0.05
    quantile: float | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> FlagRule:
        """XRAY_OOD_ALPHA, and XRAY_OOD_QUANTILE only if it was set (pydantic's ``model_fields_set``)."""
        explicit = "ood_quantile" in settings.model_fields_set
        return cls(alpha=float(settings.ood_alpha),
                   quantile=float(settings.ood_quantile) if explicit else None)

    def describe(self) -> str:
        if self.quantile is not None:
            return f"score above the {self.quantile:g} conformal quantile (XRAY_OOD_QUANTILE)"
        return f"conformal p <= {self.alpha:g}"


def flag_cut(calibration: np.ndarray, rule: FlagRule) -> tuple[float, int]:
    """(cut, rank) on the calibration scores: a film is flagged when its score is above ``cut``, the
    ``rank``-th smallest calibration score.

    ``ood_p <= alpha`` is exactly ``score > `` the (n + 1 - floor(alpha (n + 1)))-th smallest of the n
    calibration scores (p = (1 + #calibration >= score) / (n + 1)); when alpha (n + 1) < 1 no p-value
    reaches alpha and nothing is flagged (cut = inf). The quantile rule is :func:`conformal_threshold`.
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    n = len(cal)
    if rule.quantile is not None:
        return conformal_threshold(cal, rule.quantile)
    beyond = int(np.floor(rule.alpha * (n + 1) + 1e-9))  # calibration films with p <= alpha
    if beyond < 1:
        return float("inf"), n + 1
    return float(cal[n - beyond]), n + 1 - beyond


def coarse_note(n: int, rule: FlagRule) -> str | None:
    """Why the flag cannot resolve its level with ``n`` calibration films (None when it can).

    Conformal p-values move in steps of 1 / (n + 1): the cut rests on the floor(alpha (n + 1)) most
    unusual calibration films, and with fewer than MIN_AT_CUT of them it is little more than the
    largest calibration score (at alpha 0.05 that needs n >= 99)."""
    level = 1 - rule.quantile if rule.quantile is not None else rule.alpha
    beyond = int(np.floor(level * (n + 1) + 1e-9))
    if beyond >= MIN_AT_CUT:
        return None
    need = int(np.ceil(MIN_AT_CUT / level)) - 1
    if beyond < 1 and rule.quantile is not None:  # conformal_threshold caps its rank at the largest score
        why = "the cut is the largest calibration score"
    else:
        why = (f"no film can be flagged (the smallest p-value is 1/{n + 1})" if beyond < 1 else
               f"the cut rests on {beyond} calibration film{'s' if beyond != 1 else ''}")
    return (f"the flag is coarse: {n} calibration films resolve p-values in steps of 1/{n + 1}, so at "
            f"{level:g} {why}; {need} or more films make it reliable")


def ood_line(flagged: int, total: int, expected: float | None = None, rule: FlagRule | None = None,
             coarse: str | None = None) -> str:
    """The sentence predict, status and the reports print: the flagged count, and with ``rule`` how a
    film is flagged and how many of ``total`` in-distribution films would be (``expected``)."""
    line = f"{flagged} of {total} films look unlike this model's training data"
    if rule is not None:
        chance = f"; {expected:.1f} expected by chance" if expected is not None else ""
        line += f" ({rule.describe()}{chance})"
    return f"{line}; {coarse}" if coarse else line


@dataclass(frozen=True)
class OodBasis:
    """The per-film scorer of references built from format 2 on (see the module docstring).

    Raw backbone features are centred and divided by one global scale (the RMS of the per-dimension
    stds), so the backbone's own geometry is kept; T² uses a Ledoit-Wolf precision of the PCA coordinates.
    """

    centre: np.ndarray  # (d,) mean of the training rows
    scale: float  # RMS of the training rows' per-dimension std (one number, not one per dimension)
    components: np.ndarray  # (k, d) PCA basis of the scaled training rows
    location: np.ndarray  # (k,) Ledoit-Wolf location of the training rows' PCA coordinates
    precision: np.ndarray  # (k, k) Ledoit-Wolf precision of those coordinates
    residual_scale: float  # mean squared residual of training rows outside the basis

    def scores(self, x: np.ndarray) -> np.ndarray:
        """T²/k (shrunk) + Q / mean training Q per row of raw features (n x d); ~1 in distribution."""
        z = (np.asarray(x, dtype=np.float64) - self.centre) / self.scale
        t = z @ self.components.T
        q = ((z - t @ self.components) ** 2).sum(axis=1)
        dt = t - self.location
        t2 = np.einsum("ij,jk,ik->i", dt, self.precision, dt) / max(len(self.location), 1)
        return t2 + q / max(self.residual_scale, 1e-12)


def fit_basis(rows: np.ndarray, *, max_components: int, max_rows: int | None = None,
              seed: int = 0) -> OodBasis:
    """Fit an :class:`OodBasis` on training rows (films x views flattened, raw features); at most
    ``max_rows`` of them, a seeded random subset (a basis of a few directions needs no more).

    At most one component per ``ROWS_PER_COMPONENT`` rows: a basis with nearly as many components as
    rows reproduces its rows almost exactly, so their mean residual (Q's scale) is ~0 and every new
    film scores in the hundreds; with few films the cross-fitted folds would then set the threshold.
    """
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    rows = np.asarray(rows, dtype=np.float64)
    if max_rows is not None and len(rows) > max_rows:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False))]
    centre = rows.mean(axis=0)
    scale = float(np.sqrt(rows.var(axis=0).mean())) or 1.0
    z = (rows - centre) / scale
    k = max(1, min(max_components, len(z) // ROWS_PER_COMPONENT, z.shape[1]))
    components = PCA(n_components=k, random_state=seed).fit(z).components_.astype(np.float64)
    t = z @ components.T
    shrunk = LedoitWolf().fit(t)
    q = ((z - t @ components) ** 2).sum(axis=1)
    return OodBasis(centre=centre, scale=scale, components=components, location=shrunk.location_,
                    precision=shrunk.precision_, residual_scale=float(q.mean()) if q.mean() > 0 else 1.0)


def crossfit_scores(train_views: np.ndarray, train_eval: np.ndarray, groups: np.ndarray, *, folds: int,
                    max_components: int, max_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """Each training film's score against a basis fitted without its own patients' fold.

    ``train_views`` (n, K, d): the rows the basis is fitted on; ``train_eval`` (n, d): each film's eval
    view, scored as prediction scores films; ``groups``: patient ids (sklearn ``GroupKFold``). A film
    scored by a basis that saw it looks more typical than a new film would; held out, it does not.
    Empty when there are fewer than two patients.
    """
    from xray_core.monitor.scores import crossfit

    views = train_views.shape[1]

    def fold_rows(fit: np.ndarray) -> np.ndarray:
        if max_rows is not None and len(fit) * views > max_rows:
            # fit_basis's own seeded subset of the fold's flattened rows, picked before they are copied:
            # the same rows, without a copy of 4/5 of every training view (70,000 films: 2.5 GB)
            flat = np.sort(np.random.default_rng(seed).choice(len(fit) * views, size=max_rows, replace=False))
            return train_views[fit[flat // views], flat % views]
        return train_views[fit].reshape(-1, train_views.shape[-1])

    return crossfit(train_eval, groups,
                    lambda rows: fit_basis(rows, max_components=max_components, max_rows=max_rows,
                                           seed=seed).scores,
                    folds=folds, fit_rows=fold_rows)


def conformal_threshold(scores: np.ndarray, quantile: float) -> tuple[float, int]:
    """(threshold, its rank) from n in-distribution scores: the ceil((n + 1) q)-th smallest.

    For a new film exchangeable with the n, P(score > threshold) <= 1 - q (split-conformal). When
    n < q / (1 - q) that rank exceeds n and the largest score is used: the rate is then 1 / (n + 1).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        return float("inf"), 0
    rank = min(int(np.ceil((len(s) + 1) * quantile)), len(s))
    return float(s[rank - 1]), rank
