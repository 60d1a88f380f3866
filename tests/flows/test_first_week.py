"""README "Your first week", end to end on a real ``prefect server start`` (tests/prefect_server.py):
``scripts/first_week.py --deploy`` deploys ``retrain/nightly`` from prefect.yaml, runs a process worker,
drops the batches and runs the nightly twice, as a user would (the scenario the UI screenshots use).

Shown: Monday's batch makes the first champion; of the week's three batches two are taken and the
half-copied one waits; the new site's films drift from the champion (the report's drift section says
"Flagged"); the shortcut audit blocks, so the run pauses for a reviewer; the deployment's runs are all
found by the deployment filter with every state, and by their decision tags; ``xray review --approve``
makes the challenger champion, and ``xray models --history`` names the reviewer. About a minute and a
half: two flow runs in worker subprocesses; the approved run goes on at once, since the paused run
stopped Prefect's renewal of the concurrency lease its pause gave back (flows/review.py; before, it
waited up to 225 s for that renewal to fail).
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROJECT, TEST_ENV
from prefect_server import client_env, prefect_server

WEEK_ENV = {  # the demo's lowered bars for so few films, and the audit that blocks
    "XRAY_MIN_TEST_PER_CLASS": "2",
    "XRAY_FLOOR_MACRO_AUROC": "0.5",
    "XRAY_FLOOR_SENSITIVITY": "0.0",
    "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0",
    "XRAY_PATIENT_REGEX": "",
    "XRAY_SHORTCUT_POLICY": "block",
    "XRAY_HEAD_RECIPE": "linear",
    "XRAY_HEAD_L2_GRID": "0.1",
    "OMP_NUM_THREADS": "1",
}
SCENARIO_S = 900


def test_the_first_week_from_the_readme(tmp_path):
    incoming = tmp_path / "data" / "incoming"
    with prefect_server(tmp_path / "prefect-server") as api_url:
        env = {**client_env(api_url, tmp_path / "prefect-client"), **TEST_ENV, **WEEK_ENV,
               "XRAY_HOME": str(tmp_path / "home"), "XRAY_INCOMING": str(incoming),
               "XRAY_ALLOWED_ROOTS": str(tmp_path / "data"), "PYTHONPATH": str(PROJECT)}
        done = subprocess.run([sys.executable, "scripts/first_week.py", "--deploy", "--json"], cwd=PROJECT,
                              env=env, capture_output=True, text=True, timeout=SCENARIO_S, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
    week = json.loads(done.stdout)

    assert week["monday"]["state"] == "Promoted"  # the first champion, v1
    assert week["night"]["paused_state"] == "Paused"  # the audit blocked: the run waits on its form
    # Two batches taken, the half-copied one left for a later night.
    assert week["batches"] == {"2026-11-20": "taken", "2026-11-21": "taken", "2026-11-22": "waiting"}
    # The new site's films drift from the champion's reference, in result.json and the report.
    assert week["drift"]["flagged"] is True
    assert week["report_drift"].startswith("**Flagged: the new films do not look like the champion's")
    assert "drift-report" in week["artifacts"] and "retrain-report" in week["artifacts"]

    # The deployment page's query (every state): both nightly runs, the paused one included; the tags.
    names = {week["monday"]["name"], week["night"]["name"]}
    paused = {r["name"]: r["state"] for r in week["while_paused"]["all_states"]}
    assert paused == {week["monday"]["name"]: "Promoted", week["night"]["name"]: "Paused"}
    ended = {r["name"]: (r["state"], r["tags"]) for r in week["runs"]["all_states"]}
    assert ended == {name: ("Promoted", ["decision:promoted"]) for name in names}
    assert {r["name"] for r in week["runs"]["decision_tags"]} == names

    # Approved from a shell as the form would: the challenger is champion, the reviewer in the history.
    assert week["review"]["decision"] == "approve" and week["review"]["reviewer"] == "alice"
    assert week["night"]["state"] == "Promoted"
    version = week["challenger"]
    assert week["champion_after"] == version
    assert [m["version"] for m in week["models"] if m["status"] == "champion"] == [version]
    last = week["history"][-1] if week["history"][-1]["champion_after"] == version else week["history"][0]
    assert (last["decision"], last["actor"], last["champion_after"]) == ("approved", "alice", version)
    assert last["flow_run_id"] == week["night"]["id"]
