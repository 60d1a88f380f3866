"""The words settings are checked with: a :class:`Rule` says in one line what a value may be.

``xray_core.settings`` keeps one table, setting name -> Rule, and checks every ``XRAY_*`` value
against it at start-up. The checks live here so that table stays one line per setting and
``settings.py`` stays short enough to read as the list of knobs.

May import: ``data`` (label names), lazily. Nothing runs at import time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # what model.backbone can load
SEED_RANGE = (0, 2**32 - 1)  # every RNG we seed (numpy, torch, hashing) accepts this range
LABEL_TEXT = "1-64 of a-z, 0-9, '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Rule:
    """What one setting allows.

    ``allowed`` is the text every error repeats after ``XRAY_NAME=value:``; ``check`` is True for an
    allowed *parsed* value. ``good`` and ``bad`` are raw environment strings, one allowed and some
    not: the table-driven test loads each, so the words, the predicate and the parser cannot drift
    apart, and they double as examples for a reader.
    """

    allowed: str
    check: Callable[[Any], bool]
    good: str
    bad: tuple[str, ...]

    def passes(self, value: Any) -> bool:
        """``check`` that treats a value of the wrong type (say via ``with_overrides``) as not allowed."""
        try:
            return bool(self.check(value))
        except (TypeError, ValueError, AttributeError):
            return False


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def is_number(value: Any, integer: bool = False) -> bool:
    """A finite int (or float, unless ``integer``). Bools are not numbers here; nan and inf never pass:
    ``nan`` compares False with everything, so a plain ``lo <= v <= hi`` test would wave it through."""
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def number_in(lo: float, hi: float, why: str, *, integer: bool = False, open_lo: bool = False,
              open_hi: bool = False) -> Rule:
    """A finite number in an interval, worded ``must be in [0, 1) (fraction of units dropped)``.

    Its bad examples are the first values outside each end, plus malformed text (and nan/inf)."""
    def check(v: Any) -> bool:
        return is_number(v, integer) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

    span = f"{'(' if open_lo else '['}{_num(lo)}, {_num(hi)}{')' if open_hi else ']'}"
    outside = (_num(lo if open_lo else lo - 1), _num(hi if open_hi else hi + 1))
    if integer:
        return Rule(f"must be an integer in {span} ({why})", check, _num(lo + open_lo), (*outside, "1.5", "abc"))
    return Rule(f"must be in {span} ({why})", check, _num((lo + hi) / 2), (*outside, "nan", "inf", "abc"))


def integer_in(lo: int, hi: int, why: str) -> Rule:
    return number_in(lo, hi, why, integer=True)


def one_of(options: tuple[str, ...], bad: str) -> Rule:
    return Rule(f"must be one of {', '.join(options)}", lambda v: v in options, options[-1], (bad,))


def matching(pattern: str, allowed: str, good: str, bad: tuple[str, ...], optional: bool = False) -> Rule:
    """Text that fully matches ``pattern`` (or None, the setting unset, when ``optional``)."""
    regex = re.compile(pattern)
    return Rule(allowed, lambda v: (optional and v is None) or bool(regex.fullmatch(v)), good, bad)


def is_folder(value: Any) -> bool:
    """Unset, a folder, or a path that does not exist yet (created when needed); never a file.

    A path we may not even look at (permission denied) passes: the step that writes there reports
    that more precisely than "not a folder" would."""
    try:
        return value is None or isinstance(value, Path) and (value.is_dir() or not value.exists())
    except OSError:
        return True


def is_database_url(value: str) -> bool:
    """A URL SQLAlchemy parses, of a dialect it knows (the driver itself is imported only on connect)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(value).get_dialect() is not None  # NoSuchModuleError is an ArgumentError
    except ArgumentError:
        return False


def is_storage_url(value: str | None) -> bool:
    """Unset, a path, or an fsspec URL (chains like ``simplecache::s3://...`` too) of known protocols."""
    if value is None:
        return True
    import fsspec

    known = set(fsspec.available_protocols())
    return all(part.split("://")[0] in known for part in value.split("::") if "://" in part)


def is_label(value: str) -> bool:
    from xray_core.data.labels import is_safe_label

    return is_safe_label(value)


def is_label_list(value: tuple[str, ...]) -> bool:
    """Empty (any label) or two or more safe labels: one label alone can never train a classifier."""
    return len(value) != 1 and all(map(is_label, value))


def is_regex(value: str) -> bool:
    try:
        return re.compile(value) is not None
    except re.error:
        return False


def is_split_ratios(value: tuple[float, ...]) -> bool:
    """train,val,test fractions summing to 1 with some training data."""
    return (len(value) == 3 and all(is_number(r) and 0 <= r <= 1 for r in value) and value[0] > 0
            and math.isclose(sum(value), 1.0, abs_tol=1e-6))


def is_crop_scale(value: tuple[float, ...]) -> bool:
    return len(value) == 2 and all(map(is_number, value)) and 0 < value[0] <= value[1] <= 1


def is_widths(value: tuple[int, ...]) -> bool:
    """Up to 8 hidden layers of 1..16384 units (a 16384-wide layer over 2208 features is 36 M weights)."""
    return len(value) <= 8 and all(is_number(w, integer=True) and 1 <= w <= 16384 for w in value)


def is_weights(value: str) -> bool:
    return value.lower() in ("imagenet", "random") or Path(value).suffix.lower() in WEIGHT_SUFFIXES


__all__ = ["Rule", "is_number", "number_in", "integer_in", "one_of", "matching", "is_folder", "is_database_url",
           "is_storage_url", "is_label", "is_label_list", "is_regex", "is_split_ratios", "is_crop_scale",
           "is_widths", "is_weights", "WEIGHT_SUFFIXES", "SEED_RANGE", "LABEL_TEXT"]
