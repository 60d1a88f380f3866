"""The retrain flow ends in a state named after its decision, and the recipe is the same with or
without Prefect: ``Promoted``, ``Skipped`` (a missing incoming folder is a quiet night), ``Kept``,
``Insufficient evidence``; the flow and the direct executor write the same report files. Each run
carries its decision as a tag (``decision:promoted``, ...) beside the tags it was created with, and a
tag that cannot be written changes nothing else."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db import session_scope
from db.schema import Promotion
from xray_core.data.catalogue import open_catalogue
from xray_core.data.synthetic import write_dataset
from xray_core.settings import get_settings, load_settings, reset_settings

POLICY = {"XRAY_MIN_TEST_PER_CLASS": "2", "XRAY_FLOOR_MACRO_AUROC": "0.5", "XRAY_FLOOR_SENSITIVITY": "0.3",
          "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0"}


@pytest.fixture
def policy(xray_env, monkeypatch, prefect_server):
    for key, value in POLICY.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    return monkeypatch


def _server_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state

    return asyncio.run(read())


def _server_tags(state) -> list[str]:
    """The flow run's tags as the API has them (what filters and automations see)."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).tags

    return asyncio.run(read())


def _decisions() -> list[str]:
    with session_scope(open_catalogue(get_settings())) as s:
        return [p.decision for p in s.scalars(select(Promotion).order_by(Promotion.id))]


def test_each_outcome_is_a_named_final_state(policy, tmp_path):
    from prefect import tags

    from flows.retrain import retrain

    write_dataset(tmp_path / "b1", patients_per_label=14, images_per_patient=1, size=64, seed=1)
    with tags("from-a-deployment"):  # a tag the run was created with is kept beside the decision's
        state = retrain(sources=[str(tmp_path / "b1")], use_incoming=False, trigger="test", return_state=True)
    first = state.result()
    assert state.name == "Promoted" and state.is_completed()
    assert sorted(_server_tags(state)) == ["decision:promoted", "from-a-deployment"]
    assert state.message.startswith(f"v{first['train']['version']} becomes the first champion")
    server = _server_state(first["flow_run_id"])  # what the runs list shows
    assert server.name == "Promoted" and server.message == state.message

    # The nightly deployment before /data/incoming exists: a clean skip that names the folder.
    missing = tmp_path / "incoming-not-yet"
    state = retrain(incoming=str(missing), trigger="schedule", return_state=True)
    assert state.name == "Skipped" and state.is_completed()
    assert f"nothing new in {missing} (the folder does not exist)" in state.message
    assert "nothing new since champion" in state.message
    assert _server_tags(state) == ["decision:skipped"]
    report = Path(state.result()["report"]).read_text()
    assert "Skipped" in report and "Champion vs challenger" not in report

    # The same data again, forced, under a superiority policy: identical weights are not better.
    policy.setenv("XRAY_PROMOTION_MODE", "superiority")
    reset_settings()
    state = retrain(use_incoming=False, force=True, trigger="test", return_state=True)
    kept = state.result()
    assert state.name == "Kept", state.message
    assert state.message.startswith(f"champion v{first['train']['version']} stays")
    assert kept["champion_after"] == first["train"]["version"]
    assert _server_tags(state) == ["decision:kept"]

    policy.setenv("XRAY_MIN_TEST_PER_CLASS", "500")
    reset_settings()
    state = retrain(use_incoming=False, force=True, trigger="test", return_state=True)
    assert state.name == "Insufficient evidence", state.message
    assert _server_tags(state) == ["decision:insufficient-evidence"]
    assert _decisions() == ["promote", "keep", "insufficient_evidence"]  # a skip records no decision


def test_refused_and_failed_runs_are_tagged_and_a_tag_that_cannot_be_written_changes_nothing(
        policy, tmp_path, monkeypatch):
    """Refused (a path outside the allowed roots) and Failed (an error the user must fix) are tagged
    too; when the API refuses the tag, the run still ends in its own state, untagged."""
    from flows import common
    from flows.retrain import retrain

    state = retrain(sources=["/etc"], use_incoming=False, trigger="test", return_state=True)
    assert state.name == "Refused" and _server_tags(state) == ["decision:refused"]

    write_dataset(tmp_path / "tiny", patients_per_label=1, images_per_patient=1, size=64, seed=2)
    state = retrain(sources=[str(tmp_path / "tiny")], use_incoming=False, trigger="test", return_state=True)
    assert state.is_failed() and state.name == "Failed" and _server_tags(state) == ["decision:failed"]

    def api_down(flow_run_id, tag):
        raise OSError("connection refused")

    monkeypatch.setattr(common, "write_decision_tag", api_down)
    state = retrain(sources=["/etc"], use_incoming=False, trigger="test", return_state=True)
    assert state.is_failed() and state.name == "Refused" and "/etc" in state.message
    assert _server_tags(state) == []


def test_local_and_flow_runs_write_the_same_report_files(policy, tmp_path, monkeypatch):
    from flows.retrain import retrain
    from xray_core.pipeline.cycle import run_retrain
    from xray_core.pipeline.recipe import RetrainRequest

    write_dataset(tmp_path / "src", patients_per_label=10, images_per_patient=1, size=64, seed=4)
    runs = {}
    for name in ("local", "flow"):
        monkeypatch.setenv("XRAY_HOME", str(tmp_path / f"home-{name}"))
        monkeypatch.setenv("XRAY_DATABASE_URL", f"sqlite:///{tmp_path / f'home-{name}' / 'catalogue.db'}")
        reset_settings()
        if name == "local":
            out = run_retrain(load_settings(),
                              RetrainRequest(sources=(str(tmp_path / "src"),), trigger="test")).as_dict()
        else:
            out = retrain(sources=[str(tmp_path / "src")], use_incoming=False, trigger="test")
        folder = Path(out["report"]).parent
        runs[name] = (sorted(p.name for p in folder.iterdir()),
                      json.loads((folder / "result.json").read_text()))
    (local_files, local), (flow_files, flow) = runs["local"], runs["flow"]
    assert local_files == flow_files and {"report.md", "report.html", "result.json",
                                          "split.json"} <= set(flow_files)
    for key in ("state", "state_message", "status", "split_counts", "champion_after"):
        assert local[key] == flow[key], key
    assert local["decision"]["decision"] == flow["decision"]["decision"]
    assert (local["challenger_eval"]["metrics"]["macro_auroc"]
            == flow["challenger_eval"]["metrics"]["macro_auroc"])
    assert local["challenger_eval"]["probabilities"] == flow["challenger_eval"]["probabilities"]


def test_a_cancelled_run_records_a_failed_audit_row(policy, tmp_path, monkeypatch):
    """KeyboardInterrupt, Prefect's TerminationSignal and SIGTERM are BaseExceptions: still audited."""
    from xray_core.pipeline import steps
    from xray_core.pipeline.cycle import run_retrain
    from xray_core.pipeline.recipe import RetrainRequest

    write_dataset(tmp_path / "src", patients_per_label=8, images_per_patient=1, size=64, seed=5)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(steps, "evaluate_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_retrain(get_settings(),
                    RetrainRequest(sources=(str(tmp_path / "src"),), trigger="test")).as_dict()
    with session_scope(open_catalogue(get_settings())) as s:
        row = s.scalars(select(Promotion)).one()
        assert row.decision == "failed" and "cancelled" in row.rationale and row.champion_after is None
    reports = sorted(get_settings().reports_dir.glob("*/report.md"))
    assert reports and "Failed" in reports[-1].read_text()
