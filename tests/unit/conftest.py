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

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from lanes import MOVE, SERVER_FIXTURES, Lane, guarded

CALL_REPORT = pytest.StashKey[pytest.TestReport]()  # a test's call-phase report, for the teardown check


@pytest.fixture(scope="module", autouse=True)
def unit_lane_guard() -> Iterator[Lane]:
    """Module-scoped, so that a module fixture which runs the backbone or a subprocess is caught too."""
    with guarded() as lane:
        yield lane


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
