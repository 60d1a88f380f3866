"""Each film's value along a subgroup dimension (``XRAY_SLICE_BY``), for the reported-only slices.

A dimension is a catalogue fact (``sex``, ``device``, ``laterality``, ``modality``, ``body_part``), the
age band derived from ``age_years`` (:data:`AGE_BANDS`), or else a manifest attribute of that name
(:mod:`xray_core.data.attributes`). ``site`` and ``view`` are sliced by the evaluation itself (the
per-site guardrail reads them) and are not handled here. A film without a value is ``None`` (shown as
``(unknown)``); a catalogue fact wins over an attribute of the same name, which cannot arise from a
manifest (those names are known columns), except ``age_band``, which is always the derived band.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select

from db import in_blocks, session_scope
from db.schema import Image
from xray_core.data.catalogue import open_catalogue
from xray_core.settings import Settings

# Upper bounds (exclusive) in years and the band's name: paediatric, young adult, adult, older adult.
AGE_BANDS: tuple[tuple[float, str], ...] = ((18, "0-17"), (40, "18-39"), (65, "40-64"), (math.inf, "65+"))
FACTS = ("sex", "device", "laterality", "modality", "body_part")
SLICED_BY_EVALUATION = ("site", "view")


def age_band(years: Any) -> str | None:
    """``42.0`` -> ``"40-64"``; None for an unknown or impossible age (NaN, negative)."""
    if years is None:
        return None
    try:
        value = float(years)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return next(name for bound, name in AGE_BANDS if value < bound)


def reported_dimensions(slice_by: Sequence[str]) -> list[str]:
    """The ``XRAY_SLICE_BY`` names besides site and view, in the order given."""
    return [name for name in slice_by if name not in SLICED_BY_EVALUATION]


def subgroup_values(settings: Settings, image_ids: Iterable[int],
                    dimensions: Sequence[str]) -> dict[str, list[str | None]]:
    """``{dimension: [value of each id, in the order given]}`` (None: not known for that film)."""
    ids = [int(i) for i in image_ids]
    if not dimensions:
        return {}
    wanted = sorted(set(ids))
    found: dict[int, dict[str, Any]] = {}
    columns = [Image.id, Image.age_years, Image.attributes, *(getattr(Image, f) for f in FACTS)]
    with session_scope(open_catalogue(settings)) as s:
        for block in in_blocks(wanted):
            for row in s.execute(select(*columns).where(Image.id.in_(block))):
                found[row[0]] = {"age_band": age_band(row[1]), "attributes": row[2] or {},
                                 **dict(zip(FACTS, row[3:]))}
    out: dict[str, list[str | None]] = {}
    for dimension in dimensions:
        out[dimension] = [_value(found.get(i), dimension) for i in ids]
    return out


def _value(facts: dict[str, Any] | None, dimension: str) -> str | None:
    if facts is None:
        return None
    if dimension in FACTS or dimension == "age_band":
        value = facts.get(dimension)
    else:
        value = facts["attributes"].get(dimension)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None
