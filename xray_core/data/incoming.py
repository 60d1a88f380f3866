"""The incoming drop folder: ``INCOMING/<batch>/`` is one arrival, taken once, when it is complete.

A batch folder holds films in label folders, or a manifest as exported::

    INCOMING/<batch>/<label>/**/<image>    the label is the first folder below the batch (as in xray ingest)
    INCOMING/<batch>/manifest.csv          rows file,label[,patient_id,site,...]; files relative to the batch

and optionally ``batch.toml`` (``site = "hospital-a"``: where its films come from, unless a manifest's
``site`` column says) and ``READY`` (an empty file: "complete, take it now"). Rules
(docs/data.md#the-incoming-drop-folder):

- **complete**: ``READY`` is there, or nothing in the batch (a file or a folder, the batch folder itself
  included) was modified for ``XRAY_INCOMING_SETTLE_S`` seconds. Otherwise the batch is *waiting*.
- **taken once**: a batch a retrain ingested is recorded in ``incoming_batches`` by name and digest, the
  sha256 of each file's relative path, size and mtime (hidden files and READY left out, so a READY added
  later changes nothing). Not the files' content: every run looks at every batch still in the folder,
  and reading them all each night would cost what ingesting them costs (the ingest reads and hashes
  each film once anyway). A change to a taken batch (a file added, replaced or touched) is another
  digest: a new arrival, whose unchanged films the ingest skips unread.
- **refused**: a complete batch that does not fit is reported in one line naming the layout expected,
  and nothing of it is read: films directly in the batch folder (the old ``INCOMING/<label>/<image>``
  layout), neither label folders nor manifest.csv, a manifest.csv beside films it does not name, a bad
  batch.toml or manifest. A film directly in INCOMING, or a linked batch folder, is refused too.
  Refusals are not recorded: a batch fixed later is taken like any new arrival.
- **side files**: files directly in a batch folder that are not films (ATTRIBUTION.md, README, LICENSE,
  notes.txt ...) are left alone and listed. Below the label folders every file is a film candidate, as
  with ``xray ingest`` (a stray document there is quarantined as ``not_an_image``).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select

from db import session_scope
from db.schema import IncomingBatch
from xray_core.data.catalogue import open_catalogue
from xray_core.data.columns import check_mapping
from xray_core.data.images import sniff_format
from xray_core.data.ingest import IngestSummary, ingest_source
from xray_core.data.scan import is_hidden, scan_manifest, validate_manifest
from xray_core.errors import ManifestError, SourceError, UsageError
from xray_core.io.fsutil import printable
from xray_core.settings import Settings

MANIFEST, BATCH_TOML, READY = "manifest.csv", "batch.toml", "READY"  # matched in any case
BATCH_KEYS = ("site", "columns")  # what batch.toml may say
FILM_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
EXPECTED = "expected INCOMING/<batch>/<label>/**/<image> or INCOMING/<batch>/manifest.csv"
_SITE = re.compile(r"[^\x00-\x1f]{1,64}")  # as a manifest's site cell
State = Literal["ready", "waiting", "refused", "taken"]


@dataclass(frozen=True)
class Batch:
    """One batch folder as a scan found it. ``state``: ``ready`` (complete, not taken yet: the next
    retrain takes it), ``waiting`` (still changing), ``refused`` (does not fit), ``taken`` (by an
    earlier run, unchanged since)."""

    name: str  # the folder's name (printable)
    path: str
    state: State
    detail: str  # one line: how it became complete, why it waits, why it is refused, when it was taken
    layout: str | None = None  # folders | manifest (ready batches)
    digest: str | None = None
    files: int = 0
    site: str | None = None  # from batch.toml
    columns: tuple[tuple[str, str], ...] = ()  # batch.toml's [columns]: known name -> the manifest's name
    side_files: tuple[str, ...] = ()  # left alone at the batch's top
    manifest: str | None = None  # the manifest's path (layout manifest)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "side_files": list(self.side_files)}


@dataclass(frozen=True)
class IncomingScan:
    """What a look at the incoming folder found, batch by batch (sorted by name: dated names in order)."""

    folder: str
    settle_s: int
    batches: tuple[Batch, ...] = ()
    note: str | None = None  # a missing or empty folder: a quiet night, not an error

    def of(self, state: State) -> list[Batch]:
        return [b for b in self.batches if b.state == state]

    def as_dict(self) -> dict[str, Any]:
        """``xray incoming --json``: every batch folder with its state."""
        counts = {state: len(self.of(state)) for state in ("taken", "ready", "waiting", "refused")}
        return {"folder": self.folder, "settle_s": self.settle_s, "note": self.note, "counts": counts,
                "batches": [b.as_dict() for b in self.batches]}


@dataclass
class _Listing:
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (relative path, size, mtime_ns)
    top_dirs: list[str] = field(default_factory=list)
    newest_ns: int = 0
    error: str | None = None


# --------------------------------------------------------------------------- the scan (files only)


def scan_incoming(folder: Path, *, settle_s: int, taken: Callable[[str, str], str | None] | None = None,
                  now: float | None = None) -> IncomingScan:
    """Look at every batch folder of ``folder``; read nothing but names, sizes, mtimes, batch.toml and
    manifests of complete batches. ``taken(name, digest)``: when that arrival was taken, or None."""
    now = time.time() if now is None else now
    shown = printable(str(folder))
    if not folder.exists():
        return IncomingScan(shown, settle_s, note=f"nothing new in {shown} (the folder does not exist)")
    if not folder.is_dir():
        return IncomingScan(shown, settle_s, note=f"nothing new in {shown} (not a folder)")
    batches = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_hidden(entry.name):
            continue
        name, path = printable(entry.name), Path(entry.path)
        if entry.is_symlink():
            batches.append(Batch(name, str(path), "refused", "a symbolic link (never followed); copy the "
                                                             f"batch into the incoming folder; {EXPECTED}"))
        elif entry.is_dir(follow_symlinks=False):
            batches.append(look_at_batch(path, settle_s=settle_s, taken=taken, now=now))
        elif _is_film(path):
            batches.append(Batch(name, str(path), "refused",
                                 f"a film directly in the incoming folder; {EXPECTED}"))
        # any other file beside the batches (a README) is left alone
    note = None if batches else f"nothing new in {shown} (the folder is empty)"
    return IncomingScan(shown, settle_s, tuple(batches), note)


def look_at_batch(path: Path, *, settle_s: int, taken: Callable[[str, str], str | None] | None = None,
                  now: float | None = None) -> Batch:
    """One batch folder's state (see the module's rules)."""
    now = time.time() if now is None else now
    name = printable(path.name)
    listing = _list(path)
    if listing.error:
        return Batch(name, str(path), "refused", f"cannot be listed ({listing.error}); fix its permissions")
    digest = batch_digest(listing.files)
    files = sum(1 for rel, *_ in listing.files if rel.lower() != READY.lower())
    when = taken(name, digest) if taken else None
    if when:
        return Batch(name, str(path), "taken", f"taken {when}", digest=digest, files=files)
    ready = any(rel.lower() == READY.lower() for rel, *_ in listing.files)
    ago = int(now - listing.newest_ns / 1e9)
    if not ready and ago < settle_s:
        why = f"no {READY} file; last change {max(ago, 0)} s ago, under XRAY_INCOMING_SETTLE_S={settle_s} s"
        return Batch(name, str(path), "waiting", why, digest=digest, files=files)
    layout, (site, columns), side, problem = _layout(path, listing)
    if problem:
        return Batch(name, str(path), "refused", problem, digest=digest, files=files)
    how = f"{READY} file" if ready else f"unchanged for {ago} s"
    manifest = next((str(path / rel) for rel, *_ in listing.files if rel.lower() == MANIFEST), None)
    return Batch(name, str(path), "ready", how, layout, digest, files, site, tuple(columns.items()),
                 tuple(side), manifest if layout == "manifest" else None)


def batch_digest(files: list[tuple[str, int, int]]) -> str:
    """sha256 of each file's relative path, size and mtime (ns), READY left out (see the module's rules)."""
    h = hashlib.sha256()
    for rel, size, mtime_ns in sorted(files):
        if rel.lower() != READY.lower():
            h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _list(root: Path) -> _Listing:
    """Every file under ``root`` (hidden ones and hidden folders skipped, links not followed) with its
    size and mtime, and the newest mtime of anything listed, folders included."""
    out, errors = _Listing(), list[OSError]()
    out.newest_ns = root.lstat().st_mtime_ns
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        here = Path(dirpath)
        if here == root:
            out.top_dirs = list(dirnames)
        for name in [*dirnames, *sorted(filenames)]:
            if is_hidden(name):
                continue
            try:
                st = (here / name).lstat()
            except OSError:  # gone since listed: the batch is changing
                out.newest_ns = max(out.newest_ns, time.time_ns())
                continue
            out.newest_ns = max(out.newest_ns, st.st_mtime_ns)
            if name in filenames:
                rel = (here / name).relative_to(root).as_posix()
                out.files.append((printable(rel), st.st_size, st.st_mtime_ns))
    if errors:
        out.error = f"{printable(str(errors[0].filename or root))}: {errors[0].strerror or errors[0]}"
    return out


def _is_film(path: Path) -> bool:
    """A film by its suffix or its first bytes (a DICOM file often has no suffix)."""
    if path.suffix.lower() in FILM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return sniff_format(fh.read(132)) is not None
    except OSError:
        return False


BatchToml = tuple[str | None, dict[str, str]]  # (site, columns)


def _layout(path: Path, listing: _Listing) -> tuple[str | None, BatchToml, list[str], str | None]:
    """(layout, (site, columns), side files, problem) of a complete batch."""
    top = [rel for rel, *_ in listing.files if "/" not in rel]
    known = {MANIFEST, BATCH_TOML, READY.lower()}
    films_at_top = [n for n in top if n.lower() not in known and _is_film(path / n)]
    side = [n for n in top if n.lower() not in known and n not in films_at_top]
    spec: BatchToml = (None, {})
    problem = None
    toml = [n for n in top if n.lower() == BATCH_TOML]
    if toml:
        spec, problem = read_batch_toml(path / toml[0])
    manifest = [n for n in top if n.lower() == MANIFEST]
    if problem:
        return None, spec, side, problem
    if manifest:
        return "manifest", spec, side, _manifest_problem(path, path / manifest[0], listing, films_at_top,
                                                         spec[1])
    if spec[1]:
        return None, spec, side, (f"{BATCH_TOML} maps [columns], but the batch has no {MANIFEST}: columns "
                                  "name a manifest's columns; remove them or add the manifest")
    if films_at_top:
        return None, spec, side, (f"{len(films_at_top)} film(s) directly in the batch folder (e.g. "
                                  f"{films_at_top[0]}), as in the old INCOMING/<label>/<image> layout; "
                                  f"{EXPECTED}")
    if not listing.top_dirs:
        return None, spec, side, f"neither label folders nor {MANIFEST}; {EXPECTED}"
    return "folders", spec, side, None


def read_batch_toml(path: Path) -> tuple[BatchToml, str | None]:
    """((site, columns), problem) from a batch's batch.toml: ``site = "..."`` and a ``[columns]`` table
    mapping known manifest names to the export's own (as ``xray ingest --columns``) are what it may say."""
    example = 'site = "hospital-a"'
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        return (None, {}), f"{BATCH_TOML} is not valid TOML ({first}); write e.g. {example}"
    except OSError as exc:
        return (None, {}), f"{BATCH_TOML} cannot be read ({exc.strerror or exc})"
    unknown = sorted(set(data) - set(BATCH_KEYS))
    if unknown:
        return (None, {}), (f"{BATCH_TOML} has unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(BATCH_KEYS)} (e.g. {example})")
    site = data.get("site")
    if site is not None and (not isinstance(site, str) or not _SITE.fullmatch(site.strip())):
        return (None, {}), f"{BATCH_TOML}: site must be text of 1 to 64 characters (e.g. {example})"
    columns = data.get("columns", {})
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        return (None, {}), (f"{BATCH_TOML}: [columns] maps known names to the manifest's column names, "
                            'e.g. [columns] patient_id = "patientid"')
    try:
        mapping = check_mapping(columns)
    except UsageError as exc:
        return (None, {}), f"{BATCH_TOML} [columns]: {exc}"
    return ((site.strip() if site else None), mapping), None


