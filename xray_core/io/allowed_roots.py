"""Paths named by flow parameters are confined to allowed roots (``XRAY_ALLOWED_ROOTS``).

Why: a flow can be started by anyone who reaches the Prefect server, whose "Run" form has no
authentication; ``retrain(sources=["/etc"])`` read 1,069 system files and copied 263 of them into
quarantine. Every flow therefore checks the paths its parameters name, first thing, before it reads or
writes anything, with :func:`confine_parameters`:

- a path must be absolute: a relative one would resolve against the worker's working folder, which
  the person filling in the form neither sees nor chooses;
- it is resolved (``..``, symbolic links) before the check, and the resolved path is what the flow
  then uses and the catalogue records;
- the resolved path must lie in an allowed root: ``XRAY_ALLOWED_ROOTS`` (default: ``XRAY_INCOMING``'s
  parent), ``XRAY_INCOMING`` itself, and the paths the person running this process typed on the
  command line (:func:`caller_paths`). Outputs (``predict``'s ``out`` and ``heatmaps``) go under
  ``XRAY_HOME/predictions`` or a path the caller typed: a form must not be able to drop files (say,
  PNG overlays) into a folder that a later ingest reads.

The caller's exemption is a :class:`contextvars.ContextVar`, not a flow parameter or an environment
variable: the CLI sets it around its in-process flow call, and nothing a deployment run carries (its
parameters) can set it, because a run started from the UI executes in a worker process that never
enters :func:`caller_paths`.

The bottom layer: imports only ``settings`` and ``errors`` (and ``io.fsutil``); never ``prefect``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, cast

from xray_core.errors import PathRefusedError
from xray_core.io.oserrors import cut_path
from xray_core.settings import Settings

# The paths typed by the person running this process, allowed for the calls made inside caller_paths():
# (text as typed, resolved path) pairs.
_CALLER_PATHS: ContextVar[tuple[tuple[str, Path], ...]] = ContextVar("xray_caller_paths", default=())

Value = str | os.PathLike[str] | None


def shown(path: Any) -> str:
    """``path`` for a one-line message (:func:`xray_core.io.oserrors.cut_path`, the one cut every path
    message uses); a value that is not a path is shown as its repr, cut the same way."""
    return cut_path(path if isinstance(path, (str, os.PathLike)) else repr(path))


def _resolve(path: Path) -> Path:
    """``path`` with ``..`` and links resolved; a missing tail is kept as written (a missing incoming
    folder is a quiet night, not an error)."""
    return path.resolve(strict=False)


@contextmanager
def caller_paths(*paths: Value) -> Iterator[tuple[Path, ...]]:
    """Allow ``paths`` (and everything under them) to flows called inside this block, in this context.

    For the ``xray`` CLI: the person running it already has a shell, so the folders they typed are
    theirs to read. A relative one is taken against this process's working folder (the user's shell,
    not a worker's), here and when the flow is given it as typed. Entries that cannot be resolved are
    skipped: the flow then refuses them with its own message.
    """
    typed = list(_CALLER_PATHS.get())
    for raw in paths:
        if raw is None or os.fspath(raw) == "":
            continue
        try:
            typed.append((os.fspath(raw), _resolve(Path(raw).expanduser().absolute())))
        except (OSError, RuntimeError, ValueError):  # a NUL byte, a link loop
            continue
    token = _CALLER_PATHS.set(tuple(typed))
    try:
        yield tuple(path for _, path in typed)
    finally:
        _CALLER_PATHS.reset(token)


def _caller_roots() -> list[Path]:
    return [path for _, path in _CALLER_PATHS.get()]


def allowed_roots(settings: Settings) -> tuple[Path, ...]:
    """Where a flow parameter may point to read: ``XRAY_ALLOWED_ROOTS``, ``XRAY_INCOMING`` and the
    caller's own paths (in that order, without repeats)."""
    roots = [*map(_resolve, settings.allowed_roots),
             *([_resolve(settings.incoming_dir)] if settings.incoming_dir else []), *_caller_roots()]
    return tuple(dict.fromkeys(roots))


