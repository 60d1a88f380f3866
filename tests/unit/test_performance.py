"""CBPE (xray_core.monitor.performance): expected performance from calibrated probabilities, checked on
cases whose calibration is known by construction (labels drawn Bernoulli(p) from the probabilities)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from xray_core.monitor.performance import (
    ASSUMPTION,
    UNRELIABLE,
    beside_line,
    estimate,
    estimate_line,
    expected_auroc,
    realised,
)


def _binary(p: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - p, p])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimate_matches_realised_when_calibrated(seed: int) -> None:
    """Probabilities drawn, then labels drawn Bernoulli(p): the model is calibrated by construction, so
    every expected number must match the realised one within sampling noise (4000 films)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(0.7, 0.7, size=4000)
    y = (rng.random(4000) < p).astype(int)
    est = estimate(_binary(p), threshold=0.4, positive=1, drift=False)
    real = realised(_binary(p), y, threshold=0.4, positive=1)
    assert abs(est["accuracy"] - real["accuracy"]) < 4 * est["accuracy_sd"] + 1e-3
    for key in ("sensitivity", "specificity", "auroc"):
        assert abs(est[key] - real[key]) < 0.03, key
    assert est["reliable"] and est["assumption"] == ASSUMPTION


def test_estimate_is_wrong_when_probabilities_are_overconfident() -> None:
    """The estimate leans on calibration: overconfident probabilities (true chance 0.6, model says
    0.95) promise accuracy the labels do not deliver. A test that CBPE is not just the realised value."""
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.6).astype(int)
    p = np.full(2000, 0.95)
    est = estimate(_binary(p), threshold=0.5, positive=1)
    real = realised(_binary(p), y, threshold=0.5, positive=1)
    assert est["accuracy"] == pytest.approx(0.95)
    assert abs(real["accuracy"] - 0.6) < 0.04


def test_expected_auroc_is_the_pair_sum() -> None:
    """The sorted O(n log n) form equals the explicit sum over pairs i != j (ties half)."""
    rng = np.random.default_rng(4)
    p = np.round(rng.random(60), 1)  # many ties
    num = den = 0.0
    for i in range(60):
        for j in range(60):
            if i != j:
                w = p[i] * (1 - p[j])
                num += w * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
                den += w
    assert expected_auroc(p) == pytest.approx(num / den, abs=1e-4)
    hard = np.array([0.0, 0.0, 1.0, 1.0])  # certain labels: the expected AUROC is the realised one
    assert expected_auroc(hard, np.array([0.1, 0.3, 0.2, 0.9])) == pytest.approx(
        roc_auc_score([0, 0, 1, 1], [0.1, 0.3, 0.2, 0.9]))


def test_multiclass_accuracy_is_the_mean_top_probability() -> None:
    rng = np.random.default_rng(5)
    probs = rng.dirichlet([1, 1, 1], size=3000)
    y = np.array([rng.choice(3, p=row) for row in probs])
    est = estimate(probs, threshold=None, positive=None)
    real = realised(probs, y, threshold=None, positive=None)
    assert est["accuracy"] == pytest.approx(float(probs.max(axis=1).mean()), abs=1e-4)
    assert abs(est["accuracy"] - real["accuracy"]) < 4 * est["accuracy_sd"] + 1e-3
    assert "sensitivity" not in est and abs(est["auroc"] - real["auroc"]) < 0.03


def test_beside_a_drift_flag_the_estimate_is_marked_unreliable() -> None:
    p = _binary(np.array([0.1, 0.8, 0.9, 0.3, 0.6]))
    calm, drifted = (estimate(p, threshold=0.5, positive=1, drift=d) for d in (False, True))
    assert calm["reliable"] and calm["note"] is None and "unreliable" not in estimate_line(calm)
    assert not drifted["reliable"] and drifted["note"] == UNRELIABLE
    assert UNRELIABLE in estimate_line(drifted) and ASSUMPTION in estimate_line(drifted)
    assert estimate(p, threshold=0.5, positive=1, drift=None)["reliable"]  # untested: no flag to mark it
    assert "unreliable" in beside_line(drifted, {"n": 5, "accuracy": 0.4})
    none = {"n": 0, "note": "2 films carry labels the champion was not trained on (x)"}
    assert beside_line(calm, none) == (
        "accuracy estimated 78% before labels, not realised: 2 films carry labels the champion was not "
        "trained on (x)")
    assert beside_line(calm, {"n": 5, "accuracy": 0.4}) == (
        "accuracy estimated 78% before labels, realised 40% on 5 labelled films")


def test_empty_batch_estimates_nothing() -> None:
    est = estimate(np.zeros((0, 2)), threshold=0.5, positive=1)
    assert est["accuracy"] is None and estimate_line(est) == "performance not estimated (no films)"


