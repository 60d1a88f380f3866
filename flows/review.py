"""Review in the Prefect UI: a retrain run that needs a person pauses with a form, and ``xray review``
answers it from a shell.

The run (:func:`wait_for_review`, called by ``flows.retrain.PrefectExecutor.review``) pauses with an
input form, as ``prefect.flow_runs.pause_flow_run(wait_for_input=ReviewInput)`` does (a ``Paused`` state
that names the input's keys, :class:`ReviewInput`'s schema saved under them: the UI shows the form
behind the paused run's Resume button, with the question above it), emits ``xray.review.requested``,
and returns the answer, or ``expired`` after ``XRAY_REVIEW_TIMEOUT_H``. :func:`send_review` finds the
paused run (by flow-run id or name, or by the challenger's version through the registry's
``flow_run_id``) and resumes it with the answer through the Prefect API, exactly as the form does; the
server checks the answer against the same schema.

The run waits in a loop of its own rather than in ``pause_flow_run``, for two Prefect 3.9.1 behaviours
(both seen on a real server):

- A run of a deployment with a concurrency limit (every retrain deployment in prefect.yaml) gives its
  slot back when it pauses (good: nightly retrains go on), but the engine keeps renewing the lease it
  no longer has; about four minutes later the renewal fails and cancels the run (a ``CancelledError``
  injected into the flow's thread; PrefectHQ/prefect#22885 is the same for retries), which ends a
  ``pause_flow_run`` wait as ``Crashed``. Once paused, the run stops that renewal as the engine does when
  a run ends (:func:`_stop_renewal`), so an approved run goes on at once; where it cannot (another
  Prefect version), the loop survives that one cancellation and goes on once the renewal has ended.
- When a pause times out, the server fails the run ("paused and never resumed"). The run's own
  deadline comes an hour before the server's, so it sets itself back to ``Running`` first and records
  ``review_expired`` and its report as any other outcome.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from prefect import get_run_logger

# Prefect's own cancellation exception: what the failed lease renewal injects (see the module's docstring).
from prefect._internal.concurrency.cancellation import (
    CancelledError as PrefectCancelled,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import SetStateStatus
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
from prefect.flow_runs import resume_flow_run
from prefect.input import RunInput, keyset_from_base_key
from prefect.input.actions import read_flow_run_input
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL
from prefect.states import Paused, Running, State
from pydantic import Field

from flows.events import emit_review_requested
from xray_core.errors import UsageError
from xray_core.pipeline.review import ReviewAnswer, ReviewRequest, review_markdown

PAUSE_KEY = "review"  # the run's one review pause; its input lives under the keys "paused-review-*"
KEYSET = keyset_from_base_key(f"paused-{PAUSE_KEY}")  # as prefect.flow_runs.pause_flow_run names them
SERVER_GRACE_S = 3600  # the server's pause timeout is this much later than the run's own deadline


# The form on a paused retrain run: the UI renders it from this model's JSON schema (its docstring is
# the schema's description), and the server checks every answer against the same schema, from the form
# or from `xray review`.
class ReviewInput(RunInput):
    """Approve or reject the challenger; your name and reason go into the audit trail."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: the challenger becomes champion if the champion has not changed meanwhile; "
                    "reject: the champion stays")
    reviewer: str = Field(min_length=1, max_length=128, pattern=r"\S", description="your name (audit trail)")
    reason: str = Field(min_length=1, max_length=2000, pattern=r"\S", description="why (audit trail)")


def api_url() -> str | None:
    """The Prefect API this process talks to; None when Prefect would start a throw-away local server
    (nobody else can reach that one, so nobody could answer a review there)."""
    return PREFECT_API_URL.value() or None


def run_link(flow_run_id: str | None) -> str | None:
    """The paused run's page in the UI (its form is behind the Resume button), when the UI's URL is known."""
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui and flow_run_id else None


