"""prefect.yaml deploys as it is: a bare ``prefect --no-prompt deploy --all`` on a fresh ``prefect server
start`` (only the pool created first, as the README says) gives every deployment with the documented
defaults, read back from the API: retrain/nightly at ``0 2 * * *`` in Europe/Zurich on
``/data/incoming``, the time zone of monitor/daily, maintenance/weekly and audit/monthly, the descriptions,
and the pull step that runs the flows in this project. Then ``make deploy`` (the same deploy, then
``flows.serve override``) with other values sets those instead, one schedule each. Skipped, with the
server's log, if no server starts. About a minute: every deployment's flow module is imported twice."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect_server import free_port, server_env, start_server, stop, tail, wait_for_server

PROJECT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
SERVER_START_S = 90.0
OTHER = {"INCOMING": "/srv/xray/arrivals", "SCHEDULE": "30 3 * * 1-5", "TIMEZONE": "America/New_York"}


@pytest.fixture
def fresh_server(tmp_path):
    """An empty server (no scheduler or other services that would start runs); ended afterwards."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    off = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "TRIGGERS", "REPOSSESSOR", "CANCELLATION_CLEANUP",
           "PAUSE_EXPIRATIONS", "TASK_RUN_RECORDER", "EVENT_LOGGER")
    env = server_env(home, port, **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in off})
    for var in ("XRAY_INCOMING", "XRAY_SCHEDULE", "XRAY_TIMEZONE", "XRAY_PROJECT_DIR"):
        env.pop(var, None)  # a bare deploy: none of the values `make serve` sets
    proc = start_server(port, env, home / "server.log")
    try:
        if not wait_for_server(env["PREFECT_API_URL"], SERVER_START_S):
            pytest.skip(f"no Prefect server answered within {SERVER_START_S:.0f} s; its log:\n"
                        f"{tail(home / 'server.log')}")
        yield {"env": env, "port": port, "home": home}
    finally:
        stop(proc)


def _run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, (f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _ui_screenshot():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ui_screenshot", PROJECT / "scripts" / "ui_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _deployed(env: dict[str, str]) -> dict[str, dict]:
    """flow/deployment -> what the API has: id, parameters, (cron, timezone) of each schedule, description,
    pull steps."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> dict[str, dict]:
        async with get_client() as client:
            flows = {f.id: f.name for f in await client.read_flows()}
            return {f"{flows[d.flow_id]}/{d.name}": {
                "id": str(d.id), "parameters": d.parameters, "description": d.description,
                "pull_steps": d.pull_steps,
                "schedules": [(s.schedule.cron, s.schedule.timezone) for s in d.schedules]}
                for d in await client.read_deployments()}

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(read())


def test_a_bare_deploy_gives_the_defaults_and_make_deploy_sets_its_own(fresh_server):
    env = fresh_server["env"]
    prefect = [sys.executable, "-m", "prefect"]
    _run([*prefect, "work-pool", "create", "xray-process", "--type", "process"], env)
    _run([*prefect, "--no-prompt", "deploy", "--all"], env)

    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    names = {f"{d['entrypoint'].split(':')[1]}/{d['name']}" for d in spec["deployments"]}
    bare = _deployed(env)
    assert set(bare) == names
    nightly, on_drift, daily = bare["retrain/nightly"], bare["retrain/on-drift"], bare["monitor/daily"]
    assert nightly["schedules"] == [("0 2 * * *", "Europe/Zurich")]
    assert nightly["parameters"]["incoming"] == on_drift["parameters"]["incoming"] == "/data/incoming"
    weekly = bare["maintenance/weekly"]
    assert daily["schedules"] == [("30 6 * * *", "Europe/Zurich")]
    assert weekly["schedules"] == [("0 4 * * 0", "Europe/Zurich")]
    assert weekly["parameters"] == {"dry_run": False, "wait_seconds": 3600}
    monthly = bare["audit/monthly"]
    assert monthly["schedules"] == [("0 5 1 * *", "Europe/Zurich")] and monthly["parameters"] == {}
    assert all("time zone Europe/Zurich" in d["description"] for d in (nightly, daily, weekly, monthly))
    # No pull step in the file: Prefect records the folder it deployed from, where the worker runs flows.
    workdir = [{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT)}}]
    assert all(d["pull_steps"] == workdir for d in bare.values()), {n: d["pull_steps"]
                                                                    for n, d in bare.items()}
    assert not any("{{" in repr(d) for d in bare.values())  # no template deployed as text

    # `make ui-screenshot` finds the deployment page it pictures through the same API (no run yet: nightly).
    shot = _ui_screenshot()
    api = env["PREFECT_API_URL"]
    nightly_id = bare["retrain/nightly"]["id"]
    assert shot.deployment_id(api, None) == shot.deployment_id(api, "retrain/nightly") == nightly_id
    with pytest.raises(SystemExit) as refused:
        shot.deployment_id(api, "retrain/weekly")
    assert refused.value.code == 2

    # `make deploy` with other values: the Makefile's own recipe against this server (its venv marked
    # up to date, so make installs nothing).
    make = ["make", "--no-print-directory", "-o", str(VENV / ".installed"), "deploy", f"VENV={VENV}",
            f"SERVE_PORT={fresh_server['port']}", f"SERVE_HOME={fresh_server['home']}",
            *(f"{k}={v}" for k, v in OTHER.items())]
    out = _run(make, env)
    said = f"incoming {OTHER['INCOMING']}, schedule '{OTHER['SCHEDULE']}' in {OTHER['TIMEZONE']}"
    assert f"retrain/nightly: {said}" in out
    made = _deployed(env)
    nightly, on_drift, daily = made["retrain/nightly"], made["retrain/on-drift"], made["monitor/daily"]
    assert nightly["schedules"] == [(OTHER["SCHEDULE"], OTHER["TIMEZONE"])]
    assert nightly["parameters"]["incoming"] == on_drift["parameters"]["incoming"] == OTHER["INCOMING"]
    assert nightly["parameters"]["trigger"] == "schedule"  # the other parameters kept
    assert daily["schedules"] == [("30 6 * * *", OTHER["TIMEZONE"])]
    assert f"`{OTHER['SCHEDULE']}`, time zone {OTHER['TIMEZONE']}" in nightly["description"]
    assert f"time zone {OTHER['TIMEZONE']}" in daily["description"]
    weekly = made["maintenance/weekly"]
    assert weekly["schedules"] == [("0 4 * * 0", OTHER["TIMEZONE"])]  # the time zone follows, not the cron
    assert f"time zone {OTHER['TIMEZONE']}" in weekly["description"]
    monthly = made["audit/monthly"]
    assert monthly["schedules"] == [("0 5 1 * *", OTHER["TIMEZONE"])]  # the time zone follows, not the cron
    assert f"time zone {OTHER['TIMEZONE']}" in monthly["description"]
    changed = ("retrain/nightly", "retrain/on-drift", "monitor/daily", "maintenance/weekly", "audit/monthly")
    assert {n: d for n, d in made.items() if n not in changed} == {
        n: d for n, d in bare.items() if n not in changed}
