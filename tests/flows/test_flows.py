"""The Prefect flows end to end, under one session-scoped ``prefect_test_harness``.

Covers: the retrain flow twice (first promotion, then a champion-vs-challenger decision) with its
artifacts read back through the Prefect client; ``prefect.yaml`` deployed to the test server and
``retrain/manual`` run by a real process worker (``--run-once``); the one-retrain-at-a-time guard; a
failing task leaving the champion unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from db import session_scope
from db.schema import Model, Promotion
from xray_core.data.catalogue import open_catalogue
from xray_core.data.synthetic import write_dataset
from xray_core.errors import RetrainBusyError
from xray_core.settings import get_settings

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

FLOW_ENV = {
    "XRAY_MIN_TEST_PER_CLASS": "2",
    "XRAY_FLOOR_MACRO_AUROC": "0.5",
    "XRAY_FLOOR_SENSITIVITY": "0.3",
    # the second run's decision may go either way; the test checks it is recorded
    "XRAY_PROMOTION_MARGIN": "0.5",
    "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0",
}


@pytest.fixture
def flow_env(xray_env, monkeypatch, prefect_server):
    for key, value in FLOW_ENV.items():
        monkeypatch.setenv(key, value)
    from xray_core.settings import reset_settings

    reset_settings()
    return {**xray_env, **FLOW_ENV}


def _batch(root: Path, *, offset: int, seed: int) -> Path:
    write_dataset(root, patients_per_label=14, images_per_patient=1, size=64,
                  seed=seed, patient_offset=offset)
    return root


def _artifacts(flow_run_id: str) -> dict[str, list]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    out: dict[str, list] = {}
    for art in asyncio.run(read()):
        out.setdefault(art.key or art.type, []).append(art)
    return out


def test_retrain_flow_twice_promotes_then_decides_with_artifacts(flow_env, tmp_path):
    from flows.retrain import retrain

    first = retrain(sources=[str(_batch(tmp_path / "b1", offset=0, seed=1))],
                    use_incoming=False, trigger="test")
    assert first["status"] == "completed"
    assert first["decision"]["decision"] == "promote", first["decision"]["rationale"]
    assert first["champion_after"] == first["train"]["version"]
    assert first["ingests"][0]["added"] == 28

    arts = _artifacts(first["flow_run_id"])
    report = arts["retrain-report"][0].data
    assert "random-init" in report and "## Decision" in report and "promote" in report
    metrics = arts["retrain-metrics"][0].data
    assert {row["metric"] for row in metrics if isinstance(row, dict)} >= {"macro_auroc"} or \
        "macro_auroc" in str(metrics)
    assert "model-registry" in arts
    assert "drift-report" not in arts  # no champion to check the first films against
    assert "retrain-embedding" in arts or any(a.type == "progress" for v in arts.values() for a in v)
    assert Path(first["report"]).is_file()
    html_report = Path(first["report"]).with_name("report.html")  # self-contained, linked from the artifact
    from html.parser import HTMLParser

    HTMLParser().feed(html_text := html_report.read_text())
    assert 'id="roc"' in html_text and 'id="heatmaps"' in html_text and "data:image/png;base64," in html_text
    assert str(html_report) in report

    second = retrain(sources=[str(_batch(tmp_path / "b2", offset=500, seed=2))],
                     use_incoming=False, trigger="test")
    assert second["status"] == "completed"
    ch, champ = second["challenger_eval"], second["champion_eval"]
    assert champ is not None and champ["version"] == first["train"]["version"]
    assert ch["test_set_fingerprint"] == champ["test_set_fingerprint"]
    assert second["decision"]["decision"] in ("promote", "keep")
    assert second["embed"]["computed"] > 0  # only the new images were embedded ...
    assert second["embed"]["cached"] > 0  # ... the first batch came from the cache
    # New films and a champion: the retrain's drift check is a keyed artifact and a section of the report.
    arts = _artifacts(second["flow_run_id"])
    (drift,) = arts["drift-report"]
    assert drift.data.startswith("# Drift of the new films: ") and second["drift"]["summary"] in drift.data
    flagged = second["drift"]["flagged"]
    assert drift.description.startswith("Drift flagged: " if flagged else "No drift flagged: ")
    assert "## Drift of the new films" in arts["retrain-report"][0].data
    estimated = second["drift"]["checks"][0]["performance"]["accuracy"]  # before labels, beside the realised
    assert f"accuracy estimated {100 * estimated:.0f}% before labels, realised" in drift.data
    with session_scope(open_catalogue(get_settings())) as s:
        decisions = [p.decision for p in s.scalars(select(Promotion).order_by(Promotion.id))]
        champions = s.scalars(select(Model.id).where(Model.status == "champion")).all()
    assert decisions[0] == "promote" and len(decisions) == 2
    assert len(champions) == 1


def test_second_retrain_is_refused_while_one_runs(flow_env, tmp_path):
    from flows.retrain import retrain
    from xray_core.pipeline.lock import retrain_lock

    with retrain_lock(get_settings()):
        with pytest.raises(RetrainBusyError, match="another retrain is running"):
            retrain(use_incoming=False, trigger="test")


def test_failing_task_leaves_champion_unchanged_and_is_recorded(flow_env, tmp_path, monkeypatch):
    from flows.retrain import retrain

    first = retrain(sources=[str(_batch(tmp_path / "b1", offset=0, seed=1))],
                    use_incoming=False, trigger="test")
    champion = first["champion_after"]
    assert champion is not None

    def broken(*args, **kwargs):
        raise OSError("injected: disk unplugged during evaluation")

    from xray_core.pipeline import steps

    monkeypatch.setattr(steps, "evaluate_step", broken)
    with pytest.raises(Exception, match="injected"):
        retrain(sources=[str(_batch(tmp_path / "b2", offset=500, seed=2))],
                use_incoming=False, trigger="test")
    with session_scope(open_catalogue(get_settings())) as s:
        assert s.scalars(select(Model.id).where(Model.status == "champion")).all() == [champion]
        last = s.scalars(select(Promotion).order_by(Promotion.id.desc())).first()
        assert last.decision == "failed" and "injected" in last.rationale and last.champion_after == champion

    monkeypatch.undo()
    for key, value in flow_env.items():  # again through monkeypatch: undone at teardown, never leaked
        monkeypatch.setenv(key, value)
    from xray_core.settings import reset_settings

    reset_settings()
    again = retrain(use_incoming=False, trigger="test")  # the next run picks up cleanly, features reused
    assert again["status"] == "completed"
    assert again["embed"]["computed"] == 0
    assert again["champion_after"] == again["train"]["version"]  # promoted (margin 0.5 in FLOW_ENV)
    skipped = retrain(use_incoming=False, trigger="test")  # nothing new since that champion: skip
    assert skipped["status"] == "skipped" and "nothing new since champion" in skipped["summary"]
    assert Path(skipped["report"]).read_text().startswith("# Skipped: ")  # the decision first


def _cli(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_prefect_yaml_deploys_and_a_process_worker_runs_retrain_manual(flow_env, prefect_server, tmp_path):
    # The file as it is (tests/flows/test_deploy.py checks its defaults and `make deploy`'s override):
    # no variable set, the worker finds the flows through the working directory the deploy recorded.
    env = {**os.environ, **flow_env, "PREFECT_API_URL": prefect_server["api_url"],
           "PREFECT_HOME": prefect_server["home"]}
    source = _batch(tmp_path / "incoming", offset=0, seed=1)
    steps = [
        ["work-pool", "create", "xray-process", "--type", "process", "--overwrite"],
        ["work-queue", "create", "retrain", "--pool", "xray-process", "--limit", "1"],
        ["--no-prompt", "deploy", "--all"],
        ["deployment", "run", "retrain/manual", "--param", f'sources=["{source}"]'],
    ]
    for args in steps:
        done = _cli(args, env)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    deployed = _cli(["deployment", "ls"], env).stdout
    for name in ("retrain/nightly", "retrain/manual", "ingest/manual", "predict/batch", "promote/manual",
                 "rollback/manual"):
        assert name in deployed.replace("│", " "), deployed
    import asyncio

    from prefect.client.orchestration import get_client

    worker = _cli(["worker", "start", "--pool", "xray-process", "--run-once"], env, timeout=480)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

    import yaml

    yaml_names = {d["name"] for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]}

    async def states():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            # Only the deployments of prefect.yaml: other tests on the same session server (e.g. the
            # allowed-roots test's own deployment, whose run ends Refused on purpose) are not this test's.
            ours = {d.id: d.name for d in await client.read_deployments() if d.name in yaml_names}
            return [(r.name, r.state.type.value if r.state else None, ours[r.deployment_id],
                     r.state.name if r.state else None, (r.state.message or "")[:300] if r.state else None,
                     r.tags) for r in runs if r.deployment_id in ours]

    runs = asyncio.run(states())
    assert runs and all(state == "COMPLETED" for _, state, *_ in runs), (runs, worker.stdout[-4000:],
                                                                        worker.stderr[-4000:])
    # The deployment's tags, and the decision the run added to them from the worker's process.
    assert all({"xray", "retrain", f"decision:{name.lower()}"} <= set(tags)
               for _, _, _, name, _, tags in runs), runs
    with session_scope(open_catalogue(get_settings())) as s:
        audit = s.scalars(select(Promotion)).all()
    assert audit and audit[-1].trigger == "manual" and audit[-1].flow_run_id


def test_predict_drift_note_carries_the_performance_estimate():
    """The predict flow's drift-report note ends with the CBPE estimate, marked unreliable beside drift."""
    import numpy as np

    from flows.predict import drift_markdown
    from xray_core.monitor.performance import UNRELIABLE, estimate

    est = estimate(np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]]), threshold=0.5, positive=1, drift=True)
    check = {"verdict": "drift: inputs differ", "ood_line": "3 of 3 films look unlike", "performance": est}
    note = drift_markdown(check, "/data/new")
    assert "Performance before labels (CBPE): estimated accuracy 77%" in note and UNRELIABLE in note
