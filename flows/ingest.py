"""The ingest flow: one folder or manifest into the catalogue, with a summary artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from flows.common import progress_reporter, refused, transient_io
from flows.events import emit_drift, emit_ingested
from xray_core.data.ingest import ingest_source
from xray_core.errors import PathRefusedError
from xray_core.io.allowed_roots import confine_parameters
from xray_core.io.fsutil import utf8_safe
from xray_core.report.format import cut_words
from xray_core.report.terminal import render_ingest
from xray_core.settings import get_settings


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient_io, cache_policy=NO_CACHE)
def ingest_task(path: str, manifest: str | None = None, site: str | None = None,
                columns: dict[str, str] | None = None) -> dict[str, Any]:
    """Ingest one source; bad files are quarantined, never fatal."""
    progress = progress_reporter("ingest-progress", f"ingest {manifest or path}")
    return ingest_source(Path(path), manifest=Path(manifest) if manifest else None, settings=get_settings(),
                         progress=progress, site=site, columns=columns).as_dict()


@task(cache_policy=NO_CACHE)
def drift_task(flow_run_id: str | None) -> dict[str, Any]:
    """Check the films added since the last check against the champion's reference."""
    from xray_core.pipeline.monitor import run_monitor

    return run_monitor(get_settings(), flow_run_id=flow_run_id, kind="ingest")


@flow(name="ingest")
def ingest(path: str, manifest: str | None = None, site: str | None = None,
           check_drift: bool = True, columns: dict[str, str] | None = None) -> dict[str, Any] | State:
    """Ingest ``path`` (``<root>/<label>/<image>``), or the manifest CSV ``manifest`` (paths relative to it).

    ``site``: where these films come from (a manifest's ``site`` column wins); default: the folder's name.
    ``columns``: the manifest's names for known columns, e.g. ``{"patient_id": "patientid"}``
    (``xray ingest --columns``); the manifest's other columns are kept as attributes.
    ``check_drift``: then check the new films against the champion's reference (embeds them once,
    view 0; the ``drift-report`` artifact and ``xray.drift.detected`` events say what it found).
    Both paths must be absolute and inside the allowed roots (see SECURITY.md); otherwise the run ends
    ``Refused`` before anything is read.
    """
    from prefect.runtime import flow_run

    try:
        paths = confine_parameters(get_settings(), read={"path": path, "manifest": manifest})
    except PathRefusedError as exc:
        return refused(exc)  # the run's final state, not a summary
    path, manifest = paths["path"], paths["manifest"]
    summary = ingest_task(path, manifest, site, columns)
    create_markdown_artifact(markdown=utf8_safe(f"```\n{render_ingest(summary)}\n```"), key="ingest-summary",
                             description="what the last ingest added, skipped and quarantined")
    emit_ingested(summary, site or Path(path).name)  # only when films were added: nothing new queues nothing
    if check_drift and summary.get("added"):
        drift = drift_task(flow_run.id)
        create_markdown_artifact(markdown=utf8_safe(drift.pop("markdown")), key="drift-report",
                                 description=cut_words(str(drift["summary"]), 250))
        summary["drift"] = {"summary": drift["summary"], "drift": drift["drift"], "report": drift["report"],
                            "events": emit_drift(drift, source="ingest")}
    return summary
