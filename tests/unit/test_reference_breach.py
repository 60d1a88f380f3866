"""The locked reference at a drifted site (issue 26): a breach is the champion measured below the reference
by more than XRAY_REFERENCE_MARGIN on the site's new films; under ``lift`` the challenger-vs-champion
comparison no longer vetoes, every other check still does, and the challenger must not measure below the
champion there; ``alert`` changes nothing; result.json and the report name it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from xray_core.data.catalogue import Row
from xray_core.data.snapshot import SplitData
from xray_core.evaluate.breach import BreachCheck, apply_breaches, site_condition
from xray_core.pipeline.breach import (
    drift_episode,
    episode,
    flagged_sites,
    judge_site,
    measure_breaches,
    open_sites,
    restore_reference,
    site_flags,
)
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
    cm = np.zeros((2, 2), dtype=int)  # rows true, columns called (pneumonia at p >= 0.5)
    np.add.at(cm, ([LABELS.index(r.label) for r in rows], (p >= 0.5).astype(int)), 1)
    return Evaluation(version=version, test_set_fingerprint="f", n_images=len(rows),
                      metrics={"labels": LABELS, "threshold": 0.5, "confusion_matrix": cm.tolist()},
                      labels=LABELS,
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


def test_a_site_where_the_metric_is_undefined_is_not_measured_not_held(small):
    rows = [r for r in _rows(4) if r.label == "normal"]  # one class: AUROC undefined
    lone = small.with_overrides(min_test_per_class=0)
    check = judge_site(lone, "A", rows, _scored(17, rows, WORSE[:4]), _scored(2, rows, PERFECT[:4]), None)
    assert check.status == "not measured" and not check.breached and check.action == "none"
    assert check.detail == ("not measured at site A: locked reference v2: the difference could not be "
                            "estimated (macro AUROC is undefined on this test set) (XRAY_REFERENCE_MARGIN)")
    other = replace(_scored(2, _rows(4), PERFECT), labels=["normal", "covid19"])  # labels differ
    check = judge_site(small, "A", _rows(4), _scored(17, _rows(4), WORSE), other, None)
    assert check.status == "not measured" and "labels" in check.detail
    from xray_core.report.reference import breach_lines

    assert breach_lines([check]) == [{"breached": False, "head": "Locked reference at drifted site A",
                                      "text": check.detail}]  # the report line


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


# the policy's comparison failed by a wide interval: its point estimate -0.005 is within the promotion
# margin (0.02): no measured drop
WIDE = {"challenger": 0.845, "champion": 0.85, "difference": -0.005, "low": -0.09, "high": 0.08}


def test_lift_lets_a_challenger_past_a_comparison_that_failed_without_a_measured_drop_and_says_why():
    out = apply_breaches(_kept_by_the_comparison(), [_breach()], WIDE, 0.02)
    assert out["decision"] == "promote" and out["promote"] is True
    comparison = next(c for c in out["checks"] if c["name"] == "comparison")
    assert comparison["passed"] is False and comparison["lifted"] is True  # it failed; it no longer vetoes
    assert comparison["detail"].startswith("no veto: champion v17 measured 0.114 below the locked reference "
                                           "v2 at site A on 40 new films")
    assert "failed without a measured drop (difference -0.005, not below -0.02)" in comparison["detail"]
    assert "Challenger ... Keep the champion." in out["rationale"]


def test_lift_does_not_lift_a_comparison_that_measured_a_drop(settings):
    # the reviewer's probe: a challenger measured 0.06 below the champion overall (CI -0.09..-0.03) was
    # promoted by the lift; its breach_site check passed (as bad as the breached champion at site A)
    dropped = {"challenger": 0.79, "champion": 0.85, "difference": -0.06, "low": -0.09, "high": -0.03}
    level = site_condition({"challenger": 0.80, "champion": 0.80, "difference": 0.0, "low": -0.05,
                            "high": 0.05}, "A", 30, 17, 0.02)
    reference = {"version": 2, "passed": True, "detail": "ok",
                 "check": {"name": "reference", "passed": True, "detail": "lower bound -0.015"}}
    breach = replace(_breach(mode="rollback", challenger_check=level), films=60, low=-0.2, high=-0.05)
    for comparison in (dropped, None):  # a measured drop, or no number at all: not lifted
        out = apply_guards(settings, _kept_by_the_comparison(), {"metrics": {}}, None, None, None, reference,
                           [breach], comparison)
        assert out["decision"] == "keep" and out["promote"] is False
        check = next(c for c in out["checks"] if c["name"] == "comparison")
        assert check["lifted"] is False and check["detail"].startswith("still vetoes (")
    assert ("it measured the challenger 0.060 below the champion, more than the promotion margin 0.02"
            in apply_breaches(_kept_by_the_comparison(), [breach], dropped, 0.02)["checks"][1]["detail"])
    # the same failure within the margin is lifted
    assert apply_guards(settings, _kept_by_the_comparison(), {"metrics": {}}, None, None, None, reference,
                        [breach], WIDE)["promote"] is True


def test_lift_does_not_lift_another_failed_check_of_the_policy():
    decision = _kept_by_the_comparison()
    decision["checks"][2]["passed"] = False  # the guardrail vetoes too
    out = apply_breaches(decision, [_breach()], WIDE, 0.02)
    assert out["decision"] == "keep" and out["promote"] is False


def test_lift_does_not_let_a_challenger_past_a_failing_reference_check(settings):
    reference = {"version": 2, "passed": False, "detail": "lower bound -0.08",
                 "check": {"name": "reference", "passed": False, "detail": "lower bound -0.08"}}
    out = apply_guards(settings, _kept_by_the_comparison(), {"metrics": {}}, None, None, None, reference,
                       [_breach()], WIDE)
    assert out["decision"] == "keep" and not out["promote"]
    assert out["rationale"].startswith("Keep, because the challenger is not shown non-inferior to the locked "
                                       "reference")
    assert "Promote unless a guard vetoes" in out["rationale"]  # what the lift alone would have done


# The challenger against the champion on the site's test films: the same standard as the breach (point
# difference below -XRAY_REFERENCE_MARGIN), not any difference below 0.
def _vs_champion(difference: float) -> dict[str, float]:
    return {"challenger": 0.85 + difference, "champion": 0.85, "difference": difference,
            "low": difference - 0.07, "high": difference + 0.07}


def test_a_challenger_measured_below_the_champion_by_more_than_the_margin_at_the_site_is_kept():
    below = site_condition(_vs_champion(-0.05), "A", 12, 17, 0.02)  # -0.05 < -0.02
    assert below["name"] == "breach_site" and below["passed"] is False and below["measurable"] is True
    assert below["detail"].endswith("measured 0.050 below the champion it would replace there, more than "
                                    "XRAY_REFERENCE_MARGIN=0.02 (XRAY_REFERENCE_BREACH)")
    out = apply_breaches(_kept_by_the_comparison(), [_breach(challenger_check=below)], WIDE, 0.02)
    assert out["decision"] == "keep" and not out["promote"]
    assert out["checks"][-1] == {k: below[k] for k in ("name", "passed", "detail")}
    assert "must not be worse than the champion it replaces" in out["rationale"]


def test_a_challenger_itself_in_breach_of_the_reference_at_the_site_is_kept():
    # +0.05 above the breached champion, but 0.04 below the locked reference there: in breach itself
    vs_reference = {"challenger": 0.90, "champion": 0.94, "difference": -0.04, "low": -0.1, "high": 0.01}
    check = site_condition(_vs_champion(0.05), "A", 12, 17, 0.02, reference=2, vs_reference=vs_reference)
    assert check["passed"] is False and check["reference_difference"] == -0.04
    assert "measured 0.040 below the locked reference v2 (in breach itself) there" in check["detail"]
    assert "challenger 0.900 vs locked reference v2 0.940, difference -0.040" in check["detail"]
    assert apply_breaches(_kept_by_the_comparison(), [_breach(challenger_check=check)], WIDE,
                          0.02)["promote"] is False
    vs_reference["difference"] = -0.02  # within the margin of both: passes
    check = site_condition(_vs_champion(0.05), "A", 12, 17, 0.02, reference=2, vs_reference=vs_reference)
    assert check["passed"] is True
    assert "below the champion or the locked reference there" in check["detail"]


@pytest.mark.parametrize("difference", [0.0, -0.01, -0.02])
def test_a_challenger_within_the_margin_of_the_champion_at_the_site_is_not_vetoed(difference):
    # -0.01 and -0.02 are below the champion, by no more than XRAY_REFERENCE_MARGIN=0.02: noise on ~10 films
    level = site_condition(_vs_champion(difference), "A", 12, 17, 0.02)
    assert level["passed"] is True and level["measurable"] is True
    assert "not measured more than XRAY_REFERENCE_MARGIN=0.02 below the champion there" in level["detail"]
    assert apply_breaches(_kept_by_the_comparison(), [_breach(challenger_check=level)], WIDE,
                          0.02)["promote"] is True
    # with no margin the same difference below 0 vetoes
    assert site_condition(_vs_champion(difference), "A", 12, 17, 0.0)["passed"] is (difference == 0.0)


def test_a_challenger_not_measurable_at_the_site_is_reported_and_not_vetoed():
    unknown = site_condition(None, "A", 3, 17, 0.02,
                             why_not="3 films outside its training split: normal 1 film(s)")
    assert unknown["passed"] is True and unknown["measurable"] is False
    assert "not measurable" in unknown["detail"]
    out = apply_breaches(_kept_by_the_comparison(), [_breach(challenger_check=unknown)], WIDE, 0.02)
    assert out["promote"] is True and out["checks"][-1]["name"] == "breach_site"


@pytest.mark.parametrize("breach", [_breach(mode="alert"), _breach(status="held"),
                                    _breach(status="not enough films"), _breach(status="failed")])
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
                    breach_checks=[replace(_breach(), detail="champion v17 measured 0.114 below ..."), held,
                                   replace(_breach(status="failed"), site="C",
                                           detail="breach check failed: OSError: disk; no action")])
    text = retrain_markdown(run)
    assert "Locked reference at drifted site C: breach check failed: OSError: disk; no action." in text
    assert ("**Breach of the locked reference at site A**: champion v17 measured 0.114 below ... "
            "(XRAY_REFERENCE_BREACH=lift: none).") in text
    assert "Locked reference at drifted site B: held: no breach: ..." in text


# ---------------------------------------------------------------- which films: the site's drift episode

def test_a_batch_from_one_known_site_flags_that_site_for_the_breach():
    # every new film from site A, checked against A's own reference films ("site": A): that check is A's
    one_site = {"flagged": True,
                "checks": [{"subject": "all new films", "site": "A", "n": 12, "drift": True}]}
    assert flagged_sites(one_site) == ["A"]
    # a mix of sites (no "site"), or a batch compared with the pooled reference only: no site named
    assert flagged_sites({"checks": [{"subject": "all new films", "n": 12, "drift": True}]}) == []
    assert site_flags([{"subject": "all new films", "site": "A", "n": 12, "drift": False,
                        "counts": False, "pooled_drift": True}]) == {}
    # tested and not flagged (12 films), not tested (3 films, fewer than MIN_BATCH=5: says nothing)
    assert site_flags([{"subject": "all new films", "site": "A", "n": 12, "drift": False}]) == {"A": False}
    assert site_flags([{"subject": "all new films", "site": "A", "n": 3, "drift": False}]) == {}
    assert site_flags([{"subject": "all new films", "n": 20, "drift": True},
                       {"subject": "site A", "n": 12, "drift": True},
                       {"subject": "site B", "n": 8, "drift": False}]) == {"A": True, "B": False}


T = [datetime(2026, 5, day, 2, 0, tzinfo=UTC) for day in range(1, 8)]  # one check a night, T[0]..T[6]
A_FLAGGED = [{"subject": "site A", "n": 10, "drift": True}, {"subject": "site B", "n": 10, "drift": False}]
A_HELD = [{"subject": "site A", "n": 10, "drift": False}, {"subject": "site B", "n": 10, "drift": False}]
ONLY_B = [{"subject": "all new films", "site": "B", "n": 10, "drift": False}]  # A sent no films that night
A_ALONE = [{"subject": "all new films", "site": "A", "n": 10, "drift": True}]  # A sent all the films


def _newest_first(*nights: list[dict[str, Any]]) -> list[tuple[datetime, list[dict[str, Any]]]]:
    return [(T[i], checks) for i, checks in enumerate(nights)][::-1]


def test_the_episode_starts_after_the_last_check_that_held_and_a_night_without_films_does_not_end_it():
    # T0 A held; T1 A flagged (its films came after T0); T2 only B; T3 A alone flagged; T4 tonight flagged
    found = episode(_newest_first(A_HELD, A_FLAGGED, ONLY_B, A_ALONE, A_FLAGGED), "A")
    assert found == (T[0], T[1])  # films added after T0's check; the drift began at T1
    assert episode(_newest_first(A_HELD, A_FLAGGED, ONLY_B, A_ALONE, A_FLAGGED), "B") is None  # B held


def test_a_check_that_held_ends_the_episode():
    # T0 flagged, T1 held, T2 flagged, T3 flagged: the episode is T2..T3, its films those after T1
    assert episode(_newest_first(A_FLAGGED, A_HELD, A_FLAGGED, A_FLAGGED), "A") == (T[1], T[2])
    # a night with no films of A just before the episode: the films are still those after that night's check
    assert episode(_newest_first(A_HELD, ONLY_B, A_FLAGGED), "A") == (T[1], T[2])


def test_no_episode_when_the_newest_check_of_the_site_held_and_none_bound_when_every_check_flagged():
    assert episode(_newest_first(A_FLAGGED, A_HELD, ONLY_B), "A") is None  # tonight's said nothing of A
    assert episode([], "A") is None
    assert episode(_newest_first(A_FLAGGED, ONLY_B, A_FLAGGED), "A") == (None, T[0])  # from the first check


def test_the_episode_is_read_from_the_recorded_checks_of_catalogued_films(settings):
    from xray_core.monitor.checks import latest_checks, record_check

    def check(kind: str, checks: list[dict[str, Any]]) -> None:
        drift = any(c["drift"] for c in checks)
        record_check(settings, model_id=None, kind=kind, subject=kind,
                     check={"n": 10, "ood_flagged": 0, "drift": drift, "verdict": "v", "checks": checks})

    check("retrain", A_HELD)
    check("retrain", A_FLAGGED)
    check("predict", A_HELD)  # a predict batch is not a catalogued film: it neither ends nor bounds it
    check("monitor", ONLY_B)
    check("retrain", A_FLAGGED)
    rows = {r["id"]: datetime.fromisoformat(r["created_at"]) for r in latest_checks(settings, limit=10)}
    assert drift_episode(settings, "A") == (rows[1], rows[2])
    assert drift_episode(settings, "B") is None and drift_episode(settings, "C") is None


class _Snapshot:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def load(self) -> SplitData:
        return SplitData(labels=LABELS, train=[], val=[], test=self.rows)


HALF_HOUR = timedelta(minutes=30)


def _wired(monkeypatch, rows: list[Row], bound: datetime | None, *, fail: bool = False,
           recorded: bool = False, trained: dict[int, set[str]] | None = None) -> list[datetime]:
    """measure_breaches with the catalogue faked: both models (champion v17, locked reference v2) created
    at T[0]; of the 8 films, rows 0 (normal) and 4 (pneumonia) added 10 minutes after, the others an hour
    after; the drift episode ``(bound, T[4])`` (None: none recorded). The champion scores WORSE, the
    reference PERFECT; ``recorded``: the open drift episodes are read from the recorded checks (else none);
    ``trained``: the patients of each model's split manifest (else none).
    Returns the times ``by_site`` was asked for films since."""
    import xray_core.pipeline.breach as breach
    import xray_core.pipeline.sequester as sequester
    import xray_core.registry.reference as reference

    asked: list[datetime] = []
    trained = trained or {}
    added = {r.id: T[0] + timedelta(minutes=10 if r.id in (0, 4) else 60) for r in rows}

    def by_site(settings, routine, since):
        asked.append(since)
        return {"A": [r for r in routine.values() if since is None or added[r.id] > since]}

    def score(settings, version, scored):
        if fail:
            raise RuntimeError("feature cache unreadable")
        p = dict(zip([r.id for r in rows], WORSE if version == 17 else PERFECT))
        return _scored(version, scored, [p[r.id] for r in scored])

    monkeypatch.setattr(reference, "reference_version", lambda settings: 2)
    monkeypatch.setattr(breach, "model_facts", lambda settings, version: (T[0], LABELS))
    monkeypatch.setattr(breach, "trained_patients", lambda settings, version: trained.get(version, set()))
    monkeypatch.setattr(breach, "by_site", by_site)
    monkeypatch.setattr(breach, "drift_episode",
                        lambda settings, site: None if bound is None else (bound, T[4]))
    monkeypatch.setattr(sequester, "score", score)
    monkeypatch.setattr(breach, "earlier_calls", lambda *args: (None, "no earlier test films of the site"))
    if not recorded:
        monkeypatch.setattr(breach, "drifting_sites", lambda settings, after: set())
    return asked


def test_the_breach_is_measured_on_the_films_of_the_episode_and_says_since_when(small, monkeypatch):
    rows = _rows(4)
    asked = _wired(monkeypatch, rows, T[0] + HALF_HOUR)  # the check before the episode: after rows 0 and 4
    alert = small.with_overrides(reference_breach="alert")
    (check,) = measure_breaches(alert, {"checks": A_FLAGGED}, 17, 22, _Snapshot(rows))
    assert asked == [T[0], T[0] + HALF_HOUR] and check.since == (T[0] + HALF_HOUR).isoformat()
    assert (check.drift_began, check.films_from, check.status, check.films) == (T[4].isoformat(), "drift",
                                                                                "breach", 6)
    # the champion on the 6 films: normal 0.2 0.7 0.8 vs pneumonia 0.6 0.85 0.9, 7 of 9 pairs right
    assert check.difference == pytest.approx(7 / 9 - 1)
    assert check.detail.startswith("champion v17 measured 0.222 below the locked reference v2 on site A's 6 "
                                   "films since the drift began on 2026-05-05 02:00 UTC")


def test_an_episode_older_than_the_models_and_none_recorded_keep_the_films_since_both_models(small,
                                                                                           monkeypatch):
    rows, alert = _rows(4), small.with_overrides(reference_breach="alert")
    _wired(monkeypatch, rows, T[0] - HALF_HOUR)  # the drift began before the newer model was created
    (check,) = measure_breaches(alert, {"checks": A_FLAGGED}, 17, 22, _Snapshot(rows))
    assert (check.films, check.films_from, check.since) == (8, "models", T[0].isoformat())
    assert check.difference == pytest.approx(-0.25)
    assert ("on site A's 8 films since both models were created (2026-05-01 02:00 UTC; the drift began on "
            "2026-05-05 02:00 UTC)") in check.detail
    _wired(monkeypatch, rows, None)  # no recorded episode (checks stored before the breach step)
    (check,) = measure_breaches(alert, {"checks": A_FLAGGED}, 17, 22, _Snapshot(rows))
    assert check.drift_began is None and check.films_from == "models" and check.films == 8
    assert "at site A on 8 new films" in check.detail


def test_a_failing_breach_step_is_reported_and_changes_nothing(small, monkeypatch):
    rows = _rows(4)
    _wired(monkeypatch, rows, T[0], fail=True)
    checks = measure_breaches(small, {"checks": A_FLAGGED + [{"subject": "site C", "n": 9, "drift": True}]},
                              17, 22, _Snapshot(rows))
    assert [(c.site, c.status, c.action, c.reference) for c in checks] == [("A", "failed", "none", 2),
                                                                          ("C", "failed", "none", 2)]
    assert checks[0].detail == "breach check failed: RuntimeError: feature cache unreadable; no action"
    decision = _kept_by_the_comparison()
    assert apply_breaches(decision, checks) == decision
    assert (apply_guards(small, decision, {"metrics": {}}, None, None, None, None, checks)
            == apply_guards(small, decision, {"metrics": {}}, None, None, None, None, ()))


# ------------------------------------------------- a retrain on drift: no films, so no drift step of its own

def test_a_site_is_drifting_while_the_newest_check_that_tested_it_flagged_it_after_the_champion():
    nights = _newest_first(A_HELD, A_FLAGGED, ONLY_B, [{"subject": "site C", "n": 10, "drift": True}],
                           A_HELD[1:])  # T4 tested B only
    assert open_sites(nights, T[0]) == {"A", "C"}  # A: T1 (T2 did not test it); B held at T2 and T4
    assert open_sites(nights, T[1]) == {"C"}  # A's flag at T1 is not after the champion (created at T1)
    assert open_sites(_newest_first(A_FLAGGED, A_HELD), T[0] - HALF_HOUR) == set()  # held at T1: closed


def test_a_run_without_new_films_measures_a_site_flagged_by_a_recorded_monitor_check(small, monkeypatch):
    from xray_core.monitor.checks import record_check

    rows = _rows(4)
    _wired(monkeypatch, rows, None, recorded=True)  # the champion created at T[0], before the check
    alert = small.with_overrides(reference_breach="alert")
    assert measure_breaches(alert, None, 17, 22, _Snapshot(rows)) == []  # no check recorded: none
    record_check(small, model_id=None, kind="monitor", subject="monitor",
                 check={"n": 20, "ood_flagged": 0, "drift": True, "verdict": "v", "checks": A_FLAGGED})
    (check,) = measure_breaches(alert, None, 17, 22, _Snapshot(rows))  # the run's own drift: none
    assert (check.site, check.status, check.films) == ("A", "breach", 8)
    assert check.difference == pytest.approx(-0.25)


# ------------------------------------------------------------------- rollback after the decision is recorded

def _kept_run(tmp_path, review: dict[str, Any] | None = None) -> RunResult:
    from xray_core.results import TrainResult, Verdict

    return RunResult(flow_run_id=None, run_name="r", trigger="test", backbone_weights="random",
                     backbone_random_init=True, run_dir=str(tmp_path), champion_after=17,
                     train=TrainResult.from_dict({"version": 22}),
                     decision=Verdict(decision="rejected" if review else "keep", promote=False,
                                      rationale="Keep.", checks=[], review=review),
                     breach_checks=[replace(_breach(mode="rollback"), action="comparison lifted")])


@pytest.mark.parametrize("answer", ["reject", "expired"])
def test_a_reviewed_decision_does_not_restore_the_reference(settings, monkeypatch, tmp_path, answer):
    import xray_core.registry.versions as versions
    from xray_core.pipeline.executor import DirectExecutor

    called: list[dict[str, Any]] = []
    monkeypatch.setattr(versions, "rollback", lambda *a, **k: called.append(k) or {"champion_after": 2})
    rollback = settings.with_overrides(reference_breach="rollback")
    run = _kept_run(tmp_path, {"answer": answer, "reviewer": "dr x" if answer == "reject" else None})
    restore_reference(rollback, DirectExecutor(), run, "test", None)
    assert called == [] and run.champion_after == 17 and not run.reference_restored
    assert run.breach_checks[0].action == "comparison lifted; not restored: the decision came from a review"
    run = _kept_run(tmp_path)  # no review: restored
    restore_reference(rollback, DirectExecutor(), run, "test", None)
    assert len(called) == 1 and run.champion_after == 2 and run.reference_restored
    # the restore's audit row keeps the breach's numbers (metrics), with the action it took
    assert called[0]["metrics"] == {"breach": [
        {"site": "A", "status": "breach", "champion": 17, "reference": 2, "gap": -0.114, "low": -0.2,
         "high": -0.03, "films": 40, "since": None, "action": "reference restored", "kind": "auroc",
         "detection": None, "breach_site": None}]}


def test_the_review_form_says_a_breach_was_measured(settings):
    from xray_core.pipeline.review import review_markdown, review_request
    from xray_core.results import Verdict

    rows = _rows(4)
    blocked = Verdict(decision="blocked", promote=False, rationale="Not promoted.", checks=[])
    ask = review_request(settings.with_overrides(review="blocked"), blocked, _scored(22, rows, PERFECT),
                         _scored(17, rows, WORSE), breaches=["champion v17 measured 0.114 below ..."])
    assert ask is not None and ask.breaches == ("champion v17 measured 0.114 below ...",)
    assert ("**A breach at a drifted site was measured:** champion v17 measured 0.114 below .... The "
            "champion stays if you reject or nobody answers: the reference is not restored after a review"
            in review_markdown(ask))


def test_a_failed_restore_is_reported_and_does_not_fail_the_run(settings, monkeypatch, tmp_path):
    import xray_core.registry.versions as versions
    from xray_core.errors import CheckpointError
    from xray_core.pipeline.executor import DirectExecutor

    def unreadable(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise CheckpointError("model v2's weights are unreadable")

    monkeypatch.setattr(versions, "rollback", unreadable)
    run = _kept_run(tmp_path)
    rollback = settings.with_overrides(reference_breach="rollback")
    restore_reference(rollback, DirectExecutor(), run, "test", None)
    assert run.champion_after == 17 and not run.reference_restored
    assert run.breach_checks[0].action == "comparison lifted; not restored: model v2's weights are unreadable"


def test_the_decisions_audit_row_keeps_the_breach_numbers(settings, monkeypatch):
    import xray_core.registry.versions as versions
    from xray_core.pipeline.steps import promote_step

    kept: list[dict[str, Any]] = []
    monkeypatch.setattr(versions, "record_decision", lambda settings, **k: kept.append(k["metrics"]) or {})
    level = site_condition(_vs_champion(0.0), "A", 12, 17, 0.02)
    check = replace(_breach(challenger_check=level), action="comparison lifted")
    evaluation = {"version": 22, "test_set_fingerprint": "f", "metrics": {"intervals": {}}}
    promote_step(settings, challenger=22, decision={"decision": "keep", "promote": False, "rationale": "K."},
                 trigger="test", champion_eval=None, challenger_eval=evaluation, breach=[check.audit_row()])
    assert kept[0]["breach"] == [{"site": "A", "status": "breach", "champion": 17, "reference": 2,
                                  "gap": -0.114, "low": -0.2, "high": -0.03, "films": 40, "since": None,
                                  "action": "comparison lifted", "kind": "auroc", "detection": None,
                                  "breach_site": True}]


def test_new_films_of_patients_either_model_trained_on_are_not_counted(small, monkeypatch):
    rows = _rows(4)  # patients p0..p7; the champion trained on p5's earlier films, the reference on p2's
    _wired(monkeypatch, rows, None, trained={17: {"p5"}, 2: {"p2"}})
    (check,) = measure_breaches(small.with_overrides(reference_breach="alert"), {"checks": A_FLAGGED}, 17, 22,
                                _Snapshot(rows))
    assert check.films == 6  # normal 0.1 0.2 0.8 vs pneumonia 0.5 0.85 0.9 for the champion: 8 of 9 right
    assert check.difference == pytest.approx(8 / 9 - 1)


def test_a_breach_says_what_its_lift_did_once_the_decision_is_made():
    """Night 44 of the year: a breach with a comparison that had passed was recorded as 'comparison
    lifted' though nothing was lifted; the action now says what happened."""
    from xray_core.evaluate.breach import LIFTED, settled_actions

    lifting = replace(_breach(), action=LIFTED)
    held = replace(_breach(status="held"), action="none")
    passed = [{"name": "comparison", "passed": True, "detail": "non-inferior"}]
    lifted = [{"name": "comparison", "passed": False, "lifted": True, "detail": "no veto: ..."}]
    vetoed = [{"name": "comparison", "passed": False, "lifted": False, "detail": "still vetoes ..."}]
    assert [b.action for b in settled_actions([lifting, held], passed)] == [
        "nothing to lift: the comparison did not veto", "none"]
    assert settled_actions([lifting], lifted)[0].action == LIFTED
    assert settled_actions([lifting], vetoed)[0].action == "not lifted: the comparison measured a drop"
    alert = replace(_breach(mode="alert"), action="reported")
    assert settled_actions([alert], vetoed)[0].action == "reported"


