"""Evidence planning: how many more test images and new labelled patients the gate needs."""

from __future__ import annotations

import json

import pytest

from xray_core.evaluate.evidence import plan_evidence
from xray_core.evaluate.metrics import compute_metrics
from xray_core.evaluate.promotion import PolicyConfig, decide


def test_hand_computed_plan():
    """normal 12 and pneumonia 5 of 20 needed, 1.25 images per patient, 15% of patients to test:
    normal needs 8 images = ceil(6.4) = 7 patients = ceil(46.7) = 47 new patients; pneumonia 15
    images = 12 patients = 12 / 0.15 = 80 new patients."""
    plan = plan_evidence({"normal": 12, "pneumonia": 5}, 20, test_fraction=0.15, images_per_patient=1.25)
    assert plan["per_class"]["normal"] == {"test_images": 12, "more_test_images": 8, "more_test_patients": 7,
                                           "new_labelled_patients": 47}
    assert plan["per_class"]["pneumonia"] == {"test_images": 5, "more_test_images": 15,
                                              "more_test_patients": 12, "new_labelled_patients": 80}
    assert plan["new_labelled_patients"] == 127
    assert "8 more 'normal' and 15 more 'pneumonia'" in plan["summary"] and "127 in all" in plan["summary"]


def test_class_with_enough_images_needs_nothing():
    plan = plan_evidence({"normal": 30, "pneumonia": 17}, 20, test_fraction=0.2)
    assert plan["per_class"]["normal"]["more_test_images"] == 0
    assert plan["per_class"]["normal"]["new_labelled_patients"] == 0
    assert plan["per_class"]["pneumonia"]["new_labelled_patients"] == 15  # 3 / 0.2
    assert plan["new_labelled_patients"] == 15
    assert "'normal'" not in plan["summary"]


def test_float_noise_does_not_add_a_patient():
    """21 / 0.35 is 60.00000000000001 in floating point; the plan says 60, not 61."""
    plan = plan_evidence({"a": 0, "b": 30}, 21, test_fraction=0.35)
    assert plan["per_class"]["a"]["new_labelled_patients"] == 60


def test_zero_test_share_says_so():
    plan = plan_evidence({"a": 1, "b": 30}, 5, test_fraction=0.0)
    assert plan["per_class"]["a"]["new_labelled_patients"] is None and plan["new_labelled_patients"] is None
    assert "never reach it" in plan["summary"]


@pytest.mark.parametrize("kw", [dict(test_fraction=1.5), dict(test_fraction=0.1, images_per_patient=0)])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError, match="test_fraction in"):
        plan_evidence({"a": 1}, 5, **kw)


def test_insufficient_evidence_decision_carries_the_plan():
    y = [0] * 12 + [1] * 5
    probs = [[0.8, 0.2]] * 12 + [[0.3, 0.7]] * 5
    metrics = compute_metrics(y, probs, ["normal", "pneumonia"], threshold=0.5)
    metrics["bootstrap"] = {"patients": 17}
    d = decide(metrics, None, None, PolicyConfig(min_test_per_class=20, test_fraction=0.15))
    assert d.decision == "insufficient_evidence"
    assert d.evidence["per_class"]["pneumonia"]["new_labelled_patients"] == 100  # 15 / 0.15
    assert d.evidence["per_class"]["normal"]["new_labelled_patients"] == 54  # ceil(8 / 0.15)
    assert d.rationale.endswith(d.evidence["summary"])
    assert d.as_dict()["evidence"] == d.evidence
    json.dumps(d.as_dict())