def output_roots(settings: Settings) -> tuple[Path, ...]:
    """Where a flow parameter may point to write: ``XRAY_HOME/predictions`` and the caller's own paths.

    Not the read roots: a form that could write there could plant files (overlay PNGs) that the next
    ingest of that folder takes as films."""
    return tuple(dict.fromkeys([_resolve(settings.home / "predictions"), *_caller_roots()]))


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def confine(raw: Any, *, name: str, roots: Sequence[Path], hint: str) -> Path:
    """The resolved ``raw`` if it lies in one of ``roots``; else :class:`PathRefusedError`, one line.

    ``name`` is the parameter as the message shows it (``sources[0]``); ``hint`` says where such a path
    may point and how to allow another one. A relative path is refused unless the caller typed it
    (:func:`caller_paths`).
    """
    if not isinstance(raw, (str, os.PathLike)) or not os.fspath(raw):
        raise PathRefusedError(f"{name}={shown(raw)} is not a path; give an absolute path {hint}")
    path = Path(raw)
    typed = dict(_CALLER_PATHS.get())
    if not path.is_absolute() and os.fspath(raw) in typed:
        path = typed[os.fspath(raw)]  # typed on this process's command line: its user's own folder
    if not path.is_absolute():
        raise PathRefusedError(f"{name}={shown(raw)} is a relative path; a flow resolves nothing against the "
                               f"worker's working folder, so give an absolute path {hint}")
    try:
        resolved = _resolve(path)
    except RuntimeError:  # Python 3.11 reports a link loop this way
        raise PathRefusedError(f"{name}={shown(raw)} is a symbolic link loop; give an absolute path "
                               f"{hint}") from None
    except (OSError, ValueError) as exc:  # a NUL byte, a path the OS will not look up
        raise PathRefusedError(f"{name}={shown(raw)} cannot be resolved ({exc}); give an absolute path "
                               f"{hint}") from None
    if not any(_inside(resolved, root) for root in roots):
        where = "; ".join(shown(r) for r in roots) or "none"
        also = "" if resolved == path else f" (it resolves to {shown(resolved)})"
        raise PathRefusedError(f"{name}={shown(raw)}{also} is outside the allowed roots ({where}); give an "
                               f"absolute path {hint}")
    return resolved


READ_HINT = ("inside XRAY_ALLOWED_ROOTS or XRAY_INCOMING (add the folder to XRAY_ALLOWED_ROOTS for the "
             "worker, or run it with the xray command)")
WRITE_HINT = ("under XRAY_HOME/predictions (leave it unset for the default there), or run it with the xray "
              "command")


def confine_parameters(settings: Settings, *, read: Mapping[str, Value | Sequence[Value]] | None = None,
                       write: Mapping[str, Value] | None = None) -> dict[str, Any]:
    """Check every path a flow's parameters name; return them resolved, as text (``None`` stays ``None``,
    a list stays a list). The first path outside raises :class:`PathRefusedError`.

    ``read``: parameters the flow reads from (one path or a list); ``write``: outputs.
    """
    out: dict[str, Any] = {}
    readable = allowed_roots(settings)

    def read_path(value: Value, name: str) -> str:
        path = confine(value, name=name, roots=readable, hint=READ_HINT)
        _outside_home(settings, path, name=name)
        return str(path)

    for name, value in (read or {}).items():
        if value is None:
            out[name] = None
        elif isinstance(value, (list, tuple)):
            out[name] = [read_path(v, f"{name}[{i}]") for i, v in enumerate(value)]
        else:
            out[name] = read_path(cast(Value, value), name)  # one path: not a list or tuple
    writable = output_roots(settings)
    for name, value in (write or {}).items():
        out[name] = None if value is None else str(confine(value, name=name, roots=writable, hint=WRITE_HINT))
    return out


def _outside_home(settings: Settings, path: Path, *, name: str) -> None:
    """Refuse a read path inside XRAY_HOME, even where a root holds the home (``XRAY_HOME=/data/xray``
    beside ``XRAY_INCOMING=/data/incoming``): a form could otherwise ingest the system's own files,
    e.g. Grad-CAM overlays it had ``predict`` write under ``XRAY_HOME/predictions``, as films. Allowed
    when the path is inside XRAY_INCOMING or was typed by the caller."""
    home = _resolve(settings.home)
    if not _inside(path, home):
        return
    exempt = [*([_resolve(settings.incoming_dir)] if settings.incoming_dir else []), *_caller_roots()]
    if any(_inside(path, root) for root in exempt):
        return
    raise PathRefusedError(f"{name}={shown(path)} is inside XRAY_HOME ({shown(home)}), where the system "
                           f"keeps its own files; give an absolute path {READ_HINT}")


def confine_to(settings: Settings, path: Value, folder: Path, *, name: str) -> str:
    """``path`` resolved if it lies under ``folder`` (a folder the system itself writes, e.g. the run
    reports a sub-flow reads back) or in the allowed roots; else :class:`PathRefusedError`."""
    return str(confine(path, name=name, roots=(_resolve(folder), *allowed_roots(settings)),
                       hint=f"under {shown(folder)}, where the system writes it, or {READ_HINT}"))


__all__ = ["caller_paths", "allowed_roots", "output_roots", "confine", "confine_parameters", "confine_to",
           "shown"]
