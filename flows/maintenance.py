"""The maintenance flow: retention (``xray gc``) on a schedule, deployed as ``maintenance/weekly``.

Deletes what :mod:`xray_core.pipeline.retention` does not keep, holding the retrain lock (it waits up to
``wait_seconds`` for a running retrain), and publishes what went as a keyed ``gc-report`` artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from xray_core.pipeline.retention import run_gc
from xray_core.settings import get_settings


@task(cache_policy=NO_CACHE)
def gc_task(dry_run: bool, wait_seconds: float) -> dict[str, Any]:
    """Plan retention and, unless ``dry_run``, delete what it does not keep."""
    return run_gc(get_settings(), dry_run=dry_run, wait_seconds=wait_seconds)


@flow(name="maintenance")
def maintenance(dry_run: bool = False, wait_seconds: float = 3600.0) -> dict[str, Any]:
    """Retention: old rejected models' files, unused feature folders, old report files, superseded
    evaluations' slices."""
    result = gc_task(dry_run, wait_seconds)
    verb = "Would free" if dry_run else "Freed"
    rows = [f"| {r['kind']} | {r['target']} | {r['bytes']} | {r['reason']} |" for r in result["removals"]]
    markdown = "\n".join([f"### Retention: {verb.lower()} {result['bytes']} bytes", "",
                          "| what | which | bytes | why |", "|---|---|---|---|", *rows, "",
                          *(f"- note: {n}" for n in result["notes"])])
    create_markdown_artifact(markdown=markdown, key="gc-report",
                             description=f"{verb} {result['bytes']} bytes ({len(rows)} item(s))")
    return result
