"""``report.html`` of a retrain run: one self-contained file (inline CSS, figures and heatmaps as base64
PNG data URIs) that opens anywhere, also after it is mailed or archived.

Sections: summary (key numbers, decision), decision and rationale, data, metrics with 95% intervals,
per-class metrics with intervals, ROC curves of champion and challenger on the same test set,
confusion matrices, reliability diagram, example test images with Grad-CAM overlays, and the failure
(if the run failed: then there are no curves, but the report still renders).

Plots use ``matplotlib.figure.Figure`` directly, without pyplot: no global backend or figure state,
safe in worker threads. Rendering is a pure function of the run's result and :class:`ReportData`.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from xray_core.report.terminal import format_interval
from xray_core.report.markdown import KEY_METRICS
from xray_core.report.data import ModelCurves, ReportData
from xray_core.settings import Settings

PER_CLASS_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc")
_COLOURS = {"challenger": "#d62728", "champion": "#1f77b4"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.warning { background: #fff3cd; border: 1px solid #e0c36b; padding: .6em 1em; }
.failure { background: #fde2e1; border: 1px solid #e39a97; padding: .6em 1em; }
.decision { font-size: 1.25em; font-weight: 600; }
.note { color: #666; font-size: .9em; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img.heatmap { width: 256px; image-rendering: auto; border: 1px solid #999; }
figcaption { font-size: .85em; color: #444; max-width: 256px; }
img.plot { max-width: 100%; }
"""


# --------------------------------------------------------------------------- small HTML helpers


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str, css: str = "plot") -> str:
    return f'<img class="{css}" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- figures


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _roc_classes(curves: Sequence[ModelCurves], negative_label: str) -> list[str]:
    """Binary: the disease class only (the other curve is its mirror); more classes: each one-vs-rest."""
    labels = curves[0].labels
    if len(labels) == 2:
        return [l for l in labels if l != negative_label][:1] or labels[1:]
    return list(labels)


def roc_png(curves: Sequence[ModelCurves], *, negative_label: str = "normal") -> bytes:
    from matplotlib.figure import Figure

    classes = _roc_classes(curves, negative_label)
    fig = Figure(figsize=(4.2 * len(classes), 4.0), layout="constrained")
    axes = fig.subplots(1, len(classes), squeeze=False)[0]
    for ax, label in zip(axes, classes):
        ax.plot([0, 1], [0, 1], linestyle=":", color="#888", linewidth=1, label="chance")
        for c in curves:
            r = c.roc.get(label)
            if r is None:
                continue
            ax.plot(r["fpr"], r["tpr"], color=_COLOURS.get(c.role), linewidth=2, alpha=0.85,
                    label=f"{c.role} v{c.version} (AUROC {r['auroc']:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity (false-positive rate)",
               ylabel="sensitivity (true-positive rate)", title=f"ROC: {label} vs rest (n={curves[0].n})")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def confusion_png(evals: Sequence[tuple[str, dict[str, Any]]]) -> bytes:
    """One matrix per model: rows = true label, columns = predicted label, counts (and row share)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(evals), 3.9), layout="constrained")
    axes = fig.subplots(1, len(evals), squeeze=False)[0]
    for ax, (role, ev) in zip(axes, evals):
        m = ev["metrics"]
        cm, labels = m["confusion_matrix"], m["labels"]
        totals = [max(sum(row), 1) for row in cm]
        ax.imshow([[v / t for v in row] for row, t in zip(cm, totals)], cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                share = v / totals[i]
                ax.text(j, i, f"{v}\n{share:.0%}", ha="center", va="center",
                        color="white" if share > 0.6 else "black", fontsize=10)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        threshold = f" (threshold {m['threshold']:.3f})" if m.get("threshold") is not None else ""
        ax.set(xlabel="predicted", ylabel="true", title=f"{role} v{ev['version']}{threshold}")
    return _png(fig)


def reliability_png(curves: Sequence[ModelCurves]) -> bytes:
    """Accuracy vs mean confidence of the argmax prediction per confidence bin, with bin counts below."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle=":", color="#888", linewidth=1, label="perfectly calibrated")
    width = 1.0 / len(curves[0].reliability) / (len(curves) + 1)
    for k, c in enumerate(curves):
        pts = [(b["confidence"], b["accuracy"]) for b in c.reliability if b["count"]]
        colour = _COLOURS.get(c.role)
        if pts:
            top.plot(*zip(*pts), marker="o", color=colour, linewidth=1.5, label=f"{c.role} v{c.version}")
        bottom.bar([b["lo"] + (k + 0.5) * width for b in c.reliability], [b["count"] for b in c.reliability],
                   width=width, color=colour, align="edge")
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy in bin",
            title="Reliability (argmax confidence, 10 equal-width bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="mean confidence in bin", ylabel="images")
    return _png(fig)


# --------------------------------------------------------------------------- sections


