"""The retrain flow: ingest → split → embed → train → evaluate both → decide → promote → report.

Each task is one call into ``xray_core``. Tasks pass paths and small dicts; the split the run works on
is frozen in a snapshot file so every step sees the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.common import epoch_reporter, progress_reporter, transient_io
from flows.ingest import ingest_task
from xray_core.pipeline import embed
from xray_core.pipeline import lock
from xray_core.pipeline import snapshot
from xray_core.pipeline import steps
from xray_core.data.catalogue import catalogue_summary
from xray_core.report.html import write_run_html
from xray_core.registry.versions import list_models, record_decision
from xray_core.report.markdown import metrics_rows, registry_rows, retrain_markdown
from xray_core.settings import Settings, get_settings

Trigger = Literal["schedule", "manual", "cli", "demo", "test"]


@task(cache_policy=NO_CACHE)
def snapshot_task(run_dir: str) -> str:
    """Freeze the current patient-grouped split for this run; return the snapshot's path."""
    data = snapshot.load_split_data(get_settings())
    return str(snapshot.save_snapshot(Path(run_dir) / "split.json", data))


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=transient_io, cache_policy=NO_CACHE)
def embed_task(snapshot: str) -> dict[str, Any]:
    """Embed the (image, view) pairs missing from the feature cache."""
    progress = progress_reporter("retrain-embedding", "feature cache: images embedded")
    return embed.embed_step(get_settings(), snapshot.load_snapshot(Path(snapshot)), progress)


@task(cache_policy=NO_CACHE)
def train_task(snapshot: str, flow_run_id: str | None) -> dict[str, Any]:
    """Train the challenger head on cached features and save it as a candidate."""
    progress = epoch_reporter("retrain-training", "head training: epochs")
    return steps.train_step(get_settings(), snapshot.load_snapshot(Path(snapshot)), flow_run_id=flow_run_id,
                            progress=progress)


@task(cache_policy=NO_CACHE)
def evaluate_task(version: int, snapshot: str, flow_run_id: str | None) -> dict[str, Any]:
    """Score one model version on the run's test split."""
    return steps.evaluate_step(get_settings(), version, snapshot.load_snapshot(Path(snapshot)), flow_run_id=flow_run_id)


@task(cache_policy=NO_CACHE)
def decide_task(challenger: dict[str, Any], champion: dict[str, Any] | None, snapshot: str) -> dict[str, Any]:
    """Apply the promotion policy."""
    return steps.decide_step(get_settings(), challenger, champion, snapshot.load_snapshot(Path(snapshot)))


@task(cache_policy=NO_CACHE)
def promote_task(challenger: dict[str, Any], champion: dict[str, Any] | None, decision: dict[str, Any],
                 trigger: str, flow_run_id: str | None) -> dict[str, Any]:
    """Record the decision and, if it says so, switch the champion atomically."""
    return steps.promote_step(get_settings(), challenger=challenger["version"], decision=decision, trigger=trigger,
                              champion_eval=champion, challenger_eval=challenger, flow_run_id=flow_run_id)


@task(cache_policy=NO_CACHE)
def report_task(result: dict[str, Any], run_dir: str) -> str:
    """Write report.md and report.html to disk and publish the report, metrics and registry as artifacts."""
    settings = get_settings()
    path = Path(run_dir) / "report.md"
    result = {**result, "report_path": str(path)}
    result["report_html"] = str(write_run_html(settings, result, Path(run_dir)))
    markdown = retrain_markdown(result)
    from xray_core.io.fsutil import atomic_write_bytes

    atomic_write_bytes(path, markdown.encode())
    snapshot.write_json(Path(run_dir) / "result.json", result)
    create_markdown_artifact(markdown=markdown, key="retrain-report", description="retrain run report")
    if result.get("challenger_eval"):
        create_table_artifact(table=metrics_rows(result["challenger_eval"], result.get("champion_eval")),
                              key="retrain-metrics", description="champion vs challenger, 95% intervals")
    create_table_artifact(table=registry_rows(list_models(settings)), key="model-registry",
                          description="model versions after this run")
    return str(path)


