"""Metrics against hand-computed values, and the bootstrap's contracts (seeded, by patient, paired).

The vectorised bootstrap engine is checked against the plain :func:`compute_metrics` on materialised
resamples, so every interval is built from the same numbers a report shows.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from xray_core.evaluate.intervals import (
    _cluster_index,
    _Plan,
    _resample_weights,
    bootstrap_intervals,
    paired_bootstrap_difference,
    wilson_interval,
)
from xray_core.evaluate.metrics import (
    auroc,
    choose_threshold,
    compute_metrics,
    disease_indices,
    positive_index,
    predict_labels,
    sensitivity_at_specificity,
)

BINARY = ["normal", "pneumonia"]
THREE = ["normal", "pneumonia", "covid"]


def _probs_binary(p_pos) -> np.ndarray:
    p = np.asarray(p_pos, dtype=float)
    return np.c_[1 - p, p]


def _brute_auroc(y, s) -> float:
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _dataset(n_patients=60, per_patient=2, n_classes=2, seed=0, signal=1.5):
    """Synthetic test set: informative probabilities, several images per patient."""
    rng = np.random.default_rng(seed)
    patient_label = rng.integers(0, n_classes, n_patients)
    y = np.repeat(patient_label, per_patient)
    logits = rng.normal(size=(y.size, n_classes))
    logits[np.arange(y.size), y] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pids = np.repeat([f"patient{i}" for i in range(n_patients)], per_patient)
    return y, probs, pids


# --------------------------------------------------------------------------------------------------
# hand-computed binary case: TP=6, FN=2, FP=1, TN=3 at threshold 0.5


def _known_binary():
    y = np.array([1] * 8 + [0] * 4)
    p_pos = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.95, 0.3, 0.2,  # 6 detected, 2 missed
                      0.65, 0.1, 0.2, 0.4])  # 1 false alarm, 3 correct
    return y, _probs_binary(p_pos)


@pytest.mark.parametrize(
    "label, key, expected",
    [
        ("pneumonia", "sensitivity", 6 / 8),
        ("pneumonia", "specificity", 3 / 4),
        ("pneumonia", "ppv", 6 / 7),
        ("pneumonia", "npv", 3 / 5),
        ("pneumonia", "f1", 12 / 15),
        ("pneumonia", "support", 8),
        ("normal", "sensitivity", 3 / 4),
        ("normal", "specificity", 6 / 8),
        ("normal", "ppv", 3 / 5),
        ("normal", "npv", 6 / 7),
        ("normal", "f1", 6 / 9),
        ("normal", "support", 4),
    ],
)
def test_binary_per_class_counts(label, key, expected):
    y, probs = _known_binary()
    m = compute_metrics(y, probs, BINARY, threshold=0.5)
    assert m["per_class"][label][key] == pytest.approx(expected)


def test_binary_summary_and_confusion_matrix():
    y, probs = _known_binary()
    m = compute_metrics(y, probs, BINARY, threshold=0.5)
    assert m["confusion_matrix"] == [[3, 1], [2, 6]]  # rows true (normal, pneumonia), cols predicted
    assert m["n"] == 12 and m["labels"] == BINARY and m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["disease_labels"] == ["pneumonia"]
    # binary: the normal class's one-vs-rest AUROC equals pneumonia's, so macro = the binary AUROC
    assert m["macro_auroc"] == pytest.approx(m["per_class"]["pneumonia"]["auroc"])
    assert m["per_class"]["normal"]["auroc"] == pytest.approx(m["per_class"]["pneumonia"]["auroc"])
    json.dumps(m, allow_nan=False)  # JSON-able, no numpy types, no nan


def test_threshold_moves_predictions():
    y, probs = _known_binary()
    strict = compute_metrics(y, probs, BINARY, threshold=0.85)  # only 0.9 and 0.95 called positive
    assert strict["confusion_matrix"] == [[4, 0], [6, 2]]
    assert compute_metrics(y, probs, BINARY, threshold=None)["threshold"] is None  # argmax


def test_positive_class_when_negative_label_is_first_or_second():
    assert positive_index(["normal", "pneumonia"]) == 1
    assert positive_index(["pneumonia", "normal"]) == 0
    assert positive_index(["a", "b"]) == 1
    assert positive_index(THREE) is None
    assert disease_indices(THREE) == [1, 2]
    assert disease_indices(["a", "b", "c"]) == [0, 1, 2]


@pytest.mark.parametrize(
    "probs, threshold, positive, expected",
    [
        ([[0.6, 0.4], [0.2, 0.8], [0.7, 0.3]], 0.35, 1, [1, 1, 0]),
        ([[0.6, 0.4], [0.2, 0.8], [0.7, 0.3]], 0.4, 1, [1, 1, 0]),  # >= threshold is positive
        ([[0.6, 0.4], [0.2, 0.8], [0.7, 0.3]], 0.65, 0, [1, 1, 0]),
        ([[0.6, 0.4], [0.2, 0.8], [0.7, 0.3]], None, 1, [0, 1, 0]),  # argmax
        ([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], 0.1, 1, [1, 0]),  # multi-class ignores the threshold
    ],
)
def test_predict_labels(probs, threshold, positive, expected):
    out = predict_labels(np.array(probs), threshold=threshold, positive_index=positive)
    assert out.tolist() == expected


# --------------------------------------------------------------------------------------------------
# AUROC, Brier, ECE, sensitivity at specificity


@pytest.mark.parametrize(
    "y, s, expected",
    [
        ([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.8], 3.5 / 4),  # one tied pos/neg pair counts 1/2
        ([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
        ([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], 0.0),
        ([0, 1, 0, 1, 1], [0.3, 0.3, 0.6, 0.7, 0.1], 2.5 / 6),
    ],
)
def test_auroc_hand_computed(y, s, expected):
    assert auroc(np.array(y), np.array(s)) == pytest.approx(expected)


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1]])
def test_auroc_undefined_with_one_class(y):
    assert math.isnan(auroc(np.array(y), np.linspace(0, 1, len(y))))


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=30))
def test_auroc_equals_pairwise_count(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] / 5 for p in pairs])  # few distinct values: many ties
    expected = _brute_auroc(y, s)
    got = auroc(y, s)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_three_class_macro_auroc():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.7, 0.2, 0.1], [0.5, 0.3, 0.2],
        [0.2, 0.6, 0.2], [0.45, 0.3, 0.25],
        [0.1, 0.2, 0.7], [0.3, 0.5, 0.2],
    ])
    m = compute_metrics(y, probs, THREE, threshold=None)
    # class 0: both positives above every negative; class 1: 6.5/8; class 2: 6/8 (hand-counted pairs)
    assert m["per_class"]["normal"]["auroc"] == pytest.approx(1.0)
    assert m["per_class"]["pneumonia"]["auroc"] == pytest.approx(6.5 / 8)
    assert m["per_class"]["covid"]["auroc"] == pytest.approx(6 / 8)
    assert m["macro_auroc"] == pytest.approx((1 + 6.5 / 8 + 6 / 8) / 3)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert m["threshold"] is None and m["disease_labels"] == ["pneumonia", "covid"]


def test_macro_auroc_skips_absent_class():
    y = np.array([0, 0, 1, 1])  # no covid image: its AUROC is undefined and left out of the mean
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    m = compute_metrics(y, probs, THREE, threshold=None)
    assert m["per_class"]["covid"]["auroc"] is None
    assert m["per_class"]["covid"]["sensitivity"] is None and m["per_class"]["covid"]["support"] == 0
    assert m["macro_auroc"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx(1.0)  # mean recall over classes present
    json.dumps(m, allow_nan=False)


def test_brier_multiclass():
    y = np.array([0, 0])
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    # (0.2^2 + 0.2^2) = 0.08 and (0.6^2 + 0.6^2) = 0.72 -> mean 0.40
    assert compute_metrics(y, probs, BINARY, threshold=None)["brier"] == pytest.approx(0.40)


@pytest.mark.parametrize(
    "probs, y, expected",
    [
        # two images at confidence 0.9, both right (|1.0-0.9| = 0.1); two at 0.6, one right (|0.5-0.6| = 0.1)
        ([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], [0, 0, 0, 0], 0.5 * 0.1 + 0.5 * 0.1),
        # perfectly calibrated: confidence 0.75, three of four right
        ([[0.75, 0.25]] * 4, [0, 0, 0, 1], 0.0),
        # over-confident: 0.95 but always wrong
        ([[0.95, 0.05]] * 3, [1, 1, 1], 0.95),
    ],
)
def test_ece_crafted(probs, y, expected):
    m = compute_metrics(np.array(y), np.array(probs), BINARY, threshold=None)
    assert m["ece"] == pytest.approx(expected)


@pytest.mark.parametrize("target, expected", [(0.9, 2 / 5), (1.0, 1 / 5), (0.0, 1.0), (0.5, 3 / 5)])
def test_sensitivity_at_specificity(target, expected):
    neg = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    pos = [0.95, 0.85, 0.5, 0.3, 0.05]
    y = np.array([0] * 10 + [1] * 5)
    s = np.array(neg + pos)
    # target 0.9: the smallest threshold with 9 negatives strictly below is 0.85 -> 2 of 5 positives
    # target 0.5: smallest threshold with 5 negatives below is 0.5 -> 0.95, 0.85, 0.5
    assert sensitivity_at_specificity(y, s, target) == pytest.approx(expected)
    m = compute_metrics(y, _probs_binary(s), BINARY, threshold=0.5, target_specificity=target)
    assert m["sensitivity_at_specificity"] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------
# Youden threshold


@pytest.mark.parametrize(
    "y, s, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.6], 0.3),  # separable: lowest positive score
        # J = 2/3 at both 0.8 and 0.4: the smaller threshold wins
        ([0, 0, 0, 1, 1, 1], [0.1, 0.4, 0.35, 0.8, 0.4, 0.9], 0.4),
        ([0, 0, 1, 1], [0.1, 0.3, 0.2, 0.6], 0.2),  # J = 1/2 at 0.6 and 0.2
        ([0, 0, 0, 1], [0.2, 0.7, 0.1, 0.6], 0.6),  # J = 2/3 only at 0.6
        ([1, 1, 1], [0.2, 0.7, 0.1], 0.5),  # one class: degenerate
        ([0, 0], [0.2, 0.7], 0.5),
    ],
)
def test_choose_threshold(y, s, expected):
    assert choose_threshold(np.array(y), np.array(s)) == pytest.approx(expected)


@hsettings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 8)), min_size=2, max_size=25))
def test_choose_threshold_maximises_youden(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] / 8 for p in pairs])
    t = choose_threshold(y, s)
    if y.all() or not y.any():
        assert t == 0.5
        return

    def j(th):
        return (s[y] >= th).mean() - (s[~y] >= th).mean()

    best = max(j(c) for c in np.unique(s))
    assert j(t) == pytest.approx(best)
    assert all(j(c) < best - 1e-12 for c in np.unique(s) if c < t)  # nothing smaller is as good


# --------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "y, probs, labels",
    [
        ([0, 1], [[2.0, -1.0], [0.5, 0.5]], BINARY),  # logits
        ([0, 1], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], BINARY),  # length mismatch
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], BINARY),  # index out of range
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], THREE),  # columns vs labels
        ([], np.zeros((0, 2)), BINARY),  # empty
    ],
)
def test_bad_inputs_raise(y, probs, labels):
    with pytest.raises(ValueError):
        compute_metrics(np.array(y, dtype=int), np.array(probs), labels, threshold=None)


# --------------------------------------------------------------------------------------------------
# the vectorised engine equals compute_metrics on materialised resamples


def _flatten(m: dict) -> dict[str, float | None]:
    out = {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_auroc", "brier", "ece",
                             "sensitivity_at_specificity")}
    for label, d in m["per_class"].items():
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc"):
            out[f"per_class.{label}.{key}"] = d[key]
    return out


@pytest.mark.parametrize("labels, threshold", [(BINARY, 0.42), (BINARY, None), (THREE, None)])
def test_weighted_engine_matches_compute_metrics(labels, threshold):
    y, probs, _ = _dataset(n_patients=30, per_patient=1, n_classes=len(labels), seed=3)
    probs = np.round(probs, 2)  # create ties
    probs /= probs.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(7)
    weights = rng.integers(0, 3, size=(5, y.size)).astype(float)
    weights[4, y == 0] = 0  # a resample without any image of class 0: undefined metrics
    pos = positive_index(labels)
    pred = predict_labels(probs, threshold=threshold if pos is not None else None, positive_index=pos)
    plan = _Plan(y, probs, pred, labels, disease_indices(labels), 0.9, 10)
    table = plan.evaluate(weights)
    for b in range(weights.shape[0]):
        idx = np.repeat(np.arange(y.size), weights[b].astype(int))
        expected = _flatten(compute_metrics(y[idx], probs[idx], labels, threshold=threshold))
        for path, value in expected.items():
            got = table[path][b]
            if value is None:
                assert math.isnan(got), path
            else:
                assert got == pytest.approx(value, abs=1e-12), path


def test_resampling_is_by_patient():
    """Every resample gives all images of a patient the same count, and draws as many patients as
    there are: the unit of resampling is the patient, not the image."""
    pids = np.array(["big"] * 40 + [f"p{i}" for i in range(20)])
    clusters = _cluster_index(pids, pids.size)
    w = np.concatenate(list(_resample_weights(clusters, 300, seed=1)))
    assert w.shape == (300, 60)
    assert np.all(w[:, :40] == w[:, [0]])  # the 40 images of "big" move together
    patients_drawn = w[:, 0] + w[:, 40:].sum(axis=1)
    assert np.all(patients_drawn == 21)
    # the big patient is absent in about (20/21)^21 ~ 36% of resamples, which image-level resampling
    # of 60 images would essentially never do to 40 of them at once
    assert 0.25 < np.mean(w[:, 0] == 0) < 0.47


def test_missing_patient_ids_are_their_own_clusters():
    clusters = _cluster_index(np.array(["a", None, "a", "", None], dtype=object), 5)
    assert clusters[0] == clusters[2]
    assert len(set(clusters.tolist())) == 4


# --------------------------------------------------------------------------------------------------
# bootstrap intervals


@pytest.fixture(scope="module")
def binary_set():
    return _dataset(n_patients=100, per_patient=2, n_classes=2, seed=11)


def test_intervals_contain_point_and_cover_every_metric(binary_set):
    y, probs, pids = binary_set
    out = bootstrap_intervals(y, probs, BINARY, pids, threshold=0.5, n_samples=400, seed=0)
    expected_paths = {"accuracy", "balanced_accuracy", "macro_auroc", "brier", "ece",
                      "sensitivity_at_specificity"}
    expected_paths |= {f"per_class.{c}.{k}" for c in BINARY
                       for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc")}
    assert set(out) == expected_paths
    point = compute_metrics(y, probs, BINARY, threshold=0.5)
    for path, iv in out.items():
        assert iv["low"] <= iv["high"]
        assert iv["n_used"] == 400
        if path != "ece":  # ECE is biased upward under resampling; its point may sit below the CI
            assert iv["low"] <= iv["point"] <= iv["high"], path
    assert out["accuracy"]["point"] == point["accuracy"]
    assert out["per_class.pneumonia.sensitivity"]["point"] == point["per_class"]["pneumonia"]["sensitivity"]
    json.dumps(out, allow_nan=False)


def test_intervals_are_seeded(binary_set):
    y, probs, pids = binary_set
    a = bootstrap_intervals(y, probs, BINARY, pids, threshold=0.5, n_samples=200, seed=5)
    b = bootstrap_intervals(y, probs, BINARY, pids, threshold=0.5, n_samples=200, seed=5)
    c = bootstrap_intervals(y, probs, BINARY, pids, threshold=0.5, n_samples=200, seed=6)
    assert a == b
    assert a != c
    assert a["accuracy"]["point"] == c["accuracy"]["point"]


def test_duplicated_images_add_no_confidence(binary_set):
    """Copying every image of every patient 5 times adds no information. Resampling patients gives
    the same interval as before; resampling images (each its own cluster) would be falsely narrow."""
    y, probs, pids = binary_set
    k = 5
    y5, p5, pids5 = np.repeat(y, k), np.repeat(probs, k, axis=0), np.repeat(pids, k)
    base = bootstrap_intervals(y, probs, BINARY, pids, threshold=0.5, n_samples=300, seed=2)
    clustered = bootstrap_intervals(y5, p5, BINARY, pids5, threshold=0.5, n_samples=300, seed=2)
    naive = bootstrap_intervals(y5, p5, BINARY, np.arange(y5.size), threshold=0.5, n_samples=300, seed=2)
    for path in ("accuracy", "macro_auroc", "per_class.pneumonia.sensitivity"):
        assert clustered[path]["low"] == pytest.approx(base[path]["low"], abs=1e-9)
        assert clustered[path]["high"] == pytest.approx(base[path]["high"], abs=1e-9)
        width = clustered[path]["high"] - clustered[path]["low"]
        naive_width = naive[path]["high"] - naive[path]["low"]
        assert naive_width < 0.7 * width, path


def test_undefined_resamples_are_skipped():
    """With 3 patients, some resamples miss every pneumonia patient: sensitivity is undefined there
    and those resamples are left out rather than counted as 0."""
    y = np.array([0, 0, 1, 1, 0])
    probs = _probs_binary([0.2, 0.3, 0.8, 0.4, 0.1])
    pids = np.array(["a", "a", "b", "b", "c"])
    out = bootstrap_intervals(y, probs, BINARY, pids, threshold=0.5, n_samples=200, seed=0)
    iv = out["per_class.pneumonia.sensitivity"]
    assert 0 < iv["n_used"] < 200  # (2/3)^3 ~ 30% of resamples have no "b"
    # patient b's two images, one caught and one missed: every resample says 0.5, which is no
    # evidence of certainty; the interval falls back to Wilson on that one patient
    assert iv["point"] == 0.5 and iv["method"] == "wilson" and iv["n_effective"] == 1
    assert iv["low"] < 0.5 < iv["high"]


# --------------------------------------------------------------------------------------------------
# paired difference


@pytest.mark.parametrize("metric", ["macro_auroc", "balanced_accuracy", "sensitivity_at_specificity"])
def test_model_against_itself_is_exactly_zero(binary_set, metric):
    y, probs, pids = binary_set
    out = paired_bootstrap_difference(y, probs, probs, BINARY, pids, metric=metric, thresholds=(0.5, 0.5),
                                      n_samples=200)
    assert out["metric"] == metric
    assert out["difference"] == 0 and out["low"] == 0 and out["high"] == 0
    assert out["challenger"] == out["champion"]
    assert out["n_samples_used"] == 200 and out["n_samples"] == 200 and out["n_patients"] == 100
    assert set(out["sensitivity_differences"]) == {"pneumonia"}
    assert out["sensitivity_differences"]["pneumonia"]["difference"] == 0
    assert out["sensitivity_differences"]["pneumonia"]["low"] == 0
    json.dumps(out, allow_nan=False)


def test_paired_difference_detects_a_better_model():
    y, strong, pids = _dataset(n_patients=120, per_patient=2, seed=4, signal=3.0)
    rng = np.random.default_rng(0)
    weak = 0.5 * strong + 0.5 * rng.dirichlet([1, 1], size=y.size)  # diluted with noise
    out = paired_bootstrap_difference(y, strong, weak, BINARY, pids, metric="macro_auroc",
                                      thresholds=(0.5, 0.5), n_samples=300, seed=1)
    assert out["difference"] == pytest.approx(out["challenger"] - out["champion"])
    assert out["difference"] > 0 and out["low"] > 0
    assert out["low"] <= out["difference"] <= out["high"]
    again = paired_bootstrap_difference(y, strong, weak, BINARY, pids, metric="macro_auroc",
                                        thresholds=(0.5, 0.5), n_samples=300, seed=1)
    assert again == out


def test_paired_uses_each_models_threshold():
    y, probs, pids = _dataset(n_patients=50, per_patient=1, seed=8)
    out = paired_bootstrap_difference(y, probs, probs, BINARY, pids, metric="balanced_accuracy",
                                      thresholds=(0.2, 0.8), n_samples=100)
    a = compute_metrics(y, probs, BINARY, threshold=0.2)
    b = compute_metrics(y, probs, BINARY, threshold=0.8)
    assert out["challenger"] == a["balanced_accuracy"] and out["champion"] == b["balanced_accuracy"]
    sd = out["sensitivity_differences"]["pneumonia"]
    expected = a["per_class"]["pneumonia"]["sensitivity"] - b["per_class"]["pneumonia"]["sensitivity"]
    assert sd["difference"] == pytest.approx(expected) and expected > 0


def test_paired_multiclass_reports_every_disease_class():
    y, probs, pids = _dataset(n_patients=60, per_patient=1, n_classes=3, seed=2)
    out = paired_bootstrap_difference(y, probs, probs, THREE, pids, metric="sensitivity_at_specificity",
                                      thresholds=(None, None), n_samples=50)
    assert set(out["sensitivity_differences"]) == {"pneumonia", "covid"}
    assert out["challenger"] is not None and out["difference"] == 0


def test_unknown_metric_lists_allowed():
    y, probs, pids = _dataset(n_patients=10, per_patient=1)
    with pytest.raises(ValueError, match="macro_auroc, balanced_accuracy, sensitivity_at_specificity"):
        paired_bootstrap_difference(y, probs, probs, BINARY, pids, metric="accuracy", thresholds=(None, None))


# --------------------------------------------------------------------------------------------------
# exact intervals where the bootstrap degenerates, thresholds for a target sensitivity


@pytest.mark.parametrize("caught", [0, 23])
def test_degenerate_proportion_gets_a_wilson_interval(caught):
    """0/23 and 23/23 pneumonia caught: the bootstrap can only say [0, 0] or [1, 1]; the interval
    becomes Wilson's on the 23 pneumonia patients, has width, contains the point and names its method."""
    y = np.r_[np.zeros(23, int), np.ones(23, int)]
    p_pos = np.r_[np.full(23, 0.1), np.where(np.arange(23) < caught, 0.9, 0.3)]
    pids = np.array([f"p{i}" for i in range(46)])
    out = bootstrap_intervals(y, _probs_binary(p_pos), BINARY, pids, threshold=0.5, n_samples=200, seed=0)
    iv = out["per_class.pneumonia.sensitivity"]
    assert iv["point"] == caught / 23
    assert iv["method"] == "wilson" and iv["n_effective"] == 23
    assert (iv["low"], iv["high"]) == pytest.approx(wilson_interval(caught, 23))
    assert iv["low"] <= iv["point"] <= iv["high"] and iv["high"] - iv["low"] > 0.1
    # the specificity (23/23 normals below 0.5) degenerates too; the AUROC of a perfect ranking
    # must never print as exact certainty either
    assert out["per_class.normal.specificity"]["method"] == "wilson"
    if caught == 23:
        assert out["macro_auroc"]["point"] == 1.0 and out["macro_auroc"]["low"] < 1.0
    json.dumps(out, allow_nan=False)


def test_wilson_interval_hand_checked():
    low, high = wilson_interval(0, 23)
    z = 1.959963984540054
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(z**2 / (23 + z**2), rel=1e-9)  # Wilson's upper bound at 0/n
    low, high = wilson_interval(23, 23)
    assert high == pytest.approx(1.0) and low == pytest.approx(23 / (23 + z**2), rel=1e-9)


def test_non_degenerate_intervals_stay_bootstrap(binary_set):
    y, probs, pids = binary_set
    out = bootstrap_intervals(y, probs, BINARY, pids, threshold=0.5, n_samples=100, seed=0)
    assert {iv["method"] for iv in out.values()} == {"bootstrap"}


def test_auroc_matches_scikit_learn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_choose_threshold_for_target_sensitivity():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1])
    # sensitivity 3/4 first reached at 0.6, all four at 0.3
    assert choose_threshold(y, s, target_sensitivity=0.75) == 0.6
    assert choose_threshold(y, s, target_sensitivity=0.9) == 0.3
    assert choose_threshold(y, s, target_sensitivity=0.2) == 0.9