def _manifest_problem(path: Path, manifest: Path, listing: _Listing, films_at_top: list[str],
                      columns: dict[str, str]) -> str | None:
    """Why a manifest batch cannot be taken: the manifest does not read, or films in the batch that it
    does not name (a batch is label folders or a manifest naming every film, never half of each)."""
    try:
        validate_manifest(manifest, columns)
        root = manifest.parent.resolve()
        named = {os.path.normpath(c.path.relative_to(root)) for c in scan_manifest(manifest, columns)
                 if c.path.is_relative_to(root)}
    except (ManifestError, SourceError) as exc:
        return f"{manifest.name} cannot be read: {str(exc).splitlines()[0]}"
    films = [rel for rel, *_ in listing.files if "/" in rel and Path(rel).suffix.lower() in FILM_SUFFIXES]
    unnamed = [rel for rel in [*films_at_top, *films] if os.path.normpath(rel) not in named]
    if unnamed:
        return (f"{manifest.name} does not name {len(unnamed)} film(s) of the batch (e.g. {unnamed[0]}); a "
                "batch is label folders or a manifest naming every film: add them to it or move them out; "
                f"{EXPECTED}")
    return None


# --------------------------------------------------------------------------- the catalogue


def taken_lookup(settings: Settings) -> Callable[[str, str], str | None]:
    """``taken(name, digest)`` for :func:`scan_incoming`: when that arrival was taken and what it added,
    e.g. ``2026-11-20 02:00 UTC (28 films added)``, or None."""
    with session_scope(open_catalogue(settings)) as s:
        rows = {(b.name, b.digest): f"{b.taken_at:%Y-%m-%d %H:%M} UTC ({b.added} films added)"
                for b in s.scalars(select(IncomingBatch))}

    def taken(name: str, digest: str) -> str | None:
        return rows.get((name, digest))

    return taken


