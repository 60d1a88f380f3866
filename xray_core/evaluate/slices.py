"""Metrics per slice of the test set (per site, per view) and the per-site promotion guardrail.

Pooled metrics can hide opposite failures: a champion good on site A and useless on site B, and a
challenger the other way round, can have the same pooled AUROC. So every evaluation is also cut by
site and by view, each slice with its own patient-clustered intervals, and the promotion policy
refuses a challenger that collapses on any site the test set can judge.

A slice is *judged* only when every class it contains has at least ``min_per_class`` images; a
slice with a single class has no AUROC (it is shown with its sensitivity/specificity only). Slices
too small to judge are listed with the reason, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from xray_core.evaluate.intervals import bootstrap_intervals
from xray_core.evaluate.metrics import compute_metrics

UNKNOWN = "(unknown)"
# Slices per reported-only dimension (XRAY_SLICE_BY): a free-text attribute (a DOI per film) would
# otherwise give one slice, and one bootstrap, per film. The rarest values share one slice.
MAX_SLICES = 12
# What the guardrail compares per site: the slice's macro AUROC and every class's sensitivity
# (for two classes the negative class's sensitivity is the disease's specificity).
GUARDED = ("macro_auroc", "sensitivity")


def slice_name(value: Any) -> str:
    """The slice a film's site or view puts it in: :data:`UNKNOWN` when not recorded (None, blank, or
    pandas' NaN: a NaN group would be dropped by ``groupby`` and the films would vanish from the table)."""
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return UNKNOWN
    return str(value)


def slice_metrics(y: np.ndarray, probs: np.ndarray, labels: Sequence[str], patients: Sequence[str],
                  slices: dict[str, Sequence[str | None]], *, threshold: float | None, negative_label: str,
                  min_per_class: int, n_samples: int, seed: int, target_specificity: float,
                  memory_mb: int | None = None) -> dict[str, Any]:
    """``{dimension: {value: slice}}`` for each dimension in ``slices`` (e.g. ``site``, ``view``).

    Each slice: ``n``, ``counts`` per label, ``patients``, ``judged`` with ``reason`` when not,
    ``macro_auroc``, ``per_class`` sensitivities/specificities, and bootstrap ``intervals`` (the same
    engine and seed as the pooled metrics).
    """
    labels = list(labels)
    frame = pd.DataFrame({"y": np.asarray(y, dtype=np.int64), "patient": list(patients)})
    out: dict[str, Any] = {}
    for dimension, values in slices.items():
        frame[dimension] = [slice_name(v) for v in values]
        out[dimension] = {}
        for value, part in frame.groupby(dimension, sort=True):
            idx = part.index.to_numpy()
            out[dimension][str(value)] = _one_slice(
                frame["y"].to_numpy()[idx], np.asarray(probs)[idx], labels, part["patient"].to_numpy(),
                threshold=threshold, negative_label=negative_label, min_per_class=min_per_class,
                n_samples=n_samples, seed=seed, target_specificity=target_specificity, memory_mb=memory_mb)
    return out


def fold_rare(values: Sequence[str | None], *, most: int = MAX_SLICES) -> list[str | None]:
    """``values`` with at most ``most`` distinct known values: the ``most - 1`` commonest (ties by name)
    are kept, the others become one ``(other: k values)`` slice. Unknown (None) stays unknown."""
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    if len(counts) <= most:
        return list(values)
    kept = {v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:most - 1]}
    other = f"(other: {len(counts) - len(kept)} values)"
    return [v if v is None or v in kept else other for v in values]


def _one_slice(y: np.ndarray, probs: np.ndarray, labels: list[str], patients: np.ndarray, *,
               threshold: float | None, negative_label: str, min_per_class: int, n_samples: int, seed: int,
               target_specificity: float, memory_mb: int | None = None) -> dict[str, Any]:
    counts = {label: int((y == c).sum()) for c, label in enumerate(labels)}
    present = {label: n for label, n in counts.items() if n > 0}
    small = {label: n for label, n in present.items() if n < min_per_class}
    if small:
        reason = ", ".join(f"{n} {label}" for label, n in small.items()) + f" (< {min_per_class} per class)"
    elif len(present) < 2:
        reason = f"only {next(iter(present), 'no')} images: no AUROC (sensitivity/specificity only)"
    else:
        reason = None
    metrics = compute_metrics(y, probs, labels, threshold=threshold, negative_label=negative_label,
                              target_specificity=target_specificity)
    intervals = bootstrap_intervals(y, probs, labels, patients, threshold=threshold,
                                    negative_label=negative_label, n_samples=n_samples, seed=seed,
                                    target_specificity=target_specificity, memory_mb=memory_mb)
    return {"n": int(y.size), "counts": counts, "patients": int(len(set(patients))),
            "judged": not small, "auroc_judged": reason is None, "reason": reason,
            "macro_auroc": metrics["macro_auroc"] if len(present) >= 2 else None,
            "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "per_class": {label: {k: pc[k] for k in ("sensitivity", "specificity", "auroc", "support")}
                          for label, pc in metrics["per_class"].items() if counts[label] > 0},
            "intervals": {path: iv for path, iv in intervals.items()
                          if path in ("macro_auroc", "accuracy", "balanced_accuracy")
                          or path.endswith((".sensitivity", ".specificity"))}}


