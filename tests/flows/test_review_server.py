"""Review in the UI, against a real ``prefect server start``: the blocked run pauses with its form and the
answer goes through the API.

One throw-away server for the module (tests/prefect_server.py). Each test runs ``xray retrain`` in a
process of its own against it, on a small confounded two-site collection (covid19 films only from one
site, normal films only from the other: tests/integration/test_sites.py) with
``XRAY_SHORTCUT_POLICY=block``, so the shortcut audit blocks and ``XRAY_REVIEW`` defaults to ``blocked``.
The run pauses with the review form (its schema and the question saved on the run, as the UI reads
them) and emits ``xray.review.requested``; ``xray review`` then answers through the API, as the form
does. Shown: an approval makes the challenger champion, with the reviewer in ``xray models --history``;
a rejection (the run named by its name) keeps it out; no answer within ``XRAY_REVIEW_TIMEOUT_H`` ends
Kept with "review expired", after which an answer is refused (exit 2). The recipe's branches (stale
approvals included) are unit-tested with a fake executor: tests/unit/test_review.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BLOCKING_POLICY, PROJECT, TEST_ENV, write_confounded_sites
from prefect_server import client_env, prefect_server, stop, tail

PAUSED_WITHIN_S = 300.0  # ingest, embed, train and evaluate on two busy cores, then the pause
ENDED_WITHIN_S = 120.0
POLICY = {**BLOCKING_POLICY, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The module's Prefect server and the confounded collection's two manifests."""
    root = tmp_path_factory.mktemp("review")
    manifests = write_confounded_sites(root)
    with prefect_server(root / "prefect-server") as api_url:
        yield {
            "api_url": api_url,
            "root": root,
            "manifests": list(manifests),
        }


class Run:
    """``xray retrain`` in a process of its own, with its XRAY_HOME, against the test server."""

    def __init__(self, server: dict[str, Any], tmp_path: Path, **env: str) -> None:
        self.home, self.api_url = tmp_path / "home", server["api_url"]
        self.env = {
            **client_env(self.api_url, tmp_path / "prefect-client"),
            **TEST_ENV,
            **POLICY,
            **env,
            "XRAY_HOME": str(self.home),
            "XRAY_ALLOWED_ROOTS": str(server["root"]),
            "PYTHONPATH": str(PROJECT),
        }
        self.log = tmp_path / "retrain.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "xray_cli.main",
                    "retrain",
                    "--no-incoming",
                    "--json",
                    *[arg for m in server["manifests"] for arg in ("--manifest", m)],
                ],
                env=self.env,
                cwd=PROJECT,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )

    def paused_run(self) -> Any:
        """The flow run once it is paused for its review (the registry names its challenger's run)."""
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + PAUSED_WITHIN_S
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"xray retrain ended ({self.proc.returncode}) before pausing:\n{tail(self.log)}"
                    )
                run_id = flow_run_of(self.home, 1)
                if run_id:
                    run = client.read_flow_run(run_id)
                    if run.state is not None and run.state.is_paused():
                        return run
                time.sleep(1.0)
        pytest.fail(f"the retrain did not pause within {PAUSED_WITHIN_S:.0f} s:\n{tail(self.log)}")

    def result(self) -> dict[str, Any]:
        """What ``xray retrain --json`` printed once the run ended."""
        try:
            out, _ = self.proc.communicate(timeout=ENDED_WITHIN_S)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            pytest.fail(
                f"the retrain did not end within {ENDED_WITHIN_S:.0f} s of the answer:\n{tail(self.log)}"
            )
        assert self.proc.returncode == 0, tail(self.log)
        return json.loads(out)


def flow_run_of(home: Path, version: int) -> str | None:
    """The flow run that trained ``version`` (None before it is registered), read-only: the run may be
    creating the catalogue at that moment (no table yet, or locked while it migrates)."""
    import sqlite3

    db = home / "catalogue.db"
    if not db.exists():
        return None
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT flow_run_id FROM models WHERE id = ?", (version,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0] if row else None