def scan(settings: Settings, folder: str | Path, *, now: float | None = None) -> IncomingScan:
    """:func:`scan_incoming` with the settle time of ``settings`` and the batches its catalogue took."""
    return scan_incoming(Path(folder), settle_s=settings.incoming_settle_s, taken=taken_lookup(settings),
                         now=now)


def take_batch(settings: Settings, batch: Batch, *, flow_run_id: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> IngestSummary:
    """Ingest a ready batch (its manifest, or its label folders with the top's side files left alone)
    and record it as taken. A failure records nothing: the next run takes the batch again (its films
    already stored are skipped unread)."""
    if batch.state != "ready":
        raise ValueError(f"batch {batch.name} is {batch.state}, not ready")
    summary = ingest_source(Path(batch.path), manifest=Path(batch.manifest) if batch.manifest else None,
                            settings=settings, progress=progress,
                            site=batch.site, skip_top_files=True, columns=dict(batch.columns) or None)
    note = f"side files left alone: {', '.join(batch.side_files)}" if batch.side_files else ""
    with session_scope(open_catalogue(settings)) as s:
        if s.scalar(select(IncomingBatch.id).where(IncomingBatch.name == batch.name,
                                                   IncomingBatch.digest == batch.digest)) is None:
            s.add(IncomingBatch(
                name=batch.name, digest=batch.digest, folder=printable(str(Path(batch.path).parent)),
                layout=batch.layout, taken_at=datetime.now(UTC), files=batch.files, added=summary.added,
                duplicates=summary.duplicates, quarantined=summary.rejected, site=batch.site,
                source_id=summary.source_id, note=note, flow_run_id=flow_run_id))
    return summary


# --------------------------------------------------------------------------- what a run says


def run_record(found: IncomingScan, taken: dict[str, IngestSummary]) -> dict[str, Any]:
    """The ``incoming`` key of result.json: each batch this run took, left waiting or refused (batches
    taken by earlier runs are only counted)."""
    rows = []
    for b in found.batches:
        if b.state == "taken":
            continue
        row: dict[str, Any] = {"name": b.name, "state": "taken" if b.name in taken else b.state,
                               "detail": b.detail, "layout": b.layout, "site": b.site,
                               "side_files": list(b.side_files)}
        if b.name in taken:
            s = taken[b.name]
            row.update(added=s.added, duplicates=s.duplicates, quarantined=s.rejected)
        rows.append(row)
    return {"folder": found.folder, "settle_s": found.settle_s, "batches": rows,
            "taken_earlier": len(found.of("taken"))}


def batch_line(row: dict[str, Any]) -> str:
    """One batch of :func:`run_record` in one line, e.g. ``incoming 2026-11-22: waiting (no READY ...)``."""
    head = f"incoming {row['name']}: {row['state']}"
    if row["state"] == "taken":
        side = f"; side files left alone: {', '.join(row['side_files'])}" if row.get("side_files") else ""
        return (f"{head} ({row.get('added', 0)} films added, {row.get('duplicates', 0)} duplicates, "
                f"{row.get('quarantined', 0)} quarantined{side})")
    if row["state"] == "waiting":
        return f"{head} ({row['detail']})"
    return f"{head}: {row['detail']}"


def pending_phrase(record: dict[str, Any] | None) -> str | None:
    """What a skipped run's title says instead of "nothing new" when batches wait or were refused:
    ``1 batch waiting (2026-11-22); 1 batch refused (normal) in /data/incoming``; None when none."""
    if not record:
        return None
    rows = record.get("batches") or []
    parts = []
    for state in ("waiting", "refused"):
        names = [r["name"] for r in rows if r["state"] == state]
        if names:
            shown = ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{len(names)} batch{'es' if len(names) > 1 else ''} {state} ({shown})")
    return f"{'; '.join(parts)} in {record['folder']}" if parts else None
