"""Prefect events, read back from the test server's event store: an ingest flow emits
``xray.batch.ingested`` on its site (and nothing when it added no film); a retrain outcome (Blocked
included), a drift result and a retrain's own flagged drift check emit theirs with the resource ids,
``xray.source`` labels and key numbers automations match on; the on-drift trigger's match rule takes
the ingest's and the monitor's events and not the retrain's. Small: four synthetic films, no training."""

from __future__ import annotations

import asyncio
import time

from xray_core.data.synthetic import write_dataset
from xray_core.results import RunResult


def _events(prefix: str, expected: int, resource: str | None = None) -> list:
    """Events whose name starts with ``prefix`` (and, given, on ``resource``), polling until ``expected``
    arrived (they are sent by a background worker) or 60 s passed; the assertions then compare contents,
    not times. The server is shared by the session, so other flow tests' events are filtered out."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()

    async def read():
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(prefix=[prefix])),
                                            limit=50)
            return [e for e in page.events if resource is None or e.resource.id == resource]

    deadline = time.monotonic() + 60
    found = asyncio.run(read())
    while len(found) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        found = asyncio.run(read())
    return found


def test_ingest_retrain_and_drift_events_reach_the_server(xray_env, prefect_server, tmp_path, monkeypatch):
    from flows import events
    from flows.events import emit_drift, emit_retrain_drift, emit_retrain_outcome
    from flows.ingest import ingest

    source = tmp_path / "clinic-a"
    write_dataset(source, patients_per_label=2, images_per_patient=1, size=64, seed=3)
    summary = ingest(str(source))
    (ingested,) = _events("xray.batch.ingested", 1, "xray.site.clinic-a")
    assert ingested.resource.id == "xray.site.clinic-a" and ingested.resource["xray.source"] == "ingest"
    assert ingested.payload["added"] == summary["added"] == 4 and ingested.payload["site"] == "clinic-a"

    # The same folder again adds nothing: no xray.batch.ingested (it would queue a retrain for nothing).
    sent: list[str] = []
    real_emit = events.emit_event
    monkeypatch.setattr(events, "emit_event", lambda name, **kw: (sent.append(name), real_emit(name, **kw)))
    again = ingest(str(source))
    assert again["added"] == 0
    assert "xray.batch.ingested" not in sent, sent
    monkeypatch.setattr(events, "emit_event", real_emit)

    promoted_run = RunResult.from_dict({
        "state": "Promoted", "state_message": "v7 replaces v6", "version": 7, "champion_after": 7,
        "trigger": "test", "challenger_eval": {"n_images": 40, "metrics": {"macro_auroc": 0.83}}})
    assert emit_retrain_outcome(promoted_run)
    failed_run = RunResult.from_dict({"state": "Failed", "state_message": "boom"})
    assert emit_retrain_outcome(failed_run) is None  # no event for failures
    (promoted,) = [e for e in _events("xray.model.promoted", 1, "xray.model.v7")
                   if e.payload.get("trigger") == "test" and e.payload.get("n_test") == 40]
    assert promoted.resource.id == "xray.model.v7"
    assert promoted.payload["macro_auroc"] == 0.83 and promoted.payload["n_test"] == 40

    # Blocked: on the challenger's resource, the one a reviewer would promote.
    blocked_run = RunResult.from_dict({"state": "Blocked", "state_message": "v9 not promoted: shortcut audit",
                                       "version": 9, "champion_after": 7, "trigger": "test"})
    assert emit_retrain_outcome(blocked_run) == "xray.retrain.blocked"
    (blocked,) = _events("xray.retrain.blocked", 1, "xray.model.v9")
    assert blocked.payload["challenger"] == 9 and blocked.payload["champion_after"] == 7

    drifted = {"model": 7, "report": "r.md", "checks": [
        {"subject": "all new films", "drift": False, "n": 30},
        {"subject": "site far", "drift": True, "n": 16, "ood_flagged": 15, "mmd_p": 0.005, "ks_p": 0.2,
         "prevalence": {"normal": 0.5, "pneumonia": 0.5}, "verdict": "drift: inputs differ"}]}
    assert emit_drift(drifted) == 1
    (drift,) = _events("xray.drift.detected", 1, "xray.site.far")
    assert drift.resource.id == "xray.site.far" and drift.payload["ood_flagged"] == 15
    assert drift.resource["xray.source"] == drift.payload["source"] == "monitor"
    assert [r.id for r in drift.related] == ["xray.model.v7"]

    # The retrain's own drift check (RunResult.drift, as recipe.check_arrivals writes it): the same event
    # on the same resource with the same payload, from source "retrain"; nothing when it is not flagged.
    run = RunResult(flow_run_id=None, run_name="r", trigger="test", backbone_weights="random",
                    backbone_random_init=True, run_dir=str(tmp_path), state="Kept", champion_after=7,
                    drift={"flagged": True, "summary": "drift detected in site near", "warnings": [],
                           "report": "reports/retrain-check/report.md",
                           "checks": [{"subject": "site near", "n": 12, "ood_flagged": 9, "mmd_p": 0.001,
                                       "ks_p": 0.01, "verdict": "drift: inputs differ", "drift": True}]})
    assert emit_retrain_drift(run) == 1
    run.drift = {**run.drift, "flagged": False}
    assert emit_retrain_drift(run) == 0
    (own,) = _events("xray.drift.detected", 1, "xray.site.near")
    assert own.resource["xray.source"] == own.payload["source"] == "retrain"
    assert own.payload["ood_flagged"] == 9 and own.payload["report"] == "reports/retrain-check/report.md"
    assert set(own.payload) == set(drift.payload) and [r.id for r in own.related] == ["xray.model.v7"]


def test_on_drift_trigger_is_a_valid_prefect_trigger_on_the_one_at_a_time_queue():
    """The deployment trigger as Prefect itself parses it: one run per xray.drift.detected or
    xray.batch.ingested event from the ingest or monitor flow (not from a retrain's own drift check:
    no retrain loop), after the review window, on the retrain queue whose limit of 1 queues a second run
    instead of running it (tests/flows/test_trigger.py shows it on a real server)."""
    from datetime import timedelta
    from pathlib import Path

    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import Resource

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    by_name = {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}
    on_drift = by_name[("flows/retrain.py:retrain", "on-drift")]
    (raw,) = on_drift["triggers"]
    trigger = DeploymentEventTrigger.model_validate({k: v for k, v in raw.items() if k != "type"})
    assert (trigger.expect == {"xray.drift.detected", "xray.batch.ingested"} and trigger.threshold == 1
            and trigger.posture == "Reactive")
    assert trigger.schedule_after == timedelta(hours=1)
    for labels, matched in (({"prefect.resource.id": "xray.site.far", "xray.source": "monitor"}, True),
                            ({"prefect.resource.id": "xray.model.v7", "xray.source": "monitor"}, True),
                            ({"prefect.resource.id": "xray.site.far", "xray.source": "ingest"}, True),
                            # a retrain's own drift check: that run has just trained on those films
                            ({"prefect.resource.id": "xray.site.far", "xray.source": "retrain"}, False),
                            ({"prefect.resource.id": "xray.site.far"}, False),  # not sent by these flows
                            ({"prefect.resource.id": "prefect.flow-run.1", "xray.source": "monitor"}, False)):
        assert trigger.match.matches(Resource(labels)) is matched, labels
    assert on_drift["work_pool"]["work_queue_name"] == "retrain"
    assert on_drift["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert on_drift["parameters"]["trigger"] == "event"
    daily = by_name[("flows/monitor.py:monitor", "daily")]
    assert daily["schedules"][0]["cron"] == "30 6 * * *"


def test_a_breach_of_the_locked_reference_emits_its_event(xray_env, prefect_server, tmp_path):
    """``xray.reference.breach`` once per site measured in breach (not for a site that held), on the
    champion's resource with the reference related, as ``xray.audit.degraded``."""
    from flows.events import emit_reference_breach
    from xray_core.evaluate.breach import BreachCheck

    def check(site: str, status: str, difference: float) -> BreachCheck:
        return BreachCheck(site=site, champion=17, reference=2, status=status, films=40, since=None,
                           metric="macro_auroc", margin=0.02, mode="rollback", detail=f"at site {site}",
                           difference=difference, low=difference - 0.05, high=difference + 0.05,
                           action="reference restored" if status == "breach" else "none")

    run = RunResult(flow_run_id=None, run_name="r", trigger="test", backbone_weights="random",
                    backbone_random_init=True, run_dir=str(tmp_path), state="Kept", champion_after=2,
                    breach_checks=[check("A", "breach", -0.114), check("B", "held", 0.01)])
    assert emit_reference_breach(run) == 1
    (event,) = _events("xray.reference.breach", 1, "xray.model.v17")
    assert [r.id for r in event.related] == ["xray.model.v2"] and event.related[0].role == "reference"
    assert event.payload["site"] == "A" and event.payload["difference"] == -0.114
    assert event.payload["action"] == "reference restored" and event.payload["champion_after"] == 2
