"""Where and how each film was made, as one pandas frame: what slices and the shortcut audit need.

One row per image id: ``label``, ``patient``, ``site``, ``view``, ``width``, ``height``, ``aspect``,
``bit_depth``, ``format``, ``file_bytes``, ``source``. The site is the image's own (a manifest's
``site`` column, ``xray ingest --site``, or DICOM's institution when configured) and otherwise the
name of the folder it was ingested from, so a second collection is a second site even when nobody
said so. Views are upper-cased (``PA``, ``AP``, ``AP SUPINE``, ``LATERAL``); unknown stays None.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd
from sqlalchemy import select

from db import in_blocks, session_scope
from db.schema import Image, Source
from xray_core.data.catalogue import open_catalogue
from xray_core.data.sites import normalise_view, source_site
from xray_core.settings import Settings

COLUMNS = ("id", "label", "patient", "site", "view", "width", "height", "aspect", "bit_depth", "format",
           "file_bytes", "source")


def image_facts(settings: Settings, image_ids: Iterable[int]) -> pd.DataFrame:
    """The facts of the given images (any order; unknown ids are absent), indexed by image id."""
    ids = sorted({int(i) for i in image_ids})
    site_col = getattr(Image, "site", None)
    columns = [Image.id, Image.label, Image.patient_id, Image.view, Image.width,
               Image.height, Image.bit_depth, Image.format, Image.stored_path, Source.path]
    if site_col is not None:
        columns.append(site_col)
    rows: list[Any] = []
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        for block in in_blocks(ids):
            rows += s.execute(select(*columns).join(Source, Source.id == Image.source_id)
                              .where(Image.id.in_(block))).all()
    store = settings.store_dir.parent
    records = []
    for row in rows:
        own_site = row[10] if site_col is not None else None
        path = store / row[8]
        records.append({
            "id": row[0], "label": row[1], "patient": row[2], "site": own_site or source_site(row[9]),
            "view": normalise_view(row[3]), "width": row[4], "height": row[5],
            "aspect": row[4] / row[5] if row[5] else None, "bit_depth": row[6], "format": row[7],
            "file_bytes": path.stat().st_size if path.is_file() else None, "source": row[9]})
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return frame.set_index("id", drop=False)
