"""Label names: one normal form so that ``PNEUMONIA/``, ``Pneumonia`` and ``pneumonia `` agree."""

from __future__ import annotations

import re

from xray_core.errors import ImageRejected

_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def normalise_label(raw: str) -> str:
    """Lower-case, trim, and turn inner spaces into underscores; '' if nothing is left."""
    return re.sub(r"\s+", "_", raw.strip().lower())


def is_safe_label(label: str) -> bool:
    """Whether ``label`` is already a normal, safe label name (1-64 of a-z, 0-9, '_', '-')."""
    return bool(_LABEL_RE.fullmatch(label))


def check_label(raw: str, allowed: tuple[str, ...]) -> str:
    """Return the normalised label or raise ``ImageRejected('unknown_label', ...)``.

    A label must be 1-64 of a-z, 0-9, '_' or '-' (so it is safe as a folder name, a CSV cell and a
    dict key); when ``allowed`` is not empty it must also be one of them.
    """
    label = normalise_label(raw)
    if not _LABEL_RE.fullmatch(label):  # fullmatch: "$" alone would accept a trailing newline
        raise ImageRejected(
            "unknown_label",
            f"label {raw!r} is not allowed: use 1-64 characters of a-z, 0-9, '_' or '-'",
        )
    if allowed and label not in allowed:
        raise ImageRejected(
            "unknown_label", f"label {label!r} is not one of XRAY_LABELS ({', '.join(allowed)})"
        )
    return label
