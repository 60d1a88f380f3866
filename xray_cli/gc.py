"""``xray gc``: retention (:mod:`xray_core.pipeline.retention`): what a home keeps, and the rest deleted.

Its own module so that the main parser stays short. Exit codes: 0 done (or, with ``--dry-run``, listed),
1 failed, 2 bad usage (e.g. a retrain holds the lock for longer than ``--wait``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = ("delete what retention does not keep (old rejected models' files, unused feature folders, old "
        "report files); the catalogue rows stay, marked pruned; --dry-run lists it with its bytes")


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
    lines = [f"{verb} {what}: {size(x['bytes'])} ({x['keys']} file(s); {x['reason']})"
             for x in r["removals"]
             for what in [{"model": f"model {x['target']}'s files", "features": f"feature folder "
                           f"{x['target'][:12]}…", "report": f"report files of {x['target']}"}[x["kind"]]]]
    if not lines:
        lines.append("nothing to remove")
    dry = " (dry run: nothing changed)" if r["dry_run"] else ""
    lines.append(f"total: {size(r['bytes'])} ({r['bytes']} bytes){dry}")
    lines += [f"kept v{v}: {why}" for v, why in r["kept_models"].items()]
    lines += [f"kept feature folder {fp[:12]}…: {why}" for fp, why in r["kept_backbones"].items()]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
