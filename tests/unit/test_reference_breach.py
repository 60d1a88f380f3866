"""The locked reference at a drifted site (issue 26): a breach is the champion measured below the reference
by more than XRAY_REFERENCE_MARGIN on the site's new films; under ``lift`` the challenger-vs-champion
comparison no longer vetoes, every other check still does, and the challenger must not measure below the
champion there; ``alert`` changes nothing; result.json and the report name it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from xray_core.data.catalogue import Row
from xray_core.evaluate.breach import BreachCheck, apply_breaches, site_condition
from xray_core.pipeline.breach import flagged_sites, judge_site
from xray_core.pipeline.guards import apply_guards
from xray_core.report.format import outcome_sentence
from xray_core.results import Evaluation, RunResult

LABELS = ["normal", "pneumonia"]


@pytest.fixture
def small(settings):
    """The test settings with 2 films per class enough to judge (XRAY_MIN_TEST_PER_CLASS)."""
    return settings.with_overrides(min_test_per_class=2)


def _rows(n_per_label: int) -> list[Row]:
    return [Row(i, f"{i:064x}", "s", label, f"p{i}")
            for i, label in enumerate(["normal"] * n_per_label + ["pneumonia"] * n_per_label)]


def _scored(version: int, rows: list[Row], p_pneumonia: list[float]) -> Evaluation:
    p = np.asarray(p_pneumonia, dtype=float)
    return Evaluation(version=version, test_set_fingerprint="f", n_images=len(rows),
                      metrics={"labels": LABELS, "threshold": 0.5}, labels=LABELS,
                      probabilities=np.stack([1 - p, p], axis=1).tolist(), shas=[r.sha256 for r in rows],
                      sites=[], views=[])


# 4 normal films then 4 pneumonia films. The reference ranks every pneumonia film above every normal one
# (AUROC 1); the champion ranks 2 pneumonia films below 2 normal ones: of the 16 (normal, pneumonia) pairs
# it orders 12 right, AUROC 12/16 = 0.75, so champion minus reference is -0.25.
PERFECT = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]
WORSE = [0.1, 0.2, 0.7, 0.8, 0.5, 0.6, 0.85, 0.9]


def test_a_champion_measured_below_the_reference_by_more_than_the_margin_is_a_breach(small):
    rows = _rows(4)
    check = judge_site(small, "A", rows, _scored(17, rows, WORSE), _scored(2, rows, PERFECT), "t0")
    assert check.breached and check.status == "breach" and check.films == 8
    assert check.champion_value == pytest.approx(0.75) and check.reference_value == pytest.approx(1.0)
    assert check.difference == pytest.approx(-0.25) and check.action == "comparison lifted"  # lift: default
    assert check.detail.startswith("champion v17 measured 0.250 below the locked reference v2 at site A on 8 "
                                   "new films")


def test_a_champion_as_good_as_the_reference_is_no_breach(small):
    rows = _rows(4)
    check = judge_site(small, "A", rows, _scored(17, rows, PERFECT), _scored(2, rows, PERFECT), None)
    assert check.status == "held" and not check.breached and check.difference == 0 and check.action == "none"
    assert check.detail.startswith("no breach")


def test_too_few_films_of_a_class_is_not_enough_films(small):
    rows = _rows(4)[3:6]  # 1 normal, 2 pneumonia
    scores = [0.9, 0.1, 0.2]  # the champion would be below the reference on them
    check = judge_site(small, "A", rows, _scored(17, rows, scores), _scored(2, rows, [0.1, 0.8, 0.9]), None)
    assert check.status == "not enough films" and not check.breached and check.difference is None
    assert "normal 1 film(s)" in check.detail and "XRAY_MIN_TEST_PER_CLASS=2" in check.detail


def test_only_counted_per_site_drift_flags_name_a_site():
    drift = {"flagged": True, "checks": [
        {"subject": "all new films", "drift": True}, {"subject": "site A", "drift": True},
        {"subject": "site B", "drift": False, "pooled_drift": True}, {"subject": "site C", "drift": False}]}
    assert flagged_sites(drift) == ["A"]
    assert flagged_sites(None) == [] and flagged_sites({"flagged": False, "summary": "not checked"}) == []


def _breach(mode: str = "lift", challenger_check: dict[str, Any] | None = None,
            status: str = "breach") -> BreachCheck:
    return BreachCheck(site="A", champion=17, reference=2, status=status, films=40, since=None,
                       metric="macro_auroc", margin=0.02, mode=mode, detail="", difference=-0.114,
                       low=-0.2, high=-0.03, champion_value=0.855, reference_value=0.969,
                       challenger_check=challenger_check)


def _kept_by_the_comparison() -> dict[str, Any]:
    return {"decision": "keep", "promote": False, "rationale": "Challenger ... Keep the champion.",
            "checks": [{"name": "test_size", "passed": True, "detail": "ok"},
                       {"name": "comparison", "passed": False, "detail": "not shown non-inferior"},
                       {"name": "guardrail", "passed": True, "detail": "ok"}]}


def test_lift_lets_a_challenger_past_a_failing_comparison_and_says_why():
    out = apply_breaches(_kept_by_the_comparison(), [_breach()])
    assert out["decision"] == "promote" and out["promote"] is True
    comparison = next(c for c in out["checks"] if c["name"] == "comparison")
    assert comparison["passed"] is False and comparison["lifted"] is True  # it failed; it no longer vetoes
    assert comparison["detail"].startswith("no veto: champion v17 measured 0.114 below the locked reference "
                                           "v2 at site A on 40 new films")
    assert "Challenger ... Keep the champion." in out["rationale"]


def test_lift_does_not_lift_another_failed_check_of_the_policy():
    decision = _kept_by_the_comparison()
    decision["checks"][2]["passed"] = False  # the guardrail vetoes too
    out = apply_breaches(decision, [_breach()])
    assert out["decision"] == "keep" and out["promote"] is False


def test_lift_does_not_let_a_challenger_past_a_failing_reference_check(settings):
    reference = {"version": 2, "passed": False, "detail": "lower bound -0.08",
                 "check": {"name": "reference", "passed": False, "detail": "lower bound -0.08"}}
    out = apply_guards(settings, _kept_by_the_comparison(), {"metrics": {}}, None, None, None, reference,
                       [_breach()])
    assert out["decision"] == "keep" and not out["promote"]
    assert out["rationale"].startswith("Keep, because the challenger is not shown non-inferior to the locked "
                                       "reference")
    assert "Promote unless a guard vetoes" in out["rationale"]  # what the lift alone would have done


def test_a_challenger_below_the_champion_at_the_drifted_site_is_kept():
    below = site_condition({"challenger": 0.80, "champion": 0.85, "difference": -0.05, "low": -0.12,
                            "high": 0.02}, "A", 12, 17)
    assert below["name"] == "breach_site" and below["passed"] is False and below["measurable"] is True
    out = apply_breaches(_kept_by_the_comparison(), [_breach(challenger_check=below)])
    assert out["decision"] == "keep" and not out["promote"]
    assert out["checks"][-1] == {k: below[k] for k in ("name", "passed", "detail")}
    assert "must not be worse than the champion it replaces" in out["rationale"]

    level = site_condition({"challenger": 0.85, "champion": 0.85, "difference": 0.0, "low": -0.1,
                            "high": 0.1}, "A", 12, 17)
    assert level["passed"] is True
    assert apply_breaches(_kept_by_the_comparison(), [_breach(challenger_check=level)])["promote"] is True


def test_a_challenger_not_measurable_at_the_site_is_reported_and_not_vetoed():
    unknown = site_condition(None, "A", 3, 17, why_not="3 films outside its training split: normal 1 film(s)")
    assert unknown["passed"] is True and unknown["measurable"] is False
    assert "not measurable" in unknown["detail"]
    out = apply_breaches(_kept_by_the_comparison(), [_breach(challenger_check=unknown)])
    assert out["promote"] is True and out["checks"][-1]["name"] == "breach_site"


@pytest.mark.parametrize("breach", [_breach(mode="alert"), _breach(status="held"),
                                    _breach(status="not enough films")])
def test_alert_a_held_site_and_too_few_films_change_nothing(breach):
    decision = _kept_by_the_comparison()
    assert apply_breaches(decision, [breach]) == decision


def test_result_json_carries_the_breach_and_an_older_one_reads_without_it(tmp_path):
    run = RunResult(flow_run_id=None, run_name="r", trigger="test", backbone_weights="random",
                    backbone_random_init=True, run_dir=str(tmp_path),
                    breach_checks=[replace(_breach(), action="reference restored")])
    out = run.as_dict()
    assert out["breach_checks"][0]["site"] == "A" and out["breach_checks"][0]["difference"] == -0.114
    back = RunResult.from_dict(out)
    assert back.breach_checks == run.breach_checks and back.reference_restored
    old = RunResult.from_dict({k: v for k, v in out.items() if k != "breach_checks"})
    assert old.breach_checks == [] and not old.reference_restored and "breach_checks" not in old.as_dict()


def test_the_outcome_names_a_restored_reference():
    assert (outcome_sentence("Kept", 22, 17, 2, restored=True)
            == "locked reference v2 restored as champion in place of v17 (v22 not promoted)")
    assert outcome_sentence("Kept", 22, 17, 17) == "champion v17 stays (v22 not promoted)"


def test_the_report_names_the_breach_and_a_site_that_held(tmp_path):
    from xray_core.report.markdown import retrain_markdown
    from xray_core.results import Verdict

    held = replace(_breach(status="held"), site="B", detail="no breach: ...")
    run = RunResult(flow_run_id=None, run_name="r", trigger="test", backbone_weights="random",
                    backbone_random_init=True, run_dir=str(tmp_path), status="completed", state="Kept",
                    decision=Verdict(decision="keep", promote=False, rationale="Keep.", checks=[]),
                    breach_checks=[replace(_breach(), detail="champion v17 measured 0.114 below ..."), held])
    text = retrain_markdown(run)
    assert ("**Breach of the locked reference at site A**: champion v17 measured 0.114 below ... "
            "(XRAY_REFERENCE_BREACH=lift: none).") in text
    assert "Locked reference at drifted site B: held: no breach: ..." in text
