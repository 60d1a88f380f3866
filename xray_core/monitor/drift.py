"""Batch drift tests: has what the model is now shown changed since it was trained?

Three questions, answered separately so input shift and label shift are not confused:

* **Input shift (MMD)**: maximum mean discrepancy between the reference's held-out sample and the new
  batch, in the reference's PCA space (plus the scaled residual, so shifts outside the basis count),
  RBF kernel with the median-distance bandwidth. The p-value comes from ``scipy.stats.permutation_test``
  over *patients* (a patient's films move together), because films of one patient are not
  independent. sklearn's ``permutation_test_score`` permutes labels within groups, which with one
  domain per patient permutes nothing, and no well-kept library offers a grouped MMD, so the
  statistic itself is the three kernel means below (numpy).
* **Output shift (BBSD)**: ``scipy.stats.ks_2samp`` of the predicted disease probability against the
  validation films' (Bonferroni over classes when there are more than two).
* **Prevalence (BBSE)**: the new batch's class mix, from the validation confusion matrix
  C[i, j] = P(predicted i, true j) and the batch's predicted mix mu: solve C w = mu for w >= 0
  (``scipy.optimize.nnls``), prevalence = w * P_val(true j), normalised. Valid under label shift only;
  a batch that also shows input shift makes it a rough guide.
* **OOD excess**: is the batch's count of flagged films more than chance? The flag's cut (``ood_p <=
  XRAY_OOD_ALPHA``, or the XRAY_OOD_QUANTILE threshold) is an order statistic of the reference's n
  calibration scores (the k-th smallest; see :meth:`.reference.Reference.cut`), so for exchangeable
  films the count among m new ones is beta-binomial(m, n - k + 1, k) (``scipy.stats.betabinom``), not
  binomial: with a small calibration set the cut itself is random and shared by the whole batch, and a
  binomial test raised false alarms in 10% of same-distribution batches (bench/drift.py).

Every check also carries ``performance``: the batch's expected accuracy, sensitivity, specificity and
AUROC from its calibrated probabilities (CBPE, :mod:`.performance`), marked unreliable when the batch
drifts.

**Per site** (:func:`check_site`): a site's new films are compared with the reference's validation films
of *that site* (its drift-sample rows, probabilities, labels and OOD scores), because one site's films
differ from a mix of sites by construction: against the pooled reference, the sites of a simulated year
(bench/year.py) got MMD p = 0.001 every night with no shift at all. A site the reference has no rows of
is a new site, judged by its tests against the pooled reference. A site with fewer than ``MIN_BATCH``
rows, or any site of a reference saved before sites were recorded, can only get the pooled comparison,
which then does not count toward the run's drift flag.

The three tests share XRAY_DRIFT_ALPHA (Bonferroni: each warns below alpha / 3), so a batch from the
training distribution raises a warning with probability at most about alpha.

A warning is evidence that inputs changed, not proof that performance fell: only labels can show that.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xray_core.monitor.ood import FlagRule, ood_line
from xray_core.monitor.performance import estimate
from xray_core.monitor.reference import Reference

MIN_BATCH = 5  # fewer films say nothing a permutation test can resolve
# Films of a batch the MMD test compares with the reference's sample (at most 256 rows), at most: a seeded
# subsample above it. The kernel matrix is (films + 256)² and each permutation gathers it, so a night's
# 10,000 arrivals would hold 0.8 GB and take hours; past a few times the sample's size more films add
# little power (the 256 reference rows bound it). Recorded in the check as ``mmd_subsample``.
MMD_MAX_FILMS = 1024
NEW_SITE = "new site: not in the model's validation films"
POOLED = "against the pooled reference: a site differs from a mix of sites by construction"


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, x_groups: np.ndarray, y_groups: np.ndarray, *,
                         permutations: int, seed: int) -> tuple[float, float]:
    """(MMD², p-value) of rows ``x`` vs rows ``y``, permuting whole groups (patients) between them."""
    from scipy.stats import permutation_test
    from sklearn.metrics.pairwise import euclidean_distances

    z = np.vstack([x, y])
    d2 = euclidean_distances(z, squared=True)
    bandwidth = float(np.median(d2[np.triu_indices(len(z), 1)])) or 1.0
    kernel = np.exp(-d2 / bandwidth)
    _, gx = np.unique(np.asarray(x_groups).astype(str), return_inverse=True)
    _, gy = np.unique(np.asarray(y_groups).astype(str), return_inverse=True)
    group = np.concatenate([gx, gy + gx.max() + 1])
    rows = [np.flatnonzero(group == g) for g in range(group.max() + 1)]

    def mmd(a: np.ndarray, b: np.ndarray) -> float:
        ia = np.concatenate([rows[int(g)] for g in a])
        ib = np.concatenate([rows[int(g)] for g in b])
        return float(kernel[np.ix_(ia, ia)].mean() + kernel[np.ix_(ib, ib)].mean()
                     - 2 * kernel[np.ix_(ia, ib)].mean())

    res = permutation_test((np.unique(gx), np.unique(gy) + gx.max() + 1), mmd, permutation_type="independent",
                           vectorized=False, n_resamples=permutations, alternative="greater",
                           random_state=np.random.default_rng(seed))
    return float(res.statistic), float(res.pvalue)


def ks_probabilities(ref_probs: np.ndarray, new_probs: np.ndarray,
                     positive: int | None) -> tuple[float, float]:
    """(KS statistic, p) of the disease probability; with more classes, the largest statistic over
    classes and its Bonferroni-corrected p."""
    from scipy.stats import ks_2samp

    cols = [positive] if positive is not None else list(range(ref_probs.shape[1]))
    tests = [ks_2samp(ref_probs[:, c], new_probs[:, c]) for c in cols]
    worst = max(tests, key=lambda t: t.statistic)
    return float(worst.statistic), float(min(1.0, min(t.pvalue for t in tests) * len(cols)))


def bbse_prevalence(val_pred: np.ndarray, val_labels: np.ndarray, new_pred: np.ndarray,
                    n_classes: int) -> tuple[np.ndarray, float]:
    """(estimated class prevalence of the new batch, condition number of the confusion matrix)."""
    from scipy.optimize import nnls

    joint = np.zeros((n_classes, n_classes))
    np.add.at(joint, (val_pred, val_labels), 1.0)
    joint /= max(len(val_labels), 1)
    mu = np.bincount(new_pred, minlength=n_classes) / max(len(new_pred), 1)
    weights, _ = nnls(joint, mu)
    prior = np.bincount(val_labels, minlength=n_classes) / max(len(val_labels), 1)
    q = weights * prior
    q = q / q.sum() if q.sum() > 0 else prior
    return q, float(np.linalg.cond(joint))


def predicted_labels(probs: np.ndarray, threshold: float | None, positive: int | None) -> np.ndarray:
    if positive is not None and threshold is not None:
        return np.where(probs[:, positive] >= threshold, positive, 1 - positive)
    return probs.argmax(axis=1)


def check_batch(reference: Reference, features: np.ndarray, probs: np.ndarray, *, labels: list[str],
                threshold: float | None, positive: int | None, alpha: float, permutations: int,
                groups: np.ndarray | None = None, seed: int = 0,
                rule: FlagRule | None = None) -> dict[str, Any]:
    """Every batch test of one batch against a model's reference; a small JSON-able dict.

    ``features`` are the batch's raw backbone features (view 0), ``probs`` the model's calibrated
    probabilities for them, ``groups`` their patients (None: each film its own patient, as in predict).
    ``rule``: when a film is flagged (default ``ood_p <= 0.05``; callers pass XRAY_OOD_ALPHA's).
    """
    from scipy.stats import betabinom

    n = len(features)
    rule = rule or FlagRule()
    flagged, expected = reference.ood_counts(reference.scores(features), rule)
    coarse = reference.coarse(rule)
    out: dict[str, Any] = {"n": n, "ood_flagged": flagged, "ood_expected": round(expected, 2),
                           "ood_rule": rule.describe(), "ood_coarse": coarse,
                           "ood_line": ood_line(flagged, n, expected, rule, coarse),
                           "ood_expected_rate": round(reference.flag_rate(rule), 6), "alpha": alpha}
    if n < MIN_BATCH:
        return {**out, "drift": False, "input_shift": False, "output_shift": False, "ood_excess": False,
                "verdict": f"not tested: {n} films (a batch test needs at least {MIN_BATCH})",
                "performance": estimate(probs, threshold=threshold, positive=positive, drift=None)}
    calibration = reference.calibration_scores  # format 1: the validation films' scores
    cut, rank = reference.cut(rule)
    k = min(rank, len(calibration))  # the cut's rank among the calibration scores
    if reference.site is not None:  # one site's validation films: how many of them the pooled cut passes
        calibration = reference.val_scores
        k = int((np.asarray(calibration) <= cut).sum())
    a, b = max(len(calibration) - k + 1, 1), max(k, 1)
    out["ood_p"] = float(betabinom.sf(flagged - 1, n, a, b)) if flagged else 1.0
    out["ood_expected_rate"] = round(a / (a + b), 6)
    if reference.site is not None:
        out["ood_expected"] = round(n * a / (a + b), 2)
        out["ood_line"] = ood_line(flagged, n, out["ood_expected"], rule, coarse)
    new_groups = np.arange(n) if groups is None else np.asarray(groups)
    pick = np.arange(n)
    if n > MMD_MAX_FILMS:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=MMD_MAX_FILMS, replace=False))
        out["mmd_subsample"] = {"films": MMD_MAX_FILMS, "of": n, "permutations": permutations, "seed": seed}
    out["mmd"], out["mmd_p"] = mmd_permutation_test(
        reference.embed_for_drift(reference.sample),
        reference.embed_for_drift(reference.standardise(np.asarray(features)[pick])), reference.sample_groups,
        new_groups[pick], permutations=permutations, seed=seed)
    out["ks"], out["ks_p"] = ks_probabilities(reference.val_probs, probs, positive)
    val_pred = predicted_labels(reference.val_probs, threshold, positive)
    prevalence, cond = bbse_prevalence(val_pred, reference.val_labels,
                                       predicted_labels(probs, threshold, positive), len(labels))
    ref_prev = np.bincount(reference.val_labels, minlength=len(labels)) / max(len(reference.val_labels), 1)
    out["prevalence"] = {lab: round(float(v), 4) for lab, v in zip(labels, prevalence)}
    out["reference_prevalence"] = {lab: round(float(v), 4) for lab, v in zip(labels, ref_prev)}
    out["confusion_condition"] = round(cond, 3)
    each = alpha / 3  # Bonferroni over the three tests
    out["input_shift"] = out["mmd_p"] < each
    out["output_shift"] = out["ks_p"] < each
    out["ood_excess"] = out["ood_p"] < each
    out["drift"] = bool(out["input_shift"] or out["output_shift"] or out["ood_excess"])
    out["verdict"] = verdict(out)
    out["performance"] = estimate(probs, threshold=threshold, positive=positive, drift=out["drift"])
    return out


def check_site(reference: Reference, site: str, features: np.ndarray, probs: np.ndarray,
               **kwargs: Any) -> dict[str, Any]:
    """:func:`check_batch` of one site's new films against the reference's films of that site.

    Adds ``reference`` (what they were compared with: ``site``, ``pooled`` or ``pooled: new site``) and
    ``counts`` (False: the reference records no sites, so only the pooled comparison was possible; it
    must not set the run's drift flag, so ``drift`` is False and the tests' flag is ``pooled_drift``).
    A site with no drift-sample rows is new: its tests run against the pooled reference and decide (a
    site's name is often only its folder's, so the name alone raises no alarm). A site with 1 to
    ``MIN_BATCH - 1`` rows is known to the model but too thin in the reference to test alone: pooled,
    not counted (calling it new raised an alarm every night for a site of small weekly batches in
    bench/year.py)."""
    rows = reference.site_rows(site)
    if rows is None or 0 < rows < MIN_BATCH:  # only the pooled comparison is possible: reported, not counted
        why = ("this model's reference records no sites: a retrain records them" if rows is None else
               f"only {rows} of this site's films are in the model's drift sample, fewer than {MIN_BATCH} "
               "to test the site alone")
        out = check_batch(reference, features, probs, **kwargs)
        return {**out, "drift": False, "pooled_drift": out["drift"], "reference": "pooled", "counts": False,
                "verdict": f"not counted, {POOLED} ({why}): {out['verdict']}"}
    if rows == 0:  # judged on evidence: a site's name alone (often its folder's) says little
        out = check_batch(reference, features, probs, **kwargs)
        if out["n"] < MIN_BATCH:
            return {**out, "reference": "pooled: new site", "counts": True}
        return {**out, "reference": "pooled: new site", "counts": True, "new_site": True,
                "verdict": f"{NEW_SITE}; against the pooled reference: {out['verdict']}"}
    own = reference.for_site(site)
    out = check_batch(own, features, probs, **kwargs)
    return {**out, "reference": "site", "reference_rows": rows, "counts": True,
            "verdict": f"{out['verdict']} (against this site's {len(own.val_labels)} validation films)"}


def verdict(c: dict[str, Any]) -> str:
    """One sentence naming which kind of change the tests point to."""
    if not c["drift"]:
        return f"no drift detected in {c['n']} films (MMD p={c['mmd_p']:.3g}, KS p={c['ks_p']:.3g})"
    parts = []
    inputs = c["input_shift"] or c["ood_excess"]
    if inputs:
        parts.append(f"inputs differ from the reference (MMD p={c['mmd_p']:.3g}; {c['ood_line']})")
    if c["output_shift"]:
        parts.append(f"predicted probabilities shifted (KS p={c['ks_p']:.3g}) "
                     + ("with the inputs" if inputs else
                        f"without input shift: likely label shift, prevalence now ~{c['prevalence']}"))
    return "drift: " + "; ".join(parts)
