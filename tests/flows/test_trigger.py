"""The ``retrain/on-drift`` trigger against a real Prefect server: one run per event, one at a time.

A throw-away ``prefect server start`` (SQLite in a temp PREFECT_HOME, with its services: the
reactive-triggers and actions services turn events into runs) and ``python tests/ondrift.py serve``,
which registers the deployment with the trigger and concurrency limit read from prefect.yaml and
serves a stand-in retrain flow (tests/ondrift.py says what differs: the stand-in flow, and
``schedule_after`` 0 instead of an hour, which a second deployment keeps as shipped). Events are sent
with the project's own emitters (flows/events.py). Shows: two events (a drift, an ingest) give exactly
two runs, the second waits in ``AwaitingConcurrencySlot`` until the first has finished; events the
trigger must not match (a promotion, a drift event on a non-xray resource, the drift a retrain's own
check found: no retrain loop) start nothing; the shipped trigger schedules its runs an hour after
the event. What queues the second run here is the deployment's own concurrency limit (served runs
take no work queue; `make serve`'s retrain queue, limit 1, is a second guard not exercised here).
Skipped, with the server's log, if no server starts.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from ondrift import on_drift_spec
from prefect_server import free_port, server_env, start_server, stop, tail, wait_for_server

from xray_core.results import RunResult

PROJECT = Path(__file__).resolve().parents[2]
SERVER_START_S = 90.0
RUNS_DONE_S = 90.0
FIRST_RUN_S = 30.0


@pytest.fixture
def on_drift_server(tmp_path):
    """A Prefect server with its services and the served on-drift stand-in; both ended afterwards."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    env = server_env(
        home, port,
        # A run refused a concurrency slot is retried after this many seconds (default 30): 1 keeps the
        # test short without changing what is tested (the refusal itself).
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1",
        # Services with nothing to do here (no schedules, work pools or late runs): off, to spare CPU.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
        # The served runner looks for runs to start every second (default 10).
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    api_url = env["PREFECT_API_URL"]
    server_log, runner_log = home / "server.log", home / "runner.log"
    procs = []
    try:
        procs.append(start_server(port, env, server_log))
        # Started at once: it imports Prefect while the server migrates its database, then waits for it.
        with open(runner_log, "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "tests/ondrift.py", "serve"], env=env, cwd=PROJECT,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        t0 = time.monotonic()
        if not wait_for_server(api_url, SERVER_START_S):
            pytest.skip(f"no Prefect server answered at {api_url} within {SERVER_START_S:.0f} s; "
                        f"its log:\n{tail(server_log)}")
        print(f"\nPrefect server answered after {time.monotonic() - t0:.1f} s")
        yield {"api_url": api_url, "server_log": server_log, "runner_log": runner_log, "runner": procs[1]}
    finally:
        for proc in reversed(procs):
            stop(proc)


async def _deployments(client, names: list[str], runner, runner_log: Path, timeout_s: float = 60.0) -> dict:
    """name -> deployment id once the runner has registered every deployment and its automation."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if runner.poll() is not None:
            pytest.fail(f"the served stand-in exited ({runner.returncode}):\n{tail(runner_log)}")
        try:
            found = {name: await client.read_deployment_by_name(f"retrain/{name}") for name in names}
            automations = [await client.read_resource_related_automations(f"prefect.deployment.{d.id}")
                           for d in found.values()]
            if all(automations):
                return {name: d.id for name, d in found.items()}
        except Exception:  # noqa: BLE001 - not registered yet (404)
            pass
        await asyncio.sleep(0.25)
    pytest.fail(f"the on-drift deployments were not registered within {timeout_s:.0f} s:\n{tail(runner_log)}")


async def _runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return await client.read_flow_runs(deployment_filter=DeploymentFilter(
        id=DeploymentFilterId(any_=[deployment_id])))


def test_each_drift_or_ingest_event_starts_one_retrain_and_the_second_waits(on_drift_server):
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.events import emit_drift, emit_ingested, emit_retrain_outcome

    spec = on_drift_spec()
    (trigger,) = spec["triggers"]
    assert {"xray.drift.detected", "xray.batch.ingested"} <= set(trigger["expect"])
    assert trigger["threshold"] == 1
    api_url, started = on_drift_server["api_url"], time.monotonic()

    def drift(site: str) -> dict:
        return {"model": 7, "report": f"reports/monitor-{site}/report.md", "checks": [
            {"subject": f"site {site}", "drift": True, "n": 50, "ood_flagged": 37,
             "mmd_p": 0.001, "ks_p": 0.01, "verdict": "drift: inputs differ"}]}

    async def scenario() -> dict:
        async with get_client() as client:
            ids = await _deployments(client, ["on-drift", "on-drift-as-shipped"], on_drift_server["runner"],
                                     on_drift_server["runner_log"])
            print(f"deployments registered after {time.monotonic() - started:.1f} s")
            # Events the trigger must not match first: they go down the same connection, so by the time the
            # matching events' runs exist they have been judged; any run they started is counted below.
            promoted = RunResult.from_dict({"state": "Promoted", "state_message": "v8 replaces v7",
                                            "version": 8, "champion_after": 8, "trigger": "event"})
            assert emit_retrain_outcome(promoted) == "xray.model.promoted"
            emit_event("xray.drift.detected", resource={"prefect.resource.id": "elsewhere.site.far"},
                       payload={"subject": "not an xray resource"})
            # A retrain's own drift check: the same event on an xray site, from source "retrain". A run for
            # it would retrain on what was just trained on (and could loop): the trigger must skip it.
            assert emit_drift(drift("near"), source="retrain") == 1
            sent_at = time.time()
            assert emit_drift(drift("far")) == 1
            emit_ingested({"source_id": 12, "files": 50, "added": 48, "duplicates": 2,
                           "rejected": 0}, "clinic-b")
            await EventsWorker.instance().drain()  # this server's events worker: sent, then stopped

            sent, runs = time.monotonic(), []
            while time.monotonic() < sent + RUNS_DONE_S:
                runs = await _runs(client, ids["on-drift"])
                if len(runs) >= 2 and all(r.state and r.state.is_final() for r in runs):
                    break
                if not runs and time.monotonic() > sent + FIRST_RUN_S:
                    break  # the trigger did not fire: fail now, not after RUNS_DONE_S
                await asyncio.sleep(0.5)
            done_after = time.monotonic() - started
            history = {r.id: [s.name for s in await client.read_flow_run_states(r.id)] for r in runs}
            return {"runs": await _runs(client, ids["on-drift"]), "history": history, "sent_at": sent_at,
                    "done_after": done_after,
                    "as_shipped": await _runs(client, ids["on-drift-as-shipped"])}

    EventsWorker.set_client_override(PrefectEventsClient, api_url=api_url)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            seen = asyncio.run(scenario())
    finally:
        EventsWorker.set_client_override(None)
    log = tail(on_drift_server["runner_log"])

    # Exactly one run per event (a drift, an ingest), none for the three others; both finished.
    runs = sorted(seen["runs"], key=lambda r: r.start_time or r.expected_start_time)
    assert len(runs) == 2, f"{len(runs)} runs for 2 events: {[(r.name, r.state_name) for r in runs]}\n{log}"
    assert [r.state_name for r in runs] == ["Completed", "Completed"], log
    assert all(r.parameters["trigger"] == "event" for r in runs)
    first, second = runs
    # One at a time: the second was created while the first ran, was refused a slot, and started only
    # after the first had ended.
    assert second.created < first.end_time, "the second run came too late to test the queue"
    assert second.start_time >= first.end_time, ("the second run started while the first ran",
                                                 first.start_time, first.end_time, second.start_time)
    assert "AwaitingConcurrencySlot" in seen["history"][second.id], seen["history"][second.id]

    # The trigger exactly as shipped: one run per event as well, scheduled an hour after it, not started.
    shipped = seen["as_shipped"]
    assert len(shipped) == 2 and all(r.state_name == "Scheduled" for r in shipped), shipped
    window = timedelta(seconds=trigger["schedule_after"])
    for run in shipped:
        delay = run.expected_start_time.timestamp() - seen["sent_at"]
        assert window.total_seconds() - 5 <= delay <= window.total_seconds() + 60, delay
    print(f"two runs done {seen['done_after']:.1f} s after the server answered")
