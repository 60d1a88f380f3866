"""What a source names: the files of a folder (``<root>/<label>/**/<image>``) or the rows of a manifest
CSV, each as a :class:`Candidate` with any problem known before reading (outside the root, a link,
a metadata file). Reading, validating and storing is :mod:`xray_core.data.ingest`'s job.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TextIO

from xray_core.data.attributes import digest, row_values
from xray_core.data.columns import OPTIONAL, REQUIRED, Layout, layout
from xray_core.errors import ManifestError, SourceError
from xray_core.io.fsutil import printable

IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
# Files beside the label folders that describe the source rather than being images of a label.
ROOT_METADATA_SUFFIXES = {".csv", ".md", ".txt", ".json", ".yaml", ".yml", ".pdf"}
MANIFEST_REQUIRED = REQUIRED
# Optional manifest columns for the catalogue's acquisition facts (issue 17), each with its check.
MANIFEST_METADATA: dict[str, tuple[str, str]] = {
    "site": (r"[^\x00-\x1f]{1,64}", "1 to 64 characters"),
    "device": (r"[^\x00-\x1f]{1,128}", "1 to 128 characters"),
    "sex": (r"[MFO]", "M, F or O"),
    "age_years": (r"(1[0-4]\d|\d{1,2})(\.\d+)?", "a number of years from 0 to 149"),
    "age": (r"(1[0-4]\d|\d{1,2})(\.\d+)?", "a number of years from 0 to 149"),  # stored as age_years
    "study_date": (r"\d{4}-\d{2}-\d{2}", "an ISO date YYYY-MM-DD"),
    "laterality": (r"[RLBU]", "R, L, B or U"),
}
MANIFEST_OPTIONAL = OPTIONAL
# Any other column is kept as a per-film attribute (xray_core.data.columns, xray_core.data.attributes).


@dataclass(frozen=True)
class Candidate:
    """A file the source names, with what the source says about it."""

    path: Path  # as listed (absolute), not resolved through links
    rel: str  # name relative to the source root, for people (printable)
    label: str  # raw label from the folder or manifest
    patient_id: str | None = None  # from the manifest
    view: str | None = None
    problem: tuple[str, str] | None = None  # (reason, detail) known before reading
    # Acquisition facts from manifest columns (MANIFEST_METADATA), checked: (column, value) pairs.
    # They override what a DICOM header says, as the manifest's view does.
    acquisition: tuple[tuple[str, str], ...] = ()
    # The manifest's other columns, as exported (xray_core.data.attributes): sorted (name, value) pairs.
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        """The path as the catalogue stores it (printable: see :func:`~xray_core.io.fsutil.printable`)."""
        return printable(str(self.path))

    @property
    def context_key(self) -> str:
        """What else besides the bytes decides the outcome: a manifest edit re-evaluates the file."""
        extra = "".join(f"|{k}={v}" for k, v in self.acquisition)
        extra += f"|attributes={digest(self.attributes)}" if self.attributes else ""
        return f"{self.label}|{self.patient_id or ''}|{self.view or ''}{extra}"


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _link_problem(link: Path, real_root: Path, label: str | None = None) -> tuple[str, str] | None:
    """Why a symbolic link to a file cannot be used, or None when its target is inside the root.

    With ``label`` (the folder layout), a link into another label folder is refused too: the label
    comes from the folder, so ``normal/l.jpeg -> ../pneumonia/b.jpeg`` would give one film two
    labels and quarantine the real file as a conflict. A link within its own label is a duplicate.

    A cyclic link resolves to nothing: it is reported, never followed (Python 3.11's ``resolve``
    raises RuntimeError for a loop). A dangling link or one deeper than the OS follows (ELOOP) is
    left to the caller's ``stat``, which records it as missing, so it is tried again once it works.
    """
    try:
        target = link.resolve()
    except (RuntimeError, OSError) as exc:
        return ("missing_file", f"symbolic link loop ({getattr(exc, 'strerror', None) or exc}); not followed")
    if not _inside(target, real_root):
        return ("outside_root", f"symbolic link points outside the source folder ({printable(str(target))})")
    if label is not None:
        parts = target.relative_to(real_root).parts
        target_label = parts[0] if len(parts) > 1 else ""
        if target_label and target_label != label:  # a file beside the label folders has no label of its own
            return ("link_across_labels",
                    f"symbolic link in label folder {printable(label)!r} points into "
                    f"{printable(target_label)!r} ({printable('/'.join(parts))}); the label "
                    "comes from the folder, so a film is never catalogued under two labels. Copy the file "
                    "instead, or remove the link")
    return None


def _is_link(path: Path) -> bool:
    """``is_symlink`` that says False where the OS cannot even look (a path over PATH_MAX): os.walk
    reports such a folder itself, as ``unreadable_path``."""
    try:
        return path.is_symlink()
    except OSError:
        return False


def _linked_folder_problem(link: Path, real_root: Path) -> tuple[str, str] | None:
    """``outside_root`` for a linked folder whose target is outside the root, else None.

    Linked folders are never descended (they could be cyclic or lead anywhere). One that points
    inside the root loses nothing: the walk reads its files where they really are. One that points
    outside used to vanish from the batch with no row; it is now one row, as a linked file outside
    the root is, and nothing under it is listed or read."""
    try:
        target = link.resolve()
    except (RuntimeError, OSError):  # a loop: os.walk lists it as a file, so this is not reached
        return None
    if _inside(target, real_root):
        return None
    return ("outside_root", "symbolic link to a folder outside the source folder "
                            f"({printable(str(target))}); nothing in it was read. Copy the folder into the "
                            "source instead")


def walk_error_problem(exc: OSError, root: Path) -> tuple[Path, tuple[str, str]]:
    """Where a folder walk failed and the ``unreadable_path`` problem to record for it.

    ``os.walk`` ignores errors by default: an unreadable subfolder or a path over the OS's length
    limit would vanish from the batch with no row and no count. Recording it (and retrying it next
    time, see ingest's TRANSIENT_REASONS) makes the loss visible.
    """
    where = Path(exc.filename) if exc.filename else root
    reason = exc.strerror or type(exc).__name__
    return where, ("unreadable_path", f"the folder cannot be listed ({reason}); its files were not read. "
                                      "Fix its permissions or shorten the path, then ingest again")


def scan_folder(root: Path, *, skip_top_files: bool = False) -> Iterator[Candidate]:
    """Files under ``root/<label>/``; hidden files and folders skipped; links never followed out.

    ``skip_top_files``: every file directly in ``root`` is left alone (an incoming batch's side files:
    READY, batch.toml, ATTRIBUTION.md ...; :mod:`xray_core.data.incoming` refuses a batch with films there).

    A link to a file is used only when it resolves inside ``root`` (else an ``outside_root``
    rejection); linked folders are not descended (they could be cyclic or lead anywhere), and one
    that leads outside ``root`` is an ``outside_root`` rejection of its own (a linked label folder
    included), so nothing is dropped without a row.
    """
    real_root = root.resolve()
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        here = Path(dirpath)
        for name in dirnames:  # os.walk lists linked folders here but does not descend them
            folder = here / name
            if _is_link(folder) and (problem := _linked_folder_problem(folder, real_root)) is not None:
                rel_parts = folder.relative_to(root).parts
                yield Candidate(folder, printable("/".join(rel_parts)), printable(rel_parts[0]),
                                problem=problem)
        for name in sorted(filenames):
            if is_hidden(name):
                continue
            path = here / name
            rel_parts = path.relative_to(root).parts
            rel = printable("/".join(rel_parts))
            if len(rel_parts) < 2:
                if skip_top_files or path.suffix.lower() in ROOT_METADATA_SUFFIXES:
                    continue  # a manifest or README beside the label folders
                yield Candidate(path, rel, "", problem=(
                    "unknown_label", "file is not inside a label folder: use <root>/<label>/<image>"))
                continue
            problem = None
            if path.is_symlink():
                problem = _link_problem(path, real_root, rel_parts[0])
            yield Candidate(path, rel, printable(rel_parts[0]), problem=problem)
        yield from _walk_errors(errors, root)  # as soon as the walk meets them
    yield from _walk_errors(errors, root)  # met while looking for the next folder after the last


def _walk_errors(errors: list[OSError], root: Path) -> Iterator[Candidate]:
    while errors:
        where, problem = walk_error_problem(errors.pop(0), root)
        try:
            parts = where.relative_to(root).parts
        except ValueError:
            parts = ()
        yield Candidate(where, printable("/".join(parts) or str(where)), printable(parts[0]) if parts else "",
                        problem=problem)


def _open_manifest(manifest: Path, columns: Mapping[str, str] | None = None
                   ) -> tuple[csv.DictReader, TextIO, Layout]:
    fh = open(manifest, newline="", encoding="utf-8-sig", errors="strict")
    reader = csv.DictReader(fh)
    try:
        header = reader.fieldnames or []
        return reader, fh, layout(header, manifest, columns)
    except BaseException:  # a header that is not UTF-8 or not CSV, or refused: the caller reports it
        fh.close()
        raise


def manifest_attributes(manifest: Path, columns: Mapping[str, str] | None = None) -> list[str]:
    """The names of the (validated) manifest's columns kept as attributes, in the header's order."""
    _, fh, found = _open_manifest(manifest, columns)
    fh.close()
    return list(found.attributes)


def validate_manifest(manifest: Path, columns: Mapping[str, str] | None = None) -> int:
    """Read the whole manifest once (streamed) and return its row count, or raise ManifestError.

    Done before anything is written so that a malformed manifest writes nothing.
    """
    if not manifest.is_file():
        raise SourceError(f"manifest {manifest} does not exist or is not a file")
    try:
        reader, fh, _ = _open_manifest(manifest, columns)
        try:
            rows = 0
            for row in reader:
                if None in row:
                    raise ManifestError(
                        f"manifest {manifest} line {reader.line_num}: more cells than header columns")
                rows += 1
            return rows
        finally:
            fh.close()
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"manifest {manifest} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise ManifestError(f"manifest {manifest} is not a valid CSV file: {exc}") from None


def _manifest_path_problem(raw_file: str, listed: Path, root: Path, where: str) -> tuple[str, str] | None:
    """Why a manifest's file cell cannot be used, or None. Never raises: a hostile cell (NUL byte,
    a name longer than the OS allows, a link loop) is one rejected row, not a failed ingest."""
    shown = printable(repr(raw_file)) if len(raw_file) <= 200 else printable(repr(raw_file[:200])) + "…"
    if not raw_file:
        return ("missing_file", f"{where} has an empty file cell")
    if "\x00" in raw_file:
        return ("missing_file", f"{where}: {shown} contains a NUL byte; it cannot name a file")
    try:
        if Path(raw_file).is_absolute() or not _inside(listed.resolve(), root):
            return ("outside_root", f"{where}: {shown} points outside the manifest's folder "
                                    f"{printable(str(root))}")
        if not listed.is_file():
            return ("missing_file", f"{where}: {shown} does not exist")
    except (OSError, RuntimeError, ValueError) as exc:  # ENAMETOOLONG, ELOOP (RuntimeError on 3.11)
        return ("missing_file",
                f"{where}: {shown} cannot be opened ({getattr(exc, 'strerror', None) or exc})")
    return None


def _manifest_metadata(row: dict, cols: Mapping[str, str],
                       where: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, str] | None]:
    """The row's non-empty MANIFEST_METADATA cells, and a ``bad_metadata`` problem for one that fails
    its check."""
    out = []
    for name, (pattern, allowed) in MANIFEST_METADATA.items():
        value = (row.get(cols[name]) or "").strip() if name in cols else ""
        if name in ("sex", "laterality"):
            value = value.upper()
        if not value:
            continue
        if not re.fullmatch(pattern, value) or (name == "study_date" and not _iso_date(value)):
            shown = printable(repr(value[:40]))
            return (), ("bad_metadata", f"{where}: {name} {shown} is not allowed; use {allowed}")
        out.append((name, printable(value)))
    return tuple(out), None


def _iso_date(value: str) -> bool:
    try:
        date.fromisoformat(value)
        return True
    except ValueError:
        return False


def scan_manifest(manifest: Path, columns: Mapping[str, str] | None = None) -> Iterator[Candidate]:
    """Rows of a (validated) manifest; paths are relative to the manifest's folder and must stay in it.

    ``columns``: known name -> the export's column name (``--columns``, see :mod:`xray_core.data.columns`).
    """
    root = manifest.parent.resolve()
    reader, fh, found = _open_manifest(manifest, columns)
    cols = found.known
    try:
        for row in reader:
            raw_file = (row.get(cols["file"]) or "").strip()
            label = (row.get(cols["label"]) or "").strip()
            pid = (row.get(cols["patient_id"]) or "").strip() if "patient_id" in cols else ""
            view = (row.get(cols["view"]) or "").strip() if "view" in cols else ""
            listed = root / raw_file
            where = f"manifest line {reader.line_num}"
            acquisition, bad = _manifest_metadata(row, cols, where)
            attributes, too_long = row_values(row, found.attributes, where)
            problem = _manifest_path_problem(raw_file, listed, root, where) or bad or too_long
            if problem is None and len(pid) > 128:
                problem = ("bad_patient_id", f"{where}: patient_id longer than 128 characters")
            elif problem is None and len(view) > 32:
                problem = ("bad_view", f"{where}: view longer than 32 characters (e.g. PA, AP, LL)")
            yield Candidate(listed, printable(raw_file), label, patient_id=printable(pid) or None,
                            view=printable(view) or None, problem=problem, acquisition=acquisition,
                            attributes=attributes)
    finally:
        fh.close()


# --------------------------------------------------------------------------- per file