def test_check_batch_carries_the_estimate_and_marks_it_beside_drift() -> None:
    """Every batch check carries the CBPE estimate of its own probabilities; the drifted batch's is marked
    unreliable, the quiet one's is not."""
    from test_monitor_drift import LABELS, probs_for
    from test_monitor_reference import features, make_reference

    from xray_core.monitor.drift import check_batch

    ref, rng = make_reference()
    ref = type(ref)(**{**ref.__dict__, "val_probs": probs_for(rng, len(ref.val_probs))})
    common: dict = dict(labels=LABELS, threshold=0.5, positive=1, alpha=0.01, permutations=199)
    probs = probs_for(rng, 40)
    same = check_batch(ref, features(rng, 40), probs, **common)
    assert not same["drift"] and same["performance"]["reliable"]
    assert same["performance"] == estimate(probs, threshold=0.5, positive=1, drift=False)
    shifted = features(rng, 40)
    shifted[:, :8] += 0.6
    loud = check_batch(ref, shifted, probs_for(rng, 40, a=8.0), **common)
    assert loud["drift"] and not loud["performance"]["reliable"]
    assert loud["performance"]["note"] == UNRELIABLE


def test_retrain_report_puts_the_estimate_beside_the_realised_value() -> None:
    """The retrain's drift section (report.md and the drift-report artifact): for each checked batch whose
    labels are catalogued, the estimate made from probabilities alone beside the realised accuracy, the
    drifted site's estimate marked unreliable; a batch without a comparison shows the estimate alone."""
    from xray_core.report.drift import drift_context
    from xray_core.report.markdown import drift_markdown
    from xray_core.results import RunResult

    p = _binary(np.array([0.9, 0.8, 0.2, 0.1, 0.7]))
    y = np.array([1, 0, 0, 0, 1])
    calm = estimate(p, threshold=0.5, positive=1, drift=False)
    drifted = estimate(p, threshold=0.5, positive=1, drift=True)
    real = realised(p, y, threshold=0.5, positive=1)
    drift = {"flagged": True, "summary": "drift detected in site b", "checks": [
        {"subject": "all new films", "n": 5, "ood_flagged": 0, "drift": False, "performance": calm,
         "realised": real},
        {"subject": "site b", "n": 5, "ood_flagged": 3, "drift": True, "performance": drifted,
         "realised": real},
        {"subject": "site c", "n": 5, "ood_flagged": 0, "drift": False, "performance": calm}]}
    context = drift_context(drift)
    assert context is not None
    lines = context["performance"]
    assert lines[0] == "all new films: accuracy estimated 82% before labels, realised 80% on 5 labelled films"
    assert lines[1].startswith("site b: accuracy estimated 82%") and lines[1].endswith(
        "(estimate marked unreliable: drift)")
    assert lines[2] == f"site c: {estimate_line(calm)}"
    run = RunResult(flow_run_id=None, run_name=None, trigger="test", backbone_weights="random",
                    backbone_random_init=True, run_dir="", drift=drift)
    text = drift_markdown(run)
    assert text is not None and all(f"- {line}" in text for line in lines)
    quiet = drift_context({"flagged": False, "checks": [{"subject": "x", "n": 2}]})
    assert quiet is not None and quiet["performance"] == []


def test_a_stored_batch_is_realised_on_the_films_now_labelled() -> None:
    """A check stores its films' sha256 and probabilities; once some arrive labelled, the estimate is
    recomputed on those films and set beside their realised value (films with unknown or no labels left
    out, fewer than 5 labelled: nothing to say)."""
    from xray_core.monitor.performance import MIN_LABELLED, film_record, realise_record
    from xray_core.report.drift import earlier_lines

    rng = np.random.default_rng(6)
    p = rng.random(40)
    shas = [f"{i:064x}" for i in range(40)]
    record = film_record(shas, _binary(p), labels=["normal", "pneumonia"], threshold=0.5, positive=1)
    assert record["sha256"] == shas and not record["truncated"] and record["probs"][0][1] == round(p[0], 4)
    y = (rng.random(40) < p).astype(int)
    label_of = {sha: ["normal", "pneumonia"][k] for sha, k in zip(shas[:30], y[:30])}
    label_of[shas[0]] = "covid19"  # a label the model does not know: left out
    out = realise_record(record, True, label_of)
    assert out is not None and out["labelled"] == 29 and out["films"] == 40
    p29 = np.round(p[1:30], 4)
    assert out["estimate"] == estimate(_binary(p29), threshold=0.5, positive=1, drift=False)
    assert out["realised"] == realised(_binary(p29), y[1:30], threshold=0.5, positive=1)
    drifted = realise_record(record, False, label_of)
    assert drifted is not None and not drifted["estimate"]["reliable"]
    few = {sha: "normal" for sha in shas[:MIN_LABELLED - 1]}
    assert realise_record(record, True, few) is None
    check = {"kind": "predict", "subject": "/data/new", "id": 12, "created_at": "2026-12-01T06:30", **out}
    assert earlier_lines([check])[0] == (
        f"predict /data/new (check 12, 2026-12-01): {beside_line(out['estimate'], out['realised'])}"
        " (29 of its 40 films labelled now)")
