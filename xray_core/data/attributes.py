"""Per-film attributes: a manifest's own columns, kept as exported (``images.attributes``, migration 0006a).

Values are the cells as exported: stripped, control characters shown as ``\\xNN`` (as every stored name
is), an empty cell meaning "absent". A value longer than :data:`MAX_VALUE` characters rejects its row as
``bad_metadata`` (nothing is cut short silently). ``images.attribute_set`` is a short hash of a film's
attribute *names*: ``xray status`` counts films per name by grouping on it (an index), without reading
every film's JSON.

**The same film again, with other attributes** (:func:`merge`): what the catalogue holds is never
overwritten. A name the film does not have yet is added; a name it has with another value keeps the
stored value, and the ingest summary counts the conflict and shows the first few
(``attributes.conflicts``, ``attributes.examples``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.schema import Image
from xray_core.io.fsutil import printable

MAX_VALUE = 1024  # characters of one attribute value
EXAMPLES = 5  # conflicts shown in an ingest summary (all are counted)
SETS_READ = 1000  # distinct attribute sets status reads a sample film of (then: "and more")


def row_values(row: Mapping[str, str | None], columns: Mapping[str, str],
               where: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, str] | None]:
    """The row's non-empty attribute cells as (name, value) pairs, and a ``bad_metadata`` problem for
    a value over :data:`MAX_VALUE` characters (the row is rejected; nothing stored is cut short)."""
    out = []
    for name, cell in columns.items():
        value = (row.get(cell) or "").strip()
        if not value:
            continue
        if len(value) > MAX_VALUE:
            return (), ("bad_metadata", f"{where}: column {printable(name)!r} holds {len(value)} characters; "
                                        f"an attribute may hold at most {MAX_VALUE}")
        out.append((name, printable(value)))
    return tuple(sorted(out)), None


def digest(pairs: Sequence[tuple[str, str]]) -> str:
    """A short hash of (name, value) pairs: part of a manifest row's context (an edited cell re-reads it)."""
    return hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()[:16]


def name_set(names: Sequence[str]) -> str:
    """``images.attribute_set``: the first 16 hex digits of the sha256 of the sorted names."""
    return hashlib.sha256(json.dumps(sorted(names)).encode()).hexdigest()[:16]


def catalogue_values(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The ``images`` columns for a new film's attributes (both NULL when it has none)."""
    values = dict(pairs)
    return {"attributes": values or None, "attribute_set": name_set(list(values)) if values else None}


def merge(image: Image, pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Add the attributes ``image`` lacks; keep its stored values. Returns the conflicts (a name stored
    with another value), each ``{"image", "name", "stored", "given"}``."""
    stored = dict(image.attributes or {})
    conflicts = [{"image": str(image.id), "name": name, "stored": str(stored[name]), "given": value}
                 for name, value in pairs if name in stored and stored[name] != value]
    added = {name: value for name, value in pairs if name not in stored}
    if added:
        merged = {**stored, **added}
        image.attributes = merged
        image.attribute_set = name_set(list(merged))
    return conflicts


def census(session: Session) -> dict[str, Any]:
    """``{"films", "by_name"}``: films carrying any attribute, and films per attribute name (most first)."""
    groups = session.execute(select(Image.attribute_set, func.count()).where(Image.attribute_set.is_not(None))
                             .group_by(Image.attribute_set).order_by(func.count().desc())).all()
    by_name: dict[str, int] = {}
    for attribute_set, n in groups[:SETS_READ]:
        sample = session.scalar(select(Image.attributes).where(Image.attribute_set == attribute_set).limit(1))
        for name in sample or {}:
            by_name[name] = by_name.get(name, 0) + int(n)
    out: dict[str, Any] = {"films": sum(int(n) for _, n in groups),
                           "by_name": dict(sorted(by_name.items(), key=lambda kv: (-kv[1], kv[0])))}
    if len(groups) > SETS_READ:
        out["note"] = (f"counts by name cover the {SETS_READ} commonest of {len(groups)} different sets of "
                       "attribute names")
    return out
