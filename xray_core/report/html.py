"""``report.html`` of a retrain run: one self-contained file (inline CSS, figures and heatmaps as base64
data URIs) that opens anywhere, also after it is mailed or archived, and stays small (at most 2 MB).

Sections, each only when it has content: summary (the decision first, key numbers, backbone, the
random-init warning), decision and rationale, the shortcut audit, data, metrics with 95% intervals,
per-class metrics with intervals, tables by site and by view, ROC curves of champion and challenger
on the same test set (pooled, and one panel per site when there are two sites or more), confusion
matrices, reliability diagram, label history, example test images with Grad-CAM overlays, and the
failure.

Layout lives in ``templates/report.html.j2`` (Jinja2, autoescaped); this module builds its context:
numbers formatted, figures drawn and encoded. Grad-CAM overlays come at film resolution (a 3000 px
radiograph gives a ~5 MB PNG) but are shown 260 px wide, so each is embedded downscaled to
:data:`HEATMAP_EMBED_PX` as JPEG, and :func:`write_run_html` writes the full-size PNG beside the
report (``heatmaps/<sha256[:12]>.png``) with a link from the thumbnail.

Plots use ``matplotlib.figure.Figure`` directly, without pyplot: no global backend or figure state,
safe in worker threads. Rendering is a pure function of the run's :class:`~xray_core.results.RunResult`
and :class:`ReportData`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xray_core.report.data import ModelCurves, ReportData, SiteCurves
from xray_core.report.format import format_interval
from xray_core.report.markdown import KEY_METRICS, evaluations, interval, render_template, report_context
from xray_core.results import Evaluation, ReportFiles, RunResult
from xray_core.settings import Settings, setting_default

NEGATIVE_LABEL: str = setting_default("negative_label")  # XRAY_NEGATIVE_LABEL's default

PER_CLASS_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc")
_COLOURS = {"challenger": "#d62728", "champion": "#1f77b4"}
HEATMAP_DISPLAY_PX = 260  # CSS width of a heatmap thumbnail in the report
HEATMAP_EMBED_PX = 2 * HEATMAP_DISPLAY_PX  # longest side embedded: sharp on 2x (retina) screens
HEATMAP_JPEG_QUALITY = 85  # overlays are photographic: JPEG at 85 is ~10x smaller than PNG, no visible loss
HEATMAPS_DIR = "heatmaps"  # full-size overlays, beside report.html
SITE_PANELS_MAX = 12  # per-site ROC panels drawn (largest sites first); the tables list every site
SITE_PANELS_PER_ROW = 4

def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- figures


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _roc_classes(curves: Sequence[ModelCurves] | Sequence[SiteCurves], negative_label: str) -> list[str]:
    """Binary: the disease class only (the other curve is its mirror); more classes: each one-vs-rest."""
    labels = curves[0].labels
    if len(labels) == 2:
        return [label for label in labels if label != negative_label][:1] or labels[1:]
    return list(labels)


def roc_png(curves: Sequence[ModelCurves], *, negative_label: str = NEGATIVE_LABEL) -> bytes:
    """One panel per class, both models in each; every curve's legend names the images it was drawn
    from (a champion that lacks a label is scored on fewer test images than the challenger)."""
    from matplotlib.figure import Figure

    classes = _roc_classes(curves, negative_label)
    sizes = {c.n for c in curves}
    shared = f" (n={curves[0].n})" if len(sizes) == 1 else ""
    fig = Figure(figsize=(4.2 * len(classes), 4.0), layout="constrained")
    axes = fig.subplots(1, len(classes), squeeze=False)[0]
    for ax, label in zip(axes, classes):
        ax.plot([0, 1], [0, 1], linestyle=":", color="#888", linewidth=1, label="chance")
        for c in curves:
            r = c.roc.get(label)
            if r is None:
                continue
            ax.plot(r["fpr"], r["tpr"], color=_COLOURS.get(c.role), linewidth=2, alpha=0.85,
                    label=f"{c.role} v{c.version} (AUROC {r['auroc']:.3f}, n={c.n})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity (false-positive rate)",
               ylabel="sensitivity (true-positive rate)", title=f"ROC: {label} vs rest{shared}")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def site_roc_png(site_curves: Sequence[SiteCurves], *, negative_label: str = NEGATIVE_LABEL) -> bytes:
    """One panel per site, both models in each: where pooled curves hide a collapse, a panel shows it.

    Binary: the disease class; more classes: each one-vs-rest, told apart by line style. A site whose
    test images hold one class only has no curve; its panel says so instead of staying blank.
    """
    from matplotlib.figure import Figure

    sites = sorted({c.site for c in site_curves})
    classes = _roc_classes(site_curves, negative_label)
    cols = min(SITE_PANELS_PER_ROW, len(sites))
    rows = -(-len(sites) // cols)
    fig = Figure(figsize=(3.3 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    styles = ("-", "--", "-.", ":")
    for ax, site in zip(axes, sites):
        here = [c for c in site_curves if c.site == site]
        ax.plot([0, 1], [0, 1], linestyle=":", color="#888", linewidth=1)
        drawn = 0
        for c in here:
            for k, label in enumerate(classes):
                r = c.roc.get(label)
                if r is None:
                    continue
                name = f"{c.role} v{c.version}" + (f" {label}" if len(classes) > 1 else "")
                ax.plot(r["fpr"], r["tpr"], color=_COLOURS.get(c.role), linestyle=styles[k % len(styles)],
                        linewidth=2, alpha=0.85, label=f"{name} ({r['auroc']:.2f}, n={c.n})")
                drawn += 1
        counts = ", ".join(f"{label} {n}" for label, n in here[0].counts.items())
        sizes = {c.n for c in here}
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{site} (n={here[0].n})" if len(sizes) == 1 else site,
               xlabel="1 - specificity",
               ylabel="sensitivity")
        ax.title.set_fontsize(10)
        ax.set_aspect("equal")
        if drawn:
            ax.legend(loc="lower right", fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no curve: {counts}", ha="center", va="center", fontsize=8, wrap=True)
    for ax in axes[len(sites):]:
        ax.set_axis_off()
    return _png(fig)


def _site_panels(site_curves: Sequence[SiteCurves]) -> tuple[list[SiteCurves], list[str]]:
    """The curves to draw (the :data:`SITE_PANELS_MAX` largest sites) and a note when some were left out."""
    sizes: dict[str, int] = {}
    for c in site_curves:
        sizes[c.site] = max(sizes.get(c.site, 0), c.n)
    if len(sizes) < 2:  # one site: its panel would repeat the pooled figure
        return [], []
    keep = set(sorted(sizes, key=lambda s: (-sizes[s], s))[:SITE_PANELS_MAX])
    notes = ([f"Per-site ROC: the {SITE_PANELS_MAX} largest of {len(sizes)} sites are drawn; the by-site "
              "table lists them all."] if len(sizes) > SITE_PANELS_MAX else [])
    return [c for c in site_curves if c.site in keep], notes


def confusion_png(evals: Sequence[tuple[str, Evaluation]]) -> bytes:
    """One matrix per model: rows = true label, columns = predicted label, counts (and row share)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(evals), 3.9), layout="constrained")
    axes = fig.subplots(1, len(evals), squeeze=False)[0]
    for ax, (role, ev) in zip(axes, evals):
        m = ev.metrics
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
        ax.set(xlabel="predicted", ylabel="true", title=f"{role} v{ev.version}{threshold}")
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


