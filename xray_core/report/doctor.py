"""The terminal page of ``xray doctor`` (the JSON is :meth:`DoctorReport.as_dict`)."""

from __future__ import annotations

from typing import Any


def render_doctor(report: dict[str, Any]) -> str:
    """One line per fact: the catalogue, the counts, each finding with its examples, what was repaired."""
    cat = report["catalogue"]
    lines = [f"catalogue: {cat['backend']} {cat['where']}"]
    if cat["files"]:
        lines.append("  files: " + ", ".join(f"{name} {size:,} bytes" for name, size in cat["files"].items()))
    if cat["check"]:
        lines.append(f"  check: {cat['check']}")
    if cat["revision"] or cat["head"]:
        behind = "" if cat["revision"] == cat["head"] else " (the next command upgrades it)"
        lines.append(f"  schema revision: {cat['revision']} (newest {cat['head']}){behind}")
    if report["counts"]:
        counts = report["counts"].items()
        lines.append("counts: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts))
    for f in report["findings"]:
        state = "REPAIRED" if f["repaired"] else "PROBLEM"
        lines.append(f"{state} {f['code']} ({f['count']}): {f['detail']}")
        if f["repaired"]:
            lines.append(f"  -> {f['repaired']}")
        lines += [f"    {e}" for e in f["examples"]]
        if f["count"] > len(f["examples"]) and f["examples"]:
            lines.append(f"    ... and {f['count'] - len(f['examples'])} more")
    lines += [f"note: {n}" for n in report["notes"]]
    if report["backup"]:
        lines.append(f"backup and moved files: {report['backup']}")
    if report["healthy"]:
        lines.append("healthy")
    else:
        hint = "; `xray doctor --repair` fixes what it can after keeping a copy" \
            if report["repairable"] and not report["backup"] else ""
        lines.append(f"problems found{hint}")
    return "\n".join(lines)
