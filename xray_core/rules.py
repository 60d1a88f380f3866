"""What a setting may be, in words and as checks: the pieces :class:`xray_core.settings.Settings`
declares its fields with, and the words errors and ``docs/settings.md`` repeat.

A field is declared once, with :func:`setting`: its default, its range (``ge``/``le``/``gt``/``lt``, or
a ``Literal`` type), a description, and, where the range is not a number or a choice, ``allowed``
(the words) with a check from here. The words of a numeric or choice field are derived from its
range (:func:`allowed_text`), and so are its examples (:func:`examples`): one raw value the loader
must accept and some it must refuse, which the table-driven unit test loads for every setting.

May import: ``data`` (label names), lazily. Nothing runs at import time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # what model.backbone can load
SEED_MAX = 2**32 - 1  # every RNG we seed (numpy, torch, hashing) accepts 0..SEED_MAX
LABEL_TEXT = "1-64 of a-z, 0-9, '_' or '-', starting with a letter or digit"
Affects = Literal["execution", "training"]


def setting(default: Any = None, *, description: str, allowed: str | None = None, good: str | None = None,
            bad: tuple[str, ...] = (), affects: Affects | None = None, env: str | None = None,
            from_env: bool = True, secret: bool = False, empty_is_a_value: bool = False,
            default_text: str | None = None, **kwargs: Any) -> Any:
    """One setting's ``Field``. Beyond pydantic's own arguments (``ge``, ``le``, ``default_factory``...):

    ``allowed``: the words after "must be" when the range is not a number interval or a choice;
    ``good``/``bad``: raw examples (derived for intervals and choices); ``affects``: ``execution``
    (where and how fast work runs: a rerun may skip) or ``training`` (what training produces from
    the same features); ``env``: the variable when it is not ``XRAY_<NAME>``; ``from_env=False``: derived
    only (the folders under XRAY_HOME); ``secret``: never echoed; ``empty_is_a_value``: ``XRAY_X=``
    means "" rather than unset; ``default_text``: the docs' words for a default computed at load time.
    """
    marks = {"allowed": allowed, "good": good, "bad": list(bad) or None, "affects": affects, "env": env,
             "from_env": None if from_env else False, "secret": secret or None,
             "empty_is_a_value": empty_is_a_value or None, "default_text": default_text}
    extra: dict[str, Any] = {key: value for key, value in marks.items() if value is not None}
    if "default_factory" in kwargs:
        return Field(description=description, json_schema_extra=extra, **kwargs)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def extra(field: FieldInfo) -> dict[str, Any]:
    """The markers :func:`setting` stored on a field."""
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _bounds(field: FieldInfo) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, key.capitalize())):
                out[key] = getattr(item, key)
    return out


def choices(field: FieldInfo) -> tuple[str, ...]:
    """The options of a ``Literal`` field; () for any other."""
    return tuple(get_args(field.annotation)) if get_origin(field.annotation) is Literal else ()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def allowed_text(field: FieldInfo, *, why: bool = True) -> str:
    """What the field allows, in the words every error repeats after ``XRAY_NAME=value: ``; for an
    interval or a choice, with the description in brackets unless ``why`` is False (the docs table)."""
    given = extra(field).get("allowed")
    if given:
        return f"must be {given}"
    why_text = f" ({field.description})" if field.description and why else ""
    if choices(field):
        return f"must be one of {', '.join(choices(field))}{why_text}"
    b = _bounds(field)
    if ("ge" in b or "gt" in b) and ("le" in b or "lt" in b):
        span = (f"{'(' if 'gt' in b else '['}{_num(b.get('gt', b.get('ge', 0)))}, "
                f"{_num(b.get('lt', b.get('le', 0)))}{')' if 'lt' in b else ']'}")
        return f"must be {'an integer ' if field.annotation is int else ''}in {span}{why_text}"
    raise TypeError(f"setting {field.description!r} needs allowed=..., a Literal type or both bounds")


def examples(field: FieldInfo) -> tuple[str, tuple[str, ...]]:
    """(one raw value that must load, raw values that must be refused): given, else derived from the
    range. The allowed one differs from the default, so loading it shows the variable is read; the
    refused ones are the first values outside each end, plus malformed text (and nan/inf for floats)."""
    given = extra(field)
    if given.get("good") is not None:
        return given["good"], tuple(given.get("bad", ()))
    if choices(field):
        options = [c for c in choices(field) if c != field.default]
        return options[-1], tuple(given.get("bad", ("no-such-choice",)))
    b = _bounds(field)
    lo, hi = b.get("gt", b.get("ge", 0)), b.get("lt", b.get("le", 0))
    outside = (_num(lo if "gt" in b else lo - 1), _num(hi if "lt" in b else hi + 1))
    if field.annotation is int:
        inside = [lo + ("gt" in b), hi - ("lt" in b)]
        return _num(next(v for v in inside if v != field.default)), (*outside, "1.5", "abc")
    return _num((lo + hi) / 2), (*outside, "nan", "inf", "abc")


# --------------------------------------------------------------------------------------------------
# checks (after parsing) and parsers (raw environment text -> value; a parsed value passes through)


def check(predicate: Callable[[Any], bool]) -> AfterValidator:
    """An after-validator refusing values ``predicate`` rejects (the field's words say why)."""
    def run(value: Any) -> Any:
        try:
            ok = bool(predicate(value))
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ValueError("not allowed")
        return value

    return AfterValidator(run)


def parse(parser: Callable[[str], Any]) -> BeforeValidator:
    """A before-validator applying ``parser`` to environment text only, so re-validating a loaded
    (or overridden) Settings sees values, not text."""
    return BeforeValidator(lambda value: parser(value) if isinstance(value, str) else value)


def is_number(value: Any, integer: bool = False) -> bool:
    """A finite int (or float, unless ``integer``). Bools are not numbers here; nan and inf never pass."""
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def words(raw: str) -> str:
    return raw.strip().lower()


def floats(raw: str) -> tuple[float, ...]:
    return tuple(float(p) for p in raw.replace("/", ",").split(",") if p.strip())


def widths(raw: str) -> tuple[int, ...]:
    if raw.strip().lower() in ("none", "linear"):
        return ()
    return tuple(int(p) for p in raw.split(",") if p.strip())


def octal_mode(raw: str) -> int:
    """File permission bits from an octal string (``0640``, ``640`` or ``0o640``)."""
    return int(raw.strip().lower().removeprefix("0o"), 8)


def is_file_mode(value: int) -> bool:
    """0..0o777 without write access for others: a report anyone can rewrite cannot be trusted."""
    return is_number(value, integer=True) and 0 <= value <= 0o777 and not value & 0o002


def folders(raw: str) -> tuple[Path, ...]:
    """``/data,/srv/films`` -> absolute folders, resolved (links and ``..``), so that a resolved flow
    path can be compared with them; ``none`` -> (). A relative entry is refused: it would depend on the
    folder each process happens to start in."""
    if raw.strip().lower() == "none":
        return ()
    parts = [Path(p.strip()).expanduser() for p in raw.split(",") if p.strip()]
    if not parts or not all(p.is_absolute() for p in parts):
        raise ValueError("every entry must be an absolute folder path")
    return tuple(dict.fromkeys(p.resolve() for p in parts))  # ValueError for a NUL byte


def path(raw: str | Path) -> Path:
    return Path(raw).expanduser().resolve()  # ValueError for a NUL byte


def labels(raw: str) -> tuple[str, ...]:
    from xray_core.data.labels import normalise_label

    return tuple(sorted({normalise_label(p) for p in raw.split(",") if p.strip()}))


def modalities(raw: str) -> tuple[str, ...]:
    """``CR,DX`` -> ("CR", "DX"); ``any`` -> () (every modality accepted)."""
    parts = tuple(sorted({p.strip().upper() for p in raw.split(",") if p.strip()}))
    return () if parts == ("ANY",) else parts


def views(raw: str) -> tuple[str, ...]:
    """``pa, ap`` -> ("AP", "PA"): upper case, ``_`` as a space, spaces collapsed."""
    return tuple(sorted({" ".join(p.upper().replace("_", " ").split()) for p in raw.split(",") if p.strip()}))


def slice_names(raw: str) -> tuple[str, ...]:
    """``site, View,Age_Band`` -> ("site", "view", "age_band"): as manifest attribute names are stored
    (stripped, lower case, inner spaces collapsed), each once, in the order given."""
    return tuple(dict.fromkeys(" ".join(p.split()).lower() for p in raw.split(",") if p.strip()))


def are_slice_names(value: tuple[str, ...]) -> bool:
    """1 to 16 names of 1 to 64 printable characters (no control characters)."""
    return 0 < len(value) <= 16 and all(isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable()
                                        for v in value)


def is_folder(value: Any) -> bool:
    """Unset, a folder, or a path that does not exist yet (created when needed); never a file.

    A path we may not even look at (permission denied) passes: the step that writes there reports
    that more precisely than "not a folder" would."""
    try:
        return value is None or isinstance(value, Path) and (value.is_dir() or not value.exists())
    except OSError:
        return True


def are_roots(value: tuple[Path, ...]) -> bool:
    return all(isinstance(p, Path) and p.is_absolute() and is_folder(p) for p in value)


def is_database_url(value: str) -> bool:
    """A URL SQLAlchemy parses, of a dialect it knows: :func:`db.urls.check_database_url`, the same
    check ``xray`` runs at start-up."""
    from db.urls import DatabaseUrlError, check_database_url

    try:
        check_database_url(value)
    except DatabaseUrlError:
        return False
    return True


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


def matches(pattern: str, optional: bool = False) -> Callable[[Any], bool]:
    """Text that fully matches ``pattern`` (or None, the setting unset, when ``optional``)."""
    regex = re.compile(pattern)
    return lambda v: (optional and v is None) or bool(regex.fullmatch(v))


def is_split_ratios(value: tuple[float, ...]) -> bool:
    """train,val,test fractions summing to 1 with some training data."""
    return (len(value) == 3 and all(is_number(r) and 0 <= r <= 1 for r in value) and value[0] > 0
            and math.isclose(sum(value), 1.0, abs_tol=1e-6))


def is_crop_scale(value: tuple[float, ...]) -> bool:
    return len(value) == 2 and all(map(is_number, value)) and 0 < value[0] <= value[1] <= 1


def is_widths(value: tuple[int, ...]) -> bool:
    """Up to 8 hidden layers of 1..16384 units (a 16384-wide layer over 2208 features is 36 M weights)."""
    return len(value) <= 8 and all(is_number(w, integer=True) and 1 <= w <= 16384 for w in value)


def is_l2_grid(value: tuple[float, ...]) -> bool:
    return bool(value) and all(is_number(c) and 0 < c <= 1e6 for c in value)


def is_weights(value: str) -> bool:
    return value.lower() in ("imagenet", "random") or Path(value).suffix.lower() in WEIGHT_SUFFIXES


# --------------------------------------------------------------------------------------------------
# reading the environment, reporting what is wrong, and the docs page


def env_names(fields: Mapping[str, FieldInfo]) -> dict[str, str]:
    """field -> its variable: ``XRAY_`` + the upper-cased name unless the field names its own; the
    derived fields (``from_env=False``) have none."""
    return {name: extra(f).get("env", f"XRAY_{name.upper()}") for name, f in fields.items()
            if extra(f).get("from_env", True)}


class Environment(EnvSettingsSource):
    """pydantic-settings' reader of ``XRAY_*`` variables, over a given mapping (``os.environ`` by default).

    Names are matched exactly (``XRAY_HOME``, not ``xray_home``, as before); an empty value means unset
    except where the field says ``empty_is_a_value``; derived fields are never read; a field may name
    its own variable (``incoming_dir`` is ``XRAY_INCOMING``). Values stay text: each field's parser
    reads the list syntax people write (``XRAY_LABELS=a,b``, ``XRAY_HEAD_HIDDEN=none``), not JSON."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = {key.lower(): value for key, value in env.items()
                     if key.startswith("XRAY_") and key == key.upper()}
        self._names = env_names(settings_cls.model_fields)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name not in self._names:
            return None, field_name, False
        value = self.env_vars.get(self._names[field_name].lower())
        if value == "" and not extra(field).get("empty_is_a_value"):
            value = None
        return value, field_name, False


def as_text(value: Any) -> str:
    """A value as it would be written in the environment."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def refusal(exc: ValidationError, fields: Mapping[str, FieldInfo], shown: Mapping[str, str]) -> str:
    """One line per bad variable, in declaration order: ``XRAY_NAME=value: must be ...``, with secrets
    hidden, URL credentials masked and odd text quoted. pydantic reports every field at once; a field
    whose default depends on a bad one is not reported again."""
    names = env_names(fields)
    bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"] and e["type"] != "default_factory_not_called"}
    lines = []
    for name in (n for n in fields if n in bad):
        text = "(hidden)" if extra(fields[name]).get("secret") else shown.get(name, "")
        text = re.sub(r"//[^/@\s]*@", "//***@", text)
        if not text.isprintable() or text != text.strip() or not text:
            text = repr(text)
        lines.append(f"{names.get(name, name)}={text}: {allowed_text(fields[name])}")
    return "\n".join(lines)


def _default_text(field: FieldInfo) -> str:
    given = extra(field).get("default_text")
    if given:
        return given
    value = field.get_default()
    return "unset" if value is None or value == () else f"`{as_text(value)}`"


def settings_page(fields: Mapping[str, FieldInfo]) -> str:
    """The markdown of ``docs/settings.md``: one row per variable, in declaration order."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [f"| `{var}` | {cell(_default_text(fields[name]))} | "
            f"{cell(allowed_text(fields[name], why=False).removeprefix('must be '))} | "
            f"{cell(fields[name].description or '')} |" for name, var in env_names(fields).items()]
    return "\n".join([SETTINGS_PAGE_HEAD, "| variable | default | allowed | what for |", "|---|---|---|---|",
                      *rows, ""])


SETTINGS_PAGE_HEAD = """# Settings

<!-- Generated from xray_core/settings.py by `python scripts/settings_table.py --write`; do not edit.
     tests/unit/test_settings.py fails when this file and the declaration differ. -->

Every setting is an environment variable, read the first time a command or flow needs its settings.
A value that is not allowed stops the command before it touches anything, with exit code 2 and one
line per bad variable naming it and what it allows, for example

```
xray status: XRAY_HEAD_DROPOUT=1.5: must be in [0, 1) (fraction of units dropped)
```

Numbers must be finite (`nan` and `inf` are refused). Lists are comma-separated
(`XRAY_LABELS=normal,pneumonia`); an empty value is the same as unset, except for `XRAY_PATIENT_REGEX`,
where empty turns it off. Secrets are not echoed (`XRAY_PATIENT_SALT=(hidden)`, passwords in URLs
as `***`). `xray status` shows the values in use.

Adding a setting is one field in `Settings` (`xray_core/settings.py`): its type, default, range and
description; the error words, the examples the tests load, and this page follow from it.
"""


__all__ = ["setting", "extra", "choices", "allowed_text", "examples", "check", "parse", "is_number", "words",
           "floats", "widths", "octal_mode", "is_file_mode", "folders", "path", "labels", "modalities",
           "views", "is_folder", "are_roots", "is_database_url", "is_storage_url", "is_label",
           "is_label_list", "is_regex", "matches", "is_split_ratios", "is_crop_scale", "is_widths",
           "is_l2_grid", "is_weights", "env_names", "Environment", "as_text", "refusal", "settings_page",
           "WEIGHT_SUFFIXES", "SEED_MAX", "LABEL_TEXT", "Affects"]
