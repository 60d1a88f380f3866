"""Patient-grouped, label-stratified, deterministic and stable train/val/test splits.

The split belongs to the *patient* (``patients.split``), so no patient can ever sit in two splits: an
image's split is its patient's. A patient's split is assigned once and never changed, so new images of
a known patient join that patient's split and the test split only grows.

New patients are assigned in a deterministic order (sha256 of seed + patient id) by largest deficit:
within the patient's stratum (its majority label), each patient goes to the split whose patient count
is furthest below its target ratio. This keeps every stratum within one patient of the target ratios
after each assignment, which a plain hash threshold cannot promise for the small batches a hospital
adds each night. The result depends only on the catalogue's history and the seed.

With ``sequester`` (XRAY_SEQUESTER_FRACTION) above 0, a share of the new patients goes to the
``sequestered`` split first, stratified by (site, label): the patient that takes its (site, label)
stratum's patient count across a multiple of 1/fraction is sequestered (every 20th at 0.05), so each
stratum holds ``floor(fraction x patients)`` sequestered patients counted over the patients assigned since,
and patients assigned before (an upgraded catalogue) are never moved nor "caught up". A stratum of fewer
than 1/fraction patients has none yet. Sequestered patients are in no routine split (:mod:`snapshot`
reads train, val and test by name), so no decision ever sees them; only ``xray audit`` reads them.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from db.schema import SEQUESTERED, SPLITS, Image, Patient, Source
from xray_core.data.sites import source_site


def patient_order_key(patient_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()


def choose_split(counts: dict[str, int], ratios: tuple[float, ...]) -> str:
    """The split with the largest deficit against its target share after adding one patient.

    Ties go to the earlier split in train, val, test order (deterministic).
    """
    total = sum(counts.values()) + 1
    best, best_deficit = SPLITS[0], float("-inf")
    for name, ratio in zip(SPLITS, ratios):
        if ratio <= 0:
            continue
        deficit = ratio * total - counts.get(name, 0)
        if deficit > best_deficit + 1e-12:
            best, best_deficit = name, deficit
    return best


def majority_label(labels: Counter[str]) -> str:
    top = max(labels.values())
    return sorted(label for label, n in labels.items() if n == top)[0]


def sequester_turn(fraction: float, before: int) -> bool:
    """Whether the stratum's patient number ``before + 1`` is sequestered: it takes ``fraction x count``
    across a whole number."""
    return fraction > 0 and math.floor(fraction * (before + 1) + 1e-9) > math.floor(fraction * before + 1e-9)


def assign_splits(session: Session, *, ratios: tuple[float, ...], seed: int,
                  sequester: float = 0.0) -> dict[str, int]:
    """Give every patient without a split one; return how many went to each split (and to
    ``sequestered`` when ``sequester`` is above 0).

    Runs inside the caller's transaction (ingest calls it in the same write transaction as the
    images, so a crash leaves either both or neither).
    """
    session.flush()  # patients and images the caller added in this session count
    pending = session.scalars(select(Patient.patient_id).where(Patient.split.is_(None))).all()
    names = (*SPLITS, SEQUESTERED) if sequester > 0 else SPLITS
    if not pending:
        return {name: 0 for name in names}
    # Label counts of the pending patients only; the assigned ones enter as counts per (stratum, split),
    # computed in the database (at 1M images, reading every patient's labels took seconds per ingest).
    label_rows = session.execute(
        select(Image.patient_id, Image.label, func.count())
        .where(Image.patient_id.in_(select(Patient.patient_id).where(Patient.split.is_(None))))
        .group_by(Image.patient_id, Image.label)
    ).all()
    labels_of: dict[str, Counter[str]] = defaultdict(Counter)
    for pid, label, n in label_rows:
        labels_of[pid][label] += n
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {name: 0 for name in SPLITS})
    for stratum, split, n in session.execute(assigned_per_stratum(session)):
        counts[stratum][split] += n
    assigned = {name: 0 for name in names}
    site_of, seen = ((pending_sites(session), assigned_per_site_stratum(session)) if sequester > 0
                     else ({}, {}))
    now = datetime.now(UTC)
    updates = []
    for pid in sorted(pending, key=lambda p: patient_order_key(p, seed)):
        if not labels_of.get(pid):
            continue  # a patient row without images (should not happen): leave it unassigned
        stratum = majority_label(labels_of[pid])
        if sequester > 0:
            key = (site_of.get(pid, "unknown"), stratum)
            seen[key] = seen.get(key, 0) + 1
            if sequester_turn(sequester, seen[key] - 1):
                updates.append({"pid": pid, "split": SEQUESTERED, "at": now})
                assigned[SEQUESTERED] += 1
                continue  # not counted in the routine splits' shares
        split = choose_split(counts[stratum], ratios)
        updates.append({"pid": pid, "split": split, "at": now})
        counts[stratum][split] += 1
        assigned[split] += 1
    if updates:
        # One executemany UPDATE (the ORM's per-object flush took 2.5 s for 10,000 new patients).
        table = cast(Table, Patient.__table__)
        session.execute(update(table).where(table.c.patient_id == bindparam("pid"))
                        .values(split=bindparam("split"), assigned_at=bindparam("at")), updates)
        for obj in list(session.identity_map.values()):  # loaded Patient objects must not keep split None
            if isinstance(obj, Patient):
                session.expire(obj, ["split", "assigned_at"])
    return assigned


def _first_films() -> Any:
    """(patient_id, site, source path) of each patient's first film: the patient's site is that film's
    own site, else its ingest's default (:func:`~xray_core.data.sites.source_site`)."""
    first = select(Image.patient_id, func.min(Image.id).label("first")).group_by(Image.patient_id).subquery()
    return (select(first.c.patient_id, Image.site, Source.path)
            .join(Image, Image.id == first.c.first).join(Source, Source.id == Image.source_id))


