"""The audit flow: the champion against the locked reference on the sequestered test set, deployed as
``audit/monthly`` (:mod:`xray_core.pipeline.sequester`).

Records a ``sequester_audits`` row, publishes a keyed ``sequester-audit`` artifact and emits
``xray.audit.degraded`` when the champion fell below the reference by more than XRAY_REFERENCE_MARGIN.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.events import emit_audit_degraded
from xray_core.pipeline.sequester import audit_markdown, run_audit
from xray_core.settings import get_settings


@task(cache_policy=NO_CACHE)
def audit_task(flow_run_id: str | None) -> dict[str, Any]:
    """Score both models on the sequestered films and record the audit."""
    return run_audit(get_settings(), trigger="schedule", flow_run_id=flow_run_id)


@flow(name="audit")
def audit() -> dict[str, Any]:
    """Audit the champion against the locked reference on patients no routine decision has seen."""
    result = audit_task(flow_run.id)
    create_markdown_artifact(markdown=audit_markdown(result), key="sequester-audit",
                             description=f"{result['status']}: {result['verdict']}"[:250])
    result["event"] = emit_audit_degraded(result)
    return result
