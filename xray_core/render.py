"""Plain-text tables for the terminal. ``--json`` output never goes through here."""

from __future__ import annotations

from typing import Any, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_ingest(s: dict[str, Any]) -> str:
    out = [f"source {s['source_id']}: {s['manifest'] or s['source']}",
           f"  files {s['files']}: added {s['added']}, duplicates {s['duplicates']}, "
           f"unchanged (skipped) {s['skipped_unchanged']}, rejected {s['rejected']}  ({s['seconds']} s)"]
    if s["added_by_label"]:
        out.append("  added by label: " + ", ".join(f"{k} {v}" for k, v in sorted(s["added_by_label"].items())))
    if s["rejected_by_reason"]:
        out.append("  rejected by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())))
    out.append(f"  new patients {s['new_patients']}; new splits: "
               + ", ".join(f"{k} {v}" for k, v in s["split_assignments"].items()))
    if s["patients_without_id"]:
        out.append(f"  note: {s['patients_without_id']} image(s) had no patient id; each is its own patient")
    return "\n".join(out)


def render_status(r: dict[str, Any]) -> str:
    cat = r["catalogue"]
    out = [f"XRAY_HOME {r['home']}", f"catalogue {r['database_url']}", "",
           f"images {cat['images']} from {cat['sources']} source run(s); patients {cat['patients']['total']}"]
    rows = [[label, v["train"], v["val"], v["test"], v["unassigned"], sum(v.values())]
            for label, v in cat["by_label_and_split"].items()]
    if rows:
        out += ["", table(["label", "train", "val", "test", "unassigned", "total"], rows)]
    out += ["", "patients by id source: " + (", ".join(f"{k} {v}" for k, v in cat["patients"]["by_id_source"].items()) or "none")]
    rej = cat["rejections"]
    out.append(f"rejections {rej['total']}" + (": " + ", ".join(f"{k} {v}" for k, v in rej["by_reason"].items()) if rej["total"] else ""))
    nd = cat["near_duplicates"]
    out.append(f"near-duplicate pairs across splits (pHash distance <= {nd['max_distance']}): {nd['pairs_across_splits']}")
    for note in cat["notes"]:
        out.append(f"note: {note}")
    if r.get("feature_cache"):
        out += ["", table(["feature cache (backbone fingerprint)", "images", "files", "MiB", "coverage"],
                          [[c["fingerprint"][:16], c.get("images", ""), c.get("files", ""),
                            round(c.get("bytes", 0) / 2**20, 1), c.get("coverage", "")] for c in r["feature_cache"]])]
    models = r.get("models") or {}
    if models:
        out += ["", f"champion: {models.get('champion') or 'none'}; versions: {models.get('versions', 0)}"]
    s = r["settings"]
    out += ["", "settings:"] + [f"  {k} = {v}" for k, v in s.items()]
    return "\n".join(out)
