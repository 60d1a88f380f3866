"""``xray lock N --reason TEXT``: make model N the locked reference every challenger must also be
non-inferior to (the bio-creep guard; :mod:`xray_core.registry.reference`). Audited as a ``lock`` row
in the audit trail (``xray models --history``). Exit codes: 0 locked, 2 refused (no reason, an unknown
version, one never scored on a test set, the reference already, or files missing: one line).
"""

from __future__ import annotations

import argparse
import sys

HELP = ("make version N the locked reference that every challenger must also be non-inferior to "
        "(audited; by default the first champion)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("version", type=int, help="the model version to lock as the reference (see xray models)")
    p.add_argument("--reason", required=True, help="why (goes into the audit trail)")


def _actor() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cmd_lock(args: argparse.Namespace) -> int:
    from xray_core.io.fsutil import json_text, utf8_safe
    from xray_core.registry.reference import lock_reference
    from xray_core.settings import get_settings

    row = lock_reference(get_settings(), args.version, reason=args.reason, trigger="cli", actor=_actor())
    text = (json_text(row, indent=2, default=str) if args.json
            else f"v{args.version} is now the locked reference (audit row #{row['id']}): {row['rationale']}")
    sys.stdout.write(utf8_safe(text).rstrip() + "\n")
    return 0
