"""Shared flow helpers: progress artifacts for the Prefect UI, the retry condition for transient I/O, and the
final state of a flow that refuses a path outside the allowed roots."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.states import Failed, State

from xray_core.errors import PathRefusedError
from xray_core.io.fsutil import utf8_safe
from xray_core.io.oserrors import is_transient_io, user_error


def progress_reporter(key: str, description: str, *,
                      min_interval_s: float = 2.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback backed by a Prefect progress artifact.

    Updates are throttled (at most one per ``min_interval_s``, plus the final one) so that a long
    embedding does not flood the API.
    """
    state: dict[str, Any] = {"id": None, "last": 0.0}

    def update(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if state["id"] is None:
            state["id"] = create_progress_artifact(progress=pct, key=key, description=description)
            state["last"] = now
        elif done >= total or now - float(state["last"]) >= min_interval_s:
            update_progress_artifact(artifact_id=state["id"], progress=pct)
            state["last"] = now

    return update


def epoch_reporter(key: str, description: str) -> Callable[[int, int, dict], None]:
    progress = progress_reporter(key, description, min_interval_s=0.5)
    return lambda epoch, epochs, _row: progress(epoch, epochs)


def transient_io(task, task_run, state) -> bool:  # Prefect's retry_condition_fn signature
    """Retry only on transient I/O errors (a flaky network share: EIO, ESTALE, a timeout, a reset
    connection), never on what the user must fix (a path too long, a read-only file system, no
    permission), a full disk, bad data or code errors: :func:`xray_core.io.oserrors.is_transient_io`."""
    return is_transient_io(state.result(raise_on_failure=False))


def failed_for_user_error(exc: BaseException) -> State[Any] | None:
    """A ``Failed`` state whose message is the one line the CLI prints for an error the user must fix
    (not enough data, a path too long, a read-only file system), or None for any other failure.

    Raised, such an error would end the run as "Flow run encountered an exception: NotEnoughDataError:
    ..." with a traceback in the log; returned as a state, the runs list shows the line itself. The
    state carries the exception, so a flow called as a function (``xray retrain`` with a server)
    still raises it and the CLI exits 2.
    """
    error = user_error(exc)
    return None if error is None else _one_line_failure(error)


def refused(exc: PathRefusedError) -> State:
    """The final state of a flow whose parameter names a path outside the allowed roots.

    ``Failed`` named ``Refused`` with the one-line reason as its message, so the runs list says what
    happened without a traceback; returned from the flow body, not raised in a task, so no retry
    option applies. The exception is the state's data: a direct caller (the CLI) gets it back from
    the call and prints the same line, exit 2.
    """
    return _one_line_failure(exc, name="Refused")


def _one_line_failure(exc: BaseException, *, name: str = "Failed") -> State[Any]:
    """``Failed`` (named ``name``) whose message is the exception's one line, logged once; the exception
    is the state's data, so calling the flow as a function raises it again."""
    message = utf8_safe(str(exc))[:1000]
    get_run_logger().error(message)
    return Failed(name=name, message=message, data=exc)
