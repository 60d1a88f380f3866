"""bench/year_guard.py: why the champion was beyond the margin below the locked reference on a night, on
hand-made truth rows (the numbers are the AUROCs year.json keeps per night, per site)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def year_guard() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_year_guard", BENCH / "year_guard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _model(version, **sites):
    return {"version": version, "auroc": 0.0, "sites": {s: {"auroc": a} for s, a in sites.items()}}


def _night(night, champion, before, reference):
    truth = {"champion": champion, "champion_before": before, "reference": reference}
    return {"night": night, "truth": truth}


REF = _model(1, A=0.90, B=0.80)


def test_each_gap_is_named_by_what_opened_it(year_guard):
    v5 = _model(5, A=0.91, B=0.85)          # within the margin at both sites
    v5_restyled = _model(5, A=0.80, B=0.85)  # the same model after site A's films changed: -0.10
    v7 = _model(7, A=0.87, B=0.85)           # promoted from v5 on the changed films: -0.03, narrower
    v9 = _model(9, A=0.87, B=0.75)           # promoted from v7: B now -0.05 (opened), A unchanged
    v11 = _model(11, A=0.84, B=0.75)         # promoted from v9: A -0.06, wider than v9's -0.03
    rows = [
        _night(0, v5, v5, REF),
        _night(1, v5_restyled, v5_restyled, REF),  # no promotion: the world changed
        _night(2, v5_restyled, v5_restyled, REF),  # the same champion, the same gap: carried
        _night(3, v7, v5_restyled, REF),           # promotion narrowed A's gap (-0.10 -> -0.03)
        _night(4, v9, v7, REF),                    # B opened by the promotion; A's -0.03 was already there
        _night(5, v11, v9, REF),                   # A widened by the promotion (-0.03 -> -0.06)
    ]
    gaps = year_guard.guard_gaps(rows, 0.02)
    assert [(g["night"], g["site"], g["cause"]) for g in gaps] == [
        (1, "A", "world change"),
        (2, "A", "carried"),
        (3, "A", "promotion narrowed it"),
        (4, "A", "carried"),  # v7 -0.03 -> v9 -0.03: the promotion left it as it was
        (4, "B", "promotion opened it"),
        (5, "A", "promotion widened it"),
        (5, "B", "carried"),  # -0.05 -> -0.05
    ]
    assert gaps[0]["gap"] == pytest.approx(-0.10) and gaps[2]["gap_before"] == pytest.approx(-0.10)
    summary = year_guard.guard_summary(rows, 0.02)
    assert summary["nights_by_cause"]["world change"] == [1]
    assert summary["nights_by_cause"]["promotion opened it"] == [4]
    assert summary["nights_by_cause"]["carried"] == [2, 4, 5]
    assert summary["promotions_that_opened_or_widened_a_gap"] == 2 and summary["held_by_promotions"] is False


def test_a_world_change_then_a_narrowing_promotion_is_held_by_promotions(year_guard):
    v5, v5_restyled, v7 = _model(5, A=0.91), _model(5, A=0.80), _model(7, A=0.95)
    ref = _model(1, A=0.90)
    rows = [_night(0, v5, v5, ref), _night(1, v5_restyled, v5_restyled, ref), _night(2, v7, v5_restyled, ref)]
    summary = year_guard.guard_summary(rows, 0.02)
    assert [g["cause"] for g in summary["gaps"]] == ["world change"]  # night 2's v7 is above the reference
    assert summary["held_by_promotions"] is True and summary["promotions_that_opened_or_widened_a_gap"] == 0


def test_a_night_without_truth_breaks_the_chain_and_a_new_site_is_a_world_change(year_guard):
    v5 = _model(5, A=0.80)
    ref = _model(1, A=0.90, C=0.90)
    rows = [_night(0, v5, v5, ref), {"night": 1, "truth": {"champion": None, "champion_before": None,
                                                          "reference": None}},
            _night(2, v5, v5, ref), _night(3, _model(5, A=0.80, C=0.70), v5, ref)]
    assert [(g["night"], g["site"], g["cause"]) for g in year_guard.guard_gaps(rows, 0.02)] == [
        (0, "A", "world change"), (2, "A", "world change"), (3, "A", "carried"), (3, "C", "world change")]


def test_a_champion_exactly_at_the_margin_is_not_beyond_it(year_guard):
    # year.json's AUROCs have 4 places; 0.83 - 0.85 is -0.020000000000000018 in floats. summarise (bench/
    # year.py) rounds the gap and counts -0.02 as held with a margin of 0.02: so must the causes, or the
    # summary says the guard held and lists a night beyond the margin.
    ref = _model(1, A=0.85, B=0.75)
    v5, v7 = _model(5, A=0.83, B=0.73), _model(7, A=0.83, B=0.70)
    rows = [_night(0, v5, v5, ref), _night(1, v5, v5, ref), _night(2, v7, v5, ref)]
    assert 0.83 - 0.85 < -0.02  # the float difference alone would count it
    gaps = year_guard.guard_gaps(rows, 0.02)
    assert [(g["night"], g["site"], g["cause"]) for g in gaps] == [(2, "B", "promotion opened it")]
    assert gaps[0]["gap_before"] == pytest.approx(-0.02)


def test_each_gap_carries_its_truth_pool_interval_and_the_nights_are_split_by_it(year_guard):
    ref, v5 = _model(1, A=0.90, B=0.90), _model(5, A=0.87, B=0.80)
    rows = [_night(0, v5, v5, ref), _night(1, v5, v5, ref)]
    rows[0]["truth"]["champion_gap"] = {"A": {"difference": -0.03, "low": -0.06, "high": 0.0},
                                        "B": {"difference": -0.10, "low": -0.15, "high": -0.05}}
    rows[1]["truth"]["champion_gap"] = {"A": {"difference": -0.03, "low": -0.06, "high": 0.0}}
    gaps = year_guard.guard_gaps(rows, 0.02)
    assert [(g["night"], g["site"], g["low"], g["high"]) for g in gaps] == [
        (0, "A", -0.06, 0.0), (0, "B", -0.15, -0.05), (1, "A", -0.06, 0.0), (1, "B", None, None)]
    summary = year_guard.guard_summary(rows, 0.02)
    assert summary["nights_beyond_the_margin_by_the_interval"] == [0]  # B's whole interval is beyond
    assert summary["nights_within_the_interval"] == [0, 1]  # A's reaches back within the margin


def test_the_truth_pool_names_the_nights_it_cannot_place_on_either_side_of_the_margin(year_guard):
    ref, v5, v7 = _model(1, A=0.90, B=0.90), _model(5, A=0.89, B=0.95), _model(7, A=0.85, B=0.96)
    rows = [_night(0, ref, ref, ref), _night(1, v5, ref, ref), _night(2, v7, v5, ref)]
    rows[1]["truth"]["champion_gap"] = {"A": {"difference": -0.01, "low": -0.03, "high": 0.01},  # holds -0.02
                                        "B": {"difference": 0.05, "low": 0.03, "high": 0.07}}
    rows[2]["truth"]["champion_gap"] = {"A": {"difference": -0.05, "low": -0.08, "high": -0.02},  # -0.02 in
                                        "B": {"difference": 0.06, "low": 0.05, "high": 0.07}}
    got = year_guard.truth_resolution(rows, 0.02, 1000)
    assert [(u["night"], u["site"]) for u in got["undecided"]] == [(1, "A"), (2, "A")]
    assert got["films_per_pool"] == 1000 and got["gaps_with_an_interval"] == 4
    assert got["half_width_max"] == pytest.approx(0.03) and got["half_width_median"] == pytest.approx(0.02)
    assert year_guard.truth_resolution(rows[:1], 0.02, 1000)["half_width_max"] is None  # the reference only


def test_the_worst_gap_is_the_lowest_champion_minus_reference_of_any_night_and_site(year_guard):
    ref, v5, v7 = _model(1, A=0.90, B=0.90), _model(5, A=0.89, B=0.85), _model(7, A=0.86, B=0.96)
    rows = [_night(0, v5, v5, ref), _night(1, v7, v5, ref), {"night": 2, "truth": {"champion": None,
                                                                                   "reference": ref}}]
    assert year_guard.worst_gap(rows) == {"gap": -0.05, "night": 0, "site": "B"}
    assert year_guard.worst_gap(rows[2:]) == {"gap": None}
