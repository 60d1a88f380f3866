"""What the HTML run report plots: ROC points and reliability bins of champion and challenger on the
same test set, the same ROC points per site (pooled curves can hide a collapse on one collection),
and a few test images with the challenger's Grad-CAM overlays.

The probabilities are the ones each evaluation carries (computed once, by the evaluation step), so the
curves are of exactly the numbers the decision was made on (a champion from an older backbone was
scored with its own backbone there). Confusion matrices and intervals are not
recomputed here: they are in the evaluation results the report already has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xray_core.data.snapshot import Row, SplitData
from xray_core.results import Evaluation
from xray_core.settings import Settings

RELIABILITY_BINS = 10  # the same equal-width bins as the ECE in metrics.compute_metrics
# ROC points drawn per curve, at most: a point every 1/1000 of the curve's length (fpr + tpr steps, at most
# 2), well under a pixel of the report's ~400 px panels; 15,000 test films gave 15,000 points per curve
ROC_MAX_POINTS = 2000


@dataclass(frozen=True)
class ModelCurves:
    version: int
    role: str  # "challenger" or "champion"
    labels: list[str]
    n: int  # test images scored (those whose label the model knows)
    roc: dict[str, dict[str, Any]]  # class -> {"fpr": [...], "tpr": [...], "auroc": float}; one-vs-rest
    reliability: list[dict[str, Any]]  # bins of the argmax confidence: lo, hi, count, confidence, accuracy


@dataclass(frozen=True)
class SiteCurves:
    """One model's ROC points on one site's test images (the site each evaluation recorded per row)."""

    site: str
    version: int
    role: str  # "challenger" or "champion"
    labels: list[str]
    n: int  # test images of this site scored by this model
    counts: dict[str, int]  # images per label on this site
    roc: dict[str, dict[str, Any]]  # class -> {"fpr", "tpr", "auroc"}; absent when the site lacks one side


@dataclass(frozen=True)
class ExampleHeatmap:
    sha256: str
    true_label: str
    predicted_label: str
    probability: float  # the challenger's probability of its predicted label
    version: int
    png: bytes  # Grad-CAM overlay of the predicted class, at the original image's size
    ood_p: float | None = None  # conformal OOD p-value against the challenger's reference (None: unknown)
    out_of_distribution: bool | None = None  # flagged by XRAY_OOD_ALPHA's rule (None: no reference)


@dataclass(frozen=True)
class ReportData:
    curves: list[ModelCurves]  # challenger first, then the champion (if any)
    examples: list[ExampleHeatmap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be drawn, and why
    site_curves: list[SiteCurves] = field(default_factory=list)  # by site (sorted), challenger then champion


def roc_curve(y_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC points (false-positive rate, true-positive rate) from (0, 0) to (1, 1).

    One point per distinct score (tied scores move both rates at once, so the area under these
    points equals the Mann-Whitney AUROC of ``metrics.auroc``). None when one class is absent.
    """
    counts = _roc_counts(y_binary, score)
    if counts is None:
        return None
    fp, tp = counts
    return fp / fp[-1], tp / tp[-1]


