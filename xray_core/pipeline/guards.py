"""Where films come from, in the recipe: slices per site and view for every evaluation (and, reported
only, per ``XRAY_SLICE_BY`` subgroup), the shortcut audit at every retrain, and the two guards they put
on promotion.

- The **per-site guardrail** turns a pooled "promote" into "keep" when the challenger collapses on a
  site the test set can judge (``XRAY_GUARDRAIL_SITE_DROP``).
- The **negative-flip veto** (``XRAY_MAX_NEGATIVE_FLIP``, off by default) turns "promote" into "keep"
  when too many films the champion got right would be read wrong (:func:`flips_step`).
- The **locked reference** (the bio-creep guard, ``XRAY_REFERENCE_MARGIN``) turns "promote" into "keep"
  when the challenger is not shown non-inferior to the locked reference (:func:`reference_summary`).
- The **shortcut audit** warns when the label is predictable from the site, from how the films were
  made, or when the embeddings tell the sites apart; with ``XRAY_SHORTCUT_POLICY=block`` a flagged
  audit stops automatic promotion (decision ``blocked``: the challenger stays a candidate for review),
  and names the run even when the pooled policy would not have promoted anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from xray_core.data.snapshot import Row, SplitData, label_indices
from xray_core.evaluate.breach import BreachCheck
from xray_core.pipeline.features import features_for, train_views
from xray_core.settings import Settings


def evaluation_slices(settings: Settings, rows: list[Row], y: np.ndarray,
                      probs: np.ndarray, labels: list[str],
                      threshold: float | None) -> tuple[dict[str, Any], list[str | None], list[str | None]]:
    """Metrics per site and per view of one evaluation (same engine and seed as the pooled metrics),
    with each test row's site and view (for per-site curves in the report)."""
    from xray_core.data.facts import image_facts
    from xray_core.evaluate.slices import slice_metrics

    facts = image_facts(settings, [r.id for r in rows])
    known = set(facts.index)
    def pick(row: Row, column: str) -> str | None:
        # pandas holds a missing view as NaN: as None it becomes the "(unknown)" slice and JSON null
        # (a NaN vanished from the by-view table and wrote a NaN token into result.json)
        value = facts.at[row.id, column] if row.id in known else None
        return None if value is None or pd.isna(value) else str(value)

    sites, views = [pick(r, "site") for r in rows], [pick(r, "view") for r in rows]
    slices = slice_metrics(y, probs, labels, [r.patient_id for r in rows], {"site": sites, "view": views},
                           threshold=threshold, negative_label=settings.negative_label,
                           min_per_class=settings.min_test_per_class, n_samples=settings.bootstrap_samples,
                           seed=settings.bootstrap_seed, target_specificity=settings.target_specificity,
                           memory_mb=settings.memory_mb)
    return slices, sites, views


def subgroup_slices(settings: Settings, rows: list[Row], y: np.ndarray, probs: np.ndarray, labels: list[str],
                    threshold: float | None) -> dict[str, Any]:
    """Metrics per value of each reported-only ``XRAY_SLICE_BY`` dimension (sex, age_band, an attribute...),
    with the same intervals and "too small" reasons as the per-site slices; {} when none is named."""
    from xray_core.data.subgroups import reported_dimensions, subgroup_values
    from xray_core.evaluate.slices import fold_rare, slice_metrics

    dimensions = reported_dimensions(settings.slice_by)
    if not dimensions:
        return {}
    values = subgroup_values(settings, [r[0] for r in rows], dimensions)
    return slice_metrics(y, probs, labels, [r[4] for r in rows], {d: fold_rare(v) for d, v in values.items()},
                         threshold=threshold, negative_label=settings.negative_label,
                         min_per_class=settings.min_test_per_class, n_samples=settings.bootstrap_samples,
                         seed=settings.bootstrap_seed, target_specificity=settings.target_specificity,
                         memory_mb=settings.memory_mb)