def poll_seconds(timeout_s: int) -> int:
    """How often the paused run asks the API for its answer: every 10 s for a wait of hours, faster for a
    short one (a test's), never under 1 s."""
    return max(1, min(10, timeout_s // 60))


def wait_for_review(ask: ReviewRequest, before_waiting: Callable[[], None] | None = None) -> ReviewAnswer:
    """Pause this flow run with the review form and return the answer (see the module's docstring).

    ``before_waiting`` is called once the run is paused, just before it starts to wait (it gives up the
    retrain lock). Without a Prefect API, or when the server refuses the pause, there is nobody to ask:
    ``ReviewAnswer.nobody`` at once, the lock still held.
    """
    logger = get_run_logger()
    if api_url() is None:
        why = "no Prefect API is configured (PREFECT_API_URL), so nobody could reach the run to answer"
        logger.warning("review: %s", why)
        return ReviewAnswer.nobody(why)
    run_id, deadline = _this_run(), time.monotonic() + ask.timeout_s
    form = ReviewInput.with_initial_data(description=review_markdown(ask))
    # The server's own pause timeout is an hour later than ours: it would fail the run when it passes
    # (its pause-expiration service), and this run records "review expired" itself, at its deadline.
    paused: State[Any] = Paused(timeout_seconds=ask.timeout_s + SERVER_GRACE_S, reschedule=False,
                                pause_key=PAUSE_KEY)
    paused.state_details.run_input_keyset = {str(k): v for k, v in KEYSET.items()}
    with get_client(sync_client=True) as client:
        lease = _lease_renewal(client, run_id)
        response = client.set_flow_run_state(run_id, paused)
        if response.status != SetStateStatus.ACCEPT or not (response.state and response.state.is_paused()):
            why = f"the server refused to pause the run ({response.details})"
            logger.warning("review: %s", why)
            return ReviewAnswer.nobody(why)
        form.save(KEYSET)  # the schema the UI's form and the server's check of an answer use
    if lease is not None and _stop_renewal(lease):
        lease.join(5.0)
        logger.info("review: the pause gave the run's concurrency slot back; Prefect's renewal of its "
                    "lease is stopped")
    link = run_link(str(run_id))
    emit_review_requested(ask, link)
    logger.info("review: v%s waits for a reviewer until %s UTC%s", ask.version,
                f"{ask.deadline:%Y-%m-%d %H:%M}", f" ({link})" if link else "")
    if before_waiting is not None:
        before_waiting()
    got = _wait(run_id, form, deadline, poll_seconds(ask.timeout_s), lease, logger)
    if got is None:
        logger.warning("review: nobody answered within %g h (XRAY_REVIEW_TIMEOUT_H)", ask.timeout_h)
        return ReviewAnswer.expired()
    logger.info("review: %s by %s", got.decision, got.reviewer)
    answered = datetime.now(UTC)
    return ReviewAnswer(got.decision, got.reviewer.strip(), got.reason.strip(), answered)


def _wait(run_id: UUID, form: type[ReviewInput], deadline: float, poll_s: int, lease: threading.Thread | None,
          logger: Any) -> ReviewInput | None:
    """Poll until a reviewer resumes the run (their answer) or ``deadline`` passes (None; the run is set
    back to Running). With ``lease`` (the engine's renewal of the concurrency lease the pause gave
    back, still running when :func:`_stop_renewal` could not stop it), return only once it has ended:
    it cancels the run once when it fails, and that cancellation must land here, not in the steps after
    the review (module docstring)."""
    waiting, got, noted = True, None, False
    with get_client(sync_client=True) as client:
        while True:
            try:
                if waiting:
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.is_running():  # resumed: the server checked the answer
                        waiting, got = False, _answer(form)
                    elif time.monotonic() >= deadline:
                        # Running again (forced: it is paused), so the rest of the run can record and
                        # report; an answer that arrived in between still counts.
                        client.set_flow_run_state(run_id, Running(message="review expired"), force=True)
                        waiting, got = False, _answer(form)
                    elif state is None or not state.is_paused():
                        raise RuntimeError(f"the run left its pause without an answer ({state})")
                if waiting:
                    time.sleep(poll_s)
                elif lease is None or not lease.is_alive():
                    time.sleep(0.01)  # a cancellation sent as the lease thread ended is raised here, caught
                    return got
                else:  # at most one renewal interval (225 s), once
                    if not noted:
                        logger.info("review: answered; the run goes on once Prefect has noticed that the "
                                    "concurrency lease it gave back when it paused is gone")
                        noted = True
                    lease.join(1.0)
            except PrefectCancelled:
                logger.warning("review: Prefect cancelled the paused run after its concurrency lease lapsed "
                               "(the slot was given back when it paused); the run goes on")


def _answer(form: type[ReviewInput]) -> ReviewInput | None:
    """The answer saved for this run's pause, or None (none was given)."""
    value: Any = read_flow_run_input(KEYSET["response"])
    return form(**value) if value else None


def _lease_renewal(client: Any, run_id: UUID) -> threading.Thread | None:
    """The engine's thread that renews this run's deployment concurrency lease (Prefect names it after
    the lease), or None when the run holds no lease (not a deployment run, or no concurrency limit)."""
    state = client.read_flow_run(run_id).state
    lease_id = state.state_details.deployment_concurrency_lease_id if state is not None else None
    name = f"concurrency-lease-renewal-{lease_id}"
    return next((t for t in threading.enumerate() if lease_id and t.name == name), None)


def _stop_renewal(lease: threading.Thread) -> bool:
    """Stop the engine's renewal of the lease the pause gave back, as the engine itself stops it when a
    run ends (it sets the renewal loop's stop event; a renewal that fails after that cancels nothing).
    The lease is gone, so its next renewal could only fail and cancel the run. Prefect 3.9.1 keeps the
    event in the closure of the thread's target (``prefect.concurrency._leases``,
    ``_start_lease_renewal_thread``, as ``stop_event``); no public handle reaches it. False where it is
    not found (another Prefect): the run then waits out the renewal, as :func:`_wait` says."""
    seen: set[int] = set()
    todo = [getattr(lease, "_target", None)]
    while todo:
        fn = todo.pop()
        if not inspect.isfunction(fn) or id(fn) in seen:
            continue
        seen.add(id(fn))
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if name == "stop_event" and isinstance(value, threading.Event):  # not any other Event
                value.set()
                return True
            if inspect.isfunction(value):
                todo.append(value)
    return False


def _this_run() -> UUID:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("a review is asked from inside a flow run")
    return context.flow_run.id


# --------------------------------------------------------------------------- xray review (a shell)


def send_review(target: str, *, approve: bool, reason: str, reviewer: str,
                settings: Any = None) -> dict[str, Any]:
    """Answer the review a paused retrain run waits for, through the Prefect API (what the UI's form
    does). ``target``: the run's id or name, or the challenger's version (``5`` or ``v5``).

    Raises :class:`UsageError` (exit 2) with one line when there is no API, no such run, or the run is
    not waiting for a review; returns what was sent and to which run.
    """
    reason, reviewer = reason.strip(), reviewer.strip()
    if not reason:
        raise UsageError("a review needs --reason (it goes into the audit trail)")
    if not reviewer or len(reviewer) > 128:
        raise UsageError("--reviewer must be a name of 1 to 128 characters")
    url = api_url()
    if url is None:
        raise UsageError("no Prefect API is configured: set PREFECT_API_URL to the server the run is paused "
                         "on (make serve: http://127.0.0.1:4200/api)")
    version, run_id = _resolve(target, settings)
    answer = {"decision": "approve" if approve else "reject", "reviewer": reviewer, "reason": reason}
    with get_client(sync_client=True) as client:
        run = _find_run(client, target, run_id)
        state = run.state
        if state is None or not state.is_paused():
            shown = state.name if state is not None else "without a state"
            raise UsageError(f"flow run {run.name} ({run.id}) is {shown}, not waiting for a review")
        if not state.state_details.run_input_keyset:
            raise UsageError(f"flow run {run.name} ({run.id}) is paused without a review form")
    try:
        resume_flow_run(run.id, run_input=answer)
    except FlowPauseTimeout:
        raise UsageError(f"the review of flow run {run.name} expired before this answer") from None
    except NotPausedError:  # answered or expired since it was read
        raise UsageError(f"flow run {run.name} ({run.id}) is no longer waiting for a review") from None
    except RuntimeError as exc:  # the server refused the answer (its message says why)
        raise UsageError(f"flow run {run.name} refused the answer: {exc}") from None
    return {**answer, "flow_run_id": str(run.id), "flow_run_name": run.name, "version": version,
            "url": run_link(str(run.id))}


def wait_for_outcome(flow_run_id: str, timeout_s: float) -> dict[str, Any] | None:
    """The run's final state (name and message) once it has recorded the answer, or None if it has not
    finished within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state is not None and state.is_final():
                return {"state": state.name, "message": state.message}
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)


def _resolve(target: str, settings: Any) -> tuple[int | None, str | None]:
    """(version, flow run id) named by ``target``: a version's run comes from the registry; a run id or
    name is looked up on the server (None here)."""
    text = target.strip()
    number = text[1:] if text[:1] in ("v", "V") else text
    if not number.isdigit():
        return None, None
    from db import session_scope
    from xray_core.data.catalogue import open_catalogue
    from xray_core.registry.versions import existing_model
    from xray_core.settings import get_settings

    with session_scope(open_catalogue(settings or get_settings())) as s:
        model = existing_model(s, int(number))
        if model.flow_run_id is None:
            raise UsageError(f"v{model.id} was trained without Prefect (xray retrain --local): no run waits "
                             f"for its review; promote it by hand with xray promote {model.id} --reason ...")
        return model.id, model.flow_run_id


def _find_run(client: Any, target: str, run_id: str | None) -> Any:
    """The flow run by id (from the registry or typed), else by name; UsageError when there is none."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    wanted = run_id or target.strip()
    try:
        return client.read_flow_run(UUID(wanted))
    except ValueError:  # not a UUID: a run's name
        pass
    except ObjectNotFound:
        raise UsageError(f"no flow run {wanted} on {api_url()}") from None
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[wanted])))
    if not runs:
        raise UsageError(f"no flow run named {wanted!r} on {api_url()} (give its name, its id, or the "
                         "challenger's version)")
    paused = [r for r in runs if r.state is not None and r.state.is_paused()]
    return (paused or runs)[0]
