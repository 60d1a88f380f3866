"""Your first week on the Prefect path, end to end, against a running Prefect server (PREFECT_API_URL) and
an XRAY_HOME: the steps README "Your first week" and docs/operations.md walk through, written once for
the flow test (tests/flows/test_first_week.py) and for the pictures of ``make ui-screenshot``.

1. Monday: one batch from hospital-a (normal, pneumonia, READY) in INCOMING; ``retrain/nightly`` makes
   the first champion.
2. The week: ``2026-11-20`` (hospital-a, READY), ``2026-11-21`` (hospital-b: covid19 and a few normal
   films, made bigger, 16-bit, with a border and a burned-in marker; READY) and ``2026-11-22``, still
   being copied (no READY, written just now). All synthetic films (xray_core.data.synthetic_sites).
3. ``retrain/nightly`` again: it takes two batches and leaves the third; hospital-b's films drift from
   the champion's reference; covid19 comes only from hospital-b, so under ``XRAY_SHORTCUT_POLICY=block``
   the shortcut audit blocks and the run pauses with its review form.
4. The nightly deployment's runs, found as its page lists them with "All run states" (every run of the
   deployment, whatever its state's name) and by their ``decision:*`` tags.
5. ``xray review <run> --approve --reviewer ... --reason ...`` answers the form; the run ends Promoted,
   its report holds the flagged drift section, and ``xray models --history`` names the reviewer.

The worker's environment holds the settings (e.g. ``make serve`` started from a shell that exported
them): XRAY_HOME, XRAY_SHORTCUT_POLICY=block, and for so few films the lowered bars of the demo
(README "What the demo shows"). ``--deploy`` does what ``make serve`` would, for a bare server: creates
the pool, deploys ``retrain/nightly`` from prefect.yaml and runs a worker until the script ends.

    python scripts/first_week.py --incoming /data/incoming [--deploy] [--stop-at-review] [--json]

Exit codes: 0 the week went as described, 1 a step did not (it says which), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

PROJECT = Path(__file__).resolve().parents[1]
MONDAY, WEEK, COPYING = "2026-11-16", ("2026-11-20", "2026-11-21"), "2026-11-22"
NIGHTLY = "retrain/nightly"
RUN_TIMEOUT_S = 900.0


class StepFailed(Exception):
    """A step of the week did not go as described (exit 1)."""


# --------------------------------------------------------------------------- the arrivals


def drop_monday(incoming: Path) -> None:
    """Monday's batch: hospital-a, normal and pneumonia films, with a manifest and READY."""
    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset

    write_site_dataset(incoming / MONDAY, SiteStyle("hospital-a", size=64), patients_per_label=12, seed=1)
    (incoming / MONDAY / "READY").touch()


def drop_week(incoming: Path) -> None:
    """The week's three batches: two complete (READY), one still being copied."""
    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset

    a = SiteStyle("hospital-a", size=64)
    b = SiteStyle("hospital-b", size=96, bit_depth=16, gamma=0.7, border=6, marker="PORTABLE")
    write_site_dataset(incoming / WEEK[0], a, patients_per_label=6, seed=2, patient_offset=100)
    covid = write_site_dataset(incoming / WEEK[1] / "c", b, labels=("covid19",), patients_per_label=8,
                               seed=3, manifest=False)
    normal = write_site_dataset(incoming / WEEK[1] / "n", b, labels=("normal",), patients_per_label=3,
                                seed=4, patient_offset=8, manifest=False)
    rows = [f"{r.path.relative_to(incoming / WEEK[1]).as_posix()},{r.label},{r.patient_id},hospital-b"
            for r in covid + normal]
    (incoming / WEEK[1] / "manifest.csv").write_text("\n".join(["file,label,patient_id,site", *rows]) + "\n")
    for batch in WEEK:
        (incoming / batch / "READY").touch()
    # Half-copied: no READY, modified just now (complete only once unchanged for XRAY_INCOMING_SETTLE_S).
    write_site_dataset(incoming / COPYING, a, labels=("normal",), patients_per_label=2, seed=5,
                       patient_offset=200)


# --------------------------------------------------------------------------- Prefect


