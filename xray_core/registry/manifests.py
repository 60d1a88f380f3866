"""A version's training and validation images, stored as a shared split manifest (db.split_manifest).

``put_split_manifest`` writes a manifest once: a version trained on exactly the sets of an earlier
one points at the same row, so lineage costs one 64-character reference per version instead of one
row per image. ``split_manifest_images`` reads it back with each image's facts, as ``xray models
show`` lists them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db import in_blocks
from db.schema import Image, SplitManifest
from db.split_manifest import ENCODING, ROLES, decode, encode

_RANGE_CHUNK = 50_000  # ids per range read, when they fill at least half their id range


def put_split_manifest(session: Session, train_ids: Iterable[int], val_ids: Iterable[int]) -> str:
    """The manifest's sha256, inserted unless a version already wrote the identical sets."""
    sha, body, n_train, n_val = encode(train_ids, val_ids)
    values = {"sha256": sha, "encoding": ENCODING, "n_train": n_train, "n_val": n_val, "body": body}
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        # Two saves of the same sets at once (another process): the second insert is a no-op.
        insert = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(SplitManifest)
        session.execute(insert.values(**values).on_conflict_do_nothing(index_elements=["sha256"]))
    elif session.get(SplitManifest, sha) is None:
        session.add(SplitManifest(**values))
    return sha


def split_manifest_ids(session: Session, sha: str | None) -> dict[str, list[int]]:
    """{"train": ids, "val": ids}, ascending; empty for a version without a manifest."""
    if sha is None:
        return {role: [] for role in ROLES}
    row = session.get(SplitManifest, sha)
    assert row is not None  # models.split_manifest is a foreign key to split_manifests
    return decode(row.body, row.encoding)


def split_manifest_images(session: Session, sha: str | None) -> list[tuple[str, int, str, str, str, int]]:
    """(role, image id, sha256, label, patient id, source id) of every image in a manifest, by id."""
    ids = split_manifest_ids(session, sha)
    role_of = {i: role for role in ROLES for i in ids[role]}
    ordered = sorted(role_of)
    rows: list[Any] = []
    columns = select(Image.id, Image.sha256, Image.label, Image.patient_id, Image.source_id)
    for start in range(0, len(ordered), _RANGE_CHUNK):
        block = ordered[start:start + _RANGE_CHUNK]
        if block[-1] - block[0] < 2 * len(block):
            # Dense ids (a large manifest): one range read, others dropped here, instead of one IN (...)
            # query per 900 ids (850,000 ids: 945 queries, 19 s on a loaded machine).
            rows.extend(r for r in session.execute(columns.where(Image.id.between(block[0], block[-1])))
                        if r[0] in role_of)
            continue
        for part in in_blocks(block):
            rows.extend(session.execute(columns.where(Image.id.in_(part))).all())
    rows.sort(key=lambda r: r[0])
    return [(role_of[r[0]], *r) for r in rows]
