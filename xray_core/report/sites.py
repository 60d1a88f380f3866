"""Where films come from, as people read it: tables by site and by view, the shortcut audit, the
label history, and the per-site rows of the ``retrain-metrics`` artifact.

Pooled numbers can hide opposite failures (a champion good on one collection and useless on another,
a challenger the other way round), so the report, ``xray status`` and ``xray models show`` all show
the same slice tables built here. Pure functions of what the pipeline produced (the evaluations of a
:class:`~xray_core.results.RunResult`, whose slices come from :mod:`xray_core.evaluate.slices`; the
audit of :mod:`xray_core.evaluate.audit`; ``catalogue.label_history``): nothing is recomputed, so
every table shows the numbers the decision was made on.

A slice that is too small to judge keeps its row: its metrics read ``not judged`` and its note says
why (e.g. ``1 pneumonia (< 5 per class)``), so a missing site is never mistaken for a healthy one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeGuard

from xray_core.evaluate.slices import UNKNOWN  # the slice of films whose site or view is not known
from xray_core.report.format import format_interval
from xray_core.results import Evaluation

NOT_JUDGED = "not judged"
DIMENSIONS = (("site", "By site"), ("view", "By view"))
LABEL_HISTORY_SHOWN = 20  # patients listed in a report; the count is always the full one


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def slice_labels(slices: dict[str, dict[str, Any]]) -> list[str]:
    """The labels of a dimension's slices, in the model's order (every slice counts all of them)."""
    out: list[str] = []
    for sl in slices.values():
        out += [label for label in sl.get("counts", {}) if label not in out]
    return out


def slice_metric(sl: dict[str, Any], path: str) -> str:
    """One metric of one slice with its interval: ``macro_auroc`` or ``per_class.<label>.sensitivity``.

    ``-`` when the slice has no such number (a class absent from the slice, or no AUROC because the
    slice holds a single class); ``not judged`` when the slice is too small for any of its numbers.
    """
    if not sl.get("judged"):
        return NOT_JUDGED
    if path == "macro_auroc":
        point = sl.get("macro_auroc") if sl.get("auroc_judged", True) else None
    else:
        _, label, key = path.split(".", 2)
        point = (sl.get("per_class", {}).get(label) or {}).get(key)
    if point is None:
        return "-"
    return format_interval({"point": point, **(sl.get("intervals", {}).get(path) or {})})


def slice_note(sl: dict[str, Any]) -> str:
    """Why a slice is not (fully) judged; empty when it is."""
    if not sl.get("reason"):
        return ""
    return (f"{NOT_JUDGED}: " if not sl.get("judged") else "") + str(sl["reason"])


def slice_table(dimension: str, slices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"headers", "rows"}`` of one model's slices along one dimension: n, patients, images per
    label, macro AUROC [95% CI], each class's sensitivity [95% CI], and the note of slices not judged."""
    labels = slice_labels(slices)
    headers = [dimension, "n", "patients", "images per label", "macro AUROC [95% CI]",
               *[f"sensitivity {label} [95% CI]" for label in labels], "note"]
    rows = [[name, sl.get("n"), sl.get("patients"),
             ", ".join(f"{label} {n}" for label, n in sl.get("counts", {}).items()),
             slice_metric(sl, "macro_auroc"),
             *[slice_metric(sl, f"per_class.{label}.sensitivity") for label in labels], slice_note(sl)]
            for name, sl in sorted(slices.items())]
    return {"headers": headers, "rows": rows}


def worth_showing(slices: dict[str, Any] | None) -> TypeGuard[dict[str, dict[str, Any]]]:
    """A dimension is shown when at least one of its slices has a known value (all-unknown views say
    nothing a reader can act on; the pooled table already has those numbers)."""
    return bool(slices) and any(name != UNKNOWN for name in slices or {})


def slice_sections(evals: Sequence[tuple[str, Evaluation]]) -> list[dict[str, Any]]:
    """The report's "By site" and "By view" sections: one table per model, only dimensions with content.

    ``evals``: (role, evaluation) pairs, challenger first. Each section: ``{"id", "title",
    "dimension", "tables": [{"title", "headers", "rows"}]}``.
    """
    out = []
    for dimension, heading in DIMENSIONS:
        tables = []
        for role, ev in evals:
            slices: dict[str, Any] = (ev.metrics.get("slices") or {}).get(dimension) or {}
            if worth_showing(slices):
                tables.append({"title": f"{role} v{ev.version}", **slice_table(dimension, slices)})
        if tables:
            out.append({"id": f"by-{dimension}", "title": heading, "dimension": dimension, "tables": tables})
    return out + subgroup_sections(evals)


def subgroup_sections(evals: Sequence[tuple[str, Evaluation]]) -> list[dict[str, Any]]:
    """A "By sex (reported only)" section per ``XRAY_SLICE_BY`` dimension beyond site and view (the
    evaluations' ``metrics.subgroups``), shaped as :func:`slice_sections`' sections. A dimension is shown
    even when no test film has a value for it (one ``(unknown)`` row): it was asked for by name."""
    dimensions: list[str] = []
    for _, ev in evals:
        dimensions += [d for d in (ev.metrics.get("subgroups") or {}) if d not in dimensions]
    out = []
    for dimension in dimensions:
        tables = [{"title": f"{role} v{ev.version}", **slice_table(dimension, slices)}
                  for role, ev in evals if (slices := (ev.metrics.get("subgroups") or {}).get(dimension))]
        slug = re.sub(r"[^a-z0-9]+", "-", dimension.lower()).strip("-") or "attribute"
        out.append({"id": f"by-{slug}", "title": f"By {dimension} (reported only)", "dimension": dimension,
                    "tables": tables})
    return out