def _roc_counts(y_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Cumulative (false, true) positive counts from (0, 0), one point per distinct score."""
    y = np.asarray(y_binary, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if y.all() or not y.any():
        return None
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    return np.r_[0, np.cumsum(~y)[last_of_tie]], np.r_[0, np.cumsum(y)[last_of_tie]]


def drawn_roc(y_binary: np.ndarray, score: np.ndarray, *,
              max_points: int = ROC_MAX_POINTS) -> tuple[np.ndarray, np.ndarray] | None:
    """The ROC points a report draws: :func:`roc_curve`'s without the points inside a straight run
    (scikit-learn's ``drop_intermediate``: on the integer counts, so exactly the collinear ones; every
    corner stays), then, above ``max_points``, the first point of each 1/(max_points/2 - 1) of the curve's
    length (fpr + tpr: the curve is monotone, at most 2 long) and the last: every corner is then within
    that distance of a kept point, under a pixel of the drawing. Only the drawing uses these; areas
    (AUROC) come from every point. None when one class is absent."""
    counts = _roc_counts(y_binary, score)
    return None if counts is None else _drawn(*counts, max_points=max_points)


def _drawn(fp: np.ndarray, tp: np.ndarray, *, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`drawn_roc` from the cumulative counts of :func:`_roc_counts`."""
    corner = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
    fpr, tpr = fp[corner] / fp[-1], tp[corner] / tp[-1]
    if len(fpr) > max_points:
        length = np.r_[0.0, np.cumsum(np.diff(fpr) + np.diff(tpr))]
        step = 2.0 / (max_points // 2 * 2 - 2)
        first = np.r_[True, np.diff(np.floor(length / step)) > 0]
        first[-1] = True
        fpr, tpr = fpr[first], tpr[first]
    return fpr, tpr


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = RELIABILITY_BINS) -> list[dict[str, Any]]:
    """Reliability diagram data for the argmax prediction: per equal-width confidence bin, the number
    of images, their mean confidence and their accuracy (None for empty bins). Matches the ECE's bins.
    """
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(y)
    which = np.clip((conf * bins).astype(np.int64), 0, bins - 1)
    out = []
    for b in range(bins):
        in_bin = which == b
        count = int(in_bin.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": count,
                    "confidence": float(conf[in_bin].mean()) if count else None,
                    "accuracy": float(correct[in_bin].mean()) if count else None})
    return out


def _roc_by_class(labels: list[str], y: np.ndarray, probs: np.ndarray) -> dict[str, dict[str, Any]]:
    roc = {}
    for c, label in enumerate(labels):
        counts = _roc_counts(y == c, probs[:, c])  # sorted once: the area of every point, the drawing thinned
        if counts is not None:
            fp, tp = counts
            drawn = _drawn(fp, tp, max_points=ROC_MAX_POINTS)
            roc[label] = {"fpr": drawn[0].tolist(), "tpr": drawn[1].tolist(),
                          "auroc": float(np.trapezoid(tp / tp[-1], fp / fp[-1]))}
    return roc


def _curves(version: int, role: str, labels: list[str], y: np.ndarray, probs: np.ndarray) -> ModelCurves:
    return ModelCurves(version=version, role=role, labels=labels, n=int(y.size),
                       roc=_roc_by_class(labels, y, probs), reliability=reliability_bins(probs, y))


def site_curves(version: int, role: str, labels: list[str], y: np.ndarray, probs: np.ndarray,
                sites: list[str | None]) -> list[SiteCurves]:
    """ROC points of one model per site, sorted by site name; films of unknown site form one group.

    ``sites`` is the evaluation's per-row site, aligned with ``y`` and ``probs`` (the evaluation step
    records both in the same order), so these are exactly the slices the per-site guardrail judged.
    """
    from xray_core.evaluate.slices import slice_name

    names = np.array([slice_name(s) for s in sites], dtype=object)
    out = []
    for site in sorted(set(names.tolist())):
        keep = names == site
        out.append(SiteCurves(site=site, version=version, role=role, labels=labels, n=int(keep.sum()),
                              counts={label: int((y[keep] == c).sum()) for c, label in enumerate(labels)},
                              roc=_roc_by_class(labels, y[keep], probs[keep])))
    return out


