"""Negative flips (issue 26): the metric on a hand-computed case, per site, the films both models scored at
each model's own operating point, and the XRAY_MAX_NEGATIVE_FLIP veto on and off."""

from __future__ import annotations

import numpy as np
import pytest

from xray_core.data.catalogue import Row
from xray_core.data.snapshot import SplitData
from xray_core.evaluate.flips import negative_flips
from xray_core.evaluate.intervals import proportion_interval
from xray_core.evaluate.promotion import negative_flip_check
from xray_core.pipeline.guards import apply_guards, flips_step
from xray_core.report.flips import flip_rows, flips_context
from xray_core.report.html import render_html
from xray_core.report.markdown import retrain_markdown
from xray_core.results import RunResult

# Ten films, eight patients (pA has f0 and f1, pE has f5 and f6), two sites. N = normal, P = pneumonia.
#   film        f0 f1 f2 f3 f4 | f5 f6 f7 f8 f9
#   truth       N  P  P  N  P  | N  P  N  P  N
#   champion    N  P  P  N  N  | N  P  N  P  P     right: f0 f1 f2 f3, f5 f6 f7 f8
#   challenger  N  N  P  P  P  | N  P  N  P  N     right: f0 f2 f4, f5 f6 f7 f8 f9
# Negative flips (champion right, challenger wrong): f1, f3 -> 2 of 10 = 0.2, both on site A (2 of 5 = 0.4).
# Both right: f0 f2 f5 f6 f7 f8 -> 6 of 10. Positive flips (champion wrong, challenger right): f4, f9.
TRUTH = list("NPPNPNPNPN")
CHAMPION = list("NPPNNNPNPP")
CHALLENGER = list("NNPPPNPNPN")
PATIENTS = ["pA", "pA", "pB", "pC", "pD", "pE", "pE", "pF", "pG", "pH"]
SITES = ["A"] * 5 + ["B"] * 5
FILMS = [f"f{i}" for i in range(10)]


@pytest.fixture(scope="module")
def flips():
    return negative_flips(TRUTH, CHAMPION, CHALLENGER, PATIENTS, SITES, n_samples=200, seed=0, films=FILMS)


def test_the_hand_computed_flips_overall_and_per_site(flips):
    assert flips["n"] == 10 and flips["patients"] == 8
    assert flips["counts"] == {"both_right": 6, "negative_flips": 2, "positive_flips": 2, "both_wrong": 0}
    assert flips["flipped"] == ["f1", "f3"]
    assert flips["negative_flip_rate"]["point"] == pytest.approx(0.2)
    assert flips["positive_congruence"]["point"] == pytest.approx(0.6)
    rate = flips["negative_flip_rate"]
    assert rate["method"] == "bootstrap" and rate["low"] <= 0.2 <= rate["high"] and rate["high"] > 0.2
    a, b = flips["by_site"]["A"], flips["by_site"]["B"]
    assert (a["n"], a["patients"], a["counts"]["negative_flips"], a["counts"]["both_right"]) == (5, 4, 2, 2)
    assert a["negative_flip_rate"]["point"] == pytest.approx(0.4)
    assert b["counts"] == {"both_right": 4, "negative_flips": 0, "positive_flips": 1, "both_wrong": 0}
    # 0 of 5 on site B: every resample gives 0, so the interval is Wilson's on B's 4 patients, not [0, 0]
    nb = b["negative_flip_rate"]
    assert nb["point"] == 0 and nb["method"] == "wilson" and nb["n_effective"] == 4
    assert nb["low"] == pytest.approx(0) and 0.4 < nb["high"] < 0.6


def test_the_interval_resamples_patients_not_films():
    # 8 flips among 40 films: spread over 8 patients, or all in 2 patients of 4 films each. Flips that
    # travel together (one patient's films) make the rate less certain: the clustered interval is wider
    # and reaches 0 (a resample may miss both patients).
    hits = np.array([1] * 8 + [0] * 32, dtype=bool)
    own = proportion_interval(hits, np.arange(40), n_samples=400, seed=1)
    clustered = proportion_interval(hits, np.r_[[0] * 4 + [1] * 4, np.arange(2, 34)], n_samples=400, seed=1)
    assert own["point"] == clustered["point"] == pytest.approx(0.2)
    assert own["low"] > 0 and clustered["low"] == 0
    assert clustered["high"] - clustered["low"] > own["high"] - own["low"] + 0.1


def test_the_veto_check_compares_the_upper_bound(flips):
    high = flips["negative_flip_rate"]["high"]
    tight = negative_flip_check(flips, 0.1)
    assert tight["name"] == "negative_flips" and not tight["passed"]
    assert "2 of 10 films" in tight["detail"] and "exceeds the allowed 0.1" in tight["detail"]
    assert "XRAY_MAX_NEGATIVE_FLIP" in tight["detail"]
    assert negative_flip_check(flips, high)["passed"]  # at the bound: not exceeded
    assert not negative_flip_check(flips, high - 0.01)["passed"]
    empty = negative_flips([], [], [], [], [], n_samples=50, seed=0)
    assert empty["n"] == 0 and not negative_flip_check(empty, 1.0)["passed"]


def _promote() -> dict:
    return {"decision": "promote", "promote": True, "rationale": "Shown non-inferior. Promote.", "checks": []}


