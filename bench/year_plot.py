"""The PNG timeline of bench/year.py (matplotlib): each champion's true AUROC per site against the night,
the locked reference's, a marker per decision, and run time and disk use per night."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = {"Promoted": ("^", "tab:green"), "Kept": ("o", "tab:gray"), "Blocked": ("x", "tab:red"),
           "Insufficient evidence": ("s", "tab:orange"), "Skipped": (".", "black"), "Failed": ("X", "red")}


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    nights = [r["night"] for r in rows]
    fig, (ax, at, ad) = plt.subplots(3, 1, figsize=(12, 9), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1.3, 1.3]})
    sites = sorted({s for r in rows if r["truth"]["champion"] for s in r["truth"]["champion"]["sites"]})
    for i, site in enumerate(sites):
        colour = f"C{i}"
        for who, style in (("champion", "-"), ("reference", ":")):
            ys = [(r["truth"][who] or {}).get("sites", {}).get(site, {}).get("auroc") for r in rows]
            ax.plot(nights, [float("nan") if y is None else y for y in ys], style, color=colour,
                    label=f"{who} · site {site}", drawstyle="steps-post")
    low = min((r["truth"]["champion"]["sites"][s]["auroc"] for r in rows if r["truth"]["champion"]
               for s in r["truth"]["champion"]["sites"]), default=0.5)
    y0 = max(0.0, low - 0.08)
    for state, (marker, colour) in MARKERS.items():
        xs = [r["night"] for r in rows if r["state"] == state]
        if xs:
            ax.scatter(xs, [y0 + 0.02] * len(xs), marker=marker, color=colour, label=state, zorder=3)
    for r in rows:
        for event in r["events"]:
            if event != "quiet" or "quiet" not in rows[max(r["night"] - 1, 0)]["events"] or r["night"] == 0:
                ax.axvline(r["night"], color="0.8", lw=0.8, zorder=0)
                ax.text(r["night"], 1.0, event.split(":")[0], rotation=90, va="top", ha="right", fontsize=7)
    ax.set_ylim(y0, 1.01)
    ax.set_ylabel("true AUROC (truth pool)")
    ax.set_title(f"A simulated year: {out['nights']} weekly nights at {out['size']} px "
                 f"(reference margin {out['margin']})")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    parts = ("ingest", "embed", "rest")
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [r["seconds"][part] for r in rows]
        at.bar(nights, vals, bottom=bottom, label=part, width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals)]
    at.set_ylabel("run seconds")
    at.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    folders = sorted({k for r in rows for k in r["disk"]})
    bottom = [0.0] * len(rows)
    for folder in folders:
        vals = [r["disk"].get(folder, 0) / 1e6 for r in rows]
        if max(vals) > 0:
            ad.bar(nights, vals, bottom=bottom, label=folder, width=0.8)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ad.set_ylabel("XRAY_HOME MB")
    ad.set_xlabel("night")
    ad.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
