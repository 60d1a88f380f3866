"""The champion's calls at a drifted site before its drift episode: the baseline the breach step's
detection check (:func:`xray_core.evaluate.breach.detection_drop`) sets its calls on the episode's films
against.

The baseline films are the site's films in the run's TEST split catalogued before the episode (before
both models when none is recorded): no model trained or was tuned on a test patient (splits are by
patient and kept), whether or not it has a split manifest. The newest :data:`EARLIER_FILMS` of them keep
the baseline recent and its cost bounded: the catalogue is streamed newest first and only (id, site,
source) is read; reading every catalogued row, as the episode's films are read, took 6.9 s of CPU and
661 MB at 1M images.
"""

from __future__ import annotations

from datetime import datetime

from xray_core.data.catalogue import Row
from xray_core.results import Evaluation
from xray_core.settings import Settings

EARLIER_FILMS = 1000


def earlier_test_rows(settings: Settings, site: str, test: dict[int, Row], cut: datetime,
                      limit: int = EARLIER_FILMS) -> list[Row]:
    """The newest ``limit`` of ``test`` (the run's test rows by image id) that are site ``site``'s (the
    drift check's site rule: the image's own, else its ingest's default) and were catalogued at or before
    ``cut``, newest first."""
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Image, Source
    from xray_core.data.catalogue import open_catalogue
    from xray_core.data.sites import source_site

    query = (select(Image.id, Image.site, Source.path).outerjoin(Source, Source.id == Image.source_id)
             .where(Image.added_at <= cut).order_by(Image.id.desc()).execution_options(yield_per=5000))
    out: list[Row] = []
    with session_scope(open_catalogue(settings)) as s:
        for image_id, own, path in s.execute(query):
            if image_id in test and (own or source_site(path)) == site:
                out.append(test[image_id])
                if len(out) >= limit:
                    break
    return out


def earlier_calls(settings: Settings, site: str, champion: int, test: dict[int, Row], cut: datetime,
                  labels: list[str]) -> tuple[Evaluation | None, str | None]:
    """``champion`` scored on :func:`earlier_test_rows` (those of ``labels``), or (None, why): none, or
    the scoring failed. Best effort: without a baseline the detection check is skipped with the reason,
    and the ranking check stands."""
    from xray_core.pipeline.sequester import score

    try:
        rows = [r for r in earlier_test_rows(settings, site, test, cut) if r.label in labels]
        if not rows:
            return None, "no earlier test films of the site"
        return score(settings, champion, rows), None
    except Exception as exc:  # noqa: BLE001 - see docstring
        return None, f"its earlier calls could not be scored: {type(exc).__name__}: {exc}"


__all__ = ["EARLIER_FILMS", "earlier_calls", "earlier_test_rows"]
