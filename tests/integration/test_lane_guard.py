"""The unit lane's guard (tests/lanes.py, put over every unit test by tests/unit/conftest.py) refuses each
thing the lane promises not to run. These tests make the refused calls, so they run here, under the same
guard, rather than in the lane that promises never to make them.

Each test makes the refused call inside ``pytest.raises`` and then forgets the recorded violation, so the
guard's teardown check (a violation that the code under test swallowed fails a passing test) stays quiet.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from lanes import Lane, guarded

Refused = Callable[[str], AbstractContextManager[None]]


@pytest.fixture(scope="module")
def lane_guard() -> Iterator[Lane]:
    """The unit lane's guard, as tests/unit/conftest.py puts it over each unit test module."""
    with guarded() as lane:
        yield lane


@pytest.fixture
def unit_lane(lane_guard: Lane) -> Lane:
    lane_guard.violations.clear()
    return lane_guard


@pytest.fixture
def refused(unit_lane, request: pytest.FixtureRequest) -> Iterator[Refused]:
    """``with refused("what"):`` expects the block to be refused with a message that names the call,
    this test and the lane to move it to; nothing may run past the refused call."""

    @contextmanager
    def expect(what: str) -> Iterator[None]:
        with pytest.raises(unit_lane.Violation) as info:
            yield
            pytest.fail(f"{what} was not refused")
        message = str(info.value)
        assert not isinstance(info.value, Exception)  # code that catches Exception cannot swallow it
        assert what in message and request.node.nodeid in message, message
        assert "Move the test, unchanged, to tests/integration" in message, message
        assert unit_lane.violations == [message]
        unit_lane.violations.clear()

    yield expect
    assert unit_lane.violations == []


def test_a_subprocess_is_refused_however_it_is_started(refused) -> None:
    with refused("a subprocess (subprocess.Popen)"):
        subprocess.run(["true"], check=True)
    with refused("a subprocess (subprocess.Popen)"):
        subprocess.check_output([sys.executable, "-c", "print(1)"])
    with refused("os.system"):
        os.system("true")
    with refused("os.posix_spawn"):
        os.posix_spawn("/bin/true", ["true"], os.environ)


def test_a_library_locating_a_shared_library_may_run_ldconfig(unit_lane) -> None:
    """ctypes.util.find_library's `ldconfig -p` (torch runs it while being imported) is not the test's
    doing; the same subprocess started by the test itself is refused (above)."""
    import ctypes.util

    assert ctypes.util.find_library("c")  # runs ldconfig through subprocess.Popen
    assert unit_lane.violations == []


def test_a_fork_and_a_multiprocessing_start_are_refused(refused) -> None:
    with refused("os.fork"):
        os.fork()
    for method in ("fork", "spawn"):
        process = multiprocessing.get_context(method).Process(target=print)
        with refused("a multiprocessing process start"):
            process.start()
        assert process.pid is None  # nothing was started


def test_a_server_socket_is_refused(refused) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))  # binding alone (to find a free port) is allowed
        with refused("a server (socket.listen)"):
            server.listen()


def test_building_densenet_and_running_the_backbone_are_refused(refused) -> None:
    """The densenet161 build and the frozen forward: what a real embed or a Grad-CAM heatmap runs."""
    import torch
    from torch import nn
    from torchvision.models import densenet161

    from xray_core.model.backbone import Backbone, FrozenDenseNetFeatures

    with refused("a densenet build (torchvision.models.densenet.DenseNet)"):
        densenet161(weights=None)
    # A stand-in module is cheap to build, but its forward is the backbone's forward all the same.
    backbone = Backbone(features=FrozenDenseNetFeatures(nn.Conv2d(3, 4, 1)), fingerprint="f" * 64,
                        weights="random", random_init=True, device=torch.device("cpu"), forward_batch=2)
    with refused("the backbone's forward"):
        backbone.embed(torch.zeros(2, 3, 8, 8))


def test_a_prefect_flow_run_is_refused(refused) -> None:
    from prefect import flow

    ran = []

    @flow
    def tiny() -> None:
        ran.append(True)

    with refused("a Prefect flow run (prefect.flows.Flow.__call__)"):
        tiny()
    assert ran == []
    tiny.fn()  # the function under the flow is plain Python, and allowed
    assert ran == [True]
