"""Per-file preparation for ingest: what a worker process (or the ingesting process) does with one
file, and what the writer does with a prepared group before its transaction.

Split in two so that a worker never touches the catalogue or the store:

* :func:`examine` (worker side): everything that needs only the file's bytes and the settings. It
  cannot ask the catalogue whether the sha256 is already known, so it decodes every file; with
  ``known_sha`` (in-process) it skips the decode of a known file exactly as ingest always did.
* :func:`settle_group` (writer side, per write group): asks the catalogue about the group's sha256s in
  one query, and for a known file drops what the decode said (the transaction decides duplicate vs
  label conflict, as before); the good files' store copies are written with their fsyncs batched.

Where files are examined (in this process or in worker processes) is :mod:`xray_core.data.ingest_pool`'s.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from xray_core.data.attributes import catalogue_values
from xray_core.data.deidentify import deidentify
from xray_core.data.dicom import DicomPolicy, catalogue_fields, patient_pseudonym
from xray_core.data.labels import check_label
from xray_core.data.scan import Candidate
from xray_core.errors import ImageRejected
from xray_core.faults import crash_point
from xray_core.io.fsutil import sha256_bytes
from xray_core.io.storage import get_storage
from xray_core.settings import Settings

STORE_EXT = {"png": "png", "jpeg": "jpg", "dicom": "dcm"}


@dataclass
class Prepared:
    """One file, ready for the writer. Picklable: workers send it back to the writer."""

    cand: Candidate
    size: int
    mtime_ns: int
    sha256: str | None = None
    label: str | None = None  # set only once the label check passed
    reject: tuple[str, str] | None = None
    data: bytes | None = None  # the original bytes: kept for rejected and already-known files (quarantine)
    meta: dict | None = None  # image facts for a good file
    patient_id: str | None = None
    id_source: str | None = None
    stored_rel: str | None = None
    payload: bytes | None = None  # bytes the writer stores at stored_rel (de-identified for DICOM)
    known_checked: bool = False  # the catalogue was already asked about sha256 (in-process path)



def patient_from_filename(name: str, regex: re.Pattern[str] | None) -> str | None:
    if regex is None:
        return None
    match = regex.search(name)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


def given_patient(cand: Candidate, data: bytes | None,
                  regex: re.Pattern[str] | None) -> tuple[str | None, str | None]:
    """(patient id, id source) that a known file's row itself names, without decoding it: the
    manifest's cell, else XRAY_PATIENT_REGEX on the name of a non-DICOM file (a DICOM's own
    PatientID is the stored copy's: the bytes are the same). The writer compares it with the stored
    film's patient (``duplicate_other_patient``, :mod:`xray_core.data.admission`)."""
    from xray_core.data.images import sniff_format

    if cand.patient_id:
        return cand.patient_id, "manifest"
    if data is None or sniff_format(data) == "dicom":
        return None, None
    pid = patient_from_filename(cand.path.name, regex)
    return (pid, "filename") if pid is not None else (None, None)