def _summary(result: dict[str, Any]) -> str:
    ch, champ, dec = result.get("challenger_eval"), result.get("champion_eval"), result.get("decision")
    items = [f"<li>Status: <strong>{_e(result.get('status') or 'unknown')}</strong></li>"]
    if dec:
        items.append(f"<li>Decision: <strong>{_e(dec['decision'])}</strong></li>")
    for role, ev in (("challenger", ch), ("champion", champ)):
        if ev:
            m = ev["metrics"]
            iv = m.get("intervals", {})
            items.append(f"<li>{role} v{_e(ev['version'])}: macro AUROC "
                         f"{_e(format_interval({'point': m.get('macro_auroc'), **iv.get('macro_auroc', {})}))}, balanced accuracy "
                         f"{_e(format_interval({'point': m.get('balanced_accuracy'), **iv.get('balanced_accuracy', {})}))}</li>")
    if ch:
        items.append(f"<li>Test set <code>{_e(ch['test_set_fingerprint'][:16])}</code>: {_e(ch['n_images'])} images "
                     "(both models scored on the same images)</li>")
    if result.get("champion_after") is not None:
        items.append(f"<li>Champion after this run: <strong>v{_e(result['champion_after'])}</strong></li>")
    items.append(f"<li>Backbone: <code>{_e(result.get('backbone_weights'))}</code>, fingerprint "
                 f"<code>{_e((result.get('backbone_fingerprint') or '')[:16])}</code></li>")
    warn = ""
    if result.get("backbone_random_init"):
        warn = ('<p class="warning"><strong>Warning: the backbone is random-init</strong> '
                "(XRAY_BACKBONE_WEIGHTS=random). Offline/test mode: the numbers show the pipeline works, "
                "not that the model is fit for clinical use; heatmaps are meaningless.</p>")
    return _section("summary", "Summary", warn + "<ul>" + "".join(items) + "</ul>")


def _decision(result: dict[str, Any]) -> str:
    dec = result.get("decision")
    if not dec:
        return _section("decision", "Decision", "<p>No decision: the run did not get that far.</p>")
    body = f'<p class="decision">{_e(dec["decision"])}</p><p>{_e(dec["rationale"])}</p>'
    if dec.get("checks"):
        body += _table(["check", "passed", "detail"],
                       [[c["name"], "yes" if c["passed"] else "no", c["detail"]] for c in dec["checks"]])
    return _section("decision", "Decision and rationale", body)


def _data(result: dict[str, Any]) -> str:
    parts = []
    ingests = result.get("ingests") or []
    if ingests:
        parts.append(_table(["source", "new", "duplicate", "unchanged", "quarantined", "quarantine reasons"],
                            [[i.get("manifest") or i.get("source"), i.get("added"), i.get("duplicates"),
                              i.get("skipped_unchanged"), i.get("rejected"),
                              ", ".join(f"{k}: {v}" for k, v in sorted((i.get("rejected_by_reason") or {}).items())) or "-"]
                             for i in ingests]))
    else:
        parts.append("<p>No new sources this run.</p>")
    counts = result.get("split_counts") or {}
    if counts:
        labels = sorted({label for split in counts.values() for label in split})
        parts.append(_table(["split", *labels, "total"],
                            [[s, *[counts[s].get(l, 0) for l in labels], sum(counts[s].values())] for s in counts]))
    nd = result.get("near_duplicates")
    if nd is not None:
        parts.append(f"<p>Near-duplicate pairs across splits (pHash distance &le; {_e(nd['max_distance'])}): "
                     f"<strong>{_e(nd['pairs_across_splits'])}</strong></p>")
    embed = result.get("embed") or {}
    if embed:
        parts.append(f"<p>Embedding: {_e(embed.get('computed', 0))} new (image, view) pairs, "
                     f"{_e(embed.get('cached', 0))} from the feature cache, "
                     f"{_e(embed.get('recomputed_corrupt', 0))} corrupt cache entries recomputed, "
                     f"{_e(embed.get('seconds', 0))} s.</p>")
    return _section("data", "Data", "".join(parts))


def _evals(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(role, result[key]) for role, key in (("challenger", "challenger_eval"), ("champion", "champion_eval"))
            if result.get(key)]


def _metrics(result: dict[str, Any]) -> str:
    evals = _evals(result)
    if not evals:
        return ""
    ch = evals[0][1]
    boot = ch["metrics"].get("bootstrap", {})
    rows = []
    for key in KEY_METRICS + ("sensitivity_at_specificity",):
        row = [key]
        for _, ev in evals:
            m = ev["metrics"]
            row.append(format_interval({"point": m.get(key), **m.get("intervals", {}).get(key, {})}))
        rows.append(row)
    body = (f"<p>95% intervals from a patient-clustered bootstrap ({_e(boot.get('samples'))} resamples over "
            f"{_e(boot.get('patients'))} patients). Brier and ECE: lower is better.</p>"
            + _table(["metric", *[f"{role} v{ev['version']}" for role, ev in evals]], rows))
    return _section("metrics", "Champion vs challenger on the same test set", body)


