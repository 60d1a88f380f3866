"""The paused run stops Prefect's renewal of the concurrency lease its pause gave back (flows/review.py
``_stop_renewal``), on the pinned Prefect's own renewal thread: started by the engine's context manager,
with the renewal call itself replaced (no server here), so only the thread and its stop are real."""

from __future__ import annotations

import contextlib
import threading
import time
from uuid import uuid4

from prefect.concurrency import _leases

from flows import review


def _renewal_thread(lease_id) -> threading.Thread:
    name = f"concurrency-lease-renewal-{lease_id}"
    for _ in range(200):
        thread = next((t for t in threading.enumerate() if t.name == name), None)
        if thread is not None:
            return thread
        time.sleep(0.01)
    raise AssertionError(f"no thread {name}")


def test_the_paused_run_stops_the_renewal_and_nothing_is_cancelled(monkeypatch):
    renewed = threading.Event()
    failures: list[BaseException] = []

    def renew(client, lease_id, lease_duration, stop_event):
        renewed.set()
        return True  # renewed: the loop now waits 225 s (0.75 x 300) for the next renewal

    monkeypatch.setattr(_leases, "_renew_concurrency_lease_with_retries", renew)
    monkeypatch.setattr(_leases, "get_client", lambda sync_client: contextlib.nullcontext(None))
    monkeypatch.setattr(_leases, "_handle_lease_renewal_failure", lambda exc, *a: failures.append(exc))
    lease_id = uuid4()
    with _leases.maintain_concurrency_lease(lease_id, 300, raise_on_lease_renewal_failure=True):
        thread = _renewal_thread(lease_id)
        assert renewed.wait(5) and thread.is_alive()  # waiting for its next renewal
        assert review._stop_renewal(thread) is True
        thread.join(5)
        assert not thread.is_alive()  # stopped at once, not after 225 s
    assert failures == []


def test_a_thread_without_the_stop_event_is_left_alone():
    # another Prefect's thread: its target's closures hold no Event, so the run waits it out, as before
    values = {"lease": uuid4()}

    def inner() -> None:
        values.get("lease")

    def target() -> None:
        inner()

    thread = threading.Thread(target=target)
    assert review._stop_renewal(thread) is False and values["lease"] is not None


def test_only_the_renewal_loops_stop_event_is_set():
    # another Prefect's thread whose closures hold some other Event (here one that says the renewal
    # started): setting it would not stop the renewal, so _stop_renewal must say it found nothing
    started = threading.Event()

    def renew() -> None:
        started.set()

    def target() -> None:
        renew()

    thread = threading.Thread(target=target)
    assert review._stop_renewal(thread) is False and not started.is_set()
