"""The ``xray`` command. Every command has ``--json``; exit codes: 0 ok, 1 failed, 2 bad usage/input.

Commands that orchestrate (retrain, ingest via flows, predict) live in ``flows`` and are imported
lazily, so ``xray status`` never pays Prefect's import time.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xray_cli import audit, doctor, lock, reproduce
from xray_cli import gc as retention  # not `gc`: the standard library has one
from xray_cli.environment import check_environment
from xray_cli.environment import use_flow as _use_flow
from xray_core.errors import TerminatedBySignal, UsageError, XrayError
from xray_core.io.allowed_roots import caller_paths
from xray_core.io.fsutil import json_text, utf8_safe
from xray_core.io.oserrors import path_error
from xray_core.report.terminal import render_terminated  # no imports of its own: cheap
from xray_core.settings import get_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on bad usage, which is our contract too
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"xray: error: {message}\n")


def _seconds(text: str) -> float:
    """argparse type for ``--wait``: a finite number of seconds >= 0 (``nan`` or ``inf`` would wait
    forever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a finite number of seconds "
                                         ">= 0 (e.g. 60)")
    return value


def _emit(result: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    if as_json:  # json_text/utf8_safe: a byte that is not UTF-8 in a path shows as \xNN, never as \udcNN
        sys.stdout.write(json_text(result, indent=2, default=str, sort_keys=False) + "\n")
    else:
        sys.stdout.write(utf8_safe(render(result)).rstrip() + "\n")


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


def _columns(args: argparse.Namespace) -> dict[str, str] | None:
    """``--columns known=export,...`` checked (exit 2 on a bad item); None when not given."""
    from xray_core.data.columns import parse_columns

    if args.columns is None:
        return None
    if not args.manifest:
        raise UsageError("--columns maps a manifest's column names: give it with --manifest")
    return parse_columns(args.columns) or None


def cmd_ingest(args: argparse.Namespace) -> int:
    from xray_core.report.terminal import render_ingest

    manifest = str(Path(args.manifest).absolute()) if args.manifest else None
    columns = _columns(args)
    if _use_flow():
        from flows.ingest import ingest

        with caller_paths(args.path, manifest):  # typed by this user: allowed for this call (SECURITY.md)
            summary = ingest(str(Path(args.path).absolute()), manifest, site=args.site, columns=columns)
    else:
        from xray_core.data.ingest import ingest_source

        summary = ingest_source(Path(args.path), manifest=Path(manifest) if manifest else None,
                                settings=get_settings(), progress=_progress_bar(True, "ingest"),
                                site=args.site, columns=columns).as_dict()
    _emit(summary, args.json, render_ingest)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from xray_core.report.terminal import render_predict

    out = str(Path(args.out).absolute()) if args.out else None
    manifest = str(Path(args.manifest).absolute()) if args.manifest else None
    heatmaps = str(Path(args.heatmaps).absolute()) if args.heatmaps else None
    if _use_flow():
        from flows.predict import predict

        with caller_paths(args.path, out, manifest, heatmaps):  # typed by this user: allowed for this call
            result = predict(str(Path(args.path).absolute()), out=out, manifest=manifest,
                             version=args.version, heatmaps=heatmaps)
    else:
        from xray_core.pipeline.predict import predict_folder

        result = predict_folder(get_settings(), Path(args.path), out=Path(out) if out else None,
                                manifest=Path(manifest) if manifest else None, version=args.version,
                                progress=_progress_bar(True, "predict"),
                                heatmaps=Path(heatmaps) if heatmaps else None)
    if out is not None:
        result.pop("rows", None)
    _emit(result, args.json, render_predict)
    return EXIT_OK


def cmd_monitor(args: argparse.Namespace) -> int:
    from xray_core.report.terminal import render_monitor

    if _use_flow():
        from flows.monitor import monitor

        result = monitor()
    else:
        from xray_core.pipeline.monitor import run_monitor

        result = run_monitor(get_settings())
        result.pop("markdown", None)
    _emit(result, args.json, render_monitor)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from xray_core.report.status import status_report
    from xray_core.report.terminal import render_status

    _emit(status_report(get_settings()), args.json, render_status)
    return EXIT_OK


def cmd_incoming(args: argparse.Namespace) -> int:
    from xray_core.data.incoming import scan
    from xray_core.report.terminal import render_incoming

    settings = get_settings()
    folder = args.folder or settings.incoming_dir
    if folder is None:
        raise UsageError("XRAY_INCOMING is not set; name the folder: xray incoming /data/incoming")
    _emit(scan(settings, Path(folder).absolute()).as_dict(), args.json, render_incoming)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from xray_core.pipeline.steps import run_train
    from xray_core.report.terminal import render_train

    result = run_train(get_settings(), progress=_progress_bar(True, "embed"))
    _emit(result, args.json, render_train)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from xray_core.registry import listing
    from xray_core.report.terminal import render_history, render_lineage, render_models

    settings = get_settings()
    if args.action == "show":
        if args.version is None:
            raise UsageError("usage: xray models show VERSION")
        _emit(listing.model_lineage(settings, args.version), args.json, render_lineage)
    elif args.history:
        _emit(listing.history(settings), args.json, render_history)
    else:
        # Re-score first (cached features only, never embeds) so every row is on the current test set
        # where the cache allows; the rest keep their older numbers, labelled with their n and date.
        from xray_core.pipeline.rescore import models_on_current_test_set

        listing = models_on_current_test_set(settings)
        _emit(listing["models"], args.json, lambda rows: render_models(rows, listing["notes"]))
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    from xray_core.registry.versions import promote_manually
    from xray_core.report.terminal import render_history

    row = promote_manually(get_settings(), args.version, reason=args.reason, trigger="cli", actor=_actor())
    _emit(row, args.json, lambda r: render_history([r]))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from xray_core.registry.versions import rollback
    from xray_core.report.terminal import render_history

    row = rollback(get_settings(), reason=args.reason, trigger="cli", actor=_actor())
    _emit(row, args.json, lambda r: render_history([r]))
    return EXIT_OK


def cmd_review(args: argparse.Namespace) -> int:
    from flows.review import send_review, wait_for_outcome
    from xray_core.report.terminal import render_review

    sent = send_review(args.target, approve=args.approve, reason=args.reason,
                       reviewer=args.reviewer or _actor(), settings=get_settings())
    sent["outcome"] = wait_for_outcome(sent["flow_run_id"], args.wait) if args.wait > 0 else None
    _emit(sent, args.json, render_review)
    return EXIT_OK


def cmd_retrain(args: argparse.Namespace) -> int:
    from xray_core.report.terminal import render_retrain

    settings = get_settings()
    columns = _columns(args)
    if args.local:
        from xray_core.pipeline.cycle import run_retrain
        from xray_core.pipeline.executor import DirectExecutor
        from xray_core.pipeline.recipe import RetrainRequest

        incoming = None if args.no_incoming or settings.incoming_dir is None else str(settings.incoming_dir)
        request = RetrainRequest(sources=tuple(args.source or ()), manifests=tuple(args.manifest or ()),
                                 incoming=incoming, trigger="cli", force=args.force,
                                 columns=tuple((columns or {}).items()))
        executor = DirectExecutor({"embed": _progress_bar(not args.json, "embed"),
                                   "ingest": _progress_bar(not args.json, "ingest")})
        result = run_retrain(settings, request, executor, wait_seconds=args.wait).digest()
    else:
        from flows.retrain import retrain

        with caller_paths(*args.source or [], *args.manifest or []):  # typed by this user (SECURITY.md)
            result = retrain(sources=args.source or [], manifests=args.manifest or [], trigger="cli",
                             use_incoming=not args.no_incoming, wait_seconds=args.wait, force=args.force,
                             columns=columns)
    _emit(result, args.json, render_retrain)
    return EXIT_OK if result.get("status") != "failed" else EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    result = run_demo(get_settings(), sample=Path(args.sample) if args.sample else None,
                      out=sys.stdout if not args.json else sys.stderr, fresh=args.fresh)
    if args.json:
        _emit(result, True, str)
    return EXIT_OK


def _actor() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "ingest": (cmd_ingest, "ingest a folder <root>/<label>/**/<image> or a manifest CSV"),
    "status": (cmd_status, "catalogue counts, rejections, near-duplicates, feature cache, models, settings"),
    "incoming": (cmd_incoming, "the incoming folder's batches: taken, ready for the next retrain, waiting "
                               "(still changing) or refused (and why), without running anything"),
    "train": (cmd_train, "core path, no Prefect: embed what is missing, train a challenger, evaluate it"),
    "retrain": (cmd_retrain, "run the Prefect retrain flow: ingest, train, evaluate both, decide, promote"),
    "models": (cmd_models,
               "versions, status and key metrics; --history for the audit trail; show N for lineage"),
    "promote": (cmd_promote, "make a version the champion by hand (audited)"),
    "rollback": (cmd_rollback, "return to the previous champion (audited)"),
    "review": (cmd_review, "approve or reject the challenger a paused retrain run waits on (as its UI form)"),
    "predict": (cmd_predict, "predict a folder or manifest with the champion (or --version N); CSV out"),
    "demo": (cmd_demo,
             "three arrivals: first champion, a challenger decision, then a second site the shortcut "
             "audit catches"),
    "doctor": (doctor.cmd_doctor, doctor.HELP),
    "reproduce": (reproduce.cmd_reproduce, reproduce.HELP),
    "lock": (lock.cmd_lock, lock.HELP),
    "gc": (retention.cmd_gc, retention.HELP),
    "audit": (audit.cmd_audit, audit.HELP),
    "monitor": (cmd_monitor,
                "check films ingested (and list predict batches) since the last check against the "
                "champion's reference: out-of-distribution and drift warnings"),
}


