"""Evidence planning: when the gate refuses to decide for lack of test images, say how many more are
needed and roughly how many new labelled patients that means.

Why patients, not images: the split assigns whole patients, and only the test share of new patients
(``XRAY_SPLIT_RATIOS``, 0.15 by default) lands in the test split. So 15 more pneumonia test images at
one image per patient need about 15 / 0.15 = 100 new labelled pneumonia patients, not 15. The
numbers are estimates: the split is a stable hash, so the realised share of a small batch varies.
"""

from __future__ import annotations

import math
from typing import Any

# counts are ratios of small integers and a float share: 21 / 0.35 = 60.00000000000001 patients is 60
_TOL = 1e-9


def _ceil(x: float) -> int:
    return int(math.ceil(x - _TOL))


def plan_evidence(support: dict[str, int], min_per_class: int, *, test_fraction: float,
                  images_per_patient: float = 1.0) -> dict[str, Any]:
    """How far each class's test support is from ``min_per_class`` and what it takes to get there.

    ``support`` are test images per class; ``images_per_patient`` the test set's mean (1 when
    unknown); ``test_fraction`` the test share of new patients. Per class: ``more_test_images`` =
    max(0, min - support), ``more_test_patients`` = ceil(that / images_per_patient),
    ``new_labelled_patients`` = ceil(that / test_fraction) (None when the test share is 0).
    Returns those per class, their total and a one-sentence ``summary``.
    """
    if min_per_class < 0 or images_per_patient <= 0 or not 0 <= test_fraction <= 1:
        raise ValueError("min_per_class must be >= 0, images_per_patient > 0 and test_fraction in [0, 1]")
    per_class: dict[str, dict[str, Any]] = {}
    for label, n in support.items():
        images = max(0, min_per_class - int(n))
        patients = _ceil(images / images_per_patient)
        new = _ceil(patients / test_fraction) if test_fraction > 0 else (0 if patients == 0 else None)
        per_class[label] = {"test_images": int(n), "more_test_images": images, "more_test_patients": patients,
                            "new_labelled_patients": new}
    short = {lab: d for lab, d in per_class.items() if d["more_test_images"] > 0}
    totals = [d["new_labelled_patients"] for d in short.values()]
    total = None if any(t is None for t in totals) else sum(totals)
    return {"min_test_per_class": int(min_per_class), "test_fraction": float(test_fraction),
            "images_per_patient": float(images_per_patient), "per_class": per_class,
            "new_labelled_patients": total,
            "summary": _summary(short, test_fraction, images_per_patient, total)}


def _summary(short: dict[str, dict[str, Any]], test_fraction: float, images_per_patient: float,
             total: int | None) -> str:
    if not short:
        return "Every class already has enough test images."
    need = " and ".join(f"{d['more_test_images']} more '{lab}'" for lab, d in short.items())
    pats = " and ".join(str(d["more_test_patients"]) for d in short.values())
    text = (f"To decide, the test split needs {need} test images (about {pats} patients at "
            f"{images_per_patient:.2g} images per patient)")
    if total is None:
        return text + "; the test share of XRAY_SPLIT_RATIOS is 0, so new patients never reach it."
    news = " and ".join(f"{d['new_labelled_patients']} '{lab}'" for lab, d in short.items())
    return (text + f"; with {test_fraction:.0%} of new patients going to test, that is roughly {news} new "
            f"labelled patients ({total} in all).")


__all__ = ["plan_evidence"]
