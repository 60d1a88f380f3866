"""One whole retrain: the recipe, run by an executor (direct calls or Prefect tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xray_core.pipeline.embed import embed_step
from xray_core.faults import crash_point
from xray_core.pipeline.lock import retrain_lock
from xray_core.pipeline.snapshot import load_split_data
from xray_core.pipeline.steps import (current_champion, decide_step, evaluate_step, nothing_new_since_champion,
                                      promote_step, summary_metrics, train_step)
from xray_core.settings import Settings


def run_cycle(settings: Settings, *, sources: list[str] | tuple[str, ...] = (),
              manifests: list[str] | tuple[str, ...] = (), trigger: str = "cli",
              wait_seconds: float = 0.0, force: bool = False) -> dict[str, Any]:
    """One whole retrain without Prefect (``xray retrain --local``, crash tests): the flow's recipe.

    The Prefect flow (``flows/retrain.py``) runs the same steps as tasks, with artifacts.
    """
    from xray_core.data.ingest import ingest_source
    from xray_core.registry.versions import record_decision

    with retrain_lock(settings, wait_seconds=wait_seconds):
        result: dict[str, Any] = {"trigger": trigger, "ingests": []}
        version = None
        try:
            for src in sources:
                result["ingests"].append(ingest_source(Path(src), settings=settings).as_dict())
            for manifest in manifests:
                result["ingests"].append(
                    ingest_source(Path(manifest).parent, manifest=Path(manifest), settings=settings).as_dict())
            data = load_split_data(settings)
            skip = None if force else nothing_new_since_champion(settings, data)
            if skip:
                return {**result, "status": "skipped", "summary": skip, "champion_after": current_champion(settings)}
            result["embed"] = embed_step(settings, data)
            trained = train_step(settings, data)
            version = result["version"] = trained["version"]
            crash_point("retrain.after_train")
            challenger = evaluate_step(settings, version, data)
            crash_point("retrain.after_evaluate")
            champion_version = current_champion(settings)
            champion = evaluate_step(settings, champion_version, data) if champion_version else None
            decision = decide_step(settings, challenger, champion, data)
            audit = promote_step(settings, challenger=version, decision=decision, trigger=trigger,
                                 champion_eval=champion, challenger_eval=challenger)
        except Exception as exc:
            record_decision(settings, challenger=version, decision="failed", trigger=trigger, metrics={},
                            rationale=f"run failed before a decision; champion unchanged. {type(exc).__name__}: {exc}")
            raise
        result.update(status="completed", decision={k: decision[k] for k in ("decision", "promote", "rationale")},
                      champion_after=audit["champion_after"],
                      challenger=summary_metrics(challenger), champion=summary_metrics(champion) if champion else None)
        return result
