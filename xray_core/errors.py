"""Specific exceptions raised at the system's boundaries.

The CLI maps :class:`UsageError` (and its subclasses) to exit code 2 and every other
:class:`XrayError` to exit code 1. An ``OSError`` that the user can fix (a path too long, a read-only
file system, no permission) becomes a :class:`PathError` (:mod:`xray_core.io.oserrors`).
"""

from __future__ import annotations

import signal
from typing import Any


class XrayError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(XrayError):
    """Bad settings, arguments or input files: the user can fix it (exit code 2)."""


class SettingsError(UsageError):
    """An ``XRAY_*`` setting has a value that is not allowed."""


class ManifestError(UsageError):
    """A manifest CSV cannot be used as a whole (missing columns, bad encoding)."""


class SourceError(UsageError):
    """An ingest source path does not exist or is not a folder/file we can read."""


class PathRefusedError(UsageError):
    """A path named by a flow parameter is relative, or resolves outside the allowed roots
    (``XRAY_ALLOWED_ROOTS``, ``XRAY_INCOMING``, the caller's own paths): refused before anything is read."""


class ImageRejected(XrayError):
    """One file cannot be used; ``reason`` is a stable code stored in the rejections table."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BackboneWeightsError(UsageError):
    """The backbone weights named by ``XRAY_BACKBONE_WEIGHTS`` cannot be loaded."""


class CheckpointError(XrayError):
    """A model checkpoint is missing, altered (sha256 mismatch) or for another backbone."""


class NotEnoughDataError(UsageError):
    """The catalogue lacks the images a step needs (e.g. no validation images, one class only)."""


class StorageFullError(XrayError):
    """The disk (or the user's quota) is full: a file could not be written. The previous file, if
    any, is left as it was; free space and run again."""


class RetrainBusyError(XrayError):
    """Another retrain holds the retrain lock."""


class PathError(UsageError):
    """An OSError the user can fix: a path too long, a read-only file system, no permission, a file
    where a folder should be. Its message is one line naming the path (cut to about 200 characters),
    the error and what to do."""


class TerminatedBySignal(SystemExit):
    """SIGTERM turned into an exception (exit code 143), so that a local retrain records its failure
    and the CLI says what was recorded before exiting."""


def terminate_as_exception() -> None:
    """Install a SIGTERM handler raising :class:`TerminatedBySignal` (a BaseException, exit code 143).

    Prefect does this itself for flow runs; the CLI's local run needs it so that a cancelled run
    still writes its ``failed`` audit row (SIGKILL, by design, leaves only crash-safe state), and the
    CLI then prints one line saying what that row says.
    """
    def handler(signum: int, frame: Any) -> None:
        raise TerminatedBySignal(128 + signum)

    signal.signal(signal.SIGTERM, handler)
