"""A zygote: one interpreter that imports the pipeline once and forks a fresh child for each run.

The crash-safety tests SIGKILL a real retrain some twenty times. Started as ``python -c``, each run
paid ~3 s of CPU importing torch, SQLAlchemy and the pipeline before it did anything. The zygote
imports those modules once, and only imports them: it opens no database, runs no torch op and starts
no thread (checked before every fork: the process has one thread, no SQLAlchemy engine, no cached
settings). For each request it forks a child that takes the request's environment, runs the code as
``python -c`` would (then joins its threads and runs the exit handlers), and exits. The zygote reads
the child's output until every process of the run has closed it, as ``subprocess.run`` does, and
answers with the exit code as ``subprocess`` reports it (``-9`` for a SIGKILL). The kill is still a
real SIGKILL of a real process (``XRAY_FAULT_KILL_AT``, xray_core/faults.py), and the crash points
count their hits per process, so each child counts from zero.

Things read when a module is imported (``OMP_NUM_THREADS`` by the OpenMP runtime) keep the value the
zygote started with: the test process's, as for the subprocesses it replaces.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

_SERVER = "import sys; sys.path.insert(1, {tests!r}); from zygote import serve; serve(sys.argv[1:])"


class Run(NamedTuple):
    returncode: int  # as subprocess says: the exit status, or -N when signal N ended the run
    output: str  # what the run wrote to stdout and stderr, together


class Zygote:
    """The test's side: ``with Zygote(modules) as z: z.run(code, env)``."""

    def __init__(self, preload: Sequence[str]):
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER.format(tests=str(Path(__file__).resolve().parent)), *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, code: str, env: Mapping[str, str], timeout: float) -> Run:
        """Run ``code`` in a child forked from the zygote, with exactly the environment ``env``."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps({"code": code, "env": dict(env), "timeout": timeout}) + "\n")
        stdin.flush()
        # the zygote answers within the run's timeout (it kills a child that overruns); a zygote that
        # does not answer at all must not hang the suite (there is no pytest timeout)
        if not select.select([stdout], [], [], timeout + 60)[0]:
            self._proc.kill()
            raise RuntimeError(f"the zygote did not answer within {timeout + 60:.0f} s")
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote ended (exit {self._proc.wait()}):\n{self._stderr()[-3000:]}")
        reply = json.loads(line)
        if reply["returncode"] is None:
            raise subprocess.TimeoutExpired(["<zygote child>", code], timeout, output=reply["output"])
        return Run(reply["returncode"], reply["output"])

    def _stderr(self) -> str:
        return self._proc.stderr.read() if self._proc.stderr is not None else ""

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()  # the zygote ends at the end of its input
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(preload: Sequence[str]) -> None:
    """The zygote's side: import ``preload``, then one child per request line on stdin."""
    for name in preload:
        importlib.import_module(name)
    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        _check_pristine()
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(request, write_end)  # never returns
        os.close(write_end)
        returncode, output = _wait(pid, read_end, request["timeout"])
        print(json.dumps({"returncode": returncode, "output": output}), flush=True)


def _check_pristine() -> None:
    """Nothing a fork would copy badly: no thread but this one (torch's intra-op pool is not started;
    OpenMP's threads do not survive a fork), no database engine, no settings read."""
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise RuntimeError(f"the zygote runs {len(threads)} threads; it must fork with one")
    engine = sys.modules.get("db.engine")
    if engine is not None and engine._engines:
        raise RuntimeError("the zygote has a database engine")
    settings = sys.modules.get("xray_core.settings")
    if settings is not None and settings.get_settings.cache_info().currsize:
        raise RuntimeError("the zygote has read settings")


def _child(request: dict, write_end: int) -> None:
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        os.environ.clear()
        os.environ.update(request["env"])
        from xray_core.settings import reset_settings

        reset_settings()
        code = _exec(request["code"])
        threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter does before it exits:
        # joins non-daemon threads after the hooks that stop concurrent.futures executors left open
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - before or after the code: said, exit 1
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def _exec(code: str) -> int:
    """Run ``code`` as ``python -c`` runs it; its exit code."""
    try:
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - as the interpreter does: the traceback, exit code 1
        traceback.print_exc()
        return 1
    return 0


def _wait(pid: int, read_end: int, timeout: float) -> tuple[int | None, str]:
    """Read the run's output until every process holding it closed it, then reap the child; on
    timeout, SIGKILL the child and answer None."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, _text(chunks)
            chunk = pipe.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), _text(chunks)


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode(errors="replace")