# The champion's detection at a drifted site (kind "sensitivity"): 10 earlier films of site A (5 normal,
# 5 pneumonia) added before the episode, 10 of the episode after it. On the episode's films the champion
# still ranks every pneumonia film above every normal one, but below its threshold (0.5): it calls none.
EARLIER_P = [0.1, 0.2, 0.3, 0.2, 0.1, 0.9, 0.8, 0.7, 0.9, 0.6]  # 5 of 5 pneumonia called
EPISODE_P = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.42]  # 0 of 5 called, AUROC 1


def test_fisher_exact_on_the_champions_calls_before_and_during_the_episode():
    from math import comb

    from xray_core.evaluate.breach import detection_drop

    # pneumonia: 26 of 30 called before, 0 of 5 after. One-sided Fisher: with the margins fixed (35 films,
    # 26 called), the chance that all 26 calls fall among the 30 earlier films = C(30,26) / C(35,26)
    before, after = [[30, 0], [4, 26]], [[5, 0], [5, 0]]
    got = detection_drop(LABELS, "normal", before, after, 0.02, 0.01, 2)
    assert got["label"] == "pneumonia" and got["before"] == [26, 30] and got["after"] == [0, 5]
    assert got["p"] == pytest.approx(comb(30, 26) / comb(35, 26)) and got["collapsed"] is True
    assert got["drop"] == round(26 / 30, 4)
    # 4 of 5 after: a drop of 0.067, p = P(at least 26 of the 30 calls before | 30 calls) > 0.01
    held = detection_drop(LABELS, "normal", before, [[5, 0], [1, 4]], 0.02, 0.01, 2)
    assert held["collapsed"] is False and held["p"] > 0.01
    # a drop within XRAY_GUARDRAIL_SENSITIVITY_DROP is no collapse, however significant
    assert detection_drop(LABELS, "normal", before, after, 0.9, 0.01, 2)["collapsed"] is False
    # fewer positives than XRAY_MIN_TEST_PER_CLASS on either side: nothing judged
    assert detection_drop(LABELS, "normal", before, [[5, 0], [0, 1]], 0.02, 0.01, 2) is None


