"""The shortcut audit: can the label be predicted from *where* or *how* a film was made?

In public COVID-19 data, COVID films and normal films mostly come from different collections, and a
model can score very well by recognising the collection (size, format, bit depth, borders, text
markers, age) instead of the disease (DeGrave et al., Nat. Mach. Intell. 2021; Roberts et al., Nat.
Mach. Intell. 2021). Three checks run at every retrain, on the training and validation images:

(a) **label × site**: a site holding a single label, or a label whose films all come from one site,
    and the AUROC obtainable from the site alone (each film scored by its site's label frequency);
(b) **metadata probe**: patient-grouped cross-validation predicting the label from acquisition
    metadata only (width, height, aspect, bit depth, format, file size, view, …) with gradient-boosted
    trees; an AUROC above the threshold means "the label is predictable from how the films were made";
(c) **site probe**: how well the site can be predicted from the cached embeddings (logistic
    regression, patient-grouped cross-validation): the backbone sees the site, so the head could too.

Pure functions over pandas frames and arrays (scikit-learn for the probes); the pipeline gathers the
data, the report shows the result. A flagged audit is a warning, or a block (``XRAY_SHORTCUT_POLICY``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

METADATA_COLUMNS = ("width", "height", "aspect", "bit_depth", "format", "file_bytes", "view")
MIN_PER_CLASS_FOR_PROBE = 4  # fewer images of a class: the probe is not run, and says so


def _binary_target(labels: pd.Series, negative_label: str) -> tuple[np.ndarray, str]:
    """1 for disease, 0 for the negative label (multi-class: any disease vs the negative label)."""
    return (labels != negative_label).to_numpy().astype(int), f"any disease vs {negative_label}"


def label_site_table(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts per site × label, sites holding a single label, labels coming from a single site."""
    table = pd.crosstab(frame["site"], frame["label"])
    single_label_sites = {site: str(row[row > 0].index[0]) for site, row in table.iterrows()
                          if (row > 0).sum() == 1 and len(table.columns) > 1}
    single_site_labels = {str(label): str(col[col > 0].index[0]) for label, col in table.items()
                          if (col > 0).sum() == 1 and len(table.index) > 1}
    return {"table": {str(site): {str(k): int(v) for k, v in row.items()} for site, row in table.iterrows()},
            "single_label_sites": single_label_sites, "single_site_labels": single_site_labels}


def site_only_auroc(frame: pd.DataFrame, negative_label: str) -> float | None:
    """AUROC of scoring each film by its site's disease frequency: what the site alone gives away."""
    from sklearn.metrics import roc_auc_score

    y, _ = _binary_target(frame["label"], negative_label)
    if len(set(y)) < 2 or frame["site"].nunique() < 2:
        return None
    score = frame.assign(y=y).groupby("site")["y"].transform("mean").to_numpy()
    return float(roc_auc_score(y, score))


def label_site_auroc(frame: pd.DataFrame, label: str) -> float | None:
    """AUROC of telling ``label`` from every other label by the site alone (each film scored by its
    site's share of ``label``): the number a sentence about *that* label must quote, where
    :func:`site_only_auroc` pools every disease against the negative label."""
    rest = f"not {label}"
    while rest in set(frame["label"]):  # a label literally named "not <label>"
        rest = f"not {rest}"
    return site_only_auroc(frame.assign(label=frame["label"].where(frame["label"] == label, rest)), rest)


