"""Ingest a folder (``<root>/<label>/**/<image>``) or a manifest CSV into the catalogue.

Per file: stat → skip if unchanged since last seen → read once → sha256 → label check → decode and
validate → copy into the content-addressed store → catalogue row. Files that cannot be used get a
rejection row with a reason code and a copy under ``quarantine/``; the batch goes on.

Store and quarantine files go through :mod:`xray_core.io.storage` (XRAY_HOME or XRAY_STORAGE_URL).
Crash safety: store and quarantine files are written atomically *before* the transaction that names
them, so a crash leaves at most an unreferenced store file (reused by the next ingest), never a row
pointing at a missing or partial file. Rows are written in small groups, each in one ``BEGIN
IMMEDIATE`` transaction that re-checks the sha256 under the write lock, so two ingests running at
once cannot insert the same image twice or lose rows. A group's store files are written first, with
their fsyncs batched (:func:`~xray_core.io.fsutil.atomic_write_many`), all durable before its
transaction begins; a kill in between leaves unreferenced store files or temp files (``xray doctor``
lists both as ``store_orphan``), never a row without its file. A film the transaction rejects (a near
copy, a view, a label conflict) has the store file the group wrote for it removed before the commit,
and a row's file is checked under the lock first, so ingests that do not crash leave no orphan, even
two at once (:mod:`xray_core.data.store_guard`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from db import in_blocks, session_scope
from db.near_pairs import NEAR_PAIR_MAX_DISTANCE
from db.schema import Image, Patient, Rejection, SeenFile, Source
from xray_core.data.admission import (
    NearCopyIndex,
    SiteRule,
    admit,
    duplicate_of_another_patient,
    record_near_pairs,
)
from xray_core.data.attributes import EXAMPLES as ATTRIBUTE_EXAMPLES
from xray_core.data.attributes import merge
from xray_core.data.catalogue import may_have_seen, open_catalogue
from xray_core.data.columns import check_mapping
from xray_core.data.ingest_pool import PreparePool, resolve_workers
from xray_core.data.prepare import Prepared, settle_group
from xray_core.data.quarantine import Quarantine
from xray_core.data.scan import Candidate, manifest_attributes, scan_folder, scan_manifest, validate_manifest
from xray_core.data.sources import close_interrupted_ingests, ingest_owner
from xray_core.data.split import assign_splits
from xray_core.data.store_guard import STORE_GONE, drop_unnamed, quarantine_copy, restore
from xray_core.errors import SettingsError, SourceError
from xray_core.faults import crash_point
from xray_core.io.fsutil import printable, private_dir
from xray_core.io.storage import get_storage
from xray_core.settings import Settings

GROUP_SIZE = 32  # files prepared outside a transaction, then written in one short transaction
GROUP_BYTES = 64 * 2**20  # ... or fewer, when their bytes (held until the group is written) reach this
# With worker processes, the last files are written in halves (see tail_group): the workers examine
# the rest meanwhile, so that only the last few files' write follows their end.
TAIL_GROUP = 4
# Rejections that say nothing about the file's bytes (e.g. permissions): not remembered as "seen",
# so the next ingest tries again even though size and mtime are unchanged (chmod leaves mtime alone).
# A folder that cannot be listed and a file that changed while read are retried for the same reason.
TRANSIENT_REASONS = {"unreadable_file", "unreadable_path", "file_changing", STORE_GONE[0]}
# Rejections whose bytes are already kept elsewhere: an exact copy of another patient's film is the
# stored film itself, so quarantine would only hold a second copy of the same bytes.
NO_COPY_REASONS = {"duplicate_other_patient"}

Progress = Callable[[int, int], None]


@dataclass
class IngestSummary:
    source_id: int
    source: str
    manifest: str | None
    files: int = 0
    added: int = 0
    duplicates: int = 0
    skipped_unchanged: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    added_by_label: dict[str, int] = field(default_factory=dict)
    new_patients: int = 0
    patients_without_id: int = 0
    split_assignments: dict[str, int] = field(default_factory=dict)
    near_copies_linked: list[dict] = field(default_factory=list)  # near copies stored and reported
    # copies written, rows sharing one, copies skipped at the cap and why (Quarantine.summary)
    quarantine: dict = field(default_factory=dict)
    seconds: float = 0.0
    # A manifest's own columns kept per film (xray_core.data.attributes): {"columns", "conflicts",
    # "examples"}; conflicts: films already catalogued whose stored value differs (the stored one stays).
    attributes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _rules_key(settings: Settings) -> str:
    """The settings a rejection depends on. Stored with a rejected file's seen-row, so that changing
    them (e.g. adding a label to XRAY_LABELS, raising XRAY_MAX_PIXELS) re-evaluates the files they
    rejected instead of skipping them as unchanged forever."""
    return (f"labels={','.join(settings.labels)};min_side={settings.min_image_side};"
            f"max_pixels={settings.max_pixels};max_bytes={settings.max_file_bytes};"
            f"modalities={','.join(settings.allowed_modalities) or 'any'};chest={settings.require_chest};"
            f"views={','.join(settings.allowed_views) or 'any'};near={settings.near_copy_distance}")


def _unchanged(prev: tuple[int, int, str] | None, size: int, mtime_ns: int, context: str, rules: str) -> bool:
    """Whether a file's last verdict still holds: same size and mtime (-1, -1: still missing) and the
    same label/patient context; a rejection also needs the same rules (see :func:`_rules_key`)."""
    if prev is None or prev[:2] != (size, mtime_ns):
        return False
    return prev[2] in (context, f"{context}|{rules}")


# --------------------------------------------------------------------------- the run


def ingest_source(path: Path, *, settings: Settings, manifest: Path | None = None,
                  progress: Progress | None = None, source_kind: str | None = None,
                  site: str | None = None, skip_top_files: bool = False,
                  columns: Mapping[str, str] | None = None) -> IngestSummary:
    """Ingest one folder or manifest; return what happened. Bad files never stop the batch.

    ``site``: where these films come from, unless a manifest row says (see :mod:`xray_core.data.admission`).
    ``skip_top_files``: files directly in a folder source are left alone, not rejected (an incoming batch's
    side files; see :func:`~xray_core.data.scan.scan_folder`).
    ``columns``: the manifest's names for known columns (``--columns``, :mod:`xray_core.data.columns`).
    """
    start = time.perf_counter()
    path = Path(path).expanduser().absolute()
    if manifest is not None:
        manifest = Path(manifest).expanduser().absolute()
        columns = check_mapping(columns)
        total = validate_manifest(manifest, columns)
        candidates: Iterator[Candidate] = scan_manifest(manifest, columns)
        kind = "manifest"
    else:
        if not path.is_dir():
            raise SourceError(f"source {path} is not a folder; use <root>/<label>/<image> or --manifest CSV")
        listed = list(scan_folder(path, skip_top_files=skip_top_files))
        total, candidates, kind = len(listed), iter(listed), "folder"
    kind = source_kind or kind
    try:
        regex = re.compile(settings.patient_regex) if settings.patient_regex else None
    except re.error as exc:
        raise SettingsError(f"XRAY_PATIENT_REGEX={settings.patient_regex!r} is not a "
                            f"valid regular expression ({exc}); use e.g. ^(person\\d+) or an empty "
                            "value for none") from None
    rules = _rules_key(settings)
    def known_sha(sha: str) -> str | None:
        with session_scope(engine) as s:
            return s.scalar(select(Image.label).where(Image.sha256 == sha))

    # Files are prepared ahead in worker processes (XRAY_INGEST_WORKERS), taken back in order; this
    # process alone writes the store and the catalogue (see xray_core.data.ingest_pool). Forked
    # workers start on the first files now, while the catalogue opens, unless the catalogue may have
    # seen files here (a re-scan would examine them for nothing).
    pool = PreparePool(resolve_workers(settings), settings, regex, known_sha)
    seen_root = printable(str(manifest.parent if manifest else path)).rstrip("/") + "/"
    try:
        candidates = candidates if may_have_seen(settings, seen_root) else pool.prefetch(candidates)
        engine = open_catalogue(settings)
        for private in ("store", "quarantine"):
            # Quarantined files (and, with XRAY_DICOM_STORE=original, stored DICOM) keep every byte,
            # patient identifiers included (see SECURITY.md): owner only when we create them; an
            # existing folder's permissions are the administrator's choice.
            # (Under XRAY_STORAGE_URL, access is the bucket's or share's policy.)
            folder = get_storage(settings).local_path(private)
            if folder is not None:
                private_dir(folder)

        with session_scope(engine) as s:
            close_interrupted_ingests(s)  # left 'running' by a killed ingest
            source = Source(kind=kind, path=printable(str(path)), counts={"owner": ingest_owner()},
                            manifest_path=printable(str(manifest)) if manifest else None)
            s.add(source)
            s.flush()
            source_id = source.id
            # One query for every path under the source root; a manifest's absolute or ../ rows that
            # leave it are looked up one by one below (they are rare and always rejected).
            seen = {v.path: (v.size, v.mtime_ns, v.label_key) for v in s.scalars(select(SeenFile).where(
                SeenFile.path.like(f"{_like_prefix(Path(seen_root))}%", escape="\\")))}
            radius = max(settings.near_copy_distance, NEAR_PAIR_MAX_DISTANCE)
            admission = (NearCopyIndex.load(s, radius=radius),
                         SiteRule.for_source(site, str(manifest or path)))
        summary = IngestSummary(source_id, printable(str(path)),
                                printable(str(manifest)) if manifest else None)
        if manifest is not None and (kept := manifest_attributes(manifest, columns)):
            summary.attributes = {"columns": kept, "conflicts": 0, "examples": []}
        quarantine = Quarantine.for_ingest(settings)
    except BaseException as exc:  # the pool, started above, is shut down before anything is raised
        pool.__exit__(type(exc), exc, exc.__traceback__)
        raise

    def known_shas(shas: list[str]) -> set[str]:
        with session_scope(engine) as s:
            return {sha for block in in_blocks(shas) for sha in s.scalars(
                select(Image.sha256).where(Image.sha256.in_(block)))}

    def write(group: list[Prepared]) -> None:
        # Store copies first, durable together (fsyncs batched), then the group's rows in one transaction.
        _write_group(engine, settings, source_id, *settle_group(group, settings, known_shas, regex), summary,
                     rules, admission, quarantine)

    def seen_before(key: str) -> tuple[int, int, str] | None:
        if key.startswith(seen_root):
            return seen.get(key)
        with session_scope(engine) as s:
            row = s.get(SeenFile, key)
            return (row.size, row.mtime_ns, row.label_key) if row is not None else None

    try:
        group: list[Prepared] = []
        done = held = 0

        def take_one(draining: bool = False) -> None:
            nonlocal group, done, held
            item = pool.take()
            if item is not None:  # None: skipped as unchanged
                group.append(item)
                held += payload_bytes(item)
            if len(group) >= GROUP_SIZE or held >= GROUP_BYTES or (draining and tail_group(len(group),
                                                                                           len(pool))):
                write(group)
                group, held = [], 0
            done += 1
            if progress:
                progress(done, total)

        with pool:
            for cand in candidates:
                summary.files += 1
                key = cand.key
                stat_error = "the file vanished or cannot be opened"
                st = pool.prefetched_stat(cand)  # the stat a prefetched file's examination began with
                try:
                    st = st or (cand.path.lstat() if cand.problem else cand.path.stat())
                except (OSError, ValueError) as exc:  # missing; ELOOP (links deeper than the OS follows); NUL
                    st, stat_error = None, ("the file vanished or cannot be opened "
                                            f"({getattr(exc, 'strerror', None) or exc})")
                size, mtime_ns = (st.st_size, st.st_mtime_ns) if st is not None else (-1, -1)
                if _unchanged(seen_before(key), size, mtime_ns, cand.context_key, rules):
                    summary.skipped_unchanged += 1  # also a file that was missing and still is
                    pool.put(None)
                elif st is None:
                    pool.put(Prepared(cand, -1, -1, reject=cand.problem or ("missing_file", stat_error)))
                else:
                    pool.put((cand, st))
                while pool.ready():
                    take_one()
            while len(pool):
                take_one(draining=True)
        if group:
            write(group)
        summary.quarantine = quarantine.summary()
        crash_point("ingest.before_splits")
        with session_scope(engine) as s:
            summary.split_assignments = assign_splits(s, ratios=settings.split_ratios,
                                                      seed=settings.split_seed,
                                                      sequester=settings.sequester_fraction)
            summary.seconds = round(time.perf_counter() - start, 3)
            src = s.get(Source, source_id)
            assert src is not None  # this ingest's own row, added above
            src.status, src.finished_at, src.counts = "done", datetime.now(UTC), summary.as_dict()
    except BaseException:
        with session_scope(engine) as s:
            src = s.get(Source, source_id)
            if src is not None:
                src.status, src.finished_at = "failed", datetime.now(UTC)
                summary.quarantine = quarantine.summary()
                src.counts = summary.as_dict()
        raise
    return summary


def _note_conflicts(summary: IngestSummary, conflicts: list[dict[str, str]], rel: str) -> None:
    """Count attribute values a duplicate row gives differently from the stored film (which keeps its own)."""
    if not conflicts:
        return
    summary.attributes["conflicts"] = summary.attributes.get("conflicts", 0) + len(conflicts)
    examples = summary.attributes.setdefault("examples", [])
    examples += [{**c, "file": rel} for c in conflicts][:max(0, ATTRIBUTE_EXAMPLES - len(examples))]


def tail_group(taken: int, in_flight: int) -> bool:
    """Whether to write a group of ``taken`` files now, once every file is handed to the pool and
    ``in_flight`` are still to come back: as soon as it holds as many as are in flight (and at least
    TAIL_GROUP), so the last files are written in halves, each while the workers examine the files
    after it. Otherwise the whole last group (up to GROUP_SIZE files: for a batch of 42, the first 32)
    would be written after the workers' end, with nothing to do for them meanwhile. With one worker
    nothing is in flight: groups are as before."""
    return taken >= max(TAIL_GROUP, in_flight)


def payload_bytes(prep: Prepared) -> int:
    """Bytes an item holds until its group is written (a group is bounded by them too)."""
    held = len(prep.payload) if prep.payload is not None else 0
    return held + (len(prep.data) if prep.data is not None and prep.data is not prep.payload else 0)


def _rows_by_key(s, model, column, keys: list) -> dict:
    """{key: row} of ``model``'s rows whose ``column`` is one of ``keys`` (loaded into the session)."""
    wanted = sorted(set(keys))
    return {getattr(row, column.key): row for block in in_blocks(wanted)
            for row in s.scalars(select(model).where(column.in_(block)))}


