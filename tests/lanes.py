"""The unit lane's guard, shared by tests/unit/conftest.py (which puts every unit test under it) and
tests/integration/test_lane_guard.py (which shows each refusal: it makes the refused calls, so it lives
outside the lane it guards). See tests/unit/conftest.py for what is refused and why.
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
from contextlib import contextmanager
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


@contextmanager
def guarded() -> Iterator[Lane]:
    """Every refusal in place while the block runs (and only then): the calls patched, the watched modules
    guarded now or as soon as they are imported."""
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
