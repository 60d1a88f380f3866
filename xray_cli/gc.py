"""``xray gc``: retention (:mod:`xray_core.pipeline.retention`): what a home keeps, and the rest deleted.

Its own module so that the main parser stays short. Exit codes: 0 done (or, with ``--dry-run``, listed),
1 failed, 2 bad usage (e.g. a retrain holds the lock for longer than ``--wait``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = ("delete what retention does not keep (old rejected models' files, unused feature folders, old "
        "report files, superseded evaluations' per-site slices); the catalogue rows stay, marked pruned; "
        "--dry-run lists it with its bytes")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="list what would go and its bytes; change nothing")
    p.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for a running retrain (gc holds the retrain lock; default 0)")


def cmd_gc(args: argparse.Namespace) -> int:
    from xray_core.io.fsutil import json_text, utf8_safe
    from xray_core.pipeline.retention import run_gc
    from xray_core.settings import get_settings

    result = run_gc(get_settings(), dry_run=args.dry_run, wait_seconds=max(0.0, args.wait))
    text = json_text(result, indent=2, default=str) if args.json else utf8_safe(render(result))
    sys.stdout.write(text.rstrip() + "\n")
    return 0


def size(n: int) -> str:
    """Bytes for people: 1.5 MiB, 12.0 KiB, 300 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render(r: dict[str, Any]) -> str:
    verb = "would remove" if r["dry_run"] else "removed"
    lines = [f"{verb} {what}: {size(x['bytes'])} ({x['keys']} {unit}; {x['reason']})"
             for x in r["removals"]
             for what, unit in [{"model": (f"model {x['target']}'s files", "file(s)"),
                                 "features": (f"feature folder {x['target'][:12]}…", "file(s)"),
                                 "report": (f"report files of {x['target']}", "file(s)"),
                                 "evaluations": (f"the slices of {x['target']}'s old evaluations",
                                                 "row(s) in the catalogue")}[x["kind"]]]]
    if not lines:
        lines.append("nothing to remove")
    dry = " (dry run: nothing changed)" if r["dry_run"] else ""
    lines.append(f"total: {size(r['bytes'])} ({r['bytes']} bytes){dry}")
    lines += catalogue_lines(r.get("catalogue") or {})
    lines += [f"kept v{v}: {why}" for v, why in r["kept_models"].items()]
    lines += [f"kept feature folder {fp[:12]}…: {why}" for fp, why in r["kept_backbones"].items()]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def catalogue_lines(c: dict[str, Any]) -> list[str]:
    """The SQLite catalogue's size: freed rows stay in the file as free pages that new rows reuse; gc
    vacuums it (the file shrinks) only when enough of it is free."""
    def line(s: dict[str, Any]) -> str:
        return (f"{size(s['database_bytes'])}, of which {size(s['free_bytes'])} free pages (reused by new "
                f"rows); on disk: {size(s['file_bytes'])} + WAL {size(s['wal_bytes'])}")

    out = [f"catalogue: {line(c['before'])}"] if c.get("before") else []
    if c.get("after"):
        vacuumed = " (vacuumed)" if c.get("vacuumed") else ""
        out.append(f"catalogue after gc{vacuumed}: {line(c['after'])}")
    return out
