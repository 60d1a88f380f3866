"""A throw-away ``prefect server start`` for the tests that need a real, fresh server (a deployment
trigger firing, ``prefect deploy`` on an empty server): a free port, its own PREFECT_HOME, no UI, no
telemetry, and the stopping of what was started (its process group). Used by tests/flows/test_trigger.py
and tests/flows/test_deploy.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a server on ``port`` with PREFECT_HOME ``home``, and of its clients: this
    process's environment without its PREFECT_* settings (the session's test harness), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
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
