"""Shared flow helpers: progress artifacts for the Prefect UI, the retry condition for transient I/O, the
final state of a flow that refuses a path outside the allowed roots, and a run's decision tag."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

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


DECISION_TAG_PREFIX = "decision:"


def decision_tag(state_name: str) -> str:
    """The tag of a retrain's final state: ``Promoted`` -> ``decision:promoted``, ``Insufficient evidence``
    -> ``decision:insufficient-evidence``; likewise kept, skipped, blocked, failed and refused."""
    return DECISION_TAG_PREFIX + state_name.strip().lower().replace(" ", "-")


def tag_decision(state: State) -> State:
    """Tag this flow run with its decision (:func:`decision_tag` of ``state``'s name) and return ``state``.

    Prefect sets a run's tags when the run is created; the decision is known only at its end, so the
    tag is added here, from inside the run, before it returns: read the run's tags from the API,
    keep them (a ``decision:`` tag of an earlier attempt is replaced), write them back with this one.
    The UI's default filter on a deployment's runs can hide states with a custom name
    (PrefectHQ/prefect#12006, #16402); a tag is found by any filter, automation or API query. A tag
    that cannot be written (the API is down) is logged as a warning and changes nothing else: the
    run keeps its state.
    """
    from prefect.runtime import flow_run

    tag = decision_tag(state.name or state.type.value)
    run_id = flow_run.id
    if run_id is None:  # not inside a flow run
        return state
    try:
        write_decision_tag(UUID(run_id), tag)
    except Exception as exc:  # noqa: BLE001 - a tag must never change the run's outcome
        get_run_logger().warning("could not tag this run %s: %s: %s", tag, type(exc).__name__,
                                 utf8_safe(str(exc)))
    return state


def write_decision_tag(flow_run_id: UUID, tag: str) -> None:
    """Set ``tag`` on the flow run, keeping its other tags (Prefect's update replaces the whole list)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        tags = [t for t in client.read_flow_run(flow_run_id).tags if not t.startswith(DECISION_TAG_PREFIX)]
        client.update_flow_run(flow_run_id, tags=[*tags, tag])
