"""The unit lane's promise, enforced: no backbone run, no subprocess, no server, no fork or multiprocessing,
no Prefect flow run.

While a test in tests/unit runs (its module's fixtures included), each of these raises
:class:`LaneViolation` with a message naming the call and saying where the test belongs:
- ``subprocess.Popen`` (and so ``subprocess.run``/``check_output``, asyncio subprocesses), ``os.system``,
  ``os.posix_spawn``/``posix_spawnp``;
- ``os.fork``/``os.forkpty`` and ``multiprocessing``'s ``Process.start`` (pools, ProcessPoolExecutor, any
  start method);
- ``socket.listen`` (a server);
- building densenet (``torchvision.models.densenet.DenseNet``) or running the frozen backbone's forward
  (``xray_core.model.backbone.FrozenDenseNetFeatures.forward``, which ``Backbone.embed`` and the Grad-CAM
  heatmaps call);
- calling a Prefect flow (``prefect.flows.Flow.__call__``).

Why a guard and not a promise in the Makefile: the lane drifted (a retrain on ``memory://`` and a
forking race test had crept in), and only a failing test keeps it honest.

torch, torchvision and prefect are not imported here (a single small test file would pay seconds for
them): a module already imported is guarded at once, one imported later (a test body's own import) the
moment its import finishes, through a meta-path hook that lives only while the unit lane runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import multiprocessing.process
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

MOVE = ("tests/unit is the pure lane (no backbone run, subprocess, server, fork, multiprocessing or "
        "Prefect flow run). Move the test, unchanged, to tests/integration (Prefect flows: tests/flows), "
        "or give it a fake instead of the real thing.")
# Libraries that probe the machine with a short command of their own, which is not the test's doing:
# ctypes.util.find_library runs `ldconfig -p` (torch, while being imported), and joblib's loky runs
# `lscpu --parse=core` to count physical cores (scikit-learn, before its first threaded fit).
LIBRARY_PROBES = ("ctypes.util", "joblib.externals.loky.backend.context")
# Session fixtures are set up before any module's guard: the ones that start a server are refused by name.
SERVER_FIXTURES = ("prefect_server",)
CALL_REPORT = pytest.StashKey[pytest.TestReport]()  # a test's call-phase report, for the teardown check


class LaneViolation(BaseException):
    """A unit test reached something only the integration lanes may run.

    A BaseException, as pytest's own ``Failed`` is, so that code under test which catches ``Exception``
    (to report or quarantine) cannot swallow it; a violation swallowed anyway fails the test at teardown.
    """


class Lane:
    """The calls refused in this module, and the violations seen (for the teardown check)."""

    Violation = LaneViolation  # for tests here: ``from conftest import`` names tests/conftest.py

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.patch = patch
        self.violations: list[str] = []

    def refuse(self, what: str, original: Callable[..., Any],
               allow_from: tuple[str, ...] = ()) -> Callable[..., Any]:
        """A stand-in for ``what`` that records and raises instead of running it, unless called from
        a module in ``allow_from``."""

        def refused(*args: Any, **kwargs: Any) -> Any:
            if allow_from and _called_from(allow_from):
                return original(*args, **kwargs)
            test = os.environ.get("PYTEST_CURRENT_TEST", "a unit test").rsplit(" ", 1)[0]
            message = f"{test} called {what}. {MOVE}"
            self.violations.append(message)
            raise LaneViolation(message)

        return refused

    def guard(self, target: object, name: str, what: str, allow_from: tuple[str, ...] = ()) -> None:
        self.patch.setattr(target, name, self.refuse(what, getattr(target, name), allow_from))


def _called_from(modules: tuple[str, ...]) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") in modules:
            return True
        frame = frame.f_back
    return False


def _guard_densenet(lane: Lane, module: ModuleType) -> None:
    lane.guard(module.DenseNet, "__init__", "a densenet build (torchvision.models.densenet.DenseNet)")


def _guard_backbone(lane: Lane, module: ModuleType) -> None:
    lane.guard(module.FrozenDenseNetFeatures, "forward",
               "the backbone's forward (xray_core.model.backbone.FrozenDenseNetFeatures.forward)")


def _guard_prefect(lane: Lane, module: ModuleType) -> None:
    lane.guard(module.Flow, "__call__", "a Prefect flow run (prefect.flows.Flow.__call__)")


# Modules guarded when (or as soon as) they are imported: name -> what to patch in them.
ON_IMPORT: dict[str, Callable[[Lane, ModuleType], None]] = {
    "torchvision.models.densenet": _guard_densenet,
    "xray_core.model.backbone": _guard_backbone,
    "prefect.flows": _guard_prefect,
}


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Finds the watched modules through the ordinary path finder and guards each right after it runs."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def find_spec(self, fullname: str, path: Any,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        apply = ON_IMPORT.get(fullname)
        if apply is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # not a plain module file: left to the other finders, and not guarded
        run = spec.loader.exec_module

        def exec_then_guard(module: ModuleType) -> None:
            run(module)
            apply(self.lane, module)

        # A fresh loader serves each spec, so replacing its method guards only this module.
        spec.loader.exec_module = exec_then_guard  # type: ignore[method-assign]  # replaced on purpose
        return spec


@pytest.fixture(scope="module", autouse=True)
def unit_lane_guard() -> Iterator[Lane]:
    """Module-scoped, so that a module fixture which runs the backbone or a subprocess is caught too."""
    with pytest.MonkeyPatch.context() as patch:
        lane = Lane(patch)
        lane.guard(subprocess.Popen, "__init__", "a subprocess (subprocess.Popen)", allow_from=LIBRARY_PROBES)
        for name in ("system", "posix_spawn", "posix_spawnp", "fork", "forkpty"):
            if hasattr(os, name):
                lane.guard(os, name, f"os.{name}")
        lane.guard(multiprocessing.process.BaseProcess, "start", "a multiprocessing process start")
        lane.guard(socket.socket, "listen", "a server (socket.listen)")
        for name, apply in ON_IMPORT.items():
            if name in sys.modules:
                apply(lane, sys.modules[name])
        finder = _GuardOnImport(lane)
        sys.meta_path.insert(0, finder)
        try:
            yield lane
        finally:
            sys.meta_path.remove(finder)


@pytest.fixture(autouse=True)
def unit_lane(unit_lane_guard: Lane, request: pytest.FixtureRequest) -> Iterator[Lane]:
    """Refuses server fixtures by name, and fails a test whose code swallowed a violation."""
    for name in SERVER_FIXTURES:
        if name in request.fixturenames:
            pytest.fail(f"{request.node.nodeid} uses the {name} fixture. {MOVE}", pytrace=False)
    unit_lane_guard.violations.clear()
    yield unit_lane_guard
    report = request.node.stash.get(CALL_REPORT, None)
    if unit_lane_guard.violations and report is not None and report.passed:
        pytest.fail("passed although it made a refused call (its code caught the error): "
                    + unit_lane_guard.violations[0], pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    """Gives ``conftest`` back to tests/conftest.py for the test modules' ``from conftest import ...``.

    conftest.py files outside packages share the module name ``conftest``: pytest drops the one loaded
    before from ``sys.modules`` while it imports this one, so without this every later ``from conftest
    import TEST_ENV`` (in tests/unit and tests/integration alike) would find this file instead.
    """
    root = Path(__file__).resolve().parent.parent / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        if isinstance(plugin, ModuleType) and Path(getattr(plugin, "__file__", "") or ".").resolve() == root:
            sys.modules["conftest"] = plugin


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keeps the call phase's report, so the teardown check fails only tests that passed."""
    report = yield
    if call.when == "call":
        item.stash[CALL_REPORT] = report
    return report
