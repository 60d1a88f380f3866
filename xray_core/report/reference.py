"""The run report's line about the locked reference (the bio-creep guard) and the test set's reuse, from
the run's ``reference`` (:func:`xray_core.pipeline.guards.reference_summary`) and ``test_set_reuse``
(:func:`xray_core.registry.reference.count_test_set_reuse`)."""

from __future__ import annotations

from typing import Any


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


__all__ = ["reference_context"]
