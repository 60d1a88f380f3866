"""A throw-away ``prefect server start`` for the tests that need a real, fresh server (a deployment
trigger firing, ``prefect deploy`` on an empty server): a free port, its own PREFECT_HOME, no UI, no
telemetry, and the stopping of what was started (its process group). Used by tests/flows/test_trigger.py,
tests/flows/test_deploy.py and tests/flows/test_review_server.py (:func:`prefect_server`: a server
the test's own processes and the test both reach)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_START_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a server on ``port`` with PREFECT_HOME ``home``, and of its clients: this
    process's environment without its PREFECT_* settings (the session's test harness), plus ``extra``."""
    return client_env(f"http://127.0.0.1:{port}/api", home, **extra)


def client_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that talks to the server at ``api_url`` with PREFECT_HOME ``home``
    (a server reads the same): no other PREFECT_* setting leaks in, telemetry off, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", "PREFECT_LOGGING_LEVEL": "WARNING", **extra,
    })
    return env


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:``port`` in its own process group, output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui"], env=env, cwd=env["PREFECT_HOME"], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End a process a test started, and its process group (a runner's flow-run children)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_for_server(api_url: str, timeout_s: float) -> bool:
    """Whether the server at ``api_url`` answered its health check within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not answers(api_url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """Start a server with PREFECT_HOME ``home``; yield its API URL; skip the test if none answers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # Services with nothing to do here: off, to spare the CPU (events are still stored).
    env = server_env(home, port, **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
                                    for name in ("SCHEDULER", "LATE_RUNS", "FOREMAN")})
    log = home / "server.log"
    proc = start_server(port, env, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not answers(api_url):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.skip(
                    f"no Prefect server answered at {api_url} within {SERVER_START_S:.0f} s; "
                    f"its log:\n{tail(log)}"
                )
            time.sleep(0.5)
        yield api_url
    finally:
        stop(proc)
