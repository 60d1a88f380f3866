"""Flow parameters that name paths are confined to the allowed roots (issue 23, item 5).

Under the session's ``prefect_test_harness``: a flow asked for ``/etc``, a ``..`` or a link out of the
root, or a relative path ends ``Failed`` named ``Refused`` with one line, runs no task (so nothing is
retried) and reads or writes nothing (no source row, no quarantine file, no report folder). An allowed
path works and the catalogue records it resolved. The ``xray`` CLI, running the flow in-process with
PREFECT_API_URL set, passes the paths its user typed; the exemption ends with that call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import fetch

from db.schema import Source
from xray_core.data.synthetic import write_dataset
from xray_core.errors import PathRefusedError
from xray_core.settings import get_settings, load_settings, reset_settings


@pytest.fixture
def roots(xray_env, monkeypatch, prefect_server, tmp_path):
    """XRAY_ALLOWED_ROOTS = <tmp>/allowed, holding a small labelled folder ``src``; ``outside`` beside it."""
    allowed = tmp_path / "allowed"
    write_dataset(allowed / "src", patients_per_label=2, images_per_patient=1, size=64, seed=1)
    write_dataset(tmp_path / "outside", patients_per_label=2, images_per_patient=1, size=64, seed=2)
    monkeypatch.setenv("XRAY_ALLOWED_ROOTS", str(allowed))
    monkeypatch.delenv("XRAY_INCOMING", raising=False)
    reset_settings()
    return allowed


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            return await client.read_task_runs(flow_run_filter=runs)

    return asyncio.run(read())


def _assert_refused(state, *words: str) -> None:
    """Failed, named for it, one line naming the problem; no task ran, nothing was read or written."""
    assert state.is_failed() and state.name == "Refused", (state.name, state.message)
    assert "\n" not in state.message and all(w in state.message for w in words), state.message
    assert _task_runs(state.state_details.flow_run_id) == []  # no task: nothing to retry, nothing read
    settings = get_settings()
    assert fetch(settings, Source) == []
    assert not (settings.home / "quarantine").exists() and not settings.reports_dir.exists()
    with pytest.raises(PathRefusedError):  # a direct caller gets the same line as an exception
        state.result()


def test_ingest_and_retrain_of_etc_are_refused_before_anything_is_read(roots):
    from flows.ingest import ingest
    from flows.retrain import retrain

    _assert_refused(ingest(path="/etc", return_state=True), "path=/etc", "outside the allowed roots",
                    str(roots))
    _assert_refused(ingest(path=str(roots / "src"), manifest="/etc/passwd", return_state=True),
                    "manifest=/etc/passwd")
    _assert_refused(retrain(sources=["/etc"], use_incoming=False, trigger="test", return_state=True),
                    "sources[0]=/etc", "outside the allowed roots")
    _assert_refused(retrain(sources=[str(roots / "src")], manifests=["/etc/passwd"], use_incoming=False,
                            trigger="test", return_state=True), "manifests[0]=/etc/passwd")
    _assert_refused(retrain(incoming="/etc", trigger="test", return_state=True), "incoming=/etc")


def test_dotdot_relative_and_linked_escapes_are_refused(roots, tmp_path):
    from flows.ingest import ingest
    from flows.retrain import retrain

    escape = f"{roots}/src/../../outside"
    _assert_refused(ingest(path=escape, return_state=True), f"resolves to {tmp_path / 'outside'}")
    _assert_refused(retrain(sources=[escape], use_incoming=False, trigger="test", return_state=True),
                    "sources[0]=", "outside the allowed roots")
    _assert_refused(ingest(path="allowed/src", return_state=True), "relative path", "absolute")
    _assert_refused(retrain(sources=["src"], use_incoming=False, trigger="test", return_state=True),
                    "sources[0]=src is a relative path")
    (roots / "link").symlink_to(tmp_path / "outside")
    _assert_refused(ingest(path=str(roots / "link"), return_state=True),
                    f"resolves to {tmp_path / 'outside'}")
    # A root that is a string prefix of the path is not its parent: <tmp>/allowed-evil is outside.
    write_dataset(tmp_path / "allowed-evil", patients_per_label=1, images_per_patient=1, size=64, seed=3)
    _assert_refused(ingest(path=str(tmp_path / "allowed-evil"), return_state=True),
                    "outside the allowed roots")


def test_predict_refuses_inputs_outside_and_outputs_outside_predictions(roots, tmp_path):
    from flows.predict import predict

    for kwargs, words in [({"path": "/etc"}, "path=/etc"),
                          ({"path": str(roots / "src"), "out": str(tmp_path / "x.csv")}, "out="),
                          ({"path": str(roots / "src"), "heatmaps": str(roots / "src" / "normal")},
                           "heatmaps="),
                          ({"path": str(roots / "src"), "manifest": "rows.csv"}, "relative")]:
        state = predict(**kwargs, return_state=True)
        _assert_refused(state, words)
    assert not (tmp_path / "x.csv").exists() and not (get_settings().home / "predictions").exists()


def test_an_allowed_path_works_and_the_source_is_recorded_resolved(roots):
    from flows.ingest import ingest

    (roots / "via-link").symlink_to(roots / "src")
    for given in (f"{roots}/src/../src", str(roots / "via-link")):
        state = ingest(path=given, check_drift=False, return_state=True)
        assert state.is_completed(), state.message
    sources = fetch(get_settings(), Source)
    assert [s.path for s in sources] == [str((roots / "src").resolve())] * 2
    assert state.result()["added"] == 0  # the second run saw the same files


def test_the_cli_with_a_prefect_server_passes_the_users_own_path(roots, prefect_server, monkeypatch, capsys,
                                                                 tmp_path):
    from flows.ingest import ingest
    from xray_cli.main import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_server["api_url"])  # the CLI runs the flow, in-process
    monkeypatch.chdir(tmp_path)
    reset_settings()
    # Relative, as typed in the user's shell: the CLI resolves it there and allows it for this call.
    assert main(["ingest", "outside", "--json"]) == 0, capsys.readouterr().err
    assert [s.path for s in fetch(get_settings(), Source)] == [str((tmp_path / "outside").resolve())]
    # The exemption was for that call only: the same path in a bare flow run (as from the UI) is refused.
    state = ingest(path=str(tmp_path / "outside"), return_state=True)
    assert state.name == "Refused" and "outside the allowed roots" in state.message


def test_make_serve_defaults_allow_the_incoming_folders_parent(tmp_path):
    """`make serve` sets XRAY_INCOMING=/data/incoming: the nightly's `incoming`, and sources under /data,
    pass."""
    from xray_core.io.allowed_roots import confine_parameters

    settings = load_settings({"XRAY_HOME": str(tmp_path / "home"), "XRAY_INCOMING": "/data/incoming"})
    assert settings.allowed_roots == (Path("/data"),)
    paths = confine_parameters(settings, read={"incoming": "/data/incoming", "sources": ["/data/2026-11-20"]})
    assert paths == {"incoming": "/data/incoming", "sources": ["/data/2026-11-20"]}
    with pytest.raises(PathRefusedError, match=r"^sources\[0\]=/etc is outside the allowed roots \(/data; "):
        confine_parameters(settings, read={"sources": ["/etc"]})


def test_a_deployment_run_gets_no_exemption(roots, prefect_server, tmp_path):
    """What a worker does with a run from the UI or `prefect deployment run`: a fresh process loads the
    flow from its entrypoint and runs the stored parameters. Nothing there sets the caller's paths, and
    the path outside the roots ends the run Refused on the server, with no task run."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client

    from flows.ingest import ingest

    project = Path(__file__).resolve().parents[2]

    async def create() -> str:
        deployment_id = await (await ingest.ato_deployment(name="roots-test")).apply()
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"path": str(tmp_path / "outside"), "check_drift": False})
        return str(run.id)

    run_id = asyncio.run(create())
    env = {**os.environ, "PREFECT_API_URL": prefect_server["api_url"], "PREFECT__FLOW_RUN_ID": run_id}
    done = subprocess.run([sys.executable, "-m", "prefect.engine"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)

    async def state():
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).state

    final = asyncio.run(state())
    assert final.name == "Refused" and final.is_failed(), (final, done.stdout[-2000:], done.stderr[-2000:])
    assert "outside the allowed roots" in final.message and "\n" not in final.message
    assert _task_runs(run_id) == [] and fetch(get_settings(), Source) == []


def test_the_cli_retrain_passes_a_relative_source_as_its_user_typed_it(roots, prefect_server, monkeypatch,
                                                                      capsys, tmp_path):
    """`xray retrain --source outside` from the user's shell: the flow gets "outside" as typed and takes it
    against this process's folder (the user's own), because this call typed it; the source is recorded
    resolved. Four films are too few to train on: the run gets as far as that (exit 2 saying so), past
    the confinement, which would have refused the relative path from anyone else."""
    from xray_cli.main import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_server["api_url"])
    monkeypatch.chdir(tmp_path)
    reset_settings()
    code = main(["retrain", "--source", "outside", "--no-incoming", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "training needs images" in err and "allowed roots" not in err, err[-2000:]
    assert [s.path for s in fetch(get_settings(), Source)] == [str((tmp_path / "outside").resolve())]
    from flows.retrain import retrain

    # The same text in a run nobody typed it for (the UI, a deployment) is refused.
    state = retrain(sources=["outside"], use_incoming=False, trigger="test", return_state=True)
    assert state.name == "Refused" and "sources[0]=outside is a relative path" in state.message