@contextmanager
def deployed(log_dir: Path) -> Iterator[None]:
    """What ``make serve`` does on a bare server: the pool, ``retrain/nightly`` from prefect.yaml, a worker
    (its process group ended on the way out)."""
    prefect = [sys.executable, "-m", "prefect"]
    for cmd in (["work-pool", "create", "xray-process", "--type", "process", "--overwrite"],
                ["--no-prompt", "deploy", "--name", NIGHTLY]):
        done = subprocess.run([*prefect, *cmd], cwd=PROJECT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise StepFailed(f"prefect {' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    env = {"PREFECT_WORKER_QUERY_SECONDS": "2", **os.environ}
    with open(log_dir / "worker.log", "wb") as log:
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "xray-process"], cwd=PROJECT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield
    except StepFailed as exc:
        tail = (log_dir / "worker.log").read_text(errors="replace").splitlines()[-40:]
        raise StepFailed(f"{exc}\nthe worker's log ends:\n" + "\n".join(tail)) from None
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def run_nightly(client: Any, incoming: Path, *, timeout_s: float = RUN_TIMEOUT_S) -> Any:
    """Start ``retrain/nightly`` on ``incoming`` (as ``prefect deployment run retrain/nightly --param
    incoming=...``) and return the flow run once it has ended or paused for a review."""
    deployment = client.read_deployment_by_name(NIGHTLY)
    run = client.create_flow_run_from_deployment(deployment.id, parameters={"incoming": str(incoming)})
    return wait_for(client, run.id, timeout_s=timeout_s)


def wait_for(client: Any, run_id: UUID, *, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and (run.state.is_final() or run.state.is_paused()):
            return run
        time.sleep(1.0)
    raise StepFailed(f"flow run {run_id} neither ended nor paused within {timeout_s:.0f} s (is a worker "
                     "polling the xray-process pool?)")


def deployment_runs(client: Any, name: str = NIGHTLY) -> dict[str, list[dict[str, Any]]]:
    """The deployment's runs as its page lists them with "All run states" (no filter on the state), and
    the runs any filter on the ``decision:*`` tags finds."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.common import decision_tag
    from xray_core.evaluate.promotion import RUN_STATES

    deployment = client.read_deployment_by_name(name)
    by_deployment = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
    tagged = FlowRunFilter(tags=FlowRunFilterTags(any_=[decision_tag(s) for s in RUN_STATES]))

    def rows(flow_run_filter: FlowRunFilter) -> list[dict[str, Any]]:
        runs = client.read_flow_runs(flow_run_filter=flow_run_filter,
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC)
        return [{"id": str(r.id), "name": r.name, "state": r.state.name if r.state else None,
                 "tags": sorted(t for t in r.tags if t.startswith("decision:"))} for r in runs]

    return {"deployment_id": [{"id": str(deployment.id)}], "all_states": rows(by_deployment),
            "decision_tags": rows(tagged)}


def artifact_keys(client: Any, run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    of_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    found = client.read_artifacts(artifact_filter=of_run)
    return sorted({a.key for a in found if a.key})


# --------------------------------------------------------------------------- the shell commands


def xray(*args: str) -> str:
    """``xray ARGS`` in a process of its own, as typed in a shell; its stdout (a failure raises)."""
    done = subprocess.run([sys.executable, "-m", "xray_cli.main", *args], cwd=PROJECT, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise StepFailed(f"xray {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def run_result(reports: Path, run_id: UUID) -> tuple[Path, dict[str, Any]]:
    """The run's folder under XRAY_HOME/reports and its result.json."""
    for path in sorted(reports.glob("*/result.json")):
        result = json.loads(path.read_text())
        if result.get("flow_run_id") == str(run_id):
            return path.parent, result
    raise StepFailed(f"no report of flow run {run_id} under {reports}")


# --------------------------------------------------------------------------- the week


def first_week(incoming: Path, *, reviewer: str, stop_at_review: bool, say: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    from xray_core.settings import get_settings

    reports = get_settings().reports_dir
    out: dict[str, Any] = {"incoming": str(incoming)}
    with get_client(sync_client=True) as client:
        drop_monday(incoming)
        monday = run_nightly(client, incoming)
        out["monday"] = {"id": str(monday.id), "name": monday.name, "state": monday.state.name}
        say(f"Monday: {NIGHTLY} run {monday.name} ended {monday.state.name}: {monday.state.message}")
        drop_week(incoming)
        say(f"The week: dropped {', '.join(WEEK)} (READY) and {COPYING} (still being copied) in {incoming}")
        night = run_nightly(client, incoming)
        out["night"] = {"id": str(night.id), "name": night.name, "paused_state": night.state.name}
        if not night.state.is_paused():
            raise StepFailed(f"the week's nightly run {night.name} ended {night.state.name} "
                             f"({night.state.message}) instead of waiting for a reviewer")
        say(f"The week's night: run {night.name} is {night.state.name}, waiting for a reviewer; its form: "
            f"the Prefect UI, /runs/flow-run/{night.id}")
        out["while_paused"] = deployment_runs(client)
        if stop_at_review:
            say(f"Answer it in the UI (Resume) or: xray review {night.id} --approve --reason '...'")
            return out
        review = json.loads(xray("review", str(night.id), "--approve", "--reviewer", reviewer, "--reason",
                                 "hospital-b's covid19 referrals explain the site confound", "--wait", "300",
                                 "--json"))
        out["review"] = {k: review.get(k) for k in ("decision", "reviewer", "version", "outcome")}
        ended = wait_for(client, night.id, timeout_s=RUN_TIMEOUT_S)
        out["night"]["state"] = ended.state.name
        say(f"Approved by {reviewer}: run {night.name} ended {ended.state.name}: {ended.state.message}")
        folder, result = run_result(reports, night.id)
        out["challenger"], out["champion_after"] = result["train"]["version"], result.get("champion_after")
        out["batches"] = {b["name"]: b["state"] for b in result["incoming"]["batches"]}
        out["drift"] = result.get("drift") or {}
        report = (folder / "report.md").read_text()
        out["report_drift"] = report.split("## Drift of the new films", 1)[1].split("\n## ", 1)[0].strip() \
            if "## Drift of the new films" in report else None
        out["artifacts"] = artifact_keys(client, night.id)
        out["runs"] = deployment_runs(client)
    say("Batches of that night: " + ", ".join(f"{n} {s}" for n, s in out["batches"].items()))
    say(f"Drift section of its report ({folder / 'report.md'}):\n{out['report_drift']}")
    say(f"{NIGHTLY}'s runs, all states: " + ", ".join(f"{r['name']} {r['state']} {' '.join(r['tags'])}"
                                                      for r in out["runs"]["all_states"]))
    out["models"] = json.loads(xray("models", "--json"))
    out["history"] = json.loads(xray("models", "--history", "--json"))
    history = xray("models", "--history")
    say(f"$ xray models --history\n{history}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incoming", type=Path, help="the incoming folder (default: XRAY_INCOMING)")
    parser.add_argument("--deploy", action="store_true",
                        help="create the pool, deploy retrain/nightly and run a worker (a bare server)")
    parser.add_argument("--stop-at-review", action="store_true",
                        help="leave the week's nightly run paused on its review form")
    parser.add_argument("--reviewer", default="alice", help="the name in the audit trail (default: alice)")
    parser.add_argument("--json", action="store_true", help="print what was found as one JSON object")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(PROJECT))  # run as a file: import this project's flows and xray_core
    from xray_core.settings import get_settings

    incoming = args.incoming or get_settings().incoming_dir
    if incoming is None:
        print("error: name the incoming folder: --incoming DIR or XRAY_INCOMING", file=sys.stderr)
        return 2
    incoming = Path(incoming).absolute()
    if incoming.exists() and any(incoming.iterdir()):
        print(f"error: {incoming} is not empty; the week starts from an empty incoming folder",
              file=sys.stderr)
        return 2
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    try:
        with tempfile.TemporaryDirectory(prefix="first-week-") as logs, ExitStack() as stack:
            if args.deploy:
                stack.enter_context(deployed(Path(logs)))
            out = first_week(incoming, reviewer=args.reviewer, stop_at_review=args.stop_at_review, say=say)
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
