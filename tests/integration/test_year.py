"""bench/year.py at CI size (issue 26): 8 weekly nights at 32 px with tiny arrivals through the real
recipe (direct executor), every champion scored on truth pools that are never ingested. Asserts what
the year must show, not how fast it runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from sqlalchemy import select

from db import session_scope
from db.schema import Image
from xray_core.data.catalogue import open_catalogue
from xray_core.evaluate.promotion import RUN_STATES
from xray_core.io.fsutil import sha256_file
from xray_core.settings import load_settings

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_eight_nights_of_the_default_scenario(xray_env, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as when a benchmark runs as a script: it imports its siblings
    year, year_plot = _load("year"), _load("year_plot")
    scenario = year.load_scenario()
    scenario["arrivals"].update(patients_per_label=3, truth_patients_per_label=20)
    scenario["settings"]["XRAY_SEQUESTER_FRACTION"] = "0.15"  # tests/conftest turns it off; the year audits
    root = tmp_path / "year"
    root.mkdir()
    for key, value in year.year_env(root, 32, scenario).items():
        monkeypatch.setenv(key, value)  # restored after the test
    out = year.run_year(8, 32, root, scenario, log=lambda line: None)
    rows, margin = out["rows"], out["margin"]
    assert [r["night"] for r in rows] == list(range(8)) and margin == 0.02

    # every night ends in a named outcome; every night with arrivals reached a decision
    assert all(r["state"] in RUN_STATES for r in rows)
    assert rows[-1]["events"] == ["quiet"] and rows[-1]["state"] == "Skipped" and rows[-1]["version"] is None
    assert all(r["decision"] is not None for r in rows if r["events"] != ["quiet"])
    assert any(r["state"] == "Promoted" for r in rows)
    assert {"new_site:C", "restyle:A", "one_label:normal"} <= {e for r in rows for e in r["events"]}

    # the truth: champions and the locked reference scored on pools that were never ingested
    scored = [r for r in rows if r["truth"]["champion"]]
    assert scored and all(r["truth"]["reference"] for r in scored)
    for r in scored:
        champion, reference = r["truth"]["champion"], r["truth"]["reference"]
        assert champion["auroc"] >= reference["auroc"] - margin, r  # the bio-creep guard held
        # the champion's gap to the reference per site, with its paired interval over the truth pool
        gaps = r["truth"]["champion_gap"]
        assert set(gaps) == set(champion["sites"])
        for site, g in gaps.items():
            assert g["low"] <= g["difference"] <= g["high"]
            shown = champion["sites"][site]["auroc"] - reference["sites"][site]["auroc"]
            assert abs(g["difference"] - shown) <= 2e-4  # both from the same scores, rounded to 4 places
        assert set(champion["sites"]) == set(year.World(scenario, 8, 32, root).active(r["night"]))
    with session_scope(open_catalogue(load_settings())) as s:
        stored = set(s.scalars(select(Image.sha256)))
    truth_films = {sha256_file(p) for p in (root / "truth").rglob("*.png")}
    assert stored and len(truth_films) >= 40 and not stored & truth_films  # the truth is never ingested
    flip = next(r for r in rows if any(e.startswith("flip_labels") for e in r["events"]))
    gain = year._gain(flip)
    assert not (flip["state"] == "Promoted" and gain is not None and gain < -margin), flip
    assert out["summary"]["events"]["flip_labels"]["harmful_promotion"] is False

    # what each night reports, as year.json holds it
    for r in rows:
        assert {"decision", "champion_after", "failed_checks", "reference", "negative_flip_rate",
                "test_set_reuse", "seconds", "disk", "truth"} <= set(r)
        assert r["disk"]["catalogue"] > 0 and r["seconds"]["total"] > 0
        # the champion against the locked reference at each site the drift check flagged (issue 26)
        assert r["reference"] is None or all(
            {"site", "status", "gap", "films", "action"} <= set(b) for b in r["reference"]["breach"])
    assert any(r["negative_flip_rate"] is not None for r in rows)
    assert all(r["test_set_reuse"] >= 1 for r in rows if r["decision"] and r["state"] != "Skipped")
    assert "reference_guard_held" in out["summary"] and "share_positive_gain" in out["summary"]
    # every night beyond the margin is named with its cause; none means the guard held
    by_cause = out["summary"]["reference_guard_by_cause"]
    assert out["summary"]["reference_guard_held"] == (not by_cause["gaps"])
    assert sorted({n for nights in by_cause["nights_by_cause"].values() for n in nights}) == sorted(
        {g["night"] for g in by_cause["gaps"]})
    # the truth pool says which gaps it cannot place on either side of the margin
    pool = out["summary"]["truth_pool"]
    assert pool["films_per_pool"] == 40 and pool["gaps_with_an_interval"] == sum(
        1 for r in scored for g in r["truth"]["champion_gap"].values() if g["high"] > g["low"])
    assert all(u["low"] < -margin <= u["high"] for u in pool["undecided"])
    breaches = out["summary"]["reference_breaches"]
    assert breaches["breaches"] == len([b for r in rows for b in (r["reference"] or {}).get("breach") or []
                                        if b["status"] == "breach"])
    # what each step of a night cost, and the step that grew most between night 5 and the last night
    decided = [r for r in rows if r["decision"] and r["state"] != "Skipped"]
    assert all({"train", "decide"} <= set(r["seconds"]["steps"]) and r["seconds"]["cpu"] > 0 for r in decided)
    growth = out["summary"]["cost_growth"]
    assert growth["early_night"] == 5 and growth["late_night"] == decided[-1]["night"]
    assert growth["grows_most"] in decided[-1]["seconds"]["steps"] and growth["ratio_cpu"] > 0
    assert all(r["films"] > 0 for r in decided) and out["summary"]["disk_check"]["bound"] > 0
    # the monthly audit on the sequestered films ran (8 nights: every night), and is summarised
    audits = [r["audit"] for r in rows if "audit" in r]
    assert len(audits) == 8 and {a["status"] for a in audits} <= {"ok", "degraded", "inconclusive", "skipped"}
    assert sum(len(v) for v in out["summary"]["audits"].values()) == 8
    assert any(a["status"] != "skipped" and a["n_images"] > 0 for a in audits), audits
    # reports are named by the simulated date, so retention sees the weeks go by (8 nights: 6.5 weeks)
    reports = sorted(p.name for p in (root / "home" / "reports").iterdir() if "night" in p.name)
    assert reports[0].startswith(f"{year.night_date(0, 8):%Y%m%d}") and len(reports) >= 7
    assert all("drift" in r for r in rows)
    json.dumps(out)  # year.json is plain JSON
    year_plot.plot(out, tmp_path / "year.png")
    assert (tmp_path / "year.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