def examine(cand: Candidate, st: os.stat_result, settings: Settings, regex: re.Pattern[str] | None,
            known_sha: Callable[[str], str | None] | None = None) -> Prepared:
    """Read, hash, check and decode one file; no catalogue or store access (safe in a worker).

    ``known_sha`` (in-process only): a catalogued sha256 is not decoded again.
    """
    from xray_core.data.catalogue import patient_salt  # a file under XRAY_HOME, never the database
    from xray_core.data.images import decode_image, perceptual_hash

    prep = Prepared(cand, st.st_size, st.st_mtime_ns)
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
    if changed_while_read(cand.path, st, len(data)):
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
    if known_sha is not None:
        prep.known_checked = True
        if known_sha(prep.sha256) is not None:
            # Already catalogued: no need to decode again; the transaction decides duplicate vs conflict
            # (or another patient's copy).
            prep.data = data
            prep.patient_id, prep.id_source = given_patient(cand, data, regex)
            return prep
    try:
        decoded = decode_image(data, min_side=settings.min_image_side, max_pixels=settings.max_pixels,
                               policy=DicomPolicy(settings.allowed_modalities, settings.require_chest))
    except ImageRejected as rej:
        prep.reject, prep.data = (rej.reason, rej.detail), data
        return prep
    salt = patient_salt(settings) if decoded.dicom is not None else ""
    dicom_pid = None  # the salted PatientID: the only form it is ever stored in
    if decoded.dicom_patient_id:
        dicom_pid = patient_pseudonym(salt, decoded.dicom_patient_id)
    if cand.patient_id:
        prep.patient_id, prep.id_source = cand.patient_id, "manifest"
    elif dicom_pid:
        prep.patient_id, prep.id_source = dicom_pid, "dicom"
    elif (pid := patient_from_filename(cand.path.name, regex)) is not None:
        prep.patient_id, prep.id_source = pid, "filename"
    else:
        prep.patient_id, prep.id_source = f"img-{prep.sha256[:16]}", "image"
    # Named by the original's sha256 even when a de-identified copy is stored: deduplication and
    # idempotent re-scans work on what arrived (see xray_core.data.deidentify).
    prep.stored_rel = f"store/{prep.sha256[:2]}/{prep.sha256}.{STORE_EXT[decoded.format]}"
    prep.payload = data
    if decoded.dicom is not None and settings.dicom_store == "deidentified":
        prep.payload = deidentify(data, salt=salt, patient_id=dicom_pid or "",
                                  site_mode=settings.site_from_dicom)
    if not prep.known_checked:
        prep.data = data  # the writer may still learn the file is known (see settle_group)
    acquisition = (catalogue_fields(decoded.dicom, salt=salt, site_mode=settings.site_from_dicom)
                   if decoded.dicom is not None else {})
    prep.meta = {
        "width": decoded.width, "height": decoded.height, "bit_depth": decoded.bit_depth,
        "format": decoded.format, "phash": perceptual_hash(decoded.pixels),
        "stored_sha256": sha256_bytes(prep.payload) if prep.payload is not data else None,
        "view": cand.view or decoded.view, **acquisition, **manifest_facts(cand),
        **catalogue_values(cand.attributes),
    }
    return prep



def settle_group(group: list[Prepared], settings: Settings, known_shas: Callable[[list[str]], set[str]],
                 regex: re.Pattern[str] | None = None) -> tuple[list[Prepared], set[str]]:
    """Writer side, per write group: the catalogue check a worker could not make (one query), then the
    good files' store copies, durable together (fsyncs batched) before the group's rows commit.

    Returns the settled files and the store keys this call wrote (not those already there): the group
    may remove those of films its transaction rejects (:mod:`xray_core.data.store_guard`). A good
    file keeps its ``payload`` until its row is written, to write the file again should another ingest
    remove it meanwhile (bounded like the group itself, by GROUP_BYTES in ingest)."""
    asked = [p.sha256 for p in group if not p.known_checked and p.sha256 and p.label is not None]
    known = known_shas(asked) if asked else set()
    settled: list[Prepared] = []
    writes: dict[str, bytes] = {}
    for prep in group:
        if not prep.known_checked and prep.sha256 in known and prep.label is not None:
            # As if examined in-process: a known file is not decoded, so nothing the decode said counts.
            pid, id_source = given_patient(prep.cand, prep.data, regex)
            prep = Prepared(prep.cand, prep.size, prep.mtime_ns, sha256=prep.sha256, label=prep.label,
                            data=prep.data, known_checked=True, patient_id=pid, id_source=id_source)
        elif prep.meta is not None and prep.payload is not None:
            assert prep.stored_rel is not None  # set with meta and payload by examine
            writes.setdefault(prep.stored_rel, prep.payload)
            prep.data = None  # a good file's quarantine copy, if it comes to that, is taken from the store
        else:
            prep.payload = None
        settled.append(prep)
    store = get_storage(settings)  # a file already there (a crash after its write, before its row) is reused
    todo = [(k, data) for k, data in writes.items() if not (store.exists(k) and store.size(k) == len(data))]
    store.write_many(todo)
    for _ in todo:
        crash_point("ingest.store_written")
    return settled, {key for key, _ in todo}


def changed_while_read(path: Path, before: os.stat_result, n_read: int) -> bool:
    """Whether the bytes read may not be the whole, settled file: a size other than the one stat
    gave before reading, or a size or mtime that changed during the read."""
    try:
        after = path.stat()
    except OSError:
        return True
    return (n_read != before.st_size
            or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns))


def manifest_facts(cand: Candidate) -> dict:
    """Manifest acquisition columns (checked by scan) as catalogue values; they win over DICOM tags."""
    typed: dict[str, Callable[[str], object]] = {"age_years": float, "age": float,
                                                 "study_date": date.fromisoformat}
    return {("age_years" if name == "age" else name): typed.get(name, str)(value)
            for name, value in cand.acquisition}
