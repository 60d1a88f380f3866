"""``xray audit``: the champion against the locked reference on the sequestered test set
(:mod:`xray_core.pipeline.sequester`); each audit is recorded (table ``sequester_audits``).

Its own module so that the main parser stays short. Exit codes: 0 audited, also when the champion is
degraded (the result says so; the ``audit/monthly`` flow emits ``xray.audit.degraded``) and when there is
nothing to audit yet (no champion, or no patient sequestered yet: status ``skipped``, one line saying
why, no row recorded: a young catalogue is not an error); 1 failed (e.g. a model's files are missing).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = ("score the champion and the locked reference on the sequestered test set (patients no routine "
        "decision sees); record the result; say whether the champion is degraded")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options beyond --json and --debug."""


def cmd_audit(args: argparse.Namespace) -> int:
    from xray_core.io.fsutil import json_text, utf8_safe
    from xray_core.pipeline.sequester import run_audit
    from xray_core.settings import get_settings

    result = run_audit(get_settings(), trigger="cli")
    text = json_text(result, indent=2, default=str) if args.json else utf8_safe(render(result))
    sys.stdout.write(text.rstrip() + "\n")
    return 0


def render(r: dict[str, Any]) -> str:
    lines = [f"nothing to audit: {r['verdict']}" if r["status"] == "skipped" else f"audit {r['status']}: "
             f"{r['verdict']}"]
    if r["status"] != "skipped":
        lines.append(f"sequestered set: {r['n_images']} film(s) of {r['sequestered_patients']} patient(s); "
                     f"recorded as audit {r['id']}")
        for key in ("champion_metrics", "reference_metrics"):
            m = r.get(key)
            if m:
                auroc = "n/a" if m.get("macro_auroc") is None else f"{m['macro_auroc']:.3f}"
                lines.append(f"{key.split('_')[0]} v{m['version']}: macro AUROC {auroc}")
    return "\n".join(lines)