def test_a_champion_that_stops_calling_a_sites_disease_is_in_breach_though_it_ranks_well(small):
    rows, earlier = _rows(5), [Row(100 + i, f"{100 + i:064x}", "s", r.label, f"q{i}") for i, r in
                               enumerate(_rows(5))]
    champion = _scored(17, rows, EPISODE_P)
    check = judge_site(small, "A", rows, champion, _scored(2, rows, EPISODE_P), "t0",
                       earlier=_scored(17, earlier, EARLIER_P))
    assert check.difference == 0 and check.breached and check.kind == "sensitivity"  # AUROC alone: held
    assert check.detection["before"] == [5, 5] and check.detection["after"] == [0, 5]
    assert check.detection["p"] == pytest.approx(1 / 252)  # C(5,5) C(5,0) / C(10,5)
    assert check.action == "reported" and not check.acts  # reported; no decision acts on it
    assert check.detail.startswith("champion v17 called pneumonia on 0 of its 5 pneumonia films, against "
                                   "5 of 5 of the site's earlier test films (one-sided Fisher p=0.004), at "
                                   "site A on 10 new films: its detection fell by more than "
                                   "XRAY_GUARDRAIL_SENSITIVITY_DROP")
    assert check.audit_row()["kind"] == "sensitivity" and check.audit_row()["detection"]["after"] == [0, 5]
    kept = _kept_by_the_comparison()
    assert apply_breaches(kept, [check], WIDE, 0.02) == kept  # the comparison is not lifted
    assert check.audit_row()["action"] == "reported"
    for mode in ("rollback", "alert"):  # whatever XRAY_REFERENCE_BREACH says
        other = judge_site(small.with_overrides(reference_breach=mode), "A", rows, champion,
                           _scored(2, rows, EPISODE_P), "t0", earlier=_scored(17, earlier, EARLIER_P))
        assert other.breached and other.action == "reported" and not other.acts
    from xray_core.report.reference import breach_lines

    (line,) = breach_lines([check])
    assert line["breached"] and line["head"] == "Breach at site A: the champion's detection fell"
    assert line["text"].endswith("(reported; the decision does not act on it)")


