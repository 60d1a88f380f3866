"""Shared flow helpers: progress artifacts for the Prefect UI, the retry condition for transient I/O, and the
final state of a flow that refuses a path outside the allowed roots."""

from __future__ import annotations

import time
from typing import Callable

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.states import Failed, State

from xray_core.errors import PathRefusedError


def progress_reporter(key: str, description: str, *, min_interval_s: float = 2.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback backed by a Prefect progress artifact.

    Updates are throttled (at most one per ``min_interval_s``, plus the final one) so that a long
    embedding does not flood the API.
    """
    state: dict[str, object] = {"id": None, "last": 0.0}

    def update(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if state["id"] is None:
            state["id"] = create_progress_artifact(progress=pct, key=key, description=description)
            state["last"] = now
        elif done >= total or now - float(state["last"]) >= min_interval_s:
            update_progress_artifact(artifact_id=state["id"], progress=pct)  # type: ignore[arg-type]
            state["last"] = now

    return update


def epoch_reporter(key: str, description: str) -> Callable[[int, int, dict], None]:
    progress = progress_reporter(key, description, min_interval_s=0.5)
    return lambda epoch, epochs, _row: progress(epoch, epochs)


def transient_io(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry only on I/O errors (a flaky network share), never on bad data or code errors."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, (FileNotFoundError, PermissionError))


def refused(exc: PathRefusedError) -> State:
    """The final state of a flow whose parameter names a path outside the allowed roots.

    ``Failed`` named ``Refused`` with the one-line reason as its message, so the runs list says what
    happened without a traceback; returned from the flow body, not raised in a task, so no retry
    option applies. The exception is the state's data: a direct caller (the CLI) gets it back from
    the call and prints the same line, exit 2.
    """
    get_run_logger().error(str(exc))
    return Failed(name="Refused", message=str(exc), data=exc)
