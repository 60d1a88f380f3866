"""Ingest a folder (``<root>/<label>/**/<image>``) or a manifest CSV into the catalogue.

Per file: stat → skip if unchanged since last seen → read once → sha256 → label check → decode and
validate → copy into the content-addressed store → catalogue row. Files that cannot be used get a
rejection row with a reason code and a copy under ``quarantine/``; the batch goes on.

Store and quarantine files go through :mod:`xray_core.io.storage` (XRAY_HOME or XRAY_STORAGE_URL).
Crash safety: store and quarantine files are written atomically *before* the transaction that names
them, so a crash leaves at most an unreferenced store file (reused by the next ingest), never a row
pointing at a missing or partial file. Rows are written in small groups, each in one ``BEGIN
IMMEDIATE`` transaction that re-checks the sha256 under the write lock, so two ingests running at
once cannot insert the same image twice or lose rows.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import select

from db import session_scope
from db.schema import Image, Patient, Rejection, SeenFile, Source
from xray_core.data.catalogue import open_catalogue, patient_salt
from xray_core.data.deidentify import deidentify
from xray_core.data.dicom import DicomPolicy, catalogue_fields, patient_pseudonym
from xray_core.faults import crash_point
from xray_core.errors import ImageRejected, SettingsError, SourceError
from xray_core.io.fsutil import printable, sha256_bytes
from xray_core.data.labels import check_label
from xray_core.settings import Settings
from xray_core.data.admission import NearCopyIndex, SiteRule, admit
from xray_core.data.quarantine import quarantine_copy
from xray_core.data.scan import Candidate, scan_folder, scan_manifest, validate_manifest
from xray_core.data.sources import close_interrupted_ingests, ingest_owner
from xray_core.data.split import assign_splits
from xray_core.io.storage import get_storage

GROUP_SIZE = 32  # files prepared outside a transaction, then written in one short transaction
STORE_EXT = {"png": "png", "jpeg": "jpg", "dicom": "dcm"}
# Rejections that say nothing about the file's bytes (e.g. permissions): not remembered as "seen",
# so the next ingest tries again even though size and mtime are unchanged (chmod leaves mtime alone).
# A folder that cannot be listed and a file that changed while read are retried for the same reason.
TRANSIENT_REASONS = {"unreadable_file", "unreadable_path", "file_changing"}

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
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Prepared:
    cand: Candidate
    size: int
    mtime_ns: int
    sha256: str | None = None
    label: str | None = None
    reject: tuple[str, str] | None = None
    data: bytes | None = None  # kept only for rejected files (quarantine copy)
    meta: dict | None = None  # image facts for a good file
    patient_id: str | None = None
    id_source: str | None = None
    stored_rel: str | None = None


def _patient_from_filename(name: str, regex: re.Pattern[str] | None) -> str | None:
    if regex is None:
        return None
    match = regex.search(name)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


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


def _prepare(cand: Candidate, st: os.stat_result, settings: Settings, regex: re.Pattern[str] | None,
             known_sha: Callable[[str], str | None], salt: Callable[[], str]) -> _Prepared:
    from xray_core.data.images import decode_image

    prep = _Prepared(cand, st.st_size, st.st_mtime_ns)
    if cand.problem:
        prep.reject = cand.problem
        return prep
    if not stat.S_ISREG(st.st_mode):
        # A named pipe would block the read forever; a device could stream without end.
        prep.reject = ("not_an_image", "not a regular file (a named pipe, socket or device); "
                                       "only image files are read")
        return prep
    if st.st_size > settings.max_file_bytes:
        prep.reject = ("file_too_large",
                       f"{st.st_size} bytes is over XRAY_MAX_FILE_BYTES={settings.max_file_bytes}")
        return prep
    try:
        data = cand.path.read_bytes()
    except OSError as exc:
        prep.reject = ("unreadable_file", f"cannot read the file: {exc.strerror or exc}")
        return prep
    if _changed_while_read(cand.path, st, len(data)):
        # A file still being copied in: its partial bytes would be stored as one image and the full
        # bytes as another (two images of one film, possibly in two splits). Retried next time.
        prep.reject = ("file_changing", "the file changed while it was being read (still being written?); "
                                        "it is tried again by the next ingest")
        return prep
    prep.sha256 = sha256_bytes(data)
    try:
        prep.label = check_label(cand.label, settings.labels)
    except ImageRejected as rej:
        prep.reject, prep.data = (rej.reason, rej.detail), data
        return prep
    existing_label = known_sha(prep.sha256)
    if existing_label is not None:
        # Already catalogued: no need to decode again; the transaction decides duplicate vs conflict.
        prep.data = data
        return prep
    try:
        decoded = decode_image(data, min_side=settings.min_image_side, max_pixels=settings.max_pixels,
                               policy=DicomPolicy(settings.allowed_modalities, settings.require_chest))
    except ImageRejected as rej:
        prep.reject, prep.data = (rej.reason, rej.detail), data
        return prep
    from xray_core.data.images import perceptual_hash

    dicom_pid = None  # the salted PatientID: the only form it is ever stored in
    if decoded.dicom_patient_id:
        dicom_pid = patient_pseudonym(salt(), decoded.dicom_patient_id)
    if cand.patient_id:
        prep.patient_id, prep.id_source = cand.patient_id, "manifest"
    elif dicom_pid:
        prep.patient_id, prep.id_source = dicom_pid, "dicom"
    elif (pid := _patient_from_filename(cand.path.name, regex)) is not None:
        prep.patient_id, prep.id_source = pid, "filename"
    else:
        prep.patient_id, prep.id_source = f"img-{prep.sha256[:16]}", "image"
    ext = STORE_EXT[decoded.format]
    # Named by the original's sha256 even when a de-identified copy is stored: deduplication and
    # idempotent re-scans work on what arrived (see xray_core.data.deidentify).
    prep.stored_rel = f"store/{prep.sha256[:2]}/{prep.sha256}.{ext}"
    stored = data
    if decoded.dicom is not None and settings.dicom_store == "deidentified":
        stored = deidentify(data, salt=salt(), patient_id=dicom_pid or "", site_mode=settings.site_from_dicom)
    store = get_storage(settings)
    if not (store.exists(prep.stored_rel) and store.size(prep.stored_rel) == len(stored)):
        store.write_bytes(prep.stored_rel, stored)
        crash_point("ingest.store_written")
    acquisition = (catalogue_fields(decoded.dicom, salt=salt(), site_mode=settings.site_from_dicom)
                   if decoded.dicom is not None else {})
    prep.meta = {
        "width": decoded.width, "height": decoded.height, "bit_depth": decoded.bit_depth,
        "format": decoded.format, "phash": perceptual_hash(decoded.pixels),
        "stored_sha256": sha256_bytes(stored) if stored is not data else None,
        "view": cand.view or decoded.view, **acquisition, **_manifest_facts(cand),
    }
    return prep


def _changed_while_read(path: Path, before: os.stat_result, n_read: int) -> bool:
    """Whether the bytes read may not be the whole, settled file: a size other than the one stat
    gave before reading, or a size or mtime that changed during the read."""
    try:
        after = path.stat()
    except OSError:
        return True
    return n_read != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)


def _manifest_facts(cand: Candidate) -> dict:
    """Manifest acquisition columns (checked by scan) as catalogue values; they win over DICOM tags."""
    typed = {"age_years": float, "study_date": date.fromisoformat}
    return {("age_years" if name == "age" else name): typed.get(name, typed["age_years"] if name == "age" else str)(value)
            for name, value in cand.acquisition}


# --------------------------------------------------------------------------- the run


def ingest_source(path: Path, *, settings: Settings, manifest: Path | None = None,
                  progress: Progress | None = None, source_kind: str | None = None,
                  site: str | None = None) -> IngestSummary:
    """Ingest one folder or manifest; return what happened. Bad files never stop the batch.

    ``site``: where these films come from, unless a manifest row says (see :mod:`xray_core.data.admission`).
    """
    start = time.perf_counter()
    path = Path(path).expanduser().absolute()
    if manifest is not None:
        manifest = Path(manifest).expanduser().absolute()
        total = validate_manifest(manifest)
        candidates: Iterator[Candidate] = scan_manifest(manifest)
        kind = "manifest"
    else:
        if not path.is_dir():
            raise SourceError(f"source {path} is not a folder; use <root>/<label>/<image> or --manifest CSV")
        listed = list(scan_folder(path))
        total, candidates, kind = len(listed), iter(listed), "folder"
    kind = source_kind or kind
    try:
        regex = re.compile(settings.patient_regex) if settings.patient_regex else None
    except re.error as exc:
        raise SettingsError(f"XRAY_PATIENT_REGEX={settings.patient_regex!r} is not a valid regular expression "
                            f"({exc}); use e.g. ^(person\\d+) or an empty value for none") from None
    rules = _rules_key(settings)
    engine = open_catalogue(settings)
    for private in ("store", "quarantine"):
        # Quarantined files (and, with XRAY_DICOM_STORE=original, stored DICOM) keep every byte,
        # patient identifiers included (see SECURITY.md): owner only when we create them; an
        # existing folder's permissions are the administrator's choice.
        # (Under XRAY_STORAGE_URL, access is the bucket's or share's policy.)
        folder = get_storage(settings).local_path(private)
        if folder is not None:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    with session_scope(engine) as s:
        close_interrupted_ingests(s)  # left 'running' by a killed ingest
        source = Source(kind=kind, path=printable(str(path)), counts={"owner": ingest_owner()},
                        manifest_path=printable(str(manifest)) if manifest else None)
        s.add(source)
        s.flush()
        source_id = source.id
        # One query for every path under the source root; a manifest's absolute or ../ rows that
        # leave it are looked up one by one below (they are rare and always rejected).
        seen_root = printable(str(manifest.parent if manifest else path)).rstrip("/") + "/"
        seen = {v.path: (v.size, v.mtime_ns, v.label_key) for v in s.scalars(select(SeenFile).where(
            SeenFile.path.like(f"{_like_prefix(Path(seen_root))}%", escape="\\")))}
        admission = (NearCopyIndex.load(s), SiteRule.for_source(site, str(manifest or path)))

    summary = IngestSummary(source_id, printable(str(path)), printable(str(manifest)) if manifest else None)
    salt_cache: list[str] = []

    def salt() -> str:
        if not salt_cache:
            salt_cache.append(patient_salt(settings))
        return salt_cache[0]

    def known_sha(sha: str) -> str | None:
        with session_scope(engine) as s:
            return s.scalar(select(Image.label).where(Image.sha256 == sha))

    def seen_before(key: str) -> tuple[int, int, str] | None:
        if key.startswith(seen_root):
            return seen.get(key)
        with session_scope(engine) as s:
            row = s.get(SeenFile, key)
            return (row.size, row.mtime_ns, row.label_key) if row is not None else None

    try:
        group: list[_Prepared] = []
        done = 0
        for cand in candidates:
            summary.files += 1
            key = cand.key
            stat_error = "the file vanished or cannot be opened"
            try:
                st = cand.path.lstat() if cand.problem else cand.path.stat()
            except (OSError, ValueError) as exc:  # missing; ELOOP (links deeper than the OS follows); NUL
                st, stat_error = None, f"the file vanished or cannot be opened ({getattr(exc, 'strerror', None) or exc})"
            size, mtime_ns = (st.st_size, st.st_mtime_ns) if st is not None else (-1, -1)
            if _unchanged(seen_before(key), size, mtime_ns, cand.context_key, rules):
                summary.skipped_unchanged += 1  # also a file that was missing and still is
            elif st is None:
                group.append(_Prepared(cand, -1, -1, reject=cand.problem or ("missing_file", stat_error)))
            else:
                group.append(_prepare(cand, st, settings, regex, known_sha, salt))
            if len(group) >= GROUP_SIZE:
                _write_group(engine, settings, source_id, group, summary, rules, admission)
                group = []
            done += 1
            if progress:
                progress(done, total)
        if group:
            _write_group(engine, settings, source_id, group, summary, rules, admission)
        crash_point("ingest.before_splits")
        with session_scope(engine) as s:
            summary.split_assignments = assign_splits(s, ratios=settings.split_ratios, seed=settings.split_seed)
            summary.seconds = round(time.perf_counter() - start, 3)
            src = s.get(Source, source_id)
            src.status, src.finished_at, src.counts = "done", datetime.now(timezone.utc), summary.as_dict()
    except BaseException:
        with session_scope(engine) as s:
            src = s.get(Source, source_id)
            if src is not None:
                src.status, src.finished_at = "failed", datetime.now(timezone.utc)
                src.counts = summary.as_dict()
        raise
    return summary


def _like_prefix(root: Path) -> str:
    text = str(root).rstrip("/") + "/"
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _write_group(engine, settings: Settings, source_id: int, group: list[_Prepared],  # noqa: ANN001
                 summary: IngestSummary, rules: str, admission: tuple[NearCopyIndex, SiteRule]) -> None:
    """One write transaction for a group of prepared files; sha256 re-checked under the lock."""
    quarantined: dict[int, str | None] = {}
    with session_scope(engine) as s:
        for i, prep in enumerate(group):
            outcome, reject, existing = "rejected", prep.reject, None
            if reject is None and prep.sha256:
                existing = s.scalar(select(Image).where(Image.sha256 == prep.sha256))
                if existing is not None:
                    if existing.label == prep.label:
                        outcome = "duplicate"
                    else:
                        reject = ("label_conflict",
                                  f"the same bytes are already catalogued as {existing.label!r} "
                                  f"(image {existing.id}); this file says {prep.label!r}")
                elif prep.meta is None:
                    # Known when prepared but gone now (cannot happen: images are never deleted).
                    reject = ("internal", "image vanished from the catalogue during ingest")
                else:
                    verdict = admit(s, settings, admission[0], meta=prep.meta, sites=admission[1],
                                    manifest_site=dict(prep.cand.acquisition).get("site"),
                                    patient=prep.patient_id, name=prep.cand.rel, id_given=prep.id_source != "image")
                    if isinstance(verdict, dict):
                        summary.near_copies_linked.append(verdict)
                    reject = verdict if isinstance(verdict, tuple) else None
                if reject is None and outcome != "duplicate" and prep.meta is not None and existing is None:
                    patient = s.get(Patient, prep.patient_id)
                    if patient is None:
                        s.add(Patient(patient_id=prep.patient_id, id_source=prep.id_source))
                        summary.new_patients += 1
                        if prep.id_source == "image":
                            summary.patients_without_id += 1
                    s.add(Image(sha256=prep.sha256, stored_path=prep.stored_rel, label=prep.label,
                                patient_id=prep.patient_id, original_name=prep.cand.rel,
                                source_id=source_id, **prep.meta))
                    s.flush()
                    admission[0].add(s.scalar(select(Image.id).where(Image.sha256 == prep.sha256)),
                                     prep.meta["phash"], prep.patient_id, prep.cand.rel)
                    outcome = "added"
            if reject is not None:
                if i not in quarantined:
                    quarantined[i] = quarantine_copy(settings, name=prep.cand.path.name, sha256=prep.sha256,
                                                     data=prep.data, stored_rel=prep.stored_rel, reason=reject[0])
                s.add(Rejection(source_id=source_id, path=prep.cand.key, sha256=prep.sha256,
                                reason=reject[0], detail=printable(reject[1]), quarantine_path=quarantined[i]))
            if reject is None or reject[0] not in TRANSIENT_REASONS:
                # size -1 / mtime -1: missing; skipped next time unless the file has appeared.
                context = prep.cand.context_key if reject is None else f"{prep.cand.context_key}|{rules}"
                s.merge(SeenFile(path=prep.cand.key, size=prep.size, mtime_ns=prep.mtime_ns,
                                 label_key=context, sha256=prep.sha256, outcome=outcome,
                                 updated_at=datetime.now(timezone.utc)))
            prep.data = None
            if outcome == "added":
                summary.added += 1
                summary.added_by_label[prep.label] = summary.added_by_label.get(prep.label, 0) + 1
            elif outcome == "duplicate":
                summary.duplicates += 1
            else:
                summary.rejected += 1
                summary.rejected_by_reason[reject[0]] = summary.rejected_by_reason.get(reject[0], 0) + 1
        crash_point("ingest.group_before_commit")
    crash_point("ingest.group_committed")
