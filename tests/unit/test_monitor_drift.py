"""Batch drift tests on synthetic features: quiet on same-distribution batches, loud on shifted ones,
and BBSE recovers a changed prevalence from predictions alone."""

from __future__ import annotations

import numpy as np
from test_monitor_reference import features, make_reference

from xray_core.monitor.drift import bbse_prevalence, check_batch, mmd_permutation_test

LABELS = ["normal", "pneumonia"]


def probs_for(rng: np.random.Generator, n: int, a: float = 2.0) -> np.ndarray:
    p = rng.beta(a, 2.0, size=n)
    return np.column_stack([1 - p, p])


def test_same_distribution_batch_is_quiet_and_shifted_batch_is_flagged():
    ref, rng = make_reference()
    ref = type(ref)(**{**ref.__dict__, "val_probs": probs_for(rng, len(ref.val_probs))})
    common = dict(labels=LABELS, threshold=0.5, positive=1, alpha=0.01, permutations=999)
    same = check_batch(ref, features(rng, 40), probs_for(rng, 40), **common)
    assert not same["drift"] and same["mmd_p"] > 0.01 and same["verdict"].startswith("no drift")
    shifted = features(rng, 40)
    shifted[:, :8] += 0.6
    loud = check_batch(ref, shifted, probs_for(rng, 40, a=8.0), **common)
    assert loud["input_shift"] and loud["output_shift"] and loud["drift"]
    assert "inputs differ" in loud["verdict"] and loud["ood_flagged"] > 30 and loud["ood_excess"]
    n_cal = len(ref.calibration_scores)
    assert loud["ood_flagged"] == int((ref.p_values(ref.scores(shifted)) <= 0.05).sum())  # the default rule
    assert loud["ood_expected"] == round(np.floor(0.05 * (n_cal + 1)) / (n_cal + 1) * 40, 2)
    assert f"{loud['ood_flagged']} of 40 films look unlike" in loud["verdict"]
    assert "(conformal p <= 0.05; " in loud["verdict"] and loud["ood_coarse"] is None


def test_tiny_batch_is_not_tested():
    ref, rng = make_reference()
    out = check_batch(ref, features(rng, 3), probs_for(rng, 3), labels=LABELS, threshold=0.5, positive=1,
                      alpha=0.01, permutations=99)
    assert out["drift"] is False and out["verdict"].startswith("not tested: 3 films")


def test_mmd_permutes_whole_patients():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 1.0
    stat, p = mmd_permutation_test(x, y, np.arange(30) // 3, np.arange(30) // 3, permutations=99, seed=0)
    assert stat > 0 and p <= 0.05


def test_bbse_recovers_a_new_prevalence():
    rng = np.random.default_rng(2)
    val_y = rng.integers(0, 2, 2000)
    flip = rng.random(2000) < 0.1  # a classifier right 90% of the time
    val_pred = np.where(flip, 1 - val_y, val_y)
    new_y = (rng.random(4000) < 0.8).astype(int)  # prevalence 0.8 instead of ~0.5
    new_pred = np.where(rng.random(4000) < 0.1, 1 - new_y, new_y)
    q, cond = bbse_prevalence(val_pred, val_y, new_pred, 2)
    assert abs(q[1] - 0.8) < 0.05 and cond < 10
