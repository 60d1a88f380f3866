"""A manifest's header as exported: which column is which known name, and which are kept as attributes.

Hospital and public exports carry columns of their own (licence, source path, an original finding).
They are kept, as per-film **attributes** (:mod:`xray_core.data.attributes`), instead of refusing the
manifest. The risk that refusing them guarded against stays covered: a column that is a *near miss* of
a known name (``Patient ID``, ``patientid``, ``pateint_id``, ``lable``) is refused with the suggestion,
because kept as an attribute it would silently leave every film without its patient id.

**Near misses** (:func:`near_miss`), against the known names the manifest does not already use:

- the same name once case, spaces and punctuation (``_ - . /``) are dropped: ``Patient ID``,
  ``patientid``, ``PATIENT-ID`` for ``patient_id`` (a name that differs in case only, ``PATIENT_ID``,
  *is* the known name, as it always was);
- or an edit distance (a character missing, extra, replaced, or two swapped) of at most 2 and under
  half the known name's length: 2 for ``patient_id``, ``label``, ``device``; 1 for ``file``, ``view``,
  ``site``, ``sex``, ``age``. For those short names a *replaced* character does not count (``size``,
  ``side`` and ``set`` are other words, not typos of ``site`` and ``sex``), and nor does a column
  made of the known name plus a word of its own (``device_id``, ``label_id``).

``--columns known=export,...`` (:func:`parse_columns`) maps an export's names explicitly.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from xray_core.errors import ManifestError, UsageError

REQUIRED = ("file", "label")
# Checked acquisition facts (scan.MANIFEST_METADATA) and the two other columns the catalogue reads.
OPTIONAL = ("patient_id", "view", "site", "device", "sex", "age_years", "age", "study_date", "laterality")
KNOWN = (*REQUIRED, *OPTIONAL)
ALIASES = {"age": "age_years", "age_years": "age"}  # one fact under two names: either one is "used"
MAX_ATTRIBUTES = 64  # attribute columns per manifest
MAX_ATTRIBUTE_NAME = 64  # characters of an attribute column's name
_PUNCTUATION = re.compile(r"[\s_\-./]+")
_SHORT = 5  # known names shorter than this: no replaced characters, distance 1 at most


@dataclass(frozen=True)
class Layout:
    """Where each known name is in the header, and the attribute columns (name -> header cell)."""

    known: dict[str, str]  # known name -> the header cell as written
    attributes: dict[str, str]  # attribute name (stripped, lower case) -> the header cell as written


def squeeze(name: str) -> str:
    """``Patient ID`` -> ``patientid``: lower case without spaces or punctuation."""
    return _PUNCTUATION.sub("", name.lower())


def attribute_name(cell: str) -> str:
    """An attribute's name as stored: the header cell stripped, lower case, inner spaces collapsed."""
    return " ".join(cell.split()).lower()


def _distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, replacements and swaps of neighbours."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def near_miss(cell: str, known: Sequence[str] = KNOWN) -> str | None:
    """The known name ``cell`` looks like (see the module's rules), or None."""
    name = attribute_name(cell)
    if name in known:
        return None
    plain = squeeze(name)
    for candidate in known:
        if plain == squeeze(candidate):
            return candidate
    for candidate in known:
        target = squeeze(candidate)
        d = _distance(plain, target)
        if d == 0 or d > 2 or d >= len(target) / 2:
            continue
        if len(target) < _SHORT and len(plain) == len(target) and sorted(plain) != sorted(target):
            continue  # a replaced character in a short name: another word (size/site, set/sex)
        words = [w for w in _PUNCTUATION.split(name) if w]
        if len(words) > 1 and candidate in words:
            continue  # the known name plus a word of its own: device_id, label_id
        return candidate
    return None


def parse_columns(text: str | None) -> dict[str, str]:
    """``patient_id=patientid,label=finding`` -> ``{"patient_id": "patientid", "label": "finding"}``.

    Raises :class:`UsageError` (exit 2) for an item without ``=``, a name that is not a known column,
    or a known name given twice. Whether each export column exists is checked against the header.
    """
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        known, sep, export = item.partition("=")
        known, export = known.strip().lower(), export.strip()
        if not sep or not known or not export:
            raise UsageError(f"--columns {item.strip()!r} is not KNOWN=COLUMN (e.g. patient_id=patientid,"
                             f"label=finding); known names: {', '.join(KNOWN)}")
        if known not in KNOWN:
            raise UsageError(f"--columns {known}={export}: {known!r} is not a manifest column name; "
                             f"known names: {', '.join(KNOWN)}")
        if known in out:
            raise UsageError(f"--columns names {known} twice ({out[known]!r} and {export!r}); give it once")
        out[known] = export
    return out