def pending_sites(session: Session) -> dict[str, str]:
    """The site of each patient without a split."""
    query = _first_films().where(Image.patient_id.in_(select(Patient.patient_id)
                                                      .where(Patient.split.is_(None))))
    return {pid: site or source_site(path) for pid, site, path in session.execute(query)}


def assigned_per_site_stratum(session: Session) -> dict[tuple[str, str], int]:
    """Patients with a split (any, sequestered included) per (site, majority label), counted in SQL."""
    ranked = _ranked_labels(session)
    films = _first_films().subquery()
    rows = session.execute(
        select(films.c.site, films.c.path, ranked.c.label, func.count())
        .join(ranked, ranked.c.patient_id == films.c.patient_id)
        .join(Patient, Patient.patient_id == films.c.patient_id)
        .where(ranked.c.rank == 1, Patient.split.is_not(None))
        .group_by(films.c.site, films.c.path, ranked.c.label))
    out: dict[tuple[str, str], int] = defaultdict(int)
    for site, path, label, n in rows:
        out[(site or source_site(path), label)] += int(n)
    return dict(out)


def _ranked_labels(session: Session) -> Any:
    per_label = (select(Image.patient_id, Image.label, func.count().label("n"))
                 .group_by(Image.patient_id, Image.label)).subquery()
    label = (per_label.c.label.collate("C")
             if session.get_bind().dialect.name == "postgresql" else per_label.c.label)
    return select(per_label.c.patient_id, per_label.c.label, func.row_number().over(
        partition_by=per_label.c.patient_id, order_by=(per_label.c.n.desc(), label)).label("rank")).subquery()


def assigned_per_stratum(session: Session) -> Select:
    """(stratum, split, patients) of the assigned patients, the stratum being :func:`majority_label`:
    the most frequent label, ties to the first in code-point order (``COLLATE "C"`` on PostgreSQL,
    whose default collation may sort otherwise; SQLite compares bytes)."""
    ranked = _ranked_labels(session)
    return (select(ranked.c.label, Patient.split, func.count())
            .join(Patient, Patient.patient_id == ranked.c.patient_id)
            .where(ranked.c.rank == 1, Patient.split.in_(SPLITS))
            .group_by(ranked.c.label, Patient.split))
