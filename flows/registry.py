"""Manual registry actions as flows, so they are audited with a flow run id and visible in the UI."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from xray_core.registry import versions as registry
from xray_core.settings import get_settings


@flow(name="promote")
def promote(version: int, reason: str, actor: str | None = None) -> dict[str, Any]:
    """Make ``version`` the champion by hand (its checkpoint is verified first)."""
    return registry.promote_manually(get_settings(), version, reason=reason, trigger="manual", actor=actor,
                                     flow_run_id=flow_run.id)


@flow(name="rollback")
def rollback(reason: str, actor: str | None = None) -> dict[str, Any]:
    """Return to the champion before the current one."""
    return registry.rollback(get_settings(), reason=reason, trigger="manual",
                             actor=actor, flow_run_id=flow_run.id)