def audit_step(settings: Settings, data: SplitData) -> dict[str, Any]:
    """The shortcut audit over every image of the run's split, with the site of each and its embedding
    (the eval view of every image). The label × site table covers every film; the two probes run on at
    most ``XRAY_SUBSAMPLE_FILMS`` of them (stratified by label × site; the audit's ``probe_subsample``
    says how many), and only those films' features are read."""
    from xray_core.data.facts import image_facts
    from xray_core.data.subsample import stratified_subsample
    from xray_core.evaluate.audit import shortcut_audit

    rows = data.train + data.val + data.test
    facts = image_facts(settings, [r.id for r in rows]).loc[[r.id for r in rows]]
    pick = stratified_subsample(list(zip(facts["label"], facts["site"])), settings.subsample_films,
                                seed=settings.split_seed)
    chosen = rows if pick is None else [rows[i] for i in pick]
    embeddings = features_for(settings, chosen, [train_views(settings)[0]])[:, 0, :] if chosen else None
    audit = shortcut_audit(facts.reset_index(drop=True), embeddings, negative_label=settings.negative_label,
                           auroc_threshold=settings.shortcut_auroc, seed=settings.split_seed, probe_rows=pick)
    audit["policy"] = settings.shortcut_policy
    audit["sites"] = sorted(facts["site"].dropna().unique().tolist())
    return audit


def flips_step(settings: Settings, challenger: dict[str, Any], champion: dict[str, Any],
               data: SplitData) -> dict[str, Any] | None:
    """Negative flips of the challenger against the champion (:mod:`xray_core.evaluate.flips`) on the
    test films both scored: those whose label both models know. Each model's prediction is its own
    operating point's, as in its confusion matrix. None when an evaluation lacks its probabilities or
    films."""
    from xray_core.evaluate.flips import negative_flips
    from xray_core.evaluate.metrics import positive_index, predict_labels

    def predicted(ev: dict[str, Any]) -> dict[str, str]:
        labels, probs = list(ev["labels"]), np.asarray(ev["probabilities"], dtype=np.float64)
        pos = positive_index(labels, settings.negative_label)
        idx = predict_labels(probs, threshold=ev["metrics"].get("threshold") if pos is not None else None,
                             positive_index=pos)
        return dict(zip(ev["shas"], (labels[i] for i in idx)))

    if not all(ev.get("probabilities") and ev.get("shas") for ev in (challenger, champion)):
        return None
    new, old = predicted(challenger), predicted(champion)
    site_of = dict(zip(challenger["shas"], challenger.get("sites") or [None] * len(challenger["shas"])))
    rows = [r for r in data.test if r.sha256 in new and r.sha256 in old]
    return negative_flips([r.label for r in rows], [old[r.sha256] for r in rows],
                          [new[r.sha256] for r in rows],
                          [r.patient_id for r in rows], [site_of.get(r.sha256) for r in rows],
                          n_samples=settings.bootstrap_samples, seed=settings.bootstrap_seed,
                          films=[r.sha256 for r in rows])


def reference_summary(settings: Settings, challenger: dict[str, Any], champion: dict[str, Any] | None,
                      reference: dict[str, Any] | None, comparison: dict[str, Any] | None,
                      data: SplitData) -> dict[str, Any]:
    """The run's ``reference`` record: which version, its metric, the margin, the paired comparison with
    the challenger and the ``reference`` check (:func:`~xray_core.evaluate.promotion.reference_check`).
    ``comparison``: the challenger-vs-champion one, reused when the reference is the champion. Without a
    reference yet (no champion ever), no check: the first champion becomes the reference."""
    from xray_core.evaluate.intervals import paired_bootstrap_difference
    from xray_core.evaluate.promotion import reference_check

    metric, margin = settings.promotion_metric, settings.reference_margin
    if reference is None:
        return {"version": None, "metric": metric, "margin": margin, "passed": None, "check": None,
                "detail": "no locked reference yet: the first champion becomes it (or xray lock N)"}
    version = int(reference["version"])
    same = champion is not None and champion["version"] == version
    labels = list(challenger["metrics"]["labels"])
    why_not = None
    if reference["test_set_fingerprint"] != challenger["test_set_fingerprint"]:
        why_not = "it was scored on another test set than the challenger"
    elif list(reference["metrics"]["labels"]) != labels:
        why_not = (f"its labels {reference['metrics']['labels']} differ from the challenger's {labels}, so "
                   "the two cannot be compared; lock one with these labels (xray lock N --reason ...)")
    elif not (same and comparison):
        if not (challenger.get("probabilities") and reference.get("probabilities")):
            why_not = "an evaluation lacks its test probabilities"
        else:
            rows = [r for r in data.test if r.label in labels]
            comparison = paired_bootstrap_difference(
                label_indices(rows, labels), np.asarray(challenger["probabilities"], dtype=np.float64),
                np.asarray(reference["probabilities"], dtype=np.float64), labels,
                np.array([r.patient_id for r in rows]), metric=metric,
                thresholds=(challenger["metrics"].get("threshold"), reference["metrics"].get("threshold")),
                negative_label=settings.negative_label, n_samples=settings.bootstrap_samples,
                seed=settings.bootstrap_seed, target_specificity=settings.target_specificity,
                memory_mb=settings.memory_mb)
    used = None if why_not else comparison
    check = reference_check(used, version, margin, metric, settings.target_specificity, why_not)
    keys = ("challenger", "champion", "difference", "low", "high", "level")
    numbers = {k: (used or {}).get(k) for k in keys}
    return {"version": version, "metric": metric, "margin": margin, "same_as_champion": same,
            "reference": numbers.pop("champion"), **numbers, "passed": check["passed"], "check": check,
            "detail": check["detail"]}