# --------------------------------------------------------------------------- images


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def embeddable_heatmap(png: bytes, *, max_side: int = HEATMAP_EMBED_PX) -> bytes:
    """A Grad-CAM overlay at display size: longest side at most ``max_side`` (never enlarged), JPEG.

    The full-size PNG is what a reader opens to look closely; the report only needs a thumbnail,
    and four full-resolution films would make report.html tens of megabytes.
    """
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        img = opened.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=HEATMAP_JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def heatmap_file_name(sha256: str) -> str:
    return f"{sha256[:12]}.png"


# --------------------------------------------------------------------------- the context


def _metric_table(evals: list[tuple[str, Evaluation]]) -> dict[str, Any]:
    return {"headers": ["metric", *[f"{role} v{ev.version} (n={ev.n_images})" for role, ev in evals]],
            "rows": [[key, *[interval(ev.metrics, key) for _, ev in evals]]
                     for key in KEY_METRICS + ("sensitivity_at_specificity",)]}


def _per_class_tables(evals: list[tuple[str, Evaluation]]) -> list[dict[str, Any]]:
    out = []
    for role, ev in evals:
        m = ev.metrics
        iv = m.get("intervals", {})
        rows = [[label, pc.get("support"),
                 *[format_interval({"point": pc.get(k), **iv.get(f"per_class.{label}.{k}", {})})
                   for k in PER_CLASS_METRICS]]
                for label, pc in m.get("per_class", {}).items()]
        out.append({"title": f"{role} v{ev.version}", "headers": ["class", "test images", *PER_CLASS_METRICS],
                    "rows": rows})
    return out


def _figures(run: RunResult, data: ReportData | None, negative_label: str,
             heatmap_links: Mapping[str, str]) -> dict[str, Any]:
    """Figures as data URIs (None when there is nothing to draw) and the heatmap thumbnails."""
    evals = evaluations(run)
    curves = data.curves if data is not None else []
    panels, _ = _site_panels(data.site_curves if data is not None else [])
    eces = ", ".join(f"{role} v{ev.version} {_num(ev.metrics.get('ece'))}" for role, ev in evals)
    return {
        "roc": data_uri(roc_png(curves, negative_label=negative_label)) if curves else None,
        "site_roc": data_uri(site_roc_png(panels, negative_label=negative_label)) if panels else None,
        "site_roc_sites": len({c.site for c in panels}),
        "confusion": data_uri(confusion_png(evals)) if evals else None,
        "reliability": data_uri(reliability_png(curves)) if curves else None,
        "eces": eces,
        "heatmaps": [{"src": data_uri(embeddable_heatmap(x.png), "image/jpeg"), "sha": x.sha256[:12],
                      "alt": f"Grad-CAM of test image {x.sha256[:12]}", "true_label": x.true_label,
                      "predicted_label": x.predicted_label, "probability": f"{x.probability:.3f}",
                      "version": x.version, "href": heatmap_links.get(x.sha256),
                      "ood": x.out_of_distribution,
                      "ood_p": None if x.ood_p is None else f"{x.ood_p:.3f}"}
                     for x in (data.examples if data is not None else [])],
    }


