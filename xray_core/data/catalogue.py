"""Opening the catalogue for the current settings, and the read-only questions asked of it."""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Engine, case, func, select
from sqlalchemy.orm import Session, aliased

from db import get_engine, session_scope
from db.near_pairs import NEAR_PAIR_MAX_DISTANCE, NEAR_PAIRS_PER_FILM
from db.schema import SEQUESTERED, SPLITS, Image, NearPair, Patient, Rejection, SeenFile, Source
from db.urls import sqlite_file
from xray_core.data.sites import source_site
from xray_core.settings import Settings

NEAR_DUPLICATE_MAX_DISTANCE = NEAR_PAIR_MAX_DISTANCE  # bits of 64: pHash distance at or below this counts


def open_catalogue(settings: Settings) -> Engine:
    """The engine for ``settings.database_url``, with the schema upgraded to head on first use."""
    settings.home.mkdir(parents=True, exist_ok=True)
    return get_engine(settings.database_url)


def may_have_seen(settings: Settings, root: str) -> bool:
    """Whether the catalogue may hold a seen-row for a path under ``root`` (ending in ``/``), asked
    without opening it (no schema check: ~1 ms against ~0.3 s). False only when it certainly holds
    none: a SQLite catalogue not created yet, or one whose seen-rows are all elsewhere; another
    database, or any error, says True. A hint for ingest's prefetch, never a verdict."""
    database = sqlite_file(settings.database_url)
    if database is None:
        return True
    if not database.exists():
        return False
    try:
        con = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=0.1)
        try:  # the primary key's range [root, root with its last "/" raised to "0"): one index seek
            row = con.execute(f"SELECT 1 FROM {SeenFile.__tablename__} WHERE path >= ? AND path < ? LIMIT 1",
                              (root, root[:-1] + "0")).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return True
    return row is not None


def patient_salt(settings: Settings) -> str:
    """The salt for hashing DICOM PatientIDs: the setting, else a random per-home secret file.

    The file is created once with O_EXCL semantics (write a temp file, hard-link it into place) so
    two first ingests racing cannot end up with two different salts.
    """
    if settings.patient_salt:
        return settings.patient_salt
    path = settings.home / ".patient_salt"
    if not path.exists():
        settings.home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".patient_salt.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


class Row(NamedTuple):
    """One catalogued image as a run sees it: what the split, the feature cache and the metrics need.

    A tuple (so a snapshot's ``split.json`` stores it as a five-item list, as before) with names, so
    readers write ``row.label``, not ``row[3]``.
    """

    id: int  # images.id
    sha256: str  # of the stored original: the feature cache's key
    stored_path: str  # store key, relative to XRAY_HOME (``store/ab/<sha256>.png``)
    label: str
    patient_id: str  # the (salted) patient: bootstrap clusters and split groups


def split_image_rows(session: Session, split: str | None = None) -> list[Row]:
    """The images with an assigned split (of ``split`` when given), by id.

    Read through the session's connection (Core rows, no ORM loading step): at 1M images the ORM
    layer took longer than SQLite's own fetch. Building the named rows costs about 1 s per million
    on top of the fetch."""
    query = (
        select(Image.id, Image.sha256, Image.stored_path, Image.label, Image.patient_id)
        .join(Patient, Patient.patient_id == Image.patient_id)
        .where(Patient.split.is_not(None) if split is None else Patient.split == split)
        .order_by(Image.id)
    )
    return list(map(Row._make, session.connection().execute(query).all()))


class CensusRow(NamedTuple):
    """Images of one (label, site, source, view), by their patients' splits."""

    label: str
    site: str | None
    source_id: int
    view: str | None
    train: int
    val: int
    test: int
    unassigned: int
    dicom_not_chest: int  # DICOM films whose BodyPartExamined is not CHEST (or absent)


