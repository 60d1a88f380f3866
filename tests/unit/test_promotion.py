"""The promotion policy as a decision table, plus its errors and one run on real metrics."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from xray_core.errors import UsageError
from xray_core.evaluate.intervals import paired_bootstrap_difference
from xray_core.evaluate.metrics import compute_metrics
from xray_core.evaluate.promotion import Decision, PolicyConfig, PolicyError, decide
from xray_core.settings import load_settings

LABELS = ["normal", "pneumonia"]


def metrics(macro=0.90, sens=None, support=None, labels=LABELS) -> dict:
    """A compute_metrics-shaped dict with just what the policy reads."""
    sens = sens or {}
    support = support or {}
    return {
        "n": sum(support.get(lab, 50) for lab in labels),
        "labels": list(labels),
        "macro_auroc": macro,
        "per_class": {
            lab: {"sensitivity": sens.get(lab, 0.90), "support": support.get(lab, 50)} for lab in labels
        },
    }


def comparison(diff, low, high=None, metric="macro_auroc", challenger=0.90, sens_diff=None) -> dict:
    high = diff + 0.02 if high is None else high
    return {
        "metric": metric,
        "challenger": challenger,
        "champion": challenger - diff,
        "difference": diff,
        "low": low,
        "high": high,
        "n_samples_used": 1000,
        "n_samples": 1000,
        "level": 0.95,
        "target_specificity": 0.9,
        "sensitivity_differences": {"pneumonia": {"difference": sens_diff or 0.0,
                                                  "low": -0.01, "high": 0.01}},
    }


NI = PolicyConfig()  # non-inferiority, margin 0.01, guardrail 0.02
SUP = PolicyConfig(mode="superiority")


@pytest.mark.parametrize(
    "case, config, diff, low, expected",
    [
        ("better", NI, +0.020, +0.005, "promote"),
        ("worse", NI, -0.030, -0.050, "keep"),
        ("tie", NI, 0.000, -0.004, "promote"),
        ("within margin, point below 0", NI, -0.002, -0.008, "keep"),
        ("positive point, CI beyond margin", NI, +0.005, -0.020, "keep"),
        ("lower bound exactly at -margin", NI, +0.003, -0.010, "keep"),
        ("better", SUP, +0.020, +0.005, "promote"),
        ("worse", SUP, -0.030, -0.050, "keep"),
        ("tie", SUP, 0.000, -0.004, "keep"),
        ("within margin", SUP, +0.004, -0.006, "keep"),
        ("lower bound exactly 0", SUP, +0.010, 0.0, "keep"),
    ],
)
def test_comparison_table(case, config, diff, low, expected):
    d = decide(metrics(), metrics(), comparison(diff, low), config)
    assert d.decision == expected, (case, d.rationale)
    assert d.promote is (expected == "promote")
    by_name = {c["name"]: c for c in d.checks}
    assert list(by_name) == ["test_size", "comparison", "guardrail"]
    assert by_name["comparison"]["passed"] is (expected == "promote")
    assert by_name["guardrail"]["passed"] is True
    assert f"{diff:+.3f}" in d.rationale and f"{low:+.3f}" in d.rationale
    assert config.mode in by_name["comparison"]["detail"]


@pytest.mark.parametrize(
    "old_sens, new_sens, expected",
    [
        (0.90, 0.87, "keep"),  # -0.03: tripped
        (0.90, 0.88, "promote"),  # -0.02 exactly is not "more than 0.02"
        (0.90, 0.95, "promote"),  # rising sensitivity never trips
        (0.90, None, "keep"),  # cannot be computed: do not promote blind
    ],
)
def test_guardrail(old_sens, new_sens, expected):
    champion = metrics(sens={"pneumonia": old_sens})
    challenger = metrics(sens={"pneumonia": new_sens})
    # the headline metric clearly passes: only the guardrail can stop promotion
    d = decide(challenger, champion, comparison(+0.03, +0.01), NI)
    assert d.decision == expected, d.rationale
    guard = next(c for c in d.checks if c["name"] == "guardrail")
    assert guard["passed"] is (expected == "promote")
    if expected == "keep":
        assert "Guardrail tripped" in d.rationale and "pneumonia" in d.rationale
        assert "XRAY_GUARDRAIL_SENSITIVITY_DROP" in d.rationale


def test_guardrail_ignores_the_negative_class():
    champion = metrics(sens={"normal": 0.95, "pneumonia": 0.90})
    challenger = metrics(sens={"normal": 0.80, "pneumonia": 0.90})  # more false alarms, no missed disease
    assert decide(challenger, champion, comparison(+0.01, +0.001), NI).promote


def test_guardrail_checks_every_disease_class():
    labels = ["covid", "normal", "pneumonia"]
    champion = metrics(labels=labels, sens={"covid": 0.9, "pneumonia": 0.9})
    challenger = metrics(labels=labels, sens={"covid": 0.8, "pneumonia": 0.95})
    d = decide(challenger, champion, comparison(+0.02, +0.01), NI)
    assert d.decision == "keep" and "covid sensitivity fell from 0.900 to 0.800 (-0.100)" in d.rationale


@pytest.mark.parametrize("with_champion", [True, False])
def test_tiny_test_set_is_insufficient_whatever_the_numbers(with_champion):
    small = metrics(macro=0.99, sens={"pneumonia": 0.99}, support={"normal": 8, "pneumonia": 12})
    champion = metrics(macro=0.5, support={"normal": 8, "pneumonia": 12}) if with_champion else None
    comp = comparison(+0.3, +0.2) if with_champion else None
    d = decide(small, champion, comp, NI)
    assert d.decision == "insufficient_evidence" and d.promote is False
    assert "'normal' (8)" in d.rationale and "'pneumonia' (12)" in d.rationale
    assert "XRAY_MIN_TEST_PER_CLASS=20" in d.rationale
    assert d.checks == [{"name": "test_size", "passed": False, "detail": d.checks[0]["detail"]}]


def test_exactly_min_test_per_class_is_enough():
    ok = metrics(support={"normal": 20, "pneumonia": 20})
    assert decide(ok, None, None, NI).decision == "promote"


@pytest.mark.parametrize(
    "macro, sens, expected, named",
    [
        (0.85, 0.75, "promote", []),
        (0.80, 0.70, "promote", []),  # floors are inclusive
        (0.79, 0.75, "keep", ["macro AUROC 0.790 < floor 0.800", "XRAY_FLOOR_MACRO_AUROC"]),
        (0.85, 0.60, "keep", ["pneumonia sensitivity 0.600 < floor 0.700", "XRAY_FLOOR_SENSITIVITY"]),
        (0.70, 0.60, "keep", ["macro AUROC 0.700", "pneumonia sensitivity 0.600"]),
        (None, 0.90, "keep", ["macro AUROC n/a"]),
    ],
)
def test_first_model_floors(macro, sens, expected, named):
    d = decide(metrics(macro=macro, sens={"pneumonia": sens}), None, None, NI)
    assert d.decision == expected, d.rationale
    assert "No champion yet" in d.rationale
    assert [c["name"] for c in d.checks] == ["test_size", "floor_macro_auroc", "floor_sensitivity"]
    for text in named:
        assert text in d.rationale
    # the normal class's sensitivity is not a disease floor
    assert decide(metrics(macro=0.9, sens={"normal": 0.1}), None, None, NI).promote


@pytest.mark.parametrize(
    "metric, name",
    [
        ("macro_auroc", "macro AUROC"),
        ("balanced_accuracy", "balanced accuracy"),
        ("sensitivity_at_specificity", "sensitivity at 90% specificity"),
    ],
)
@pytest.mark.parametrize("mode, low, expected",
                         [("non-inferiority", -0.004, "promote"), ("superiority", -0.004, "keep"),
                                                  ("superiority", +0.002, "promote")])
def test_each_metric_and_mode(metric, name, mode, low, expected):
    config = PolicyConfig(metric=metric, mode=mode)
    d = decide(metrics(), metrics(), comparison(+0.006, low, metric=metric), config)
    assert d.decision == expected
    assert f"Challenger {name} 0.900 vs champion 0.894" in d.rationale


def test_rationale_carries_the_numbers():
    comp = comparison(+0.009, -0.004, +0.021, challenger=0.941)
    comp["champion"] = 0.932
    d = decide(metrics(), metrics(), comp, NI)
    assert d.rationale == (
        "Challenger macro AUROC 0.941 vs champion 0.932: difference +0.009, 95% CI [-0.004, +0.021] over "
        "1000 patient-clustered bootstrap resamples; shown non-inferior (margin 0.01): the challenger's "
        "macro AUROC is 0.009 higher, and the 95% lower bound of the difference (-0.004) is above the "
        "allowed -0.010. Guardrail: no disease-class sensitivity dropped more than 0.02. Promote."
    )
    json.dumps(d.as_dict())


@pytest.mark.parametrize(
    "diff, low, expected",
    [
        # both conditions fail: two facts joined by "and", not a contrast between failures
        (-0.042, -0.143,
         "not shown non-inferior (margin 0.01): the challenger's macro AUROC is 0.042 lower, and "
         "the 95% lower bound of the difference (-0.143) is at or below the allowed -0.010."),
        (+0.005, -0.020,
         "not shown non-inferior (margin 0.01): the challenger's macro AUROC is 0.005 higher, but "
         "the 95% lower bound of the difference (-0.020) is at or below the allowed -0.010, "
         "so a drop larger than the margin is not ruled out."),
        (-0.002, -0.008,
         "not shown non-inferior (margin 0.01): the 95% lower bound of the difference (-0.008) is "
         "above the allowed -0.010, but the challenger's macro AUROC is 0.002 lower, and the "
         "rule also requires the point difference to be at least 0."),
        (0.000, -0.004,
         "shown non-inferior (margin 0.01): the challenger's macro AUROC equals the champion's, and "
         "the 95% lower bound of the difference (-0.004) is above the allowed -0.010."),
    ],
)
def test_non_inferiority_wording_is_plain(diff, low, expected):
    d = decide(metrics(), metrics(), comparison(diff, low), NI)
    assert expected in d.rationale, d.rationale
    assert " but the point difference" not in d.rationale and "fails (" not in d.rationale


@pytest.mark.parametrize("low, expected", [(+0.005, "shown superior: the 95% lower bound of the difference "
                                                    "(+0.005) is above 0."),
                                           (-0.004, "not shown superior: the 95% lower bound of the "
                                                    "difference (-0.004) is not above 0.")])
def test_superiority_wording(low, expected):
    assert expected in decide(metrics(), metrics(), comparison(+0.01, low), SUP).rationale


def test_rationale_when_fewer_resamples_were_usable():
    comp = comparison(+0.01, +0.001)
    comp["n_samples_used"] = 990
    assert "over 990 of 1000 patient-clustered" in decide(metrics(), metrics(), comp, NI).rationale


def test_undefined_difference_keeps():
    comp = comparison(+0.01, +0.001)
    comp["difference"] = comp["low"] = comp["high"] = None
    d = decide(metrics(), metrics(), comp, NI)
    assert d.decision == "keep" and "could not be estimated" in d.rationale


# --------------------------------------------------------------------------------------------------
# errors and configuration


@pytest.mark.parametrize(
    "changes, allowed",
    [
        ({"metric": "accuracy"}, "macro_auroc, balanced_accuracy, sensitivity_at_specificity"),
        ({"mode": "equivalence"}, "non-inferiority, superiority"),
    ],
)
def test_unknown_metric_or_mode(changes, allowed):
    with pytest.raises(PolicyError, match=allowed):
        PolicyConfig(**changes)
    with pytest.raises(ValueError):
        replace(NI, **changes)
    assert issubclass(PolicyError, UsageError)  # the CLI exits with 2


@pytest.mark.parametrize(
    "champion, comp, message",
    [
        (metrics(), None, "no comparison"),
        (metrics(), comparison(0.01, 0.0, metric="balanced_accuracy"), "XRAY_PROMOTION_METRIC"),
        (metrics(support={"normal": 40}), comparison(0.01, 0.0), "different test sets"),
    ],
)
def test_bad_calls(champion, comp, message):
    with pytest.raises(PolicyError, match=message):
        decide(metrics(), champion, comp, NI)


def test_from_settings(tmp_path):
    s = load_settings({
        "XRAY_HOME": str(tmp_path),
        "XRAY_MIN_TEST_PER_CLASS": "7",
        "XRAY_FLOOR_MACRO_AUROC": "0.75",
        "XRAY_FLOOR_SENSITIVITY": "0.6",
        "XRAY_PROMOTION_METRIC": "balanced_accuracy",
        "XRAY_PROMOTION_MODE": "superiority",
        "XRAY_PROMOTION_MARGIN": "0.03",
        "XRAY_GUARDRAIL_SENSITIVITY_DROP": "0.05",
        "XRAY_NEGATIVE_LABEL": "healthy",
        "XRAY_TARGET_SPECIFICITY": "0.95",
    })
    assert PolicyConfig.from_settings(s) == PolicyConfig(
        min_test_per_class=7, floor_macro_auroc=0.75, floor_sensitivity=0.6, metric="balanced_accuracy",
        mode="superiority", margin=0.03, guardrail_sensitivity_drop=0.05, negative_label="healthy",
        target_specificity=0.95,
    )


# --------------------------------------------------------------------------------------------------
# end to end on real metrics


def test_decide_on_computed_metrics():
    rng = np.random.default_rng(3)
    n_patients = 80
    y = np.repeat(rng.integers(0, 2, n_patients), 2)
    pids = np.repeat(np.arange(n_patients), 2).astype(str)
    logits = rng.normal(size=(y.size, 2))
    logits[np.arange(y.size), y] += 2.5
    strong = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    weak = 0.4 * strong + 0.6 * rng.dirichlet([1, 1], size=y.size)
    m_strong = compute_metrics(y, strong, LABELS, threshold=0.5)
    m_weak = compute_metrics(y, weak, LABELS, threshold=0.5)

    def comp(a, b):
        return paired_bootstrap_difference(y, a, b, LABELS, pids, metric="macro_auroc", thresholds=(0.5, 0.5),
                                           n_samples=300)

    config = PolicyConfig(min_test_per_class=20)
    assert decide(m_strong, m_weak, comp(strong, weak), config).decision == "promote"
    assert decide(m_weak, m_strong, comp(weak, strong), config).decision == "keep"
    itself = decide(m_strong, m_strong, comp(strong, strong), config)
    assert itself.decision == "promote" and "[+0.000, +0.000]" in itself.rationale
    assert isinstance(itself, Decision)