def apply_guards(settings: Settings, decision: dict[str, Any], challenger: dict[str, Any],
                 champion: dict[str, Any] | None, audit: dict[str, Any] | None,
                 flips: dict[str, Any] | None = None,
                 reference: dict[str, Any] | None = None,
                 breaches: Sequence[BreachCheck] = (),
                 comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    """The policy's decision after a breach of the locked reference at a drifted site (``breaches``:
    :func:`~xray_core.evaluate.breach.apply_breaches`, which lifts a failed comparison only when
    ``comparison``, the policy's challenger-vs-champion difference, measured no drop), the per-site
    guardrail, the negative-flip veto (``flips``: from :func:`flips_step`, kept in the result), the locked
    reference (``reference``: from :func:`reference_summary`, kept in the result) and the shortcut audit
    (a new dict)."""
    from xray_core.evaluate.breach import apply_breaches
    from xray_core.evaluate.promotion import negative_flip_check
    from xray_core.evaluate.slices import site_guardrail

    out = apply_breaches({**decision, "checks": list(decision.get("checks") or [])}, breaches, comparison,
                         settings.promotion_margin)
    if champion is not None:
        guard = site_guardrail(challenger["metrics"].get("slices"), champion["metrics"].get("slices"),
                               max_drop=settings.guardrail_site_drop,
                               evidence=settings.guardrail_site_evidence)
        out["checks"].append({k: guard[k] for k in ("name", "passed", "detail")})
        out["site_drops"] = guard["drops"]
        if guard["within_noise"]:
            out["site_drops_within_noise"] = guard["within_noise"]
        if not guard["passed"] and out.get("promote"):
            out.update(decision="keep", promote=False,
                       rationale=f"Keep, because {guard['detail']}. Pooled, the policy would have promoted: "
                                 f"{out['rationale']}")
    if flips is not None:
        out["negative_flips"] = flips
        if settings.max_negative_flip is not None:
            check = negative_flip_check(flips, settings.max_negative_flip)
            out["checks"].append(check)
            if not check["passed"] and out.get("promote"):
                out.update(decision="keep", promote=False,
                           rationale=f"Keep, because {check['detail']}. Without this veto the policy would "
                                     f"have promoted: {out['rationale']}")
    if reference is not None:
        out["reference"] = {k: v for k, v in reference.items() if k != "check"}
        if reference.get("check") is not None:
            out["checks"].append(reference["check"])
            if not reference["passed"] and out.get("promote"):
                out.update(decision="keep", promote=False,
                           rationale=f"Keep, because the challenger is not shown non-inferior to the locked "
                                     f"reference: {reference['detail']}. Without this guard the policy would "
                                     f"have promoted: {out['rationale']}")
    if audit is not None:
        flagged = bool(audit.get("flagged"))
        detail = "; ".join(audit.get("warnings") or []) or "no shortcut found"
        out["checks"].append({"name": "shortcut_audit", "passed": not flagged,
                              "detail": f"{detail} (XRAY_SHORTCUT_POLICY={settings.shortcut_policy})"})
        # Under block, a flagged audit names the run even when the policy would not have promoted
        # either (e.g. a new label set that cannot be compared): the data needs review before any
        # model trained on it is trusted, and that is the first thing the state should say.
        if flagged and settings.shortcut_policy == "block":
            said = "the policy said" if out.get("promote") else "the policy would not have promoted either"
            out.update(decision="blocked", promote=False,
                       rationale=(f"Not promoted: the shortcut audit flagged the data ({detail}), and "
                                  "XRAY_SHORTCUT_POLICY=block stops automatic promotion. The challenger "
                                  "stays a candidate: review the audit, then promote it by hand (xray "
                                  f"promote) or not. Without the audit {said}: {out['rationale']}"))
    return out
