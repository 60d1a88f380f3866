"""The monitor flow: check what arrived since the last check against the champion's reference.

Writes ``reports/monitor-<stamp>/report.md``, a keyed ``drift-report`` artifact (the UI keeps its
history) and, for each drifted batch or site, an ``xray.drift.detected`` event that the
``retrain/on-drift`` deployment trigger reacts to.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.events import emit_drift
from xray_core.pipeline.monitor import run_monitor
from xray_core.report.format import cut_words
from xray_core.settings import get_settings


@task(cache_policy=NO_CACHE)
def check_task(flow_run_id: str | None) -> dict[str, Any]:
    """Embed and check everything new since the last check; record the checks; write the report."""
    return run_monitor(get_settings(), flow_run_id=flow_run_id)


@flow(name="monitor")
def monitor() -> dict[str, Any]:
    """Check new films (and list predict batches) against the champion's reference; warn on drift."""
    result = check_task(flow_run.id)
    create_markdown_artifact(markdown=result.pop("markdown"), key="drift-report",
                             description=cut_words(str(result["summary"]), 250))
    result["events"] = emit_drift(result)
    return result