def _per_class(result: dict[str, Any]) -> str:
    evals = _evals(result)
    if not evals:
        return ""
    parts = []
    for role, ev in evals:
        m = ev["metrics"]
        iv = m.get("intervals", {})
        rows = []
        for label, pc in m.get("per_class", {}).items():
            rows.append([label, pc.get("support"),
                         *[format_interval({"point": pc.get(k), **iv.get(f"per_class.{label}.{k}", {})}) for k in PER_CLASS_METRICS]])
        parts.append(f"<h3>{_e(role)} v{_e(ev['version'])}</h3>"
                     + _table(["class", "test images", *PER_CLASS_METRICS], rows))
    return _section("per-class", "Per-class metrics (95% intervals)", "".join(parts))


def _figures(result: dict[str, Any], data: ReportData | None, negative_label: str) -> str:
    out = []
    if data is not None and data.curves:
        out.append(_section("roc", "ROC curves (same test set)",
                            _img(roc_png(data.curves, negative_label=negative_label), "ROC curves")))
    evals = _evals(result)
    if evals:
        out.append(_section("confusion", "Confusion matrices",
                            "<p>Rows: true label; columns: predicted label at each model's operating point.</p>"
                            + _img(confusion_png(evals), "confusion matrices")))
    if data is not None and data.curves:
        eces = ", ".join(f"{role} v{ev['version']} {_num(ev['metrics'].get('ece'))}" for role, ev in evals)
        out.append(_section("calibration", "Reliability (calibration) diagram",
                            (f"<p>Expected calibration error: {_e(eces)}.</p>" if eces else "")
                            + _img(reliability_png(data.curves), "reliability diagram")))
    if data is not None and data.examples:
        figs = "".join(
            f"<figure>{_img(x.png, f'Grad-CAM of test image {x.sha256[:12]}', 'heatmap')}<figcaption>true "
            f"<strong>{_e(x.true_label)}</strong>, predicted <strong>{_e(x.predicted_label)}</strong> "
            f"{x.probability:.2f} (v{x.version}); image <code>{_e(x.sha256[:12])}</code></figcaption></figure>"
            for x in data.examples)
        out.append(_section("heatmaps", "Test images with Grad-CAM heatmaps",
                            "<p>The challenger's Grad-CAM of its predicted class: where the backbone features "
                            "that drove that logit came from. Coarse (the feature map is input/32 pixels wide) "
                            "and not a diagnosis; meaningless with a random-init backbone.</p>" + figs))
    return "".join(out)


def render_html(result: dict[str, Any], data: ReportData | None, *, negative_label: str = "normal",
                notes: Sequence[str] = ()) -> str:
    """The whole report as one HTML document (no external resources)."""
    title = f"Retrain run {result.get('run_name') or result.get('flow_run_id') or ''}".strip()
    all_notes = [*notes, *(data.notes if data else [])]
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="note">Generated {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}'
            + (f"; trigger {_e(result.get('trigger'))}" if result.get("trigger") else "")
            + (f"; flow run <code>{_e(result.get('flow_run_id'))}</code>" if result.get("flow_run_id") else "")
            + "</p>",
            _summary(result), _decision(result), _data(result), _metrics(result), _per_class(result),
            _figures(result, data, negative_label)]
    if all_notes:
        body.append("".join(f'<p class="note">{_e(n)}</p>' for n in all_notes))
    if result.get("error"):
        body.append(_section("failure", "Failure",
                             f'<p class="failure"><code>{_e(result["error"])}</code></p>'
                             "<p>The champion was not changed.</p>"))
    if result.get("report_path"):
        body.append(f'<p class="note">Markdown report: <code>{_e(result["report_path"])}</code></p>')
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>\n")


def write_run_html(settings: Settings, result: dict[str, Any], run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` for a retrain run (completed or failed) and return its path.

    Curves and heatmaps need the run's frozen split (``run_dir/split.json``) and the challenger's
    evaluation; without them (a run that failed early) the report has the other sections only.
    If computing them fails, the report says why instead: a report must not fail a finished run.
    """
    from xray_core.errors import XrayError
    from xray_core.io.fsutil import atomic_write_bytes
    from xray_core.report.data import collect_report_data
    from xray_core.pipeline.snapshot import load_snapshot

    run_dir = Path(run_dir)
    snapshot = run_dir / "split.json"
    data, notes = None, []
    challenger, champion = result.get("challenger_eval"), result.get("champion_eval")
    if challenger and snapshot.is_file():
        try:
            data = collect_report_data(settings, load_snapshot(snapshot), challenger=challenger, champion=champion)
        except (XrayError, OSError, ValueError, RuntimeError) as exc:
            notes.append(f"Curves and heatmaps unavailable: {type(exc).__name__}: {exc}")
    elif result.get("status") == "failed":
        notes.append("The run failed before both models were evaluated: no curves or heatmaps.")
    path = run_dir / "report.html"
    atomic_write_bytes(path, render_html(result, data, negative_label=settings.negative_label, notes=notes).encode())
    return path


__all__ = ["render_html", "write_run_html", "roc_png", "confusion_png", "reliability_png"]
