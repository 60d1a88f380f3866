"""Prefect events, read back from the test server's event store: an ingest flow emits
``xray.batch.ingested`` on its site; a retrain outcome and a drift result emit theirs with the
resource ids and key numbers automations match on. Small: four synthetic films, no training."""

from __future__ import annotations

import asyncio
import time

from xray_core.data.synthetic import write_dataset


def _events(prefix: str, expected: int) -> list:
    """Events whose name starts with ``prefix``, polling until ``expected`` arrived (they are sent by a
    background worker) or 60 s passed; the assertions then compare contents, not times."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()

    async def read():
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(prefix=[prefix])), limit=50)
            return page.events

    deadline = time.monotonic() + 60
    found = asyncio.run(read())
    while len(found) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        found = asyncio.run(read())
    return found


def test_ingest_retrain_and_drift_events_reach_the_server(xray_env, prefect_server, tmp_path):
    from flows.events import emit_drift, emit_retrain_outcome
    from flows.ingest import ingest

    source = tmp_path / "clinic-a"
    write_dataset(source, patients_per_label=2, images_per_patient=1, size=64, seed=3)
    summary = ingest(str(source))
    (ingested,) = _events("xray.batch.ingested", 1)
    assert ingested.resource.id == "xray.site.clinic-a"
    assert ingested.payload["added"] == summary["added"] == 4 and ingested.payload["site"] == "clinic-a"

    assert emit_retrain_outcome({"state": "Promoted", "state_message": "v7 replaces v6", "version": 7,
                                 "champion_after": 7, "trigger": "test",
                                 "challenger_eval": {"n_images": 40, "metrics": {"macro_auroc": 0.83}}})
    assert emit_retrain_outcome({"state": "Failed", "state_message": "boom"}) is None  # no event for failures
    (promoted,) = _events("xray.model.promoted", 1)
    assert promoted.resource.id == "xray.model.v7"
    assert promoted.payload["macro_auroc"] == 0.83 and promoted.payload["n_test"] == 40

    drifted = {"model": 7, "report": "r.md", "checks": [
        {"subject": "all new films", "drift": False, "n": 30},
        {"subject": "site far", "drift": True, "n": 16, "ood_flagged": 15, "mmd_p": 0.005, "ks_p": 0.2,
         "prevalence": {"normal": 0.5, "pneumonia": 0.5}, "verdict": "drift: inputs differ"}]}
    assert emit_drift(drifted) == 1
    (drift,) = _events("xray.drift.detected", 1)
    assert drift.resource.id == "xray.site.far" and drift.payload["ood_flagged"] == 15
    assert [r.id for r in drift.related] == ["xray.model.v7"]