def check_mapping(columns: Mapping[str, str] | None) -> dict[str, str]:
    """A mapping given in code (a flow parameter): the same checks as :func:`parse_columns`."""
    if not columns:
        return {}
    if not isinstance(columns, Mapping):
        raise UsageError("columns must map known names to the export's column names, e.g. "
                         "{'patient_id': 'patientid'}")
    return parse_columns(",".join(f"{k}={v}" for k, v in columns.items()))


def mapping_text(columns: Mapping[str, str]) -> str:
    """The ``--columns`` value that gives ``columns`` (for messages), shell-quoted."""
    return shlex.quote(",".join(f"{k}={v}" for k, v in columns.items()))


def layout(header: Sequence[str | None], manifest: Path, columns: Mapping[str, str] | None = None) -> Layout:
    """Sort the header's columns into known names and attributes, or raise :class:`ManifestError`.

    Refused: a column twice (case-insensitive), a ``columns`` entry naming a column the header lacks or
    one already taken, a known name both mapped and present as itself, a near miss of a known name the
    manifest does not use, a missing ``file`` or ``label``, an attribute name with control characters
    or over :data:`MAX_ATTRIBUTES` characters, more than :data:`MAX_ATTRIBUTES` attribute columns.
    """
    where = f"manifest {manifest}"
    cells = [h for h in header if h is not None and h.strip()]  # a blank column is ignored
    lowered = [attribute_name(h) for h in cells]
    duplicated = sorted({n for n in lowered if lowered.count(n) > 1})
    if duplicated:
        # csv.DictReader keeps the last of two same-named columns: "file,label,file" would silently
        # take the wrong file or label (a pneumonia film ingested as normal).
        raise ManifestError(f"{where} has duplicate column(s) {', '.join(map(repr, duplicated))}; "
                            "each column may appear once")
    by_name = {attribute_name(h): h for h in cells}
    known: dict[str, str] = {}
    for name, export in (columns or {}).items():
        cell = by_name.get(attribute_name(export))
        if cell is None:
            raise ManifestError(f"{where}: --columns {name}={export}: the manifest has no column {export!r}; "
                                f"its columns: {', '.join(cells) or 'none'}")
        if cell in known.values():
            raise ManifestError(f"{where}: --columns maps column {export!r} twice; a column names one thing")
        if name in by_name and by_name[name] != cell:
            raise ManifestError(f"{where} has a column {by_name[name]!r} and --columns maps {name} to "
                                f"{export!r}; rename one of them in the export")
        known[name] = cell
    taken = set(known.values())
    rest = [c for c in cells if c not in taken]
    for cell in rest:
        if attribute_name(cell) in KNOWN and attribute_name(cell) not in known:
            known[attribute_name(cell)] = cell
    used = set(known) | {ALIASES[n] for n in known if n in ALIASES}
    unused = [n for n in KNOWN if n not in used]
    attributes: dict[str, str] = {}
    misses = []
    for cell in rest:
        if cell in known.values():
            continue
        if (looks := near_miss(cell, unused)) is not None:
            misses.append(f"column {cell!r} looks like {looks!r}: rename it or map it with "
                          f"--columns {known_pair(looks, cell)}")
            continue
        attributes[attribute_name(cell)] = cell
    missing = [c for c in REQUIRED if c not in known]
    if missing:
        misses.append(f"lacks column(s) {', '.join(missing)}; found {', '.join(cells) or 'none'}. Map the "
                      "export's names with --columns, e.g. --columns file=filename,label=finding")
    if misses:  # every problem of the header at once, in one line
        raise ManifestError(f"{where}: " + "; ".join(misses))
    _check_attribute_names(list(attributes), where)
    return Layout(known=known, attributes=attributes)


def known_pair(known: str, cell: str) -> str:
    """``patient_id='Patient ID'``: one ``--columns`` item, the export's name quoted for a shell."""
    return f"{known}={shlex.quote(cell)}"


def _check_attribute_names(names: list[str], where: str) -> None:
    if len(names) > MAX_ATTRIBUTES:
        raise ManifestError(f"{where} has {len(names)} columns besides the known ones; at most "
                            f"{MAX_ATTRIBUTES} are kept as attributes. Drop columns nobody needs from the "
                            "export")
    for name in names:
        if not name.isprintable():
            raise ManifestError(f"{where}: column name {name[:40]!r} holds control characters; rename it")
        if len(name) > MAX_ATTRIBUTE_NAME:
            raise ManifestError(f"{where}: column name {name[:40]!r}… is {len(name)} characters; at most "
                                f"{MAX_ATTRIBUTE_NAME}")
