"""A model's reference: a compact summary of the features its head was trained on, saved beside it.

Built in ``train_step`` from the training films' eval-view features (view 0) and the validation
films, standardised by the head's own normaliser, and saved as ``models/<v>/reference.safetensors``
(sha256 in the card and verified on load, like the head). It holds:

* the per-dimension mean/std (the head's normaliser) and a PCA basis (sklearn, up to 32 components)
  with the mean training residual, for the per-film OOD score (:mod:`xray_core.monitor.ood`);
* a seeded random sample of at most 256 standardised feature rows (float16) with a patient group per
  row, for the batch drift test (:mod:`xray_core.monitor.drift`). The rows are *validation* films:
  training rows sit closer to a PCA basis fitted on them than any new film does, so a batch test
  against them would flag every batch; validation films are held out from the head and the basis,
  exactly like films met in use;
* the validation films' calibrated probabilities, labels and OOD scores, for the KS and BBSE tests;
* the site of each validation film and so of each drift-sample row (``val_sites``/``sample_sites``: an
  index into the site names kept in the file's metadata), so a per-site check compares a site's new
  films with that site's validation films (:meth:`Reference.for_site`): one site differs from a mix of
  sites by construction. A file saved before sites were recorded lacks both and loads with ``sites``
  empty; readers before them ignore both;
* the per-film scorer and its calibration scores: the validation films plus each training film scored
  without its own patients' fold, the split-conformal threshold at XRAY_OOD_QUANTILE and how it was
  calibrated (how many films of each). XRAY_OOD_SCORE picks the scorer: ``t2q`` (the default), format
  2: T² + Q on globally scaled features (:class:`xray_core.monitor.ood.OodBasis`); ``knn``, format 3:
  kNN distance on L2-normalised features (:class:`xray_core.monitor.scores.KnnScorer`, k = KNN_K, at
  most MAX_KNN_ROWS training films stored as float16). ``bench/ood.py`` found them tied on a real
  foreign site; T² + Q stores no training films (docs/monitoring.md).

A format-1 file (saved before the scorer) has no basis: it scores as it always did (standardised
T² + Q, threshold = a quantile of the validation scores) and its validation scores are its calibration.
Every format flags the same way (:meth:`Reference.flags`: ``ood_p <= XRAY_OOD_ALPHA`` by default).

Prediction needs nothing else: no catalogue access. A model saved before references existed has none;
its OOD status is then "unknown", never a guess.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from xray_core.errors import CheckpointError
from xray_core.monitor.ood import (
    FlagRule,
    OodBasis,
    coarse_note,
    conformal_threshold,
    crossfit_scores,
    fit_basis,
    flag_cut,
    ood_parts,
    ood_scores,
    standardise,
)
from xray_core.monitor.scores import KnnScorer, conformal_p, crossfit, fit_knn

REFERENCE_FILE = "reference.safetensors"
MAX_COMPONENTS = 32  # enough for the few directions a frozen backbone's features vary in; small on disk
MAX_BASIS_ROWS = 4096  # training rows (films x views) the PCA basis is fitted on, at most
MAX_SAMPLE = 256  # rows kept for the drift test: ~1 MB as float16 at 2208 dimensions
CROSSFIT_FOLDS = 5  # patient folds for the training films' calibration scores
KNN_K = 1  # the nearest training film's distance: bench/ood.py's best k of 1, 5, 10, 20 at 64 and 224 px
OOD_SCORES = ("t2q", "knn")  # XRAY_OOD_SCORE: format 2 (T² + Q, the default) or format 3 (kNN)
MAX_KNN_ROWS = 2048  # training films kept for the kNN score: ~9 MB as float16 at 2208 dimensions


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (safetensors bytes) with its header in one order: metadata keys sorted, tensors by offset.

    safetensors keeps the metadata in a Rust HashMap and writes its keys in a per-map random order, so the
    same arrays and metadata gave different bytes (and a different sha256 on the card) from call to call.
    Only the header's JSON is rewritten (padded to 8 bytes, as safetensors pads it); the data is untouched
    and the file is a plain safetensors file, read as before."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
    if meta is not None:
        ordered = {"__metadata__": dict(sorted(meta.items())), **ordered}
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


@dataclass(frozen=True)
class Reference:
    mean: np.ndarray  # (d,) the head's feature mean
    std: np.ndarray  # (d,) the head's feature std
    pca_mean: np.ndarray  # (d,) mean of the standardised training rows
    components: np.ndarray  # (k, d) PCA basis of the standardised training rows
    variance: np.ndarray  # (k,) variance along each component
    residual_scale: float  # mean squared residual of training rows outside the basis
    sample: np.ndarray  # (m, d) standardised validation rows (held out from the basis), m <= 256
    sample_groups: np.ndarray  # (m,) patient group of each sample row (an index, not an id)
    val_probs: np.ndarray  # (n_val, classes) calibrated validation probabilities
    val_labels: np.ndarray  # (n_val,) validation label indices
    val_scores: np.ndarray  # (n_val,) OOD scores of the validation films
    threshold: float  # OOD score above which a film is out of distribution
    quantile: float  # XRAY_OOD_QUANTILE the threshold was calibrated with
    basis: OodBasis | None = None  # the per-film scorer of format 2; None with knn None: format 1
    cal_scores: np.ndarray | None = None  # (n_cal,) in-distribution scores the threshold is a quantile of
    calibration: dict[str, Any] = field(default_factory=dict)  # how: method, n films, folds
    knn: KnnScorer | None = None  # the per-film scorer of format 3
    sites: tuple[str, ...] = ()  # site names (empty: saved before sites were recorded)
    val_sites: np.ndarray | None = None  # (n_val,) index into ``sites`` of each validation film
    sample_sites: np.ndarray | None = None  # (m,) index into ``sites`` of each drift-sample row
    site: str | None = None  # set by ``for_site``: the one site this reference holds the films of

    @property
    def format(self) -> int:
        return 3 if self.knn is not None else 2 if self.basis is not None else 1

    @property
    def calibration_scores(self) -> np.ndarray:
        """The scores the threshold was calibrated on (format 1: the validation films')."""
        return self.val_scores if self.cal_scores is None else self.cal_scores

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-value of each score: (1 + calibration scores >= it) / (n + 1).

        For a film exchangeable with the in-distribution calibration films, P(p <= a) <= a at every
        level a, so p-values grade the evidence where the flag at ``threshold`` is one cut: with ~70
        calibration films the 0.99 flag is "above every one of them", which one odd in-distribution
        film can push out of reach of a whole foreign site (the demo's adult films: 0 of 42 flagged,
        22 with p <= 0.05 against 1.7 expected).
        """
        return conformal_p(self.calibration_scores, scores)

    def cut(self, rule: FlagRule) -> tuple[float, int]:
        """(score above which a film is flagged, its rank among the calibration scores) under ``rule``.
        The quantile the reference was built with keeps its stored threshold (format 1's: not conformal)."""
        if rule.quantile is not None and rule.quantile == self.quantile:
            cal = np.asarray(self.calibration_scores)
            return self.threshold, int((cal <= self.threshold).sum())
        return flag_cut(self.calibration_scores, rule)

    def flags(self, scores: np.ndarray, rule: FlagRule) -> np.ndarray:
        """Out of distribution under ``rule``, per film (by default exactly ``p_values(scores) <= alpha``)."""
        return np.asarray(scores, dtype=np.float64) > self.cut(rule)[0]

    def flag_rate(self, rule: FlagRule) -> float:
        """The fraction of in-distribution films ``rule`` flags (exchangeable films; at most its level)."""
        n = len(self.calibration_scores)
        return float(min(n + 1 - self.cut(rule)[1], n) / (n + 1)) if n else 0.0

    def coarse(self, rule: FlagRule) -> str | None:
        """Why the calibration set is too small to resolve ``rule``'s level, or None."""
        return coarse_note(len(self.calibration_scores), rule)

    def ood_counts(self, scores: np.ndarray, rule: FlagRule) -> tuple[int, float]:
        """(films flagged, how many of them are expected by chance) for a batch's scores: the numbers of
        every OOD summary line."""
        scores = np.asarray(scores, dtype=np.float64)
        return int(self.flags(scores, rule).sum()), self.flag_rate(rule) * len(scores)

    def p_value_rate(self, level: float) -> float:
        """P(p <= level) for an in-distribution film: floor(level (n + 1)) / (n + 1), at most ``level``
        (p-values take the values k / (n + 1) only)."""
        n = len(self.calibration_scores)
        return float(np.floor(level * (n + 1)) / (n + 1))

    def site_rows(self, site: str) -> int | None:
        """Drift-sample rows of ``site`` (0: none of the validation films came from it); None: the
        reference records no sites."""
        if self.sample_sites is None or not self.sites:
            return None
        return int((self.sample_sites == self.sites.index(site)).sum()) if site in self.sites else 0

    def for_site(self, site: str) -> Reference:
        """This reference restricted to ``site``'s validation films: their drift-sample rows, probabilities,
        labels and OOD scores (the MMD, KS, BBSE and OOD-excess tests' side). The per-film flag (scorer,
        calibration, cut) stays the pooled one."""
        if self.sample_sites is None or self.val_sites is None or site not in self.sites:
            raise ValueError(f"the reference holds no validation films of site {site!r}")
        i = self.sites.index(site)
        s, v = self.sample_sites == i, self.val_sites == i
        return replace(self, sample=self.sample[s], sample_groups=self.sample_groups[s],
                       sample_sites=self.sample_sites[s], val_sites=self.val_sites[v],
                       val_probs=self.val_probs[v], val_labels=self.val_labels[v],
                       val_scores=self.val_scores[v], cal_scores=self.calibration_scores, site=site)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return standardise(x, self.mean, self.std)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """OOD scores of raw backbone features (n x d)."""
        if self.knn is not None:
            return self.knn.scores(x)
        if self.basis is not None:
            return self.basis.scores(x)
        return ood_scores(self.standardise(x), self.pca_mean, self.components,
                          self.variance, self.residual_scale)

    def embed_for_drift(self, z: np.ndarray) -> np.ndarray:
        """Standardised rows → PCA coordinates plus the scaled residual: the space the batch test compares
        in."""
        t2, q = ood_parts(z, self.pca_mean, self.components, self.variance)
        coords = (z - self.pca_mean) @ self.components.T / np.sqrt(np.maximum(self.variance, 1e-12))
        return np.column_stack([coords, np.sqrt(q / max(self.residual_scale, 1e-12))])

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        arrays = {k: np.ascontiguousarray(v) for k, v in {
            "mean": self.mean.astype(np.float64), "std": self.std.astype(np.float64),
            "pca_mean": self.pca_mean.astype(np.float64), "components": self.components.astype(np.float64),
            "variance": self.variance.astype(np.float64), "residual_scale": np.array([self.residual_scale]),
            "sample": self.sample.astype(np.float16), "sample_groups": self.sample_groups.astype(np.int64),
            "val_probs": self.val_probs.astype(np.float32), "val_labels": self.val_labels.astype(np.int64),
            "val_scores": self.val_scores.astype(np.float64), "threshold": np.array([self.threshold]),
            "quantile": np.array([self.quantile])}.items()}
        sites: dict[str, str] = {}
        if self.sites and self.val_sites is not None and self.sample_sites is not None:
            arrays["val_sites"] = np.ascontiguousarray(self.val_sites, dtype=np.int64)
            arrays["sample_sites"] = np.ascontiguousarray(self.sample_sites, dtype=np.int64)
            sites["sites"] = json.dumps(list(self.sites))
        if self.format == 1:
            return canonical_safetensors(save(arrays, metadata={"format": "xray-reference/1", **sites}))
        arrays["cal_scores"] = np.ascontiguousarray(self.calibration_scores, dtype=np.float64)
        if self.knn is not None:
            arrays["ood_knn_rows"] = np.ascontiguousarray(self.knn.rows, dtype=np.float16)
            arrays["ood_knn_k"] = np.array([self.knn.k], dtype=np.int64)
        if self.basis is not None:
            b = self.basis
            arrays.update({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in {
                "ood_centre": b.centre, "ood_scale": np.array([b.scale]), "ood_components": b.components,
                "ood_location": b.location, "ood_precision": b.precision,
                "ood_residual_scale": np.array([b.residual_scale])}.items()})
        metadata = {"format": f"xray-reference/{self.format}", "calibration": json.dumps(self.calibration),
                    **sites}
        return canonical_safetensors(save(arrays, metadata=metadata))

    @classmethod
    def from_bytes(cls, data: bytes) -> Reference:
        from safetensors.numpy import load

        try:
            a = load(data)
            basis, knn, cal_scores, calibration = None, None, None, {}
            if "ood_components" in a:  # format 2
                basis = OodBasis(centre=a["ood_centre"], scale=float(a["ood_scale"][0]),
                                 components=a["ood_components"], location=a["ood_location"],
                                 precision=a["ood_precision"],
                                 residual_scale=float(a["ood_residual_scale"][0]))
            if "ood_knn_rows" in a:  # format 3
                knn = KnnScorer(rows=a["ood_knn_rows"].astype(np.float64), k=int(a["ood_knn_k"][0]))
            if "cal_scores" in a:
                cal_scores, calibration = (a["cal_scores"],
                                           json.loads(_metadata(data).get("calibration", "{}")))
            sites: tuple[str, ...] = ()
            if "sample_sites" in a:  # recorded since per-site drift checks
                sites = tuple(str(n) for n in json.loads(_metadata(data)["sites"]))
            return cls(mean=a["mean"].astype(np.float64), std=a["std"].astype(np.float64),
                       pca_mean=a["pca_mean"].astype(np.float64),
                       components=a["components"].astype(np.float64), variance=a["variance"],
                       residual_scale=float(a["residual_scale"][0]), sample=a["sample"].astype(np.float64),
                       sample_groups=a["sample_groups"], val_probs=a["val_probs"].astype(np.float64),
                       val_labels=a["val_labels"], val_scores=a["val_scores"],
                       threshold=float(a["threshold"][0]), quantile=float(a["quantile"][0]),
                       basis=basis, cal_scores=cal_scores, calibration=calibration, knn=knn,
                       sites=sites, val_sites=a.get("val_sites"), sample_sites=a.get("sample_sites"))
        except Exception as exc:  # noqa: BLE001 - any parse problem is one kind of error here
            raise CheckpointError(f"{REFERENCE_FILE} is not a readable reference "
                                  f"({type(exc).__name__}: {exc})") from None

    def describe(self) -> dict[str, Any]:
        """What the card records about the reference (numbers, not arrays)."""
        score = ("T² + Q (XRAY_OOD_SCORE=t2q): T²/k (Ledoit-Wolf) in the PCA space of globally scaled "
                 "features + Q/mean training Q (xray_core.monitor.ood)" if self.basis is not None else
                 "T² + Q (format 1): T²/k in the PCA space + Q/mean training Q (xray_core.monitor.ood)")
        if self.knn is not None:
            score = (f"kNN (XRAY_OOD_SCORE=knn): distance to the {self.knn.k}-th nearest of "
                     f"{len(self.knn.rows)} training films, L2-normalised features "
                     "(xray_core.monitor.scores)")
        return {"file": REFERENCE_FILE, "format": self.format, "components": int(len(self.variance)),
                "sample_rows": int(len(self.sample)), "n_val": int(len(self.val_scores)),
                "ood_threshold": self.threshold, "ood_quantile": self.quantile,
                "ood_score": score,
                "ood_calibration": self.calibration or {"method": "quantile of the validation scores",
                                                        "n": int(len(self.val_scores))}}


def build_reference(x_train: np.ndarray, x_val: np.ndarray, val_groups: np.ndarray, val_probs: np.ndarray,
                    val_labels: np.ndarray, *, mean: np.ndarray, std: np.ndarray, quantile: float,
                    seed: int = 0, train_eval: np.ndarray | None = None,
                    train_groups: np.ndarray | None = None, score: str = "t2q",
                    val_sites: Sequence[str] | None = None) -> Reference:
    """Summarise features for OOD and drift checks.

    ``score`` (XRAY_OOD_SCORE, passed by the caller): ``"t2q"`` builds format 2, ``"knn"`` format 3.
    ``x_train``: the training rows the head saw, (films, views, d) or already flattened (rows, d); the
    drift test's PCA basis and the T² + Q basis come from them. ``x_val``: the validation films' eval view
    (one row per film), the drift sample and part of the OOD calibration. ``train_eval`` (films, d) and
    ``train_groups`` (patient ids): each training film's eval view, scored cross-fitted for the rest of
    the calibration (t2q: only with a 3-D ``x_train``, whose fold rows fit each basis; without them the
    validation films alone calibrate the flag); for knn also the scorer's rows (else ``x_train``'s).
    ``mean``/``std`` are the head's own normaliser, so the drift test sees features as the head does.
    ``val_groups`` are patient ids: sample rows keep a group index so the drift test permutes whole
    patients. ``val_sites``: each validation film's site (None: not recorded), kept per sample row for
    the per-site checks; the sample itself does not depend on them. ``seed``: a reproducible sample
    (local RNG).
    """
    from sklearn.decomposition import PCA

    if score not in OOD_SCORES:
        raise ValueError(f"unknown OOD score {score!r}: one of {', '.join(OOD_SCORES)}")
    films = np.asarray(x_train) if np.ndim(x_train) == 3 else None
    d = np.shape(x_train)[-1]
    knn_rows = np.asarray(train_eval if train_eval is not None else x_train).reshape(-1, d)
    x_train = np.asarray(x_train).reshape(-1, np.shape(x_train)[-1])
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if len(x_train) > MAX_BASIS_ROWS:  # the basis of a few directions needs no more rows than this
        x_train = x_train[np.sort(rng.choice(len(x_train), size=MAX_BASIS_ROWS, replace=False))]
    z = standardise(x_train, mean, std)
    k = max(1, min(MAX_COMPONENTS, len(z) - 1, z.shape[1]))
    pca = PCA(n_components=k, svd_solver="auto", random_state=seed).fit(z)
    components, variance = pca.components_.astype(np.float64), pca.explained_variance_.astype(np.float64)
    _, q = ood_parts(z, pca.mean_, components, variance)
    residual_scale = float(q.mean()) if len(q) and q.mean() > 0 else 1.0
    z_val = standardise(x_val, mean, std)
    pick = np.sort(rng.choice(len(z_val), size=min(MAX_SAMPLE, len(z_val)), replace=False))
    _, group_index = np.unique(np.asarray(val_groups, dtype=str), return_inverse=True)
    site_names, site_index = (np.unique(np.asarray(val_sites, dtype=str), return_inverse=True)
                              if val_sites is not None else (np.zeros(0, dtype=str), None))
    if site_index is not None and len(site_index) != len(z_val):
        raise ValueError(f"{len(site_index)} validation sites for {len(z_val)} validation films")
    basis, knn, cross = None, None, np.zeros(0)
    if score == "knn":
        def fit(rows: np.ndarray) -> Any:
            return fit_knn(rows, k=KNN_K, max_rows=MAX_KNN_ROWS, seed=seed).scores

        knn = fit_knn(knn_rows, k=KNN_K, max_rows=MAX_KNN_ROWS, seed=seed)
        val_scores = knn.scores(x_val)
        if train_eval is not None and train_groups is not None:
            cross = crossfit(np.asarray(train_eval), np.asarray(train_groups), fit, folds=CROSSFIT_FOLDS)
    else:
        basis = fit_basis(x_train, max_components=MAX_COMPONENTS, seed=seed)
        val_scores = basis.scores(x_val)
        if films is not None and train_eval is not None and train_groups is not None:
            cross = crossfit_scores(films, np.asarray(train_eval), np.asarray(train_groups),
                                    folds=CROSSFIT_FOLDS, max_components=MAX_COMPONENTS,
                                    max_rows=MAX_BASIS_ROWS, seed=seed)
    cal_scores = np.concatenate([val_scores, cross])
    threshold, rank = conformal_threshold(cal_scores, quantile)
    calibration = {"method": "split-conformal quantile: validation films + training films cross-fitted "
                             "by patient fold", "score": score,
                   "n": int(len(cal_scores)), "n_val": int(len(val_scores)),
                   "n_train_crossfit": int(len(cross)),
                   "folds": CROSSFIT_FOLDS if len(cross) else 0, "rank": rank,
                   "expected_flag_rate": round((len(cal_scores) + 1 - rank) / (len(cal_scores) + 1), 6)}
    return Reference(mean=mean, std=std, pca_mean=pca.mean_.astype(np.float64), components=components,
                     variance=variance, residual_scale=residual_scale, sample=z_val[pick],
                     sample_groups=group_index[pick].astype(np.int64),
                     val_probs=np.asarray(val_probs, np.float64), val_labels=np.asarray(val_labels, np.int64),
                     val_scores=val_scores, threshold=threshold, quantile=float(quantile), basis=basis,
                     knn=knn, cal_scores=cal_scores, calibration=calibration,
                     sites=tuple(str(n) for n in site_names),
                     val_sites=None if site_index is None else site_index.astype(np.int64),
                     sample_sites=None if site_index is None else site_index[pick].astype(np.int64))


def _metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (its header: 8-byte little-endian length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {})


def model_reference(model: Any) -> Reference | None:
    """The reference of a loaded model (its bytes were sha256-verified by ``load_model``), or None."""
    data = getattr(model, "files", {}).get(REFERENCE_FILE)
    return None if data is None else Reference.from_bytes(data)
