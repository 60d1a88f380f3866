"""The run report's line about the locked reference (the bio-creep guard) and the test set's reuse, from
the run's ``reference`` (:func:`xray_core.pipeline.guards.reference_summary`) and ``test_set_reuse``
(:func:`xray_core.registry.reference.count_test_set_reuse`), and one line per drifted site where the
champion was measured against the reference (``breach_checks``: :mod:`xray_core.pipeline.breach`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xray_core.evaluate.breach import DETECTION, FAILED, UNMEASURED, BreachCheck


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def reference_context(reference: dict[str, Any] | None) -> dict[str, Any] | None:
    """One line: reference vN, its metric, the margin, and (``verdict``) passed or failed; None: no line."""
    if not reference:
        return None
    metric, margin = reference.get("metric") or "", reference.get("margin") or 0.0
    if reference.get("version") is None:
        return {"text": f"Locked reference: none yet, the first champion becomes it (margin {margin:g}, "
                        "XRAY_REFERENCE_MARGIN)", "verdict": "not checked"}
    same = " (the champion)" if reference.get("same_as_champion") else ""
    value = reference.get("reference")
    diff = (f"{_signed(reference.get('difference'))} [{_signed(reference.get('low'))}, "
            f"{_signed(reference.get('high'))}]")
    passed = reference.get("passed")
    verdict = "not checked" if passed is None else "passed" if passed else "failed"
    return {"text": f"Locked reference v{reference['version']}{same}: {metric} "
                    f"{'n/a' if value is None else f'{value:.3f}'}, challenger minus reference {diff}, "
                    f"margin {margin:g} (XRAY_REFERENCE_MARGIN)", "verdict": verdict}


def breach_lines(checks: Sequence[BreachCheck]) -> list[dict[str, Any]]:
    """One line per drifted site where the champion was measured against the locked reference: ``head``
    (``Breach of the locked reference at site A``, bold when ``breached``) and ``text`` (the measure, and
    under a breach what XRAY_REFERENCE_BREACH did); [] when no site was measured."""
    return [_breach_line(c) for c in checks]


def _breach_line(c: BreachCheck) -> dict[str, Any]:
    if c.breached and c.kind == DETECTION:
        head, tail = (f"Breach at site {c.site}: the champion's detection fell",
                      " (reported; the decision does not act on it)")
    elif c.breached:
        head, tail = (f"Breach of the locked reference at site {c.site}",
                      f" (XRAY_REFERENCE_BREACH={c.mode}: {c.action})")
    else:
        shown = "" if c.status in (FAILED, UNMEASURED) else f": {c.status}"  # said in the detail
        head, tail = f"Locked reference at drifted site {c.site}{shown}", ""
    return {"breached": c.breached, "head": head, "text": c.detail + tail}


__all__ = ["breach_lines", "reference_context"]