COLUMNS_HELP = ("the manifest's names for known columns, e.g. "
                "patient_id=patientid,label=finding,file=filename (docs/data.md#manifests)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xray", description="Catalogue, retrain and promote a chest X-ray classifier.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("ingest", help=COMMANDS["ingest"][1])
    p.add_argument("path", help="source folder (for --manifest: the folder the manifest sits in, or the "
                   "manifest)")
    p.add_argument("--manifest", help="CSV with columns file,label[,patient_id][,view][,site]...; paths "
                                      "relative to it; other columns are kept as attributes")
    p.add_argument("--site", help="where these films come from (a manifest's site column wins); default: the "
                                  "source folder's name")
    p.add_argument("--columns", metavar="KNOWN=COLUMN,...", help=COLUMNS_HELP)
    p = sub.add_parser("status", help=COMMANDS["status"][1])
    p = sub.add_parser("incoming", help=COMMANDS["incoming"][1])
    p.add_argument("folder", nargs="?", help="the incoming folder (default: XRAY_INCOMING)")
    sub.add_parser("train", help=COMMANDS["train"][1])
    p = sub.add_parser("retrain", help=COMMANDS["retrain"][1])
    p.add_argument("--source", action="append", help="folder to ingest first (repeatable)")
    p.add_argument("--manifest", action="append", help="manifest CSV to ingest first (repeatable)")
    p.add_argument("--columns", metavar="KNOWN=COLUMN,...", help=COLUMNS_HELP + " (every --manifest)")
    p.add_argument("--no-incoming", action="store_true", help="do not scan XRAY_INCOMING")
    p.add_argument("--wait", type=_seconds, default=0.0,
                   help="seconds to wait for a running retrain (default 0)")
    p.add_argument("--force", action="store_true",
                   help="train even when nothing changed since the champion or the last decision "
                        "not to promote")
    p.add_argument("--local", action="store_true",
                   help="run the same recipe without Prefect (same reports and audit rows; no UI artifacts)")
    p = sub.add_parser("models", help=COMMANDS["models"][1])
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("version", nargs="?", type=int)
    p.add_argument("--history", action="store_true", help="the audit trail of every decision")
    p = sub.add_parser("promote", help=COMMANDS["promote"][1])
    p.add_argument("version", type=int)
    p.add_argument("--reason", required=True)
    p = sub.add_parser("rollback", help=COMMANDS["rollback"][1])
    p.add_argument("--reason", required=True)
    p = sub.add_parser("review", help=COMMANDS["review"][1])
    p.add_argument("target", help="the challenger's version (5 or v5), or the paused flow run's id or name")
    answer = p.add_mutually_exclusive_group(required=True)
    answer.add_argument("--approve", action="store_true", help="promote it (if the champion has not changed)")
    answer.add_argument("--reject", action="store_true", help="keep the champion")
    p.add_argument("--reason", required=True, help="why (goes into the audit trail)")
    p.add_argument("--reviewer", help="your name in the audit trail (default: the login name)")
    p.add_argument("--wait", type=_seconds, default=60.0,
                   help="seconds to wait for the run to record the answer (default 60; 0: do not wait)")
    p = sub.add_parser("predict", help=COMMANDS["predict"][1])
    p.add_argument("path",
                   help="folder of images (any layout; a first-level folder name is taken as the true label)")
    p.add_argument("--out", help="CSV to write (without it, rows are printed)")
    p.add_argument("--manifest", help="CSV with file[,label] rows relative to it")
    p.add_argument("--version", type=int, help="model version (default: the champion)")
    p.add_argument("--heatmaps", metavar="DIR",
                   help="write a Grad-CAM overlay PNG per image into DIR (limits: docs/evaluation.md)")
    sub.add_parser("monitor", help=COMMANDS["monitor"][1])
    for name, mod in dict(doctor=doctor, reproduce=reproduce, lock=lock, gc=retention, audit=audit).items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP))
    p = sub.add_parser("demo", help=COMMANDS["demo"][1])
    p.add_argument("--sample", help="real sample folder with manifest.csv; synthetic images when absent")
    p.add_argument("--fresh", action="store_true",
                   help="delete XRAY_HOME first (the Makefile's demo home only)")
    for name in sub.choices:
        sub.choices[name].add_argument("--json", action="store_true", help="machine-readable output")
        sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="show the Python traceback of an unexpected error")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an unexpected error")
    return parser