def _like_prefix(root: Path) -> str:
    text = str(root).rstrip("/") + "/"
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _write_group(engine, settings: Settings, source_id: int, group: list[Prepared], written: set[str],
                 summary: IngestSummary, rules: str, admission: tuple[NearCopyIndex, SiteRule],
                 quarantine: Quarantine) -> None:
    """One write transaction for a group of prepared files; sha256 re-checked under the lock.
    ``written``: the store files the group wrote (those of films it rejects are removed: store_guard)."""
    quarantined: dict[int, tuple[str | None, str | None]] = {}
    store, rejected = get_storage(settings), []
    with session_scope(engine) as s:
        admission[0].refresh(s)  # films another ingest catalogued meanwhile (this transaction holds the lock)
        # The group's catalogued films, patients and seen-rows, read under the lock in one query each
        # (grown below as the group adds its own), instead of a query per file.
        images = _rows_by_key(s, Image, Image.sha256, [p.sha256 for p in group if p.sha256])
        patients = _rows_by_key(s, Patient, Patient.patient_id, [p.patient_id for p in group if p.patient_id])
        seen_rows = _rows_by_key(s, SeenFile, SeenFile.path, [p.cand.key for p in group])
        for i, prep in enumerate(group):
            outcome, reject, existing = "rejected", prep.reject, None
            if reject is None and prep.sha256:
                existing = images.get(prep.sha256)
                if existing is not None:
                    if existing.label != prep.label:
                        reject = ("label_conflict",
                                  f"the same bytes are already catalogued as {existing.label!r} "
                                  f"(image {existing.id}); this file says {prep.label!r}")
                    else:
                        reject = duplicate_of_another_patient(s, prep, existing)
                        outcome = "duplicate" if reject is None else outcome
                        if reject is None and prep.cand.attributes:
                            _note_conflicts(summary, merge(existing, prep.cand.attributes), prep.cand.rel)
                elif prep.meta is None:
                    # Known when prepared but gone now (cannot happen: images are never deleted).
                    reject = ("internal", "image vanished from the catalogue during ingest")
                else:
                    assert prep.patient_id is not None  # a prepared good file has its patient
                    verdict = admit(s, settings, admission[0], meta=prep.meta, sites=admission[1],
                                    manifest_site=dict(prep.cand.acquisition).get("site"),
                                    patient=prep.patient_id, name=prep.cand.rel,
                                    id_given=prep.id_source != "image")
                    if isinstance(verdict, dict):
                        summary.near_copies_linked.append(verdict)
                    reject = verdict if isinstance(verdict, tuple) else None
                    if reject is None and not restore(store, prep, written):  # removed by another ingest
                        reject = STORE_GONE
                if reject is None and outcome != "duplicate" and prep.meta is not None and existing is None:
                    if prep.patient_id not in patients:
                        patient = Patient(patient_id=prep.patient_id, id_source=prep.id_source)
                        patients[prep.patient_id] = patient
                        s.add(patient)
                        summary.new_patients += 1
                        if prep.id_source == "image":
                            summary.patients_without_id += 1
                    image = Image(sha256=prep.sha256, stored_path=prep.stored_rel, label=prep.label,
                                  patient_id=prep.patient_id, original_name=prep.cand.rel,
                                  source_id=source_id, **prep.meta)
                    s.add(image)
                    s.flush()
                    images[prep.sha256] = image
                    image_id = image.id
                    assert image_id is not None and prep.patient_id is not None  # the row just flushed
                    record_near_pairs(s, admission[0], image_id, prep.meta["phash"], prep.patient_id)
                    admission[0].add(image_id, prep.meta["phash"], prep.patient_id, prep.cand.rel)
                    outcome = "added"
            if reject is not None:
                if i not in quarantined:
                    quarantined[i] = (None, None) if reject[0] in NO_COPY_REASONS else quarantine_copy(
                        quarantine, store, prep, reject[0], written)
                    rejected.append(prep)
                copied, skipped = quarantined[i]
                detail = reject[1] if skipped is None else f"{reject[1]}; {skipped}"
                s.add(Rejection(source_id=source_id, path=prep.cand.key, sha256=prep.sha256,
                                reason=reject[0], detail=printable(detail), quarantine_path=copied))
            if reject is None or reject[0] not in TRANSIENT_REASONS:
                # size -1 / mtime -1: missing; skipped next time unless the file has appeared.
                context = prep.cand.context_key if reject is None else f"{prep.cand.context_key}|{rules}"
                values = {"size": prep.size, "mtime_ns": prep.mtime_ns, "label_key": context,
                          "sha256": prep.sha256, "outcome": outcome, "updated_at": datetime.now(UTC)}
                if (row := seen_rows.get(prep.cand.key)) is not None:
                    for name, value in values.items():
                        setattr(row, name, value)
                else:
                    seen_rows[prep.cand.key] = SeenFile(path=prep.cand.key, **values)
                    s.add(seen_rows[prep.cand.key])
            prep.data = prep.payload = None
            crash_point("ingest.group_row")  # a row added, the group's transaction still open
            if outcome == "added":
                assert prep.label is not None  # an added film passed the label check
                summary.added += 1
                summary.added_by_label[prep.label] = summary.added_by_label.get(prep.label, 0) + 1
            elif outcome == "duplicate":
                summary.duplicates += 1
            else:
                assert reject is not None  # neither added nor a duplicate: rejected
                summary.rejected += 1
                summary.rejected_by_reason[reject[0]] = summary.rejected_by_reason.get(reject[0], 0) + 1
        # Store files of films rejected here that no row names: removed under the lock, before the
        # commit (why that order is crash-safe: store_guard.drop_unnamed).
        drop_unnamed(s, store, rejected, written)
        crash_point("ingest.group_before_commit")
    crash_point("ingest.group_committed")