def site_metric_rows(challenger: Evaluation | None, champion: Evaluation | None) -> list[dict[str, Any]]:
    """Per-site rows for the ``retrain-metrics`` artifact: ``macro_auroc @ site paeds`` and each class's
    ``sensitivity[label] @ site paeds``, both models side by side; a slice not judged says why."""
    site_slices = {role: ((ev.metrics.get("slices") or {}).get("site") or {}) if ev is not None else {}
                   for role, ev in (("challenger", challenger), ("champion", champion))}
    sites = sorted(set(site_slices["challenger"]) | set(site_slices["champion"]))
    labels = slice_labels({**site_slices["champion"], **site_slices["challenger"]})
    rows = []
    for site in sites:
        for name, path in [("macro_auroc", "macro_auroc"),
                           *[(f"sensitivity[{label}]",
                              f"per_class.{label}.sensitivity") for label in labels]]:
            row: dict[str, Any] = {"metric": f"{name} @ site {site}"}
            for role, ev in (("challenger", challenger), ("champion", champion)):
                sl = site_slices[role].get(site)
                if ev is None or sl is None:
                    row[role] = "-"
                elif not sl.get("judged"):
                    row[role] = f"{NOT_JUDGED}: {sl.get('reason')}"
                else:
                    row[role] = slice_metric(sl, path)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- the shortcut audit


POLICY_WORDS = {
    "warn": "a flagged audit is reported here and does not stop promotion",
    "block": "a flagged audit stops automatic promotion; the challenger stays a candidate for review",
}


def audit_context(audit: dict[str, Any] | None) -> dict[str, Any] | None:
    """The "Shortcut audit" section: warnings in plain words first, then the label × site table, the
    AUROC the site alone gives, the metadata probe (with its features), the site probe and the policy."""
    if not audit:
        return None
    ls = audit.get("label_site") or {}
    table = ls.get("table") or {}
    labels = sorted({label for row in table.values() for label in row})
    single_label = ls.get("single_label_sites") or {}
    single_site = ls.get("single_site_labels") or {}
    rows = []
    for site, row in sorted(table.items()):
        notes = [f"only {single_label[site]}"] if site in single_label else []
        notes += [f"every {label} film is from here" for label, s in sorted(single_site.items()) if s == site]
        rows.append([site, *[row.get(label, 0) for label in labels], sum(row.values()), "; ".join(notes)])
    meta, probe = audit.get("metadata_probe") or {}, audit.get("site_probe") or {}
    policy = audit.get("policy") or "warn"
    return {
        "flagged": bool(audit.get("flagged")),
        "warnings": list(audit.get("warnings") or []),
        "headers": ["site", *labels, "total", "note"],
        "rows": rows,
        "site_only_auroc": _fmt(audit.get("site_only_auroc")),
        "metadata": {"auroc": _fmt(meta.get("auroc")), "target": meta.get("target") or "",
                     "features": ", ".join(meta.get("features") or []) or "none", "n": meta.get("n"),
                     "note": meta.get("note") or ""},
        "site_probe": {"auroc": _fmt(probe.get("auroc")), "task": probe.get("task") or "",
                       "note": probe.get("note") or ""},
        "threshold": _fmt(audit.get("threshold")),
        "policy": policy,
        "policy_words": POLICY_WORDS.get(policy, ""),
    }


# --------------------------------------------------------------------------- label history


def films_text(films: Sequence[dict[str, Any]]) -> str:
    """``2026-11-01 a.png: covid19; 2026-11-20 c.png: No Finding``: a patient's films in order."""
    return "; ".join(f"{(f.get('added_at') or '')[:10]} {f.get('file')}: {f.get('label')}" for f in films)


def label_history_context(history: dict[str, Any] | None, *,
                          limit: int = LABEL_HISTORY_SHOWN) -> dict[str, Any] | None:
    """The "Label history" section: patients whose films carry different labels, with dates and files,
    and whether any sit in the test split (then the test set disagrees with itself). None when none."""
    if not history or not history.get("patients"):
        return None
    rows = [[e["patient_id"], e.get("split") or "unassigned", ", ".join(e.get("labels") or []),
             films_text(e.get("films") or [])] for e in (history.get("examples") or [])[:limit]]
    return {"patients": history["patients"], "in_test": history.get("in_test", 0), "shown": len(rows),
            "headers": ["patient", "split", "labels", "films (added, file: label)"], "rows": rows}


__all__ = ["slice_table", "slice_sections", "subgroup_sections",
           "slice_metric", "slice_note", "site_metric_rows", "audit_context",
           "label_history_context", "films_text", "worth_showing", "UNKNOWN", "NOT_JUDGED"]