def main(argv: list[str] | None = None) -> int:
    # A hospital tool does not phone home: Prefect's anonymous server telemetry is off unless the user
    # turns it on (and without internet it only logs connection errors).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ingest" and args.manifest is None and Path(args.path).suffix.lower() == ".csv":
        args.manifest, args.path = args.path, str(Path(args.path).parent)
    handler = COMMANDS[args.command][0]
    debug = bool(getattr(args, "debug", False))
    from xray_core.errors import terminate_as_exception

    terminate_as_exception()  # SIGTERM unwinds like an error: rows roll back or record failure, one line
    try:
        check_environment(args.command, args)
        return handler(args)
    except UsageError as exc:
        sys.stderr.write(f"xray {args.command}: {exc}\n")
        return EXIT_USAGE
    except XrayError as exc:
        sys.stderr.write(f"xray {args.command}: failed: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write(f"xray {args.command}: interrupted\n")
        return 130
    except TerminatedBySignal as exc:  # SIGTERM: say what was recorded, exit 143
        result = getattr(exc, "xray_result", None)
        sys.stderr.write(f"xray {args.command}: {render_terminated(result, command=args.command)}\n")
        return int(exc.code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback, unless --debug
        from db.engine import CatalogueFileError

        user = exc if isinstance(exc, CatalogueFileError) else path_error(exc)
        if user is not None:  # a damaged catalogue, a path too long, read-only, no permission: exit 2
            sys.stderr.write(f"xray {args.command}: {user}\n")
            return EXIT_USAGE
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        sys.stderr.write(f"xray {args.command}: failed: unexpected {type(exc).__name__}: {first}"
                         + ("" if debug else " (run again with --debug for the traceback)") + "\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
