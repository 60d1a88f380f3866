"""Which site a film comes from and how its view is spelled: pure naming rules, no catalogue.

Kept apart from :mod:`xray_core.data.facts` (which queries the catalogue) so that the catalogue's own
census (:func:`xray_core.data.catalogue.counts_by_label_site_split`), ingest admission and the facts
frame share one rule without importing each other.
"""

from __future__ import annotations

from pathlib import Path


def source_site(path: str | None) -> str:
    """The default site of an ingest: the source folder's name (``/data/hospital-b/2026-11`` → ``2026-11``
    is rarely right, so a dated leaf folder falls back to its parent's name)."""
    if not path:
        return "unknown"
    p = Path(path)
    name = p.name if p.suffix.lower() != ".csv" else p.parent.name
    parent = p.parent if p.suffix.lower() != ".csv" else p.parent.parent
    if name[:4].isdigit() and parent.name:  # 2026-11-20, 20261120: a delivery, not a place
        return parent.name
    return name or "unknown"


def normalise_view(view: str | None) -> str | None:
    """A view as the slices compare it: upper case, single spaces (``ap_supine`` → ``AP SUPINE``);
    a blank view is unknown (None)."""
    if view is None or not str(view).strip():
        return None
    return " ".join(str(view).upper().replace("_", " ").split())
