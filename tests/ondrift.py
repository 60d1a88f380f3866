"""A stand-in for ``retrain/on-drift``, served with the trigger and concurrency limit prefect.yaml ships.

Used by tests/flows/test_trigger.py, which runs ``python tests/ondrift.py serve`` against a
throw-away Prefect server. The flow is a stand-in (a real retrain takes minutes): it has the
retrain flow's name and the deployment's parameters, and it holds its run open for a moment so a
second run could overlap it if the one-at-a-time limit did not hold.

Two deployments are served, both from prefect.yaml's ``on-drift`` entry:

- ``on-drift``: its trigger with ``schedule_after`` set to 0 (the shipped review window, an hour,
  would hold the runs back that long; nothing else is changed) and its ``concurrency_limit``; these
  runs are started and watched.
- ``on-drift-as-shipped``: the trigger exactly as shipped, 1 hour window included, with no
  concurrency limit; its runs are only scheduled (an hour out), never started, and show the window.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect_server import wait_for_server

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
# How long a run keeps going after the second run exists (seconds); the served runner polls every
# second, so it tries to start the second run at least once while the first still runs.
HOLD_AFTER_SECOND_S = 2.5
HOLD_MAX_S = 30.0


def on_drift_spec() -> dict[str, Any]:
    """The ``retrain/on-drift`` deployment as prefect.yaml defines it (anchors resolved)."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    (entry,) = [d for d in spec["deployments"]
                if d["entrypoint"] == "flows/retrain.py:retrain" and d["name"] == "on-drift"]
    return entry


def shipped_triggers(schedule_after: float | None = None) -> list:
    """prefect.yaml's triggers for on-drift, parsed by Prefect as `prefect deploy` does (the same
    ``DeploymentTriggerTypes`` union, ``type`` key included); ``schedule_after`` replaces the window."""
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    adapter = TypeAdapter(DeploymentTriggerTypes)
    triggers = []
    for raw in on_drift_spec()["triggers"]:
        raw = dict(raw)
        if schedule_after is not None:
            raw["schedule_after"] = schedule_after
        triggers.append(adapter.validate_python(raw))
    return triggers


@flow(name="retrain")
def retrain(incoming: str | None = None, use_incoming: bool = False, trigger: str = "manual",
            wait_seconds: int = 3600) -> str:
    """Stand-in: wait until this deployment has a second run (or HOLD_MAX_S), then a little more."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.runtime import deployment

    deadline = time.monotonic() + HOLD_MAX_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            mine = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            if len(client.read_flow_runs(deployment_filter=mine)) >= 2:
                break
            time.sleep(0.2)
    time.sleep(HOLD_AFTER_SECOND_S)
    return f"stand-in retrain (trigger={trigger})"


def serve() -> None:
    """Register both deployments (and their automations) on PREFECT_API_URL and serve them."""
    from prefect import serve as prefect_serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    if not wait_for_server(os.environ["PREFECT_API_URL"],
                           float(os.environ.get("ONDRIFT_SERVER_WAIT_S", "90"))):
        sys.exit("no Prefect server answered")
    entry = on_drift_spec()
    params = entry["parameters"]
    tested = retrain.to_deployment(name=entry["name"], parameters=params, tags=entry.get("tags"),
                                   triggers=shipped_triggers(schedule_after=0),
                                   concurrency_limit=ConcurrencyLimitConfig(**entry["concurrency_limit"]))
    as_shipped = retrain.to_deployment(name=f"{entry['name']}-as-shipped", parameters=params,
                                       triggers=shipped_triggers())
    prefect_serve(tested, as_shipped, print_starting_message=False)


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python tests/ondrift.py serve")
    serve()