def test_the_setting_vetoes_promotion_only_when_set(settings, flips):
    ev = {"metrics": {}}
    off = apply_guards(settings, _promote(), ev, ev, None, flips)
    assert off["promote"] and off["negative_flips"] is flips
    assert "negative_flips" not in [c["name"] for c in off["checks"]]

    on = apply_guards(settings.with_overrides(max_negative_flip=0.1), _promote(), ev, ev, None, flips)
    assert on["decision"] == "keep" and not on["promote"]
    assert on["rationale"].startswith("Keep, because negative flip rate 0.200")
    assert "would have promoted: Shown non-inferior" in on["rationale"]
    check = next(c for c in on["checks"] if c["name"] == "negative_flips")
    assert not check["passed"]

    loose = apply_guards(settings.with_overrides(max_negative_flip=1.0), _promote(), ev, ev, None, flips)
    assert loose["promote"] and next(c for c in loose["checks"] if c["name"] == "negative_flips")["passed"]


def test_flips_step_uses_each_models_operating_point_on_the_films_both_scored(settings):
    # s0 normal, s1 pneumonia (pA); s2 pneumonia (pB); s3 normal (pC); s4 covid19 (pD): the champion
    # does not know covid19, so s4 is not a film both scored
    rows = [Row(i, f"s{i}", f"store/s{i}.png", label, pid) for i, (label, pid) in enumerate(
        [("normal", "pA"), ("pneumonia", "pA"), ("pneumonia", "pB"), ("normal", "pC"), ("covid19", "pD")])]
    # champion (normal, pneumonia) at threshold 0.3 on pneumonia: s0 N right, s1 P right (argmax would say
    # N), s2 P right, s3 P wrong. Challenger (covid19, normal, pneumonia), argmax: s0 N right, s1 N wrong,
    # s2 covid19 wrong, s3 N right. Negative flips: s1, s2 -> 2 of 4; both right: s0; positive flip: s3.
    champion = {"labels": ["normal", "pneumonia"], "metrics": {"threshold": 0.3},
                "shas": ["s0", "s1", "s2", "s3"], "sites": ["A", "A", "B", "B"],
                "probabilities": [[0.9, 0.1], [0.6, 0.4], [0.1, 0.9], [0.65, 0.35]]}
    challenger = {"labels": ["covid19", "normal", "pneumonia"], "metrics": {"threshold": None},
                  "shas": ["s0", "s1", "s2", "s3", "s4"], "sites": ["A", "A", "B", "B", "B"],
                  "probabilities": [[0.1, 0.8, 0.1], [0.1, 0.5, 0.4], [0.6, 0.1, 0.3], [0.1, 0.8, 0.1],
                                    [0.8, 0.1, 0.1]]}
    data = SplitData(labels=["covid19", "normal", "pneumonia"], train=[], val=[], test=rows)
    out = flips_step(settings, challenger, champion, data)
    assert out is not None
    assert (out["n"], out["patients"], out["flipped"]) == (4, 3, ["s1", "s2"])
    assert out["counts"] == {"both_right": 1, "negative_flips": 2, "positive_flips": 1, "both_wrong": 0}
    by_site = {site: part["counts"]["negative_flips"] for site, part in out["by_site"].items()}
    assert by_site == {"A": 1, "B": 1}


def test_report_section_and_metric_rows(flips):
    context = flips_context(flips)
    assert context is not None and context["negative_flips"] == 2 and context["flipped"] == ["f1", "f3"]
    assert [r[0] for r in context["rows"]] == ["all", "A", "B"] and context["rows"][1][3] == 2
    rows = {r["metric"]: r["challenger"] for r in flip_rows(flips)}
    overall = rows["negative_flip_rate"]
    assert overall.startswith("0.200 [") and overall.endswith("(2 of 10 films)")
    assert rows["negative_flip_rate @ site A"].startswith("0.400") and "positive_congruence @ site B" in rows
    assert flips_context(None) is None and flip_rows(None) == []


def test_result_json_round_trip_and_both_reports_show_the_section(flips):
    ev = {"version": 3, "n_images": 10, "test_set_fingerprint": "ab" * 32,
          "metrics": {"labels": ["N", "P"], "macro_auroc": 0.9, "per_class": {}, "intervals": {},
                      "confusion_matrix": [[4, 1], [1, 4]]}}
    run = RunResult.from_dict({
        "run_name": "nightly-7", "trigger": "test", "backbone_weights": "imagenet", "ingests": [],
        "status": "completed", "challenger_eval": ev, "champion_eval": {**ev, "version": 2},
        "decision": {"decision": "keep", "promote": False, "rationale": "Keep.", "checks": []},
        "champion_after": 2, "negative_flips": flips})
    assert run.as_dict()["negative_flips"] == flips  # result.json's new key survives a reload
    md = retrain_markdown(run)
    assert "## Negative flips" in md and "**2**, a negative flip rate of 0.200 [" in md
    assert "| A | 5 | 4 | 2 | 0.400" in md and "`f1`, `f3`" in md
    html = render_html(run, None)
    assert 'id="negative-flips"' in html and "<code>f1</code>" in html
    without = RunResult.from_dict({**run.as_dict(), "negative_flips": None})
    assert "Negative flips" not in retrain_markdown(without) and "negative_flips" not in without.as_dict()
