"""``xray doctor``: the command's arguments and its call into :mod:`xray_core.data.doctor`.

Its own module so that the main parser stays short; exit codes follow the CLI's contract: 0 healthy,
1 problems found (or left after ``--repair``), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

HELP = ("check the catalogue (after a crash or a full disk) against the store, quarantine and models; "
        "--repair fixes what loses nothing, after a backup")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", action="store_true",
                   help="keep a copy, checkpoint the WAL, move orphaned files aside (never deletes)")
    p.add_argument("--verify", action="store_true",
                   help="integrity_check and sha256 of every store and checkpoint file (reads every byte)")


def cmd_doctor(args: argparse.Namespace) -> int:
    from xray_core.data.doctor import examine
    from xray_core.data.doctor_repair import repair
    from xray_core.io.fsutil import json_text, utf8_safe
    from xray_core.report.doctor import render_doctor
    from xray_core.settings import get_settings

    settings = get_settings()
    report = repair(settings, verify=args.verify) if args.repair else examine(settings, verify=args.verify)
    result = report.as_dict()
    # json_text / utf8_safe: a home whose name is not UTF-8 prints as \xNN, never a lone surrogate.
    text = json_text(result, indent=2, default=str) if args.json else utf8_safe(render_doctor(result))
    sys.stdout.write(text + "\n")
    return 0 if report.healthy else 1
