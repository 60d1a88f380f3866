"""scripts/ui_screenshot.py without a browser or a server: its usage errors and exit codes."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ui_screenshot.py"


@pytest.fixture(scope="module")
def shot():
    spec = importlib.util.spec_from_file_location("ui_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_base_is_derived_from_the_page_url(shot):
    assert shot.api_base("http://127.0.0.1:4311/runs") == "http://127.0.0.1:4311/api"


@pytest.mark.parametrize("url", ["127.0.0.1:4200/runs", "file:///tmp/runs", "http:///runs"])
def test_a_url_that_is_not_http_is_bad_usage(shot, url, capsys):
    with pytest.raises(SystemExit) as exc:
        shot.api_base(url)
    assert exc.value.code == 2 and "http://127.0.0.1:4200/runs" in capsys.readouterr().err


def test_a_missing_browser_is_bad_usage_that_says_how_to_install(shot, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        shot.main(["--chromium", str(tmp_path / "no-chromium")])
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err


def test_no_browser_on_path_names_the_install_command(shot, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        shot.find_browser(None)
    assert exc.value.code == 2 and "apt-get install -y chromium" in capsys.readouterr().err


def test_a_server_that_does_not_answer_fails_before_the_browser_runs(shot, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\nexit 99\n")
    fake.chmod(0o755)
    out = tmp_path / "ui"
    argv = ["--url", f"http://127.0.0.1:{port}/runs", "--chromium", str(fake), "--out-dir", str(out)]
    assert shot.main(argv) == 1
    assert "make serve" in capsys.readouterr().err and not out.exists()


def test_non_positive_sizes_are_bad_usage(shot, capsys):
    assert shot.main(["--height", "0"]) == 2
    assert "--height must be a positive integer" in capsys.readouterr().err


def test_the_runs_list_and_the_deployment_page_are_captured(shot, tmp_path):
    pages = shot.captures("http://127.0.0.1:4311/runs", "0b5e-id", tmp_path)
    assert [(c.url, c.out.name) for c in pages] == [
        ("http://127.0.0.1:4311/runs", "runs.png"),
        ("http://127.0.0.1:4311/deployments/deployment/0b5e-id?tab=Runs", "deployment.png")]


def test_a_deployment_that_is_not_flow_slash_name_is_bad_usage(shot, capsys):
    assert shot.main(["--deployment", "nightly"]) == 2
    assert "retrain/nightly" in capsys.readouterr().err


def test_a_paused_run_is_pictured_with_its_resume_button_clicked(shot, tmp_path):
    pages = shot.captures("http://127.0.0.1:4311/runs", "0b5e-id", tmp_path, paused="9a1f-run")
    assert [(c.url, c.out.name, c.click) for c in pages][2:] == [
        ("http://127.0.0.1:4311/runs/flow-run/9a1f-run", "review-form.png", ("Resume",))]
    assert [c.click for c in pages[:2]] == [(), ("All run states",)]  # every run, custom states included
