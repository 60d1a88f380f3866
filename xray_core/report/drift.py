"""The retrain's drift step, as people read it: whether the films that arrived look like the champion's
training data (the reference saved with it), in report.md, report.html and the ``drift-report``
artifact.

The retrain checks drift only when films were added and a champion exists
(:func:`xray_core.pipeline.recipe.check_arrivals`); its result is ``RunResult.drift``: ``flagged``,
the one-line ``summary``, ``warnings``, one ``checks`` entry per batch (all new films, then each
site with enough films: ``n``, ``ood_flagged``, ``mmd_p``, ``ks_p``, ``verdict``, ``drift``, the
champion's ``performance`` estimated before labels and, the new films' labels being catalogued, the
``realised`` value beside it), ``earlier``: earlier checks (predict batches, monitor runs) whose films
arrived labelled since, each with its estimate beside the realised value, and the monitor's own
``report``. Nothing is recomputed here.
"""

from __future__ import annotations

from typing import Any

from xray_core.report.format import cut_words

DESCRIPTION_MAX_CHARS = 200  # Prefect shows artifact descriptions in one table cell


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def unlike_line(check: dict[str, Any]) -> str | None:
    """``15 of 42 films look unlike the champion's training data`` (None when the check has no count)."""
    if check.get("n") is None or check.get("ood_flagged") is None:
        return None
    line = f"{check['ood_flagged']} of {check['n']} films look unlike the champion's training data"
    return f"{line}; {check['ood_coarse']}" if check.get("ood_coarse") else line


def drift_context(drift: dict[str, Any] | None) -> dict[str, Any] | None:
    """The "Drift of the new films" section: flagged or not, the one-line summary, the MMD p and how
    many films look unlike the reference (of all new films), then a table with one row per batch (its
    verdict: the check's warnings say no more). None when the run did not check (no champion, or no
    film added)."""
    if not drift:
        return None
    checks = list(drift.get("checks") or [])
    first = checks[0] if checks else {}
    return {
        "flagged": bool(drift.get("flagged")),
        "checked": bool(checks),
        "summary": str(drift.get("summary") or ("drift flagged" if drift.get("flagged") else "no drift")),
        "subject": first.get("subject"),
        "mmd_p": _p(first.get("mmd_p")) if first else None,
        "unlike": unlike_line(first) if first else None,
        "headers": ["films", "n", "unlike the reference", "MMD p", "KS p", "drift", "verdict"],
        "rows": [[c.get("subject"), c.get("n"), c.get("ood_flagged"), _p(c.get("mmd_p")), _p(c.get("ks_p")),
                  "yes" if c.get("drift") else "no", c.get("verdict") or ""] for c in checks],
        "report": drift.get("report"),
        "performance": performance_lines(checks) + earlier_lines(drift.get("earlier") or []),
    }


def performance_lines(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check that carries a CBPE estimate: ``all new films: accuracy estimated 84% before
    labels, realised 80% on 50 labelled films`` (the estimate alone when no labels were compared)."""
    from xray_core.monitor.performance import beside_line, estimate_line

    lines = []
    for c in checks:
        est, real = c.get("performance"), c.get("realised")
        if est and est.get("accuracy") is not None:
            lines.append(f"{c.get('subject')}: " + (beside_line(est, real) if real else estimate_line(est)))
    return lines


def earlier_lines(earlier: list[dict[str, Any]]) -> list[str]:
    """One line per earlier check (a predict batch, a monitor run) whose films have arrived labelled since:
    ``predict /data/new (check 12, 2026-12-01): accuracy estimated 84% before labels, realised 80% on 45
    labelled films (45 of its 50 films labelled now)``."""
    from xray_core.monitor.performance import beside_line

    return [f"{e.get('kind')} {e.get('subject')} (check {e.get('id')}, {str(e.get('created_at'))[:10]}): "
            f"{beside_line(e['estimate'], e['realised'])} ({e.get('labelled')} of its {e.get('films')} films "
            "labelled now)" for e in earlier if e.get("estimate") and e.get("realised")]


def drift_description(drift: dict[str, Any]) -> str:
    """The ``drift-report`` artifact's description: ``Drift flagged: <summary>`` or ``No drift: ...``."""
    context = drift_context(drift) or {"flagged": False, "summary": "not checked"}
    lead = "Drift flagged" if context["flagged"] else "No drift flagged"
    return cut_words(f"{lead}: {context['summary']}", DESCRIPTION_MAX_CHARS)


__all__ = ["drift_context", "drift_description", "earlier_lines", "performance_lines", "unlike_line"]