def xray(
    run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str, str]:
    """The ``xray`` command in this process, with the run's XRAY_HOME and Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from xray_cli import main as cli
    from xray_core.settings import reset_settings

    for key, value in run.env.items():
        if key.startswith("XRAY_") or key == "PREFECT_API_URL":
            monkeypatch.setenv(key, value)
    reset_settings()
    capsys.readouterr()
    with temporary_settings(updates={PREFECT_API_URL: run.api_url}):
        code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def form_of(run_id: Any) -> tuple[dict[str, Any], str]:
    """(the form's JSON schema, the text above it) as saved on the paused run for the UI."""
    from prefect.client.orchestration import get_client

    from flows.review import KEYSET

    async def read() -> tuple[Any, Any]:
        async with get_client() as client:
            return (
                await client.read_flow_run_input(run_id, KEYSET["schema"]),
                await client.read_flow_run_input(run_id, KEYSET["description"]),
            )

    schema, description = asyncio.run(read())
    return json.loads(schema), json.loads(description)


def review_events(version: int) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    async def read() -> list[Any]:
        async with get_client() as client:
            page = await client.read_events(
                filter=EventFilter(event=EventNameFilter(name=["xray.review.requested"])), limit=50
            )
            return [e for e in page.events if e.resource.id == f"xray.model.v{version}"]

    deadline = time.monotonic() + 30
    while not (found := asyncio.run(read())) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def history(
    run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[list[dict], str]:
    code, out, err = xray(run, monkeypatch, capsys, "models", "--history", "--json")
    assert code == 0, err
    rows = json.loads(out)
    code, text, err = xray(run, monkeypatch, capsys, "models", "--history")
    assert code == 0, err
    return rows, text


def test_approving_the_paused_run_promotes_the_challenger_with_the_reviewer_recorded(
    server, tmp_path, monkeypatch, capsys
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run = Run(server, tmp_path)
    try:
        with temporary_settings(updates={PREFECT_API_URL: run.api_url}):
            paused = run.paused_run()
            schema, description = form_of(paused.id)
            (event,) = review_events(1)
        # The form the UI shows: approve or reject, reviewer, reason; the question above it.
        assert schema["properties"]["decision"]["enum"] == ["approve", "reject"]
        assert set(schema["required"]) == {"decision", "reviewer", "reason"}
        assert (
            "### Review challenger v1" in description and "the shortcut audit flagged the data" in description
        )
        assert "FAILED shortcut_audit" in description
        assert event.payload["flow_run_id"] == str(paused.id) and event.payload["decision"] == "blocked"
        assert event.payload["url"].endswith(f"/runs/flow-run/{paused.id}")
        # While it waits, the retrain lock is free for a nightly run.
        assert (run.home / "retrain.lock").read_text() == ""

        code, out, err = xray(
            run,
            monkeypatch,
            capsys,
            "review",
            "1",
            "--approve",
            "--reason",
            "the site confound is explained by the referral pattern",
            "--reviewer",
            "alice",
            "--wait",
            str(ENDED_WITHIN_S),
            "--json",
        )
        assert code == 0, err
        sent = json.loads(out)
        assert (sent["decision"], sent["reviewer"], sent["version"], sent["flow_run_id"]) == (
            "approve",
            "alice",
            1,
            str(paused.id),
        )
        assert sent["outcome"]["state"] == "Promoted", sent
        result = run.result()
    finally:
        stop(run.proc)

    assert result["state"] == "Promoted" and result["champion_after"] == 1
    assert result["state_message"].startswith("v1 becomes the first champion. Approved in review by alice")
    assert result["decision"]["decision"] == "approved"
    rows, text = history(run, monkeypatch, capsys)
    (row,) = rows  # one audit row for the outcome
    assert (row["decision"], row["actor"], row["champion_after"], row["flow_run_id"]) == (
        "approved",
        "alice",
        1,
        str(paused.id),
    )
    assert "approved: None -> champion 1 (challenger 1; trigger cli; by alice" in text
    assert "the site confound is explained by the referral pattern" in text
    code, out, _ = xray(run, monkeypatch, capsys, "models", "--json")
    assert code == 0 and [m["status"] for m in json.loads(out)] == ["champion"]


def test_rejecting_the_run_by_its_name_keeps_the_challenger_out(server, tmp_path, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run = Run(server, tmp_path)
    try:
        with temporary_settings(updates={PREFECT_API_URL: run.api_url}):
            paused = run.paused_run()
        code, out, err = xray(
            run,
            monkeypatch,
            capsys,
            "review",
            paused.name,
            "--reject",
            "--reason",
            "the label follows the site",
            "--reviewer",
            "bob",
            "--wait",
            str(ENDED_WITHIN_S),
        )
        assert code == 0, err
        assert f"reject sent to flow run {paused.name}" in out and "the run ended Kept" in out
        result = run.result()
    finally:
        stop(run.proc)

    assert result["state"] == "Kept" and result["champion_after"] is None
    rows, _ = history(run, monkeypatch, capsys)
    (row,) = rows
    assert (row["decision"], row["actor"]) == ("rejected", "bob")
    assert row["rationale"].startswith("Rejected in review by bob: the label follows the site.")


def test_an_unanswered_review_expires_and_then_refuses_an_answer(server, tmp_path, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run = Run(server, tmp_path, XRAY_REVIEW_TIMEOUT_H="0.003")  # about 11 seconds
    try:
        with temporary_settings(updates={PREFECT_API_URL: run.api_url}):
            paused = run.paused_run()
        result = run.result()
    finally:
        stop(run.proc)

    assert result["state"] == "Kept" and result["champion_after"] is None
    assert "Review expired: nobody answered within 0.003 h (XRAY_REVIEW_TIMEOUT_H)" in result["state_message"]
    rows, _ = history(run, monkeypatch, capsys)
    (row,) = rows
    assert (row["decision"], row["actor"]) == ("review_expired", None)

    code, _, err = xray(run, monkeypatch, capsys, "review", "1", "--approve", "--reason", "too late")
    assert code == 2 and f"flow run {paused.name} ({paused.id}) is Kept, not waiting for a review" in err
    code, _, err = xray(
        run,
        monkeypatch,
        capsys,
        "review",
        "00000000-0000-0000-0000-000000000000",
        "--reject",
        "--reason",
        "no such run",
    )
    assert code == 2 and "no flow run 00000000-0000-0000-0000-000000000000 on http://127.0.0.1:" in err