def _example_rows(rows: list[Row], y: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` test images, taking each true label in turn (by sha256 within a label): deterministic."""
    by_label: dict[int, list[int]] = {}
    for i in sorted(range(len(rows)), key=lambda i: rows[i].sha256):
        by_label.setdefault(int(y[i]), []).append(i)
    picked: list[int] = []
    queues = [by_label[k] for k in sorted(by_label)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def collect_report_data(settings: Settings, data: SplitData, *, challenger: Evaluation,
                        champion: Evaluation | None, n_examples: int = 4) -> ReportData:
    """Curves of both models on the run's test split (``data``: its frozen SplitData) and up to
    ``n_examples`` test images with the challenger's Grad-CAM overlays.

    ``challenger``/``champion`` are the run's evaluations: their test probabilities travel with them,
    so no test feature is read again here, except the examples' own (view 0, cached by the embed step),
    to mark the ones the challenger's reference flags as out of distribution.
    """
    from xray_core.data.images import decode_stored
    from xray_core.evaluate.metrics import positive_index, predict_labels
    from xray_core.io.storage import get_storage
    from xray_core.model.backbone import load_backbone
    from xray_core.model.heatmap import gradcam_batch, heatmap_caption, overlay_png
    from xray_core.registry.versions import load_model

    curves: list[ModelCurves] = []
    notes: list[str] = []
    examples: list[ExampleHeatmap] = []
    by_site: list[SiteCurves] = []
    for evaluation, role in ((challenger, "challenger"), (champion, "champion")):
        if evaluation is None:
            continue
        version = evaluation.version
        model_labels = list(evaluation.labels)
        rows = [r for r in data.test if r.label in model_labels]
        probs = np.asarray(evaluation.probabilities, dtype=np.float64)
        index = {label: i for i, label in enumerate(model_labels)}
        y = np.array([index[r.label] for r in rows], dtype=np.int64)
        curves.append(_curves(version, role, model_labels, y, probs))
        sites = evaluation.sites
        if len(sites) == len(y):
            by_site += site_curves(version, role, model_labels, y, probs, list(sites))
        elif sites:  # none recorded (an evaluation from before sites were): no panels, nothing to say
            notes.append(f"no per-site curves for v{version}: its evaluation lists {len(sites)} sites "
                         f"for {len(y)} test images")
        if role != "challenger" or n_examples <= 0 or not rows:
            continue
        model = load_model(settings, version)
        backbone = load_backbone(settings)
        if model.card["backbone_fingerprint"] != backbone.fingerprint:
            notes.append(f"no heatmaps: model v{version} was trained on another backbone")
            continue
        labels = model.labels
        pos = positive_index(labels, settings.negative_label) if len(labels) == 2 else None
        preds = predict_labels(probs, threshold=model.threshold, positive_index=pos)
        picked = _example_rows(rows, y, n_examples)
        store = get_storage(settings)
        grays = [decode_stored(store.read_bytes(rows[i].stored_path), max_pixels=settings.max_pixels)
                 for i in picked]
        cams = gradcam_batch(backbone, model.head, grays, class_indices=[int(preds[i]) for i in picked],
                             settings=settings)
        ood = example_ood(settings, backbone, model, [rows[i].sha256 for i in picked])
        for i, gray, cam, (ood_p, flagged) in zip(picked, grays, cams, ood):
            k = int(preds[i])
            p = float(probs[i, k])
            examples.append(ExampleHeatmap(
                sha256=rows[i].sha256, true_label=rows[i].label, predicted_label=labels[k], probability=p,
                version=version, png=overlay_png(gray, cam, text=heatmap_caption(
                    labels[k], p, version, threshold=model.threshold,
                    positive_label=labels[pos] if pos is not None else None)),
                ood_p=ood_p, out_of_distribution=flagged))
    by_site.sort(key=lambda c: (c.site, c.role != "challenger"))
    return ReportData(curves=curves, examples=examples, notes=notes, site_curves=by_site)


def example_ood(settings: Settings, backbone: Any, model: Any,
                shas: list[str]) -> list[tuple[float | None, bool | None]]:
    """(conformal OOD p-value, flagged) of each film against the model's reference, by XRAY_OOD_ALPHA's
    rule; (None, None) each without a reference or cached features (the gallery then marks nothing)."""
    from xray_core.model.features import FeatureCache, FeatureCacheError
    from xray_core.monitor.ood import FlagRule
    from xray_core.monitor.reference import model_reference

    reference = model_reference(model)
    if reference is None or not shas:
        return [(None, None)] * len(shas)
    try:
        x = FeatureCache(backbone, settings).load(shas, 0)
    except FeatureCacheError:
        return [(None, None)] * len(shas)
    scores = reference.scores(x)
    flags = reference.flags(scores, FlagRule.from_settings(settings))
    return [(float(p), bool(f)) for p, f in zip(reference.p_values(scores), flags)]


__all__ = ["ModelCurves", "SiteCurves", "ExampleHeatmap", "ReportData", "drawn_roc", "roc_curve",
           "reliability_bins", "site_curves", "collect_report_data"]