def html_contents(context: dict[str, Any]) -> list[str]:
    """What a rendered report shows beyond its summary, in words (for the markdown's link to it)."""
    fig = context["figures"]
    out = ["the shortcut audit"] if context["audit"] else []
    out += ["metrics with 95% intervals", "per-class metrics"] if context["metric_table"] else []
    out += [f"tables {s['title'].lower()}" for s in context["slice_sections"]]
    out += ["label history"] if context["label_history"] else []
    out += [name for name, present in (("ROC curves", fig["roc"]), ("per-site ROC curves", fig["site_roc"]),
                                       ("confusion matrices", fig["confusion"]),
                                       ("a reliability diagram", fig["reliability"]),
                                       ("Grad-CAM heatmaps", fig["heatmaps"])) if present]
    return out


def html_context(run: RunResult, data: ReportData | None, *, negative_label: str = NEGATIVE_LABEL,
                 notes: Sequence[str] = (), heatmap_links: Mapping[str, str] | None = None,
                 files: ReportFiles | None = None) -> dict[str, Any]:
    evals = evaluations(run)
    context = report_context(run, files)
    context.update(
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        metric_table=_metric_table(evals) if evals else None,
        per_class=_per_class_tables(evals),
        figures=_figures(run, data, negative_label, heatmap_links or {}),
        notes=[*notes, *(data.notes if data else []), *_site_panels(data.site_curves if data else [])[1]],
        heatmap_display_px=HEATMAP_DISPLAY_PX,
    )
    return context


def render_html(run: RunResult, data: ReportData | None, *, negative_label: str = NEGATIVE_LABEL,
                notes: Sequence[str] = (), heatmap_links: Mapping[str, str] | None = None,
                files: ReportFiles | None = None) -> str:
    """The whole report as one HTML document (no external resources; links to full-size heatmaps
    only for the shas in ``heatmap_links``, sha256 -> href relative to the report)."""
    context = html_context(run, data, negative_label=negative_label, notes=notes, heatmap_links=heatmap_links,
                           files=files)
    return render_template("report.html.j2", context)


def write_run_html(settings: Settings, run: RunResult, run_dir: Path,
                   files: ReportFiles | None = None) -> tuple[Path, list[str]]:
    """Write ``run_dir/report.html`` for a retrain run (completed, skipped or failed); return its path
    and what it shows beyond the summary (:func:`html_contents`: the markdown report links to it
    promising only that).

    Curves and heatmaps need the run's frozen split (``run_dir/split.json``) and the challenger's
    evaluation; without them (a run that failed early) the report has the other sections only.
    If computing them fails, the report says why instead: a report must not fail a finished run.
    Full-size heatmaps go to ``run_dir/heatmaps/``; every file gets ``settings.file_mode``.
    ``files``: where the other report files are, for the report to name them.
    """
    from xray_core.data.snapshot import load_snapshot
    from xray_core.errors import XrayError
    from xray_core.io.fsutil import atomic_write_bytes, atomic_write_text
    from xray_core.report.data import collect_report_data

    run_dir = Path(run_dir)
    snapshot = run_dir / "split.json"
    data, notes = None, []
    challenger, champion = run.challenger_eval, run.champion_eval
    if challenger is not None and snapshot.is_file():
        try:
            data = collect_report_data(settings, load_snapshot(snapshot),
                                       challenger=challenger, champion=champion)
        except (XrayError, OSError, ValueError, RuntimeError) as exc:
            notes.append(f"Curves and heatmaps unavailable: {type(exc).__name__}: {exc}")
    elif run.status == "failed":
        notes.append("The run failed before both models were evaluated: no curves or heatmaps.")
    links = {}
    for x in data.examples if data is not None else []:
        name = heatmap_file_name(x.sha256)
        atomic_write_bytes(run_dir / HEATMAPS_DIR / name, x.png, mode=settings.file_mode)
        links[x.sha256] = f"{HEATMAPS_DIR}/{name}"
    context = html_context(run, data, negative_label=settings.negative_label, notes=notes,
                           heatmap_links=links, files=files)
    path = run_dir / "report.html"
    atomic_write_text(path, render_template("report.html.j2", context), mode=settings.file_mode)
    return path, html_contents(context)


__all__ = ["render_html", "write_run_html", "html_context", "embeddable_heatmap", "roc_png", "site_roc_png",
           "confusion_png", "reliability_png", "HEATMAP_EMBED_PX"]
