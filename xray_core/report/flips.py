"""The "Negative flips" section of the run report and its rows in the ``retrain-metrics`` artifact, from
the run's ``negative_flips`` (:func:`xray_core.evaluate.flips.negative_flips`)."""

from __future__ import annotations

from typing import Any

from xray_core.report.format import format_interval

FLIPPED_SHOWN = 10  # films named in the report; result.json lists every one


def _rate(part: dict[str, Any], key: str) -> str:
    return format_interval(part.get(key))


def _row(name: str, part: dict[str, Any]) -> list[Any]:
    counts = part.get("counts") or {}
    return [name, part.get("n", 0), part.get("patients", 0), counts.get("negative_flips", 0),
            _rate(part, "negative_flip_rate"), counts.get("both_right", 0),
            _rate(part, "positive_congruence")]


def flips_context(flips: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report section's values (None: no champion to compare with, so no section)."""
    if not flips:
        return None
    counts = flips.get("counts") or {}
    flipped = [str(f)[:12] for f in flips.get("flipped") or []]
    return {
        "n": flips.get("n", 0), "patients": flips.get("patients", 0),
        "negative_flips": counts.get("negative_flips", 0), "positive_flips": counts.get("positive_flips", 0),
        "both_right": counts.get("both_right", 0), "both_wrong": counts.get("both_wrong", 0),
        "rate": _rate(flips, "negative_flip_rate"), "congruence": _rate(flips, "positive_congruence"),
        "samples": flips.get("samples"),
        "headers": ["site", "films", "patients", "negative flips", "negative flip rate (95% CI)",
                    "both right", "positive congruence (95% CI)"],
        "rows": [_row("all", flips),
                 *[_row(site, part) for site, part in (flips.get("by_site") or {}).items()]],
        "flipped": flipped[:FLIPPED_SHOWN], "more": max(0, len(flipped) - FLIPPED_SHOWN),
    }


def flip_rows(flips: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows for the ``retrain-metrics`` artifact: the challenger's negative flip rate and positive
    congruence against the champion, overall and ``@ site ...``, with the films counted."""
    if not flips:
        return []
    rows = []
    for where, part in [("", flips), *[(f" @ site {s}", p) for s, p in (flips.get("by_site") or {}).items()]]:
        counts, n = part.get("counts") or {}, part.get("n", 0)
        rows.append({"metric": f"negative_flip_rate{where}", "champion": "(reference)",
                     "challenger": f"{_rate(part, 'negative_flip_rate')} ({counts.get('negative_flips', 0)} "
                                   f"of {n} films)"})
        rows.append({"metric": f"positive_congruence{where}", "champion": "(reference)",
                     "challenger": f"{_rate(part, 'positive_congruence')} ({counts.get('both_right', 0)} "
                                   f"of {n} films)"})
    return rows


__all__ = ["flip_rows", "flips_context"]