def test_a_champion_whose_calls_held_is_no_breach_and_says_so(small):
    rows, earlier = _rows(5), _rows(5)
    check = judge_site(small, "A", rows, _scored(17, rows, EARLIER_P), _scored(2, rows, EARLIER_P), "t0",
                       earlier=_scored(17, earlier, EARLIER_P))
    assert check.status == "held" and check.kind == "auroc" and check.detection["collapsed"] is False
    assert check.detail.endswith("its detection held: it called pneumonia on 5 of its 5 pneumonia films, "
                                 "against 5 of 5 of the site's earlier test films (one-sided Fisher p=1)")
    # in a ranking breach whose calls fell too, the words say so
    below = [p / 2 for p in WORSE] + [0.1, 0.1]  # ranked worse than the reference, and none called
    worse = judge_site(small, "A", rows, _scored(17, rows, below), _scored(2, rows, EARLIER_P), "t0",
                       earlier=_scored(17, earlier, EARLIER_P))
    assert worse.kind == "auroc" and worse.breached and worse.detection["collapsed"]
    assert "; its detection fell too: it called pneumonia on 0 of its 5" in worse.detail
    # no baseline: said, and the ranking check stands
    alone = judge_site(small, "A", rows, _scored(17, rows, EARLIER_P), _scored(2, rows, EARLIER_P), "t0",
                       earlier_note="no earlier test films of the site")
    assert alone.status == "held" and alone.detail.endswith(
        "; its detection not judged: no earlier test films of the site")


