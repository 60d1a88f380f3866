"""Negative flips: films the champion got right that the challenger gets wrong.

A challenger with a better AUROC can still miss films the champion read correctly, and readers used to
the old model's behaviour lose trust in the new one (Yan et al., "Positive-Congruent Training", CVPR
2021; Bansal et al., AAAI 2019). Over the films both models scored:

- **negative flip rate** = films the champion got right and the challenger gets wrong / films;
- **positive congruence** = films both get right / films.

"Right" means the model's predicted class at its own operating point (its binary threshold on
calibrated probabilities, else the argmax: :func:`xray_core.evaluate.metrics.predict_labels`), equal to
the film's label. Both rates get the project's patient-clustered bootstrap interval (Wilson on the
patients where every resample agrees: :func:`xray_core.evaluate.intervals.proportion_interval`),
overall and per site, with the same seed and resample count as every other interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xray_core.evaluate.intervals import proportion_interval
from xray_core.evaluate.slices import slice_name


def negative_flips(truth: Sequence[str], champion: Sequence[str], challenger: Sequence[str],
                   patients: Sequence[Any], sites: Sequence[str | None], *, n_samples: int, seed: int,
                   level: float = 0.95, films: Sequence[str] | None = None) -> dict[str, Any]:
    """Negative flips and positive congruence of ``challenger`` against ``champion`` (one predicted label
    per film each, beside the film's true label, patient and site).

    Returns ``n``, ``patients``, ``counts`` (both_right, negative_flips, positive_flips, both_wrong),
    ``negative_flip_rate`` and ``positive_congruence`` (``{"point", "low", "high", "method", ...}``),
    ``flipped`` (the ``films`` names, else the indices, of the negative flips), ``by_site`` (the same
    numbers per site, without ``flipped``) and the interval's ``level``, ``samples`` and ``seed``.
    """
    t, old, new = (np.asarray(list(v), dtype=object) for v in (truth, champion, challenger))
    if not t.size == old.size == new.size == len(patients) == len(sites):
        raise ValueError(f"negative_flips needs one of each per film: {t.size} labels, {old.size} and "
                         f"{new.size} predictions, {len(patients)} patients, {len(sites)} sites")
    old_right, new_right = old == t, new == t
    flips, both = old_right & ~new_right, old_right & new_right
    kw: dict[str, Any] = {"n_samples": n_samples, "seed": seed, "level": level}
    patient_ids = np.asarray(list(patients), dtype=object)
    site_names = np.asarray([slice_name(s) for s in sites], dtype=object)

    def summary(mask: np.ndarray) -> dict[str, Any]:
        return {
            "n": int(mask.sum()), "patients": int(len(set(patient_ids[mask].tolist()))),
            "counts": {"both_right": int(both[mask].sum()),
                       "negative_flips": int(flips[mask].sum()),
                       "positive_flips": int((~old_right & new_right)[mask].sum()),
                       "both_wrong": int((~old_right & ~new_right)[mask].sum())},
            "negative_flip_rate": proportion_interval(flips[mask], patient_ids[mask], **kw),
            "positive_congruence": proportion_interval(both[mask], patient_ids[mask], **kw),
        }

    everything = np.ones(t.size, dtype=bool)
    names = list(films) if films is not None else list(range(t.size))
    return {**summary(everything), "flipped": [names[i] for i in np.flatnonzero(flips)],
            "by_site": {str(site): summary(site_names == site) for site in sorted(set(site_names.tolist()))},
            "level": float(level), "samples": int(n_samples), "seed": int(seed), "clustered_by": "patient"}


__all__ = ["negative_flips"]
