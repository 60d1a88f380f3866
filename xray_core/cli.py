"""The ``xray`` command. Every command has ``--json``; exit codes: 0 ok, 1 failed, 2 bad usage/input.

Commands that orchestrate (retrain, ingest via flows, predict) live in ``flows`` and are imported
lazily, so ``xray status`` never pays Prefect's import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from xray_core.errors import UsageError, XrayError
from xray_core.settings import get_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on bad usage, which is our contract too
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"xray: error: {message}\n")


def _emit(result: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str, sort_keys=False) + "\n")
    else:
        sys.stdout.write(render(result).rstrip() + "\n")


def _progress_bar(enabled: bool, label: str) -> Callable[[int, int], None] | None:
    """A one-line progress bar on stderr (never stdout, so ``--json`` output stays parseable)."""
    if not enabled or not sys.stderr.isatty():
        return None

    def update(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


# --------------------------------------------------------------------------- commands


def cmd_ingest(args: argparse.Namespace) -> int:
    from xray_core.ingest import ingest_source
    from xray_core.render import render_ingest

    summary = ingest_source(Path(args.path), manifest=Path(args.manifest) if args.manifest else None,
                            settings=get_settings(), progress=_progress_bar(True, "ingest"))
    _emit(summary.as_dict(), args.json, render_ingest)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from xray_core.render import render_status
    from xray_core.status import status_report

    _emit(status_report(get_settings()), args.json, render_status)
    return EXIT_OK


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "ingest": (cmd_ingest, "ingest a folder <root>/<label>/**/<image> or a manifest CSV"),
    "status": (cmd_status, "catalogue counts, rejections, near-duplicates, feature cache, models, settings"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xray", description="Catalogue, retrain and promote a chest X-ray classifier.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("ingest", help=COMMANDS["ingest"][1])
    p.add_argument("path", help="source folder (for --manifest: the folder the manifest sits in, or the manifest)")
    p.add_argument("--manifest", help="CSV with columns file,label[,patient_id][,view]; paths relative to it")
    p = sub.add_parser("status", help=COMMANDS["status"][1])
    for name in sub.choices:
        sub.choices[name].add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ingest" and args.manifest is None and Path(args.path).suffix.lower() == ".csv":
        args.manifest, args.path = args.path, str(Path(args.path).parent)
    handler = COMMANDS[args.command][0]
    try:
        return handler(args)
    except UsageError as exc:
        sys.stderr.write(f"xray {args.command}: {exc}\n")
        return EXIT_USAGE
    except XrayError as exc:
        sys.stderr.write(f"xray {args.command}: failed: {exc}\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
