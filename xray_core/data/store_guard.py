"""A write group's store files against its rejections, and against another ingest's.

A group's store files are written before its transaction (:func:`~xray_core.data.prepare.settle_group`),
but some of its films are rejected only inside the transaction, under the catalogue's write lock
(near copies of another patient's film, disallowed views, label conflicts). Such a film's store file
would be named by no row: ``xray doctor`` would list it as ``store_orphan`` on a healthy home. So,
still inside the transaction, :func:`drop_unnamed` removes the store files this group wrote for
rejected films that no image row names.

The store is content-addressed, so removing a file races with another ingest of the same bytes: it may
have found the file already there before its own transaction (and not written it), and will add a row
naming it. Hence the other side, :func:`restore`: before a row names a store file (or a quarantine
copy is taken from it), the writer checks, under the lock, that the file is there, and writes it again
from the bytes it still holds if another ingest removed it. Both sides run under the write lock (SQLite
``BEGIN IMMEDIATE``, PostgreSQL's transaction-scoped advisory lock: :mod:`db.engine`), so a removal and
a row naming the same file never interleave.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import in_blocks
from db.schema import Image
from xray_core.data.prepare import Prepared
from xray_core.data.quarantine import Quarantine
from xray_core.io.storage import Storage

# A film whose store file another ingest removed (it rejected the same bytes) after this one had let go
# of the bytes: not stored now, and not remembered as seen, so the next ingest tries it again.
STORE_GONE = ("store_file_gone", "its store file was removed by another ingest that rejected the same bytes "
                                 "at the same time; it is tried again by the next ingest")


def restore(store: Storage, prep: Prepared, written: set[str]) -> bool:
    """Whether ``prep``'s store file is there now, written again from ``prep.payload`` (durably) when
    another ingest removed it; a file written here joins ``written`` (the group's own, see
    :func:`drop_unnamed`). False only when the file is gone and the bytes are no longer held.

    Call under the write lock: the other ingest removes files only under it."""
    assert prep.stored_rel is not None  # a prepared good file
    if store.exists_now(prep.stored_rel):  # never a cached answer: another host may have removed it
        return True
    if prep.payload is None:
        return False
    store.write_bytes(prep.stored_rel, prep.payload)  # atomic and fsynced, before the row that names it
    written.add(prep.stored_rel)
    return True


def quarantine_copy(quarantine: Quarantine, store: Storage, prep: Prepared, reason: str,
                    written: set[str]) -> tuple[str | None, str | None]:
    """:meth:`Quarantine.copy` of a rejected film: its bytes as read, or else its store file, which
    another ingest may have removed meanwhile (then written again first, see :func:`restore`)."""
    stored_rel = prep.stored_rel
    if prep.data is None and stored_rel is not None and not restore(store, prep, written):
        stored_rel = None  # nothing left to copy from: the row says so by naming no copy
    return quarantine.copy(sha256=prep.sha256, data=prep.data, stored_rel=stored_rel, reason=reason,
                           stored_sha256=(prep.meta or {}).get("stored_sha256"))


def drop_unnamed(s: Session, store: Storage, rejected: list[Prepared], written: set[str]) -> int:
    """Remove the store files of ``rejected`` films that this group wrote (``written``) and that no image
    row names; return how many. A file that was there before the group is left alone (a crash's orphan,
    which ``xray doctor`` lists, or a file another ingest is about to name).

    Called inside the group's transaction, after its rows are flushed and its quarantine copies made,
    *before* the commit. Why that order is crash-safe:

    * Under the write lock, no other ingest can commit a row naming the file between the check below
      and the removal, and the other ingest checks the file is there before its row (:func:`restore`).
      After the commit the lock is gone: another ingest could name the file and commit before a removal.
    * A crash (or a failed commit) after the removal rolls the group back: no committed row ever named
      the file, so nothing committed is lost; the rejection and seen-rows go too, so the next ingest
      examines the film again. Its quarantine copy, taken from the store file before the removal, was
      written atomically and fsynced (:func:`~xray_core.io.fsutil.atomic_copy`), so it is kept either way.
    * A crash before the removal leaves the file as before this fix: an orphan ``xray doctor`` lists.
    """
    mine = {p.sha256: p.stored_rel for p in rejected if p.sha256 and p.stored_rel in written}
    if not mine:
        return 0
    named = {path for block in in_blocks(sorted(mine)) for path in s.scalars(  # this group's too
        select(Image.stored_path).where(Image.sha256.in_(block)))}
    gone = {rel for rel in mine.values() if rel is not None and rel not in named}
    removed = 0
    for rel in sorted(gone):
        try:  # best effort: a store that refuses deletes (object lock, a read-only folder) keeps an orphan,
            store.delete(rel)  # as before this check, rather than failing the group on every ingest
        except OSError:
            continue
        removed += 1
    return removed


__all__ = ["STORE_GONE", "drop_unnamed", "quarantine_copy", "restore"]