def census(session: Session) -> list[CensusRow]:
    """One pass over the images for every count ``xray status`` shows (by label, split, site, view).

    Grouped in the order of the covering index ``ix_images_census`` (migration 0005), so SQLite reads
    the index alone and groups without sorting: at 1M images one such pass replaced four (two
    label/split/site group-bys, the views, the DICOM body parts), each of them a sort of 1M rows.
    Splits are summed per group instead of grouped by, for the same reason.
    """
    def count_if(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    rows = session.execute(
        select(Image.label, Image.site, Image.source_id, Image.view,
               *(count_if(Patient.split == name) for name in SPLITS), count_if(Patient.split.is_(None)),
               count_if((Image.format == "dicom") & (func.coalesce(Image.body_part, "") != "CHEST")))
        .join(Patient, Patient.patient_id == Image.patient_id)
        .group_by(Image.label, Image.site, Image.source_id, Image.view)
    ).all()
    return [CensusRow(*row[:4], *(int(n) for n in row[4:])) for row in rows]


def _split_counts(row: CensusRow) -> dict[str, int]:
    return {"train": row.train, "val": row.val, "test": row.test, "unassigned": row.unassigned}


def counts_by_label_and_split(session: Session,
                              rows: list[CensusRow] | None = None) -> dict[str, dict[str, int]]:
    """Images per label × split (``rows``: a census already taken, else one is)."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: {**{s: 0 for s in SPLITS}, "unassigned": 0})
    for row in census(session) if rows is None else rows:
        for split, n in _split_counts(row).items():
            table[row.label][split] += n
    return {label: dict(v) for label, v in sorted(table.items())}


def counts_by_label_site_split(session: Session, rows: list[CensusRow] | None = None
                               ) -> dict[str, dict[str, dict[str, int]]]:
    """Images per site × label × split: ``{site: {label: {"train", "val", "test", "unassigned"}}}``.

    The site is the image's own (manifest ``site`` column, ``--site``, DICOM), else the default site of
    the ingest it came from (:func:`xray_core.data.sites.source_site` of the source path), the same
    rule the slices and the shortcut audit use, so ``xray status`` shows the sites they will see.
    """
    rows = census(session) if rows is None else rows
    paths = dict(session.execute(select(Source.id, Source.path)
                                 .where(Source.id.in_(sorted({r.source_id for r in rows})))).tuples().all())
    table: dict[str, dict[str, dict[str, int]]] = {}
    for row in rows:
        cell = table.setdefault(row.site or source_site(paths.get(row.source_id)), {}).setdefault(
            row.label, {**{s: 0 for s in SPLITS}, "unassigned": 0})
        for split, n in _split_counts(row).items():
            cell[split] += n
    return {site: dict(sorted(labels.items())) for site, labels in sorted(table.items())}


def near_duplicate_pairs(
    session: Session, *, max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE, limit: int = 100
) -> tuple[int, list[dict[str, Any]]]:
    """Pairs of different images whose perceptual hashes are within ``max_distance`` bits while
    their patients sit in different splits (possible leakage). Returns (total pairs, first ``limit``
    by the two image ids).

    Reads the ``near_pairs`` table (:class:`db.schema.NearPair`: ingest records each new film's pairs,
    migration 0005 backfilled older films) joined to both patients' splits, so the cost follows the
    number of near pairs, not the square of the catalogue (the former all-pairs scan took 146 s at
    100,000 images). ``max_distance`` above NEAR_PAIR_MAX_DISTANCE is refused: the table holds no more.
    """
    if max_distance > NEAR_PAIR_MAX_DISTANCE:
        raise ValueError(f"max_distance {max_distance} is above {NEAR_PAIR_MAX_DISTANCE}, the widest "
                         "distance near_pairs records (db.near_pairs.NEAR_PAIR_MAX_DISTANCE)")
    image_a, image_b = aliased(Image), aliased(Image)
    patient_a, patient_b = aliased(Patient), aliased(Patient)
    across = (select(NearPair.image_a, NearPair.image_b, NearPair.distance,
                     image_a.sha256, patient_a.split, image_a.original_name, image_a.patient_id,
                     image_b.sha256, patient_b.split, image_b.original_name, image_b.patient_id)
              .join(image_a, image_a.id == NearPair.image_a)
              .join(patient_a, patient_a.patient_id == image_a.patient_id)
              .join(image_b, image_b.id == NearPair.image_b)
              .join(patient_b, patient_b.patient_id == image_b.patient_id)
              .where(NearPair.distance <= max_distance, patient_a.split.is_not(None),
                     patient_b.split.is_not(None), patient_a.split != patient_b.split))
    total = session.scalar(select(func.count()).select_from(across.subquery())) or 0
    found = [{"image_a": a, "sha256_a": sha_a, "split_a": split_a, "file_a": file_a, "patient_a": pat_a,
              "image_b": b, "sha256_b": sha_b, "split_b": split_b, "file_b": file_b, "patient_b": pat_b,
              "distance": int(d)}
             for a, b, d, sha_a, split_a, file_a, pat_a, sha_b, split_b, file_b, pat_b
             in session.execute(across.order_by(NearPair.image_a, NearPair.image_b).limit(limit))]
    return int(total), found


def label_history(session: Session, *, limit: int = 50) -> dict[str, Any]:
    """Patients whose films carry different labels (e.g. two COVID-19 films, then a "No Finding" one).

    Not a conflict to resolve silently: a label that changed over time is a clinical fact or a labelling
    error, and a patient like this in the test split makes the test set disagree with itself. Returns
    the count, how many sit in the test split, and up to ``limit`` patients with their films in order.
    """
    changed = (select(Image.patient_id).group_by(Image.patient_id)
               .having(func.count(func.distinct(Image.label)) > 1)).subquery()
    # Counted in SQL, and films read only for the ``limit`` patients listed: a catalogue where many
    # patients' labels changed (a relabelling) would otherwise build every patient's film list.
    n_changed, in_test = session.execute(
        select(func.count(), func.coalesce(func.sum(case((Patient.split == "test", 1), else_=0)), 0))
        .select_from(changed).join(Patient, Patient.patient_id == changed.c.patient_id)).one()
    # Grouped, ordered and cut in the order of ix_images_patient_label: stops after ``limit`` patients.
    listed_ids = (select(Image.patient_id).group_by(Image.patient_id)
                  .having(func.count(func.distinct(Image.label)) > 1).order_by(Image.patient_id).limit(limit))
    rows = session.execute(
        select(Image.patient_id, Patient.split, Image.label, Image.original_name, Image.added_at, Image.id)
        .join(Patient, Patient.patient_id == Image.patient_id)
        .where(Image.patient_id.in_(listed_ids))
        .order_by(Image.patient_id, Image.added_at, Image.id)
    ).all()
    patients: dict[str, dict[str, Any]] = {}
    for pid, split, label, name, added, _ in rows:
        entry = patients.setdefault(pid, {"patient_id": pid, "split": split, "films": []})
        entry["films"].append({"label": label, "file": name,
                               "added_at": added.isoformat() if added else None})
    for entry in patients.values():
        entry["labels"] = sorted({f["label"] for f in entry["films"]})
    return {"patients": int(n_changed), "in_test": int(in_test), "examples": list(patients.values())}


def catalogue_summary(settings: Settings, *, rows: list[CensusRow] | None = None) -> dict[str, Any]:
    """Everything ``xray status`` shows about the catalogue (images, patients, rejections, sources);
    ``rows``: a :func:`census` already taken (status shares one with its per-site table)."""
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        rows = census(s) if rows is None else rows
        by_label_split = counts_by_label_and_split(s, rows)
        rejections = dict(
            s.execute(select(Rejection.reason, func.count()).group_by(Rejection.reason)).tuples().all()
        )
        patients_by_source = dict(
            s.execute(select(Patient.id_source, func.count()).group_by(Patient.id_source)).tuples().all()
        )
        patients_by_split = dict(
            s.execute(select(Patient.split, func.count()).group_by(Patient.split)).tuples().all()
        )
        n_images = s.scalar(select(func.count()).select_from(Image)) or 0
        n_sources = s.scalar(select(func.count()).select_from(Source)) or 0
        near_total, near_pairs = near_duplicate_pairs(s, limit=20)
        at_cap = s.scalar(select(func.count()).select_from(  # films that recorded only their closest pairs
            select(NearPair.image_b).group_by(NearPair.image_b)
            .having(func.count() >= NEAR_PAIRS_PER_FILM).subquery())) or 0
        history = label_history(s, limit=20)
        views: dict[str, int] = defaultdict(int)
        for row in rows:
            views[str(row.view or "unknown")] += sum(_split_counts(row).values())
        # DICOM films whose BodyPartExamined is not CHEST (or absent): kept unless XRAY_REQUIRE_CHEST.
        not_chest = sum(row.dicom_not_chest for row in rows)
    notes = []
    if not_chest:
        notes.append(f"{not_chest} DICOM film(s) are not marked CHEST (BodyPartExamined); "
                     "XRAY_REQUIRE_CHEST=true would quarantine such films.")
    if patients_by_source.get("image"):
        notes.append(
            f"{patients_by_source['image']} image(s) had no patient id (no manifest column, DICOM "
            "PatientID or XRAY_PATIENT_REGEX match): each counts as its own patient, so images of one "
            "real patient could sit in different splits."
        )
    if rejections.get("duplicate_other_patient"):
        notes.append(f"{rejections['duplicate_other_patient']} file(s) were exact copies of a film "
                     "catalogued under another patient (duplicate_other_patient): each film stays under its "
                     "first patient; the rejection rows name both patients.")
    if near_total:
        notes.append(f"{near_total} near-duplicate image pair(s) sit in different splits (see "
                     "near_duplicates).")
    if at_cap:
        notes.append(f"{at_cap} film(s) are near {NEAR_PAIRS_PER_FILM} or more films of other patients; only "
                     f"their {NEAR_PAIRS_PER_FILM} closest are recorded, so near-duplicate counts are "
                     "lower bounds.")
    if patients_by_split.get(SEQUESTERED):
        notes.append(f"{patients_by_split[SEQUESTERED]} patient(s) are sequestered "
                     "(XRAY_SEQUESTER_FRACTION): their films are in no split or view count here; only "
                     "xray audit reads them.")
    if history["patients"]:
        notes.append(f"{history['patients']} patient(s) have films with different labels "
                     f"({history['in_test']} in the test split); see label_history.")
    return {
        "images": n_images,
        "sources": n_sources,
        "by_label_and_split": by_label_split,
        "patients": {
            "total": sum(patients_by_source.values()),
            "by_id_source": patients_by_source,
            "by_split": {str(k or "unassigned"): v for k, v in patients_by_split.items()},
        },
        "rejections": {"total": sum(rejections.values()), "by_reason": dict(sorted(rejections.items()))},
        "near_duplicates": {"max_distance": NEAR_DUPLICATE_MAX_DISTANCE, "pairs_across_splits": near_total,
                            "films_at_record_cap": at_cap, "examples": near_pairs},
        "label_history": history,
        # films per view; "unknown" are kept and counted (XRAY_ALLOWED_VIEWS)
        "views": dict(sorted(views.items())),
        "dicom_not_marked_chest": not_chest,
        "notes": notes,
    }


def stored_sha256_of(settings: Settings, sha256: str) -> str | None:
    """The sha256 of the bytes stored for an image when they differ from the original's (a de-identified
    DICOM copy), so the store can still be verified on read; None when they are the original's."""
    with session_scope(open_catalogue(settings)) as s:
        return s.scalar(select(Image.stored_sha256).where(Image.sha256 == sha256))


def stored_path(settings: Settings, relative: str) -> Path:
    return settings.home / relative