def _grouped_cv_scores(x: np.ndarray, y: np.ndarray, groups: Sequence[str], model: Any, *, seed: int,
                       folds: int = 5) -> np.ndarray | None:
    """Out-of-fold probabilities from patient-grouped stratified k-fold (None when too few data).

    One thread each for OpenMP and BLAS: the audit fits small models (tens to thousands of rows), where
    thread start-up and spin-waiting cost more than they save, and on a busy host the gradient-boosted
    trees' OpenMP threads spun against other work (16 films: 1.1 s with the default threads, 0.14 s
    with one, load average 3.6 on 2 cores; identical out-of-fold scores)."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedGroupKFold
    from threadpoolctl import threadpool_limits

    counts = np.bincount(y)
    k = int(min(folds, counts[counts > 0].min(), len(set(groups))))
    if len(counts) < 2 or k < 2:
        return None
    oof = np.full(len(y), np.nan)
    with threadpool_limits(limits=1):
        for train, test in StratifiedGroupKFold(n_splits=k, shuffle=True,
                                                random_state=seed).split(x, y, groups):
            if len(set(y[train])) < 2:
                continue
            fitted = clone(model).fit(x[train], y[train])
            oof[test] = fitted.predict_proba(x[test])[:, 1]
    return oof


def metadata_probe(frame: pd.DataFrame, negative_label: str, *, seed: int = 0) -> dict[str, Any]:
    """Cross-validated AUROC of predicting the label from acquisition metadata alone."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    y, target = _binary_target(frame["label"], negative_label)
    columns = [c for c in METADATA_COLUMNS if c in frame and frame[c].notna().any()]
    if min(np.bincount(y, minlength=2)) < MIN_PER_CLASS_FOR_PROBE or not columns:
        return {"auroc": None, "target": target, "features": columns,
                "note": f"not run: needs at least {MIN_PER_CLASS_FOR_PROBE} images of each class and "
                        "some metadata"}
    x = pd.DataFrame({c: frame[c] for c in columns})
    categorical = [c for c in columns if not pd.api.types.is_numeric_dtype(x[c])]
    for c in categorical:
        x[c] = x[c].fillna("?").astype("category").cat.codes
    # Small leaves: audits run on tens to thousands of films, and the default (20) cannot split a small set.
    model = HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.1, random_state=seed,
                                           min_samples_leaf=max(2, min(20, len(y) // 10)),
                                           categorical_features=(
                                               [columns.index(c) for c in categorical] or None))
    oof = _grouped_cv_scores(x.to_numpy(dtype=np.float64), y, frame["patient"].tolist(), model, seed=seed)
    ok = oof is not None and not np.isnan(oof).all()
    auroc = float(roc_auc_score(y[~np.isnan(oof)], oof[~np.isnan(oof)])) if ok and oof is not None else None
    return {"auroc": auroc, "target": target, "features": columns, "n": int(len(y)),
            "note": None if ok else "not run: too few patients for grouped cross-validation"}


def site_probe(embeddings: np.ndarray, sites: Sequence[str], patients: Sequence[str], *,
               seed: int = 0) -> dict[str, Any]:
    """How well the embeddings tell the sites apart (one site vs the rest, the largest site as 'rest')."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = pd.Series(list(sites))
    if names.nunique() < 2:
        return {"auroc": None, "note": "one site only: nothing to tell apart"}
    largest = names.value_counts().index[0]
    y = (names != largest).to_numpy().astype(int)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    oof = _grouped_cv_scores(np.asarray(embeddings, dtype=np.float64), y, list(patients), model, seed=seed)
    if oof is None or np.isnan(oof).all():
        return {"auroc": None, "note": "not run: too few images or patients per site"}
    keep = ~np.isnan(oof)
    return {"auroc": float(roc_auc_score(y[keep], oof[keep])),
            "task": f"other sites vs {largest}", "note": None}


def shortcut_audit(frame: pd.DataFrame, embeddings: np.ndarray | None, *, negative_label: str,
                   auroc_threshold: float, seed: int = 0,
                   probe_rows: np.ndarray | None = None) -> dict[str, Any]:
    """All three checks and the warnings they raise, in plain words. ``frame`` has one row per image
    with ``label``, ``site``, ``patient`` and the metadata columns available.

    ``probe_rows``: positions in ``frame`` of the films the two probes use (``embeddings`` then has one
    row per such film), a subsample of a large split; recorded as ``probe_subsample``. None: every film."""
    sites = label_site_table(frame)
    by_site = site_only_auroc(frame, negative_label)
    probed = frame if probe_rows is None else frame.iloc[probe_rows].reset_index(drop=True)
    meta = metadata_probe(probed, negative_label, seed=seed)
    probe: dict[str, Any]
    probe = (site_probe(embeddings, probed["site"].tolist(), probed["patient"].tolist(), seed=seed)
             if embeddings is not None else {"auroc": None, "note": "no embeddings"})
    warnings = []
    for label, site in sites["single_site_labels"].items():
        if label != negative_label:
            own = label_site_auroc(frame, label)
            warnings.append(f"{label} films come only from site {site}: the label is predictable from the "
                            "site"
                            + (f" (AUROC {own:.2f} from the site alone, {label} against the rest)"
                               if own is not None else ""))
    for site, label in sites["single_label_sites"].items():
        warnings.append(f"site {site} holds only {label} films")
    if by_site is not None and by_site > auroc_threshold and not sites["single_site_labels"]:
        warnings.append(f"the label is predictable from the site alone (AUROC {by_site:.2f} > "
                        f"{auroc_threshold:.2f})")
    if meta["auroc"] is not None and meta["auroc"] > auroc_threshold:
        warnings.append("the label is predictable from how the films were made (metadata AUROC "
                        f"{meta['auroc']:.2f} > {auroc_threshold:.2f}; from {', '.join(meta['features'])})")
    if probe["auroc"] is not None and probe["auroc"] > auroc_threshold and warnings:
        warnings.append(f"the embeddings tell the sites apart (AUROC {probe['auroc']:.2f}), so the model can "
                        "use the site as a shortcut")
    out = {"flagged": bool(warnings), "warnings": warnings, "label_site": sites,
           "site_only_auroc": _f(by_site), "metadata_probe": meta, "site_probe": probe,
           "threshold": auroc_threshold}
    if probe_rows is not None:
        out["probe_subsample"] = {"films": int(len(probed)), "of": int(len(frame)),
                                  "stratified_by": "label x site", "seed": seed}
    return out


def _f(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)
