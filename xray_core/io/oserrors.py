"""OSErrors sorted by who can fix them: the user (a path too long, a read-only file system, no
permission: exit 2 with one line, never retried) or time (a flaky share: retried once by the flows).

The one place that decides it: the CLI's last line of defence, the retrain audit row and the flows'
retry condition and Failed states all ask :func:`path_error` / :func:`is_transient_io`.
"""

from __future__ import annotations

import errno
import os

from xray_core.errors import PathError, UsageError
from xray_core.io.fsutil import printable

# errno -> what the user can do about it. These are not transient: retrying cannot change the outcome.
USER_ERRNOS: dict[int, str] = {
    errno.ENAMETOOLONG: "a file name may have at most 255 bytes and a path 4,096; use a shorter path",
    errno.EROFS: "that file system is mounted read-only; make it writable or point XRAY_HOME (or the output "
                 "path) at a writable one",
    errno.EACCES: "this user may not read or write there; fix the permissions or use another path",
    errno.EPERM: "the operation is not permitted there; fix the permissions or use another path",
    errno.ENOTDIR: "a part of the path is a file where a folder is needed",
    errno.EISDIR: "it is a folder where a file is needed",
    errno.ELOOP: "too many symbolic links (or a link loop) in the path",
}
# What may succeed a few seconds later: a flaky network share or disk, a busy file, a dropped connection.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET, errno.ECONNABORTED,
                              errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                              errno.EAGAIN, errno.EBUSY, errno.EINTR})
PATH_SHOWN = 200  # characters of a path a message shows; a 10,000-character path is cut in the middle


def cut_path(path: object, limit: int = PATH_SHOWN) -> str:
    """``path`` as printable text of at most about ``limit`` characters: its start and its end (where the
    file name is), with the total length in the middle. Bytes that are not UTF-8 show as ``\\xNN``."""
    text = printable(os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path))
    if len(text) <= limit:
        return text
    half = (limit - 30) // 2
    return f"{text[:half]}…[{len(text):,} characters]…{text[-half:]}"


def path_error(exc: BaseException) -> PathError | None:
    """The :class:`PathError` for an OSError the user can fix (:data:`USER_ERRNOS`), else None.

    One line: ``cannot use <path, cut>: <strerror> (<ERRNO>); <what to do>``. The CLI prints it
    (exit 2); the retrain flow ends Failed with it as the state's message.
    """
    if not isinstance(exc, OSError) or exc.errno not in USER_ERRNOS:
        return None
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    paths = [cut_path(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = f"cannot use {' -> '.join(paths)}" if paths else "a file operation failed"
    error = PathError(f"{where}: {exc.strerror or os.strerror(exc.errno)} ({name}); {USER_ERRNOS[exc.errno]}")
    error.__cause__ = exc
    return error


def user_error(exc: BaseException) -> UsageError | None:
    """The error as the user must see it when it is theirs to fix: a :class:`UsageError` itself, or the
    :class:`PathError` of an OSError in :data:`USER_ERRNOS`; None for anything else (a failure)."""
    return exc if isinstance(exc, UsageError) else path_error(exc)


def is_transient_io(exc: BaseException | None) -> bool:
    """Worth one retry: a timeout, a dropped connection, or an OSError whose errno is in
    :data:`TRANSIENT_ERRNOS` (or that carries none: a library's own I/O error, as before). Never a
    user error (:data:`USER_ERRNOS`), a full disk, a missing file, nor bad data or a code error."""
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    return exc.errno is None or exc.errno in TRANSIENT_ERRNOS
