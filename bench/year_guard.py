"""Why the bio-creep guard was not held on a night: each night and site where the champion's true AUROC
fell more than the margin below the locked reference's, with what opened the gap.

The issue's criterion ("never more than the margin below the reference, at any site, on any night") counts
two different things alike. Bio-creep is a chain of *promotions* drifting below the first validated
model; the promotion policy can prevent it. A site whose films change under a champion (a new scanner)
can open a gap with no decision taken at all, on the night the first changed films arrive, before any of
them could be measured. Telling the two apart is what says whether the guard failed or the world moved.
And a "true" AUROC is measured on a finite truth pool: each gap carries its paired 95% interval over the
pool (year.py ``Truth.gaps``), which says whether the pool itself can tell it from the margin.

Causes, from the truth scores year.json keeps per night (every model scored on the same night's pools):
- ``world change``: no promotion tonight, and the same champion was within the margin at that site the
  night before (or the site is new): its gap opened because the site's films changed;
- ``promotion opened it``: promoted tonight, and the champion it replaced was within the margin;
- ``promotion widened it``: promoted tonight, the replaced champion was already beyond the margin, and the
  new one is further below;
- ``promotion narrowed it``: promoted tonight from a champion further below (the gap shrank, not enough);
- ``carried``: the gap was there the night before: the same champion was already beyond the margin, or
  tonight's promotion replaced one exactly as far below.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

SAME = 1e-9  # gaps this close are the same gap
# year.json's AUROCs have 4 places (Truth.of); a gap is rounded to them, as year.py's summarise rounds it
# for reference_guard_held: 0.83 - 0.85 is -0.020000000000000018 in floats, not beyond a margin of 0.02.
PLACES = 4
CAUSES = ("world change", "promotion opened it", "promotion widened it", "promotion narrowed it", "carried")


def site_gap(model: dict[str, Any] | None, reference: dict[str, Any], site: str) -> float | None:
    """``model``'s true AUROC at ``site`` minus the reference's, rounded as year.json's AUROCs (None: a
    site one of them was not scored on)."""
    if not model or site not in model["sites"] or site not in reference["sites"]:
        return None
    return round(float(model["sites"][site]["auroc"] - reference["sites"][site]["auroc"]), PLACES)


def guard_gaps(rows: list[dict[str, Any]], margin: float) -> list[dict[str, Any]]:
    """One entry per night and site beyond the margin: night, site, version, gap, gap_before, cause, and
    the gap's paired 95% interval over the truth pool (``low``/``high``; None in a year.json without
    ``truth.champion_gap``)."""
    out: list[dict[str, Any]] = []
    last: dict[str, tuple[int, float]] = {}  # site -> (champion version, gap) on the night before
    for r in rows:
        truth = r["truth"]
        champion, before = truth.get("champion"), truth.get("champion_before")
        reference = truth.get("reference")
        if not champion or not reference:
            last = {}
            continue
        now: dict[str, tuple[int, float]] = {}
        for site in champion["sites"]:
            gap = site_gap(champion, reference, site)
            if gap is None:
                continue
            now[site] = (champion["version"], gap)
            if gap >= -margin:
                continue
            promoted = before is not None and before["version"] != champion["version"]
            gap_before = site_gap(before, reference, site) if promoted else None
            if promoted and (gap_before is None or gap_before >= -margin):
                cause = "promotion opened it"
            elif promoted and gap_before is not None and gap < gap_before - SAME:
                cause = "promotion widened it"
            elif promoted and gap_before is not None and gap > gap_before + SAME:
                cause = "promotion narrowed it"
            elif promoted:  # the new champion is exactly as far below as the one it replaced
                cause = "carried"
            elif site in last and last[site][0] == champion["version"] and last[site][1] < -margin:
                cause = "carried"
            else:
                cause = "world change"
            interval = (truth.get("champion_gap") or {}).get(site) or {}
            out.append({"night": r["night"], "site": site, "version": champion["version"],
                        "gap": gap, "cause": cause, "gap_before": gap_before,
                        "low": interval.get("low"), "high": interval.get("high")})
        last = now
    return out


def guard_summary(rows: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """The nights beyond the margin grouped by cause, and whether any promotion opened or widened a gap
    (the bio-creep the locked reference exists to stop)."""
    gaps = guard_gaps(rows, margin)
    nights: dict[str, list[int]] = defaultdict(list)
    for g in gaps:
        if g["night"] not in nights[g["cause"]]:
            nights[g["cause"]].append(g["night"])
    made_worse = [g for g in gaps if g["cause"] in ("promotion opened it", "promotion widened it")]
    # the truth pool is finite too: nights whose whole interval lies beyond the margin, and nights where
    # it reaches back within it (the pool cannot tell the gap from the margin)
    sure = sorted({g["night"] for g in gaps if g["high"] is not None and g["high"] < -margin})
    unsure = sorted({g["night"] for g in gaps if g["high"] is not None and g["high"] >= -margin})
    return {"nights_by_cause": {cause: nights[cause] for cause in CAUSES},
            "nights_beyond_the_margin_by_the_interval": sure, "nights_within_the_interval": unsure,
            "promotions_that_opened_or_widened_a_gap": len(made_worse),
            "held_by_promotions": not made_worse, "gaps": gaps}


def worst_gap(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The lowest champion-minus-reference gap of the year: ``{"gap", "night", "site"}`` (gap None: no
    night had both a champion and a reference)."""
    worst: dict[str, Any] = {"gap": None}
    for r in rows:
        champion, reference = r["truth"].get("champion"), r["truth"].get("reference")
        for site in (champion or {}).get("sites", {}) if reference else ():
            gap = site_gap(champion, reference, site)
            if gap is not None and (worst["gap"] is None or gap < worst["gap"]):
                worst = {"gap": gap, "night": r["night"], "site": site}
    return worst


def truth_resolution(rows: list[dict[str, Any]], margin: float, films: int) -> dict[str, Any]:
    """Can the truth pool tell each night's gap from the margin? ``undecided``: the nights and sites whose
    champion-minus-reference interval over the pool (``truth.champion_gap``) holds ``-margin`` (its point
    may lie on either side: a bigger pool would be needed to say which), and the intervals' half-widths.
    A champion that is the reference has no interval. ``films``: each pool's films (one per patient)."""
    found = [(r["night"], site, g) for r in rows for site, g in (r["truth"].get("champion_gap") or {}).items()
             if g and g.get("low") is not None and g.get("high") is not None and g["high"] > g["low"]]
    widths = sorted((g["high"] - g["low"]) / 2 for _, _, g in found)
    undecided = [{"night": night, "site": site, "gap": g["difference"], "low": g["low"], "high": g["high"]}
                 for night, site, g in found if g["low"] < -margin <= g["high"]]
    return {"films_per_pool": films, "gaps_with_an_interval": len(found),
            "half_width_median": round(widths[len(widths) // 2], 4) if widths else None,
            "half_width_max": round(widths[-1], 4) if widths else None,
            "undecided": undecided}
