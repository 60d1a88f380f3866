"""The retrain run report: markdown for the Prefect UI and for ``XRAY_HOME/reports/<run>/``.

Pure functions of the run's result dicts, so the report is testable without Prefect.
"""

from __future__ import annotations

from typing import Any

from xray_core.report.terminal import format_interval

KEY_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc", "brier", "ece")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_rows(challenger: dict[str, Any] | None, champion: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows for the metrics table artifact: one per metric, both models side by side, with intervals."""
    rows = []
    for key in KEY_METRICS:
        row: dict[str, Any] = {"metric": key}
        for name, ev in (("challenger", challenger), ("champion", champion)):
            if ev is None:
                row[name] = "-"
                continue
            m = ev["metrics"]
            row[name] = format_interval({"point": m.get(key), **{b: m.get("intervals", {}).get(key, {}).get(b) for b in ("low", "high")}})
        rows.append(row)
    for name, ev in (("challenger", challenger), ("champion", champion)):
        if ev is None:
            continue
        for label, pc in ev["metrics"].get("per_class", {}).items():
            iv = ev["metrics"].get("intervals", {}).get(f"per_class.{label}.sensitivity", {})
            rows.append({"metric": f"sensitivity[{label}] ({name})",
                         name: format_interval({"point": pc.get("sensitivity"), "low": iv.get("low"), "high": iv.get("high")}),
                         "challenger" if name == "champion" else "champion": ""})
    return rows


def _key_numbers(result: dict[str, Any]) -> list[str]:
    """One line each: the decision and both models' macro AUROC with intervals (the headline)."""
    lines = []
    dec = result.get("decision")
    if dec:
        lines.append(f"- Decision: **{dec['decision']}**" + (f"; champion after the run: v{result['champion_after']}"
                                                             if result.get("champion_after") is not None else ""))
    for name in ("challenger_eval", "champion_eval"):
        ev = result.get(name)
        if ev:
            m = ev["metrics"]
            iv = m.get("intervals", {})
            lines.append(f"- {name.split('_')[0]} v{ev['version']}: macro AUROC "
                         f"{format_interval({'point': m.get('macro_auroc'), **iv.get('macro_auroc', {})})}, balanced accuracy "
                         f"{format_interval({'point': m.get('balanced_accuracy'), **iv.get('balanced_accuracy', {})})} "
                         f"on {ev['n_images']} test images")
    if result.get("status") == "failed":
        lines.append("- Status: **failed** (champion unchanged)")
    return ["", *lines] if lines else []


def retrain_markdown(result: dict[str, Any]) -> str:
    """The human report of one retrain run."""
    out = [f"# Retrain run {result.get('run_name') or result.get('flow_run_id') or ''}".rstrip(), ""]
    if result.get("backbone_random_init"):
        out += ["> **Warning: the backbone is random-init** (XRAY_BACKBONE_WEIGHTS=random). Offline/test mode: "
                "metrics show the pipeline works, not that the model is fit for clinical use.", ""]
    out.append(f"Backbone: `{result.get('backbone_weights')}` fingerprint `{(result.get('backbone_fingerprint') or '')[:16]}`")
    out += _key_numbers(result)
    if result.get("report_html"):
        out += ["", f"Full report with ROC curves, confusion matrices, calibration and Grad-CAM heatmaps: "
                f"`{result['report_html']}` (self-contained HTML; open it in a browser)"]
    out += ["", "## Data", ""]
    ingests = result.get("ingests", [])
    if ingests:
        rows = [[i.get("manifest") or i.get("source"), i["added"], i["duplicates"], i["skipped_unchanged"], i["rejected"],
                 ", ".join(f"{k}: {v}" for k, v in sorted(i["rejected_by_reason"].items())) or "-"] for i in ingests]
        out.append(_md_table(["source", "new", "duplicate", "unchanged", "quarantined", "quarantine reasons"], rows))
    else:
        out.append("No new sources this run.")
    counts = result.get("split_counts", {})
    if counts:
        labels = sorted({label for split in counts.values() for label in split})
        out += ["", _md_table(["split"] + labels, [[s] + [counts[s].get(l, 0) for l in labels] for s in counts])]
    nd = result.get("near_duplicates")
    if nd is not None:
        out += ["", f"Near-duplicate pairs across splits (pHash distance ≤ {nd['max_distance']}): **{nd['pairs_across_splits']}**"]
    embed = result.get("embed") or {}
    if embed:
        out += ["", f"Embedding: {embed.get('computed', 0)} new (image, view) pairs, {embed.get('cached', 0)} from the "
                f"feature cache, {embed.get('recomputed_corrupt', 0)} corrupt cache entries recomputed, {embed.get('seconds', 0)} s."]
    ch, champ = result.get("challenger_eval"), result.get("champion_eval")
    out += ["", "## Champion vs challenger (same test set)", ""]
    if ch:
        out.append(f"Test set `{ch['test_set_fingerprint'][:16]}`: {ch['n_images']} images; 95% intervals from a "
                   f"patient-clustered bootstrap ({ch['metrics'].get('bootstrap', {}).get('samples')} resamples).")
        header = ["metric", f"challenger (v{ch['version']})", f"champion (v{champ['version']})" if champ else "champion"]
        out += ["", _md_table(header, [[r["metric"], r.get("challenger", ""), r.get("champion", "")]
                                       for r in metrics_rows(ch, champ)])]
    dec = result.get("decision")
    if dec:
        out += ["", "## Decision", "", f"**{dec['decision']}**", "", dec["rationale"]]
        checks = dec.get("checks") or []
        if checks:
            out += ["", _md_table(["check", "passed", "detail"],
                                  [[c["name"], "yes" if c["passed"] else "no", c["detail"]] for c in checks])]
    if result.get("champion_after") is not None:
        out += ["", f"Champion after this run: **v{result['champion_after']}**"]
    if result.get("status") == "skipped":
        out += ["", "## Skipped", "", result["summary"]]
    if result.get("error"):
        out += ["", "## Failure", "", f"`{result['error']}`", "", "The champion was not changed."]
    if result.get("report_path"):
        out += ["", f"Report on disk: `{result['report_path']}`"]
    return "\n".join(out) + "\n"


def registry_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the ``model-registry`` table artifact: each model's latest numbers with the size,
    fingerprint and date of the test set they were measured on, and a note when that set is older."""
    return [{"version": m["version"], "status": m["status"],
             "macro_auroc": format_interval(m["metrics"].get("macro_auroc")),
             "balanced_accuracy": format_interval(m["metrics"].get("balanced_accuracy")),
             "n_images": m.get("n_images"), "test_set": (m.get("test_set_fingerprint") or "")[:8],
             "scored": (m.get("scored_at") or "")[:10], "note": m.get("note") or "",
             "promoted": (m.get("last_promoted") or {}).get("time", "")[:19]}
            for m in models]