def site_guardrail(challenger: dict[str, Any] | None, champion: dict[str, Any] | None, *,
                   max_drop: float, evidence: str = "interval") -> dict[str, Any]:
    """The per-site guardrail as a policy check: ``{"name", "passed", "detail", "drops", "within_noise"}``.

    On every site that both evaluations judge, the challenger's macro AUROC (where the site has two
    classes) and each class's sensitivity may not fall more than ``max_drop`` below the champion's.

    ``evidence="interval"`` (the default): a drop vetoes only when the champion's value also lies above
    the upper bound of the challenger's 95% patient-clustered interval on that site. On a site with a
    handful of test films one film moves sensitivity by a third, and a guardrail that fires on such
    drops vetoes every challenger, so a champion that has broken keeps its place (bench/year.py: a
    champion with sensitivity 0 on a restyled site stayed 13 nights while per-site noise vetoed
    challengers that restored it). Drops within the noise are listed in ``within_noise`` and the detail.
    ``evidence="point"``: every point drop above ``max_drop`` vetoes (the guardrail before issue 26).

    The trade-off, stated: the interval is the challenger's alone, so on a small site even a large drop
    from a perfect champion passes (7 of 10 positives found has the interval [0.40, 1.00]: a champion at
    1.00 lies inside it). The pooled guardrail, the comparison, the locked reference and the negative
    flips still judge those films; a site that needs the stricter rule sets ``point``.
    """
    drops, noise = [], []
    ch_sites, champ_sites = (challenger or {}).get("site", {}), (champion or {}).get("site", {})
    for site in sorted(set(ch_sites) & set(champ_sites)):
        new, old = ch_sites[site], champ_sites[site]
        if not (new["judged"] and old["judged"]):
            continue
        pairs = []
        if new.get("auroc_judged") and old.get("auroc_judged"):
            pairs.append(("macro AUROC", "macro_auroc", new["macro_auroc"], old["macro_auroc"]))
        for label in sorted(set(new["per_class"]) & set(old["per_class"])):
            pairs.append((f"sensitivity[{label}]", f"per_class.{label}.sensitivity",
                          new["per_class"][label]["sensitivity"], old["per_class"][label]["sensitivity"]))
        for metric, path, a, b in pairs:
            if a is None or b is None or b - a <= max_drop + 1e-12:
                continue
            high = ((new.get("intervals") or {}).get(path) or {}).get("high")
            drop = {"site": site, "metric": metric, "challenger": a, "champion": b, "drop": b - a,
                    "challenger_high": high}
            if evidence == "point" or high is None or b > high + 1e-12:
                drops.append(drop)
            else:
                noise.append(drop)
    judged = [s for s in sorted(set(ch_sites) & set(champ_sites))
              if ch_sites[s]["judged"] and champ_sites[s]["judged"]]
    if drops:
        worst = max(drops, key=lambda d: d["drop"])
        detail = (f"site {worst['site']} collapsed: {worst['metric']} {worst['challenger']:.3f} vs champion "
                  f"{worst['champion']:.3f} (drop {worst['drop']:.3f} > allowed {max_drop:.3f}, "
                  "XRAY_GUARDRAIL_SITE_DROP)")
        if len(drops) > 1:
            detail += "; also " + "; ".join(f"{d['site']} {d['metric']} −{d['drop']:.3f}" for d in drops
                                            if d is not worst)
    elif judged:
        detail = (f"no site dropped more than {max_drop:.3f}" if not noise else
                  f"no site's drop beyond {max_drop:.3f} can be told from noise") + \
            f" (sites judged: {', '.join(judged)})"
    else:
        detail = "no site has enough test images of each class in both evaluations to judge"
    if noise:
        detail += ("; within the site's noise, not vetoing (champion inside the challenger's 95% interval, "
                   "XRAY_GUARDRAIL_SITE_EVIDENCE=interval): "
                   + "; ".join(f"{d['site']} {d['metric']} {d['challenger']:.3f} vs {d['champion']:.3f} "
                               f"(interval up to {d['challenger_high']:.3f})" for d in noise))
    return {"name": "per_site_guardrail", "passed": not drops, "detail": detail, "drops": drops,
            "within_noise": noise}
