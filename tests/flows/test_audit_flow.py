"""audit/monthly's flow under the session's Prefect harness: on a home with nothing to audit it publishes
the keyed sequester-audit artifact saying why and emits nothing; an audit that finds the champion
degraded emits ``xray.audit.degraded`` on the champion's resource, the reference related."""

from __future__ import annotations

import asyncio
import time
from typing import Any


def _artifacts(flow_run_id: Any) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return asyncio.run(read())


def _degraded_events(resource: str) -> list:
    """Polls until the event arrived (a background worker sends it) or 60 s passed."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()

    async def read() -> list:
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(
                event=EventNameFilter(prefix=["xray.audit.degraded"])), limit=50)
            return [e for e in page.events if e.resource.id == resource]

    deadline, found = time.monotonic() + 60, asyncio.run(read())
    while not found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = asyncio.run(read())
    return found


def test_the_audit_flow_publishes_its_artifact_and_emits_degraded(xray_env, prefect_server, monkeypatch):
    import flows.audit
    from flows.audit import audit

    state = audit(return_state=True)
    result = state.result()
    assert result["status"] == "skipped" and result["event"] is False
    (report,) = [a for a in _artifacts(state.state_details.flow_run_id) if a.key == "sequester-audit"]
    assert "Sequestered audit: skipped" in report.data and "there is no champion yet" in report.data

    degraded = {"status": "degraded", "degraded": True, "id": 4, "champion": 913, "reference": 1,
                "n_images": 40, "metric": "macro_auroc", "margin": 0.02, "sequestered_images": 40,
                "sequestered_patients": 40, "verdict": "locked reference v1: champion v913 ...",
                "comparison": {"difference": -0.3, "low": -0.4, "high": -0.2},
                "champion_metrics": {"version": 913, "macro_auroc": 0.6, "balanced_accuracy": 0.55},
                "reference_metrics": {"version": 1, "macro_auroc": 0.9, "balanced_accuracy": 0.8}}
    monkeypatch.setattr(flows.audit, "run_audit", lambda settings, **kw: degraded)
    state = audit(return_state=True)
    assert state.result()["event"] is True
    (report,) = [a for a in _artifacts(state.state_details.flow_run_id) if a.key == "sequester-audit"]
    assert "| v913 | champion | 0.600 |" in report.data and report.description.startswith("degraded")
    (event,) = _degraded_events("xray.model.v913")
    assert event.payload["reference"] == 1 and event.payload["low"] == -0.4 and event.payload["audit"] == 4
    assert "xray.model.v1" in [r.id for r in event.related]  # Prefect adds the flow run and its task
