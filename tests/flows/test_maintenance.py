"""maintenance/weekly's flow under the session's Prefect harness: it runs retention (a tiny registry: v1
promoted, v2 kept, XRAY_KEEP_REJECTED=0), prunes v2 and publishes the keyed gc-report artifact."""

from __future__ import annotations

import asyncio

from registry_heads import BACKBONE, save

from xray_core.registry.versions import record_decision


def test_the_maintenance_flow_prunes_and_publishes_its_report(xray_env, monkeypatch, prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.maintenance import maintenance
    from xray_core.pipeline import retention
    from xray_core.settings import get_settings, reset_settings

    monkeypatch.setenv("XRAY_KEEP_REJECTED", "0")
    reset_settings()
    settings = get_settings()
    for k, decision in enumerate(("promote", "keep")):
        record_decision(settings, challenger=save(settings, seed=k), decision=decision, rationale="test",
                        metrics={}, trigger="test", promote=decision == "promote")
    monkeypatch.setattr(retention, "current_backbone", lambda s: BACKBONE)  # no densenet to build here

    state = maintenance(dry_run=False, wait_seconds=0, return_state=True)
    result = state.result()
    assert [r["target"] for r in result["removals"]] == ["v2"] and result["bytes"] > 0
    assert not (settings.models_dir / "2").exists() and (settings.models_dir / "1").exists()

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))

    (report,) = [a for a in asyncio.run(artifacts()) if a.key == "gc-report"]
    assert "| model | v2 |" in report.data
