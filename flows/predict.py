"""The predict flow: a folder of films → a CSV of predictions from the champion (or a given version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from flows.common import progress_reporter, refused
from xray_core.errors import PathRefusedError
from xray_core.io.allowed_roots import confine_parameters
from xray_core.io.fsutil import json_safe, utf8_safe
from xray_core.monitor.performance import estimate_line
from xray_core.pipeline.predict import predict_folder
from xray_core.report.format import cut_words
from xray_core.report.terminal import predict_markdown
from xray_core.settings import get_settings


@task(cache_policy=NO_CACHE)
def predict_task(path: str, out: str | None, manifest: str | None, version: int | None,
                 heatmaps: str | None = None) -> dict[str, Any]:
    """Predict every file below ``path`` and write the CSV (and Grad-CAM overlays to ``heatmaps``)."""
    progress = progress_reporter("predict-progress", f"predict {path}")
    return predict_folder(get_settings(), Path(path), out=Path(out) if out else None,
                          manifest=Path(manifest) if manifest else None, version=version, progress=progress,
                          heatmaps=Path(heatmaps) if heatmaps else None)


@flow(name="predict")
def predict(path: str, out: str | None = None, manifest: str | None = None, version: int | None = None,
            heatmaps: str | None = None) -> dict[str, Any] | State:
    """Predict a folder; ``out`` defaults to XRAY_HOME/predictions/<folder name>.csv; ``heatmaps``: a
    folder for one Grad-CAM overlay PNG per predicted image (none when unset). ``path`` and ``manifest``
    must be inside the allowed roots, ``out`` and ``heatmaps`` under XRAY_HOME/predictions (see
    SECURITY.md); otherwise the run ends ``Refused`` before anything is read or written."""
    try:
        paths = confine_parameters(get_settings(), read={"path": path, "manifest": manifest},
                                   write={"out": out, "heatmaps": heatmaps})
    except PathRefusedError as exc:
        return refused(exc)  # the run's final state, not a result
    path, manifest, out, heatmaps = paths["path"], paths["manifest"], paths["out"], paths["heatmaps"]
    if out is None:
        out = str(get_settings().home / "predictions" / f"{Path(path).name or 'batch'}.csv")
    result = predict_task(path, out, manifest, version, heatmaps)
    rows = result.pop("rows")
    # json_safe/utf8_safe: a CSV or heatmap path whose name is not UTF-8 reaches the server as \xNN.
    create_table_artifact(table=json_safe(rows[:200]), key="predictions",
                          description=utf8_safe(f"first 200 rows of {out}"))
    create_markdown_artifact(markdown=utf8_safe(predict_markdown(result, out, heatmaps)),
                             key="predict-summary", description="batch prediction summary")
    if result.get("drift"):
        create_markdown_artifact(markdown=utf8_safe(drift_markdown(result["drift"], out)), key="drift-report",
                                 description=cut_words(result["drift"]["verdict"], 250))
    return result


def drift_markdown(check: dict[str, Any], subject: str) -> str:
    """The predict batch's drift check as a short markdown note (same key as the monitor's report)."""
    lines = [f"# Drift check: predict batch `{subject}`", "",
             f"**{check['verdict']}**", "", check["ood_line"]]
    if "mmd_p" in check:
        lines += ["", "| test | statistic | p |", "|---|---|---|",
                  f"| MMD on embeddings (input shift) | {check['mmd']:.4g} | {check['mmd_p']:.3g} |",
                  f"| KS on predicted probabilities (output shift) | {check['ks']:.3g} | "
                  f"{check['ks_p']:.3g} |",
                  f"| excess of out-of-distribution films (beta-binomial) | {check['ood_flagged']} of "
                  f"{check['n']} | {check['ood_p']:.3g} |", "",
                  f"Estimated prevalence (BBSE): {check['prevalence']}"]
    if check.get("performance"):
        lines += ["", f"Performance before labels (CBPE): {estimate_line(check['performance'])}"]
    lines += ["", "A drift warning is evidence that the inputs changed, not proof that performance fell."]
    return "\n".join(lines)