def _run_dir(settings: Settings, run_id: str | None) -> Path:
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = settings.reports_dir / f"{stamp}-{(run_id or 'adhoc')[:8]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@flow(name="retrain", log_prints=False)
def retrain(sources: list[str] | None = None, manifests: list[str] | None = None, incoming: str | None = None,
            use_incoming: bool = True, trigger: Trigger = "manual", wait_seconds: float = 0.0,
            force: bool = False) -> dict[str, Any]:
    """Ingest new data, train a challenger, compare it with the champion on the same test set, decide.

    ``sources``: folders (``<root>/<label>/<image>``) to ingest first; ``manifests``: manifest CSVs;
    ``incoming``: a folder scanned every run (default XRAY_INCOMING when ``use_incoming``). Only one
    retrain runs at a time: a second one waits ``wait_seconds`` and then fails with a clear message.
    When nothing changed since the champion was trained, the run skips training unless ``force``.
    """
    settings = get_settings()
    logger = get_run_logger()
    run_id = flow_run.id
    run_name = flow_run.name
    with lock.retrain_lock(settings, wait_seconds=wait_seconds):
        run_dir = _run_dir(settings, run_id)
        result: dict[str, Any] = {"flow_run_id": run_id, "run_name": run_name, "trigger": trigger,
                                  "backbone_weights": settings.backbone_weights, "ingests": []}
        version = None
        try:
            folder = incoming or (str(settings.incoming_dir) if use_incoming and settings.incoming_dir else None)
            for src in [*(sources or []), *([folder] if folder else [])]:
                result["ingests"].append(ingest_task(src))
            for manifest in manifests or []:
                result["ingests"].append(ingest_task(str(Path(manifest).parent), manifest))
            snapshot = snapshot_task(str(run_dir))
            data = snapshot.load_snapshot(Path(snapshot))
            result["split_counts"] = data.counts()
            result["near_duplicates"] = catalogue_summary(settings)["near_duplicates"]
            skip = None if force else steps.nothing_new_since_champion(settings, data)
            if skip:
                result.update(status="skipped", summary=skip, champion_after=steps.current_champion(settings))
                logger.info(skip)
                result["report"] = report_task(result, str(run_dir))
                return _small(result)
            if settings.embed_dask_workers > 0:
                from flows.embed import run_parallel_embed

                result["embed"] = run_parallel_embed(settings, snapshot)
            else:
                result["embed"] = embed_task(snapshot)
            result["backbone_fingerprint"] = result["embed"]["backbone_fingerprint"]
            result["backbone_random_init"] = result["embed"]["backbone_random_init"]
            trained = train_task(snapshot, run_id)
            version = trained["version"]
            result["train"] = trained
            challenger = evaluate_task(version, snapshot, run_id)
            champion_version = steps.current_champion(settings)
            champion = evaluate_task(champion_version, snapshot, run_id) if champion_version else None
            result["challenger_eval"], result["champion_eval"] = challenger, champion
            decision = decide_task(challenger, champion, snapshot)
            result["decision"] = {k: decision[k] for k in ("decision", "promote", "rationale", "checks")}
            audit = promote_task(challenger, champion, decision, trigger, run_id)
            result["champion_after"] = audit["champion_after"]
            result["status"] = "completed"
            logger.info("decision %s: %s", decision["decision"], decision["rationale"])
        except Exception as exc:
            result["status"] = "failed"
            result["error"] = f"{type(exc).__name__}: {exc}"
            record_decision(settings, challenger=version, decision="failed", trigger=trigger, flow_run_id=run_id,
                            rationale=f"run failed before a decision; champion unchanged. {result['error']}",
                            metrics={})
            report_task(result, str(run_dir))
            raise
        result["report"] = report_task(result, str(run_dir))
        result["summary"] = (f"model v{version}: {result['decision']['decision']}; champion is "
                             f"v{result['champion_after']}" if result.get("champion_after") else
                             f"model v{version}: {result['decision']['decision']}; no champion")
    return _small(result)


def _small(result: dict[str, Any]) -> dict[str, Any]:
    """What the flow returns: the headline numbers, not the full metric dicts (those are in the report)."""
    keep = ("flow_run_id", "status", "summary", "trigger", "ingests", "split_counts", "embed", "champion_after", "report")
    out = {k: result.get(k) for k in keep}
    out["decision"] = result.get("decision")
    out["train"] = {k: result.get("train", {}).get(k) for k in ("version", "threshold", "best_epoch", "epochs_run", "smoke_test")}
    for name in ("challenger_eval", "champion_eval"):
        ev = result.get(name)
        out[name] = None if ev is None else {"version": ev["version"], "test_set_fingerprint": ev["test_set_fingerprint"],
                                             "n_images": ev["n_images"],
                                             **{k: ev["metrics"].get(k) for k in ("accuracy", "balanced_accuracy", "macro_auroc")}}
    return out