def test_the_breach_step_judges_the_champions_calls_on_the_sites_films_from_before_the_episode(
        small, monkeypatch):
    earlier = [Row(100 + i, f"{100 + i:064x}", "s", r.label, f"q{i}") for i, r in enumerate(_rows(5))]
    rows = _rows(5)
    p = {**dict(zip([r.id for r in earlier], EARLIER_P)), **dict(zip([r.id for r in rows], EPISODE_P))}
    _wired(monkeypatch, [*earlier, *rows], T[0] + HALF_HOUR)
    import xray_core.pipeline.breach as breach
    import xray_core.pipeline.sequester as sequester

    added = {r.id: T[0] + timedelta(minutes=10 if r.id >= 100 else 60) for r in [*earlier, *rows]}
    monkeypatch.setattr(breach, "by_site", lambda settings, routine, since: {"A": [
        r for r in routine.values() if since is None or added[r.id] > since]})
    monkeypatch.setattr(sequester, "score", lambda settings, version, scored: _scored(
        version, scored, [p[r.id] for r in scored]))
    import xray_core.pipeline.detection as detection

    monkeypatch.setattr(breach, "earlier_calls", detection.earlier_calls)  # _wired stubbed it
    cuts: list[datetime] = []
    monkeypatch.setattr(detection, "earlier_test_rows", lambda settings, site, test, cut: cuts.append(
        cut) or [test[r.id] for r in earlier if added[r.id] <= cut])
    (check,) = measure_breaches(small, {"checks": A_FLAGGED}, 17, 22, _Snapshot([*earlier, *rows]))
    assert check.films == 10 and check.kind == "sensitivity" and check.status == "breach"
    assert check.detection["before"] == [5, 5] and check.detection["after"] == [0, 5]
    assert check.challenger_check is None  # lift is the default; a detection breach measures no challenger
    assert cuts == [T[0] + HALF_HOUR]  # the films up to the check before the episode


def test_rollback_does_not_restore_the_reference_for_a_fall_in_detection(settings, monkeypatch, tmp_path):
    import xray_core.registry.versions as versions
    from xray_core.pipeline.executor import DirectExecutor

    called: list[dict[str, Any]] = []
    monkeypatch.setattr(versions, "rollback", lambda *a, **k: called.append(k) or {"champion_after": 2})
    run = _kept_run(tmp_path)
    run.breach_checks = [replace(c, kind="sensitivity", action="reported") for c in run.breach_checks]
    rollback = settings.with_overrides(reference_breach="rollback")
    restore_reference(rollback, DirectExecutor(), run, "test", None)
    assert not called and run.champion_after == 17 and [c.action for c in run.breach_checks] == ["reported"]
