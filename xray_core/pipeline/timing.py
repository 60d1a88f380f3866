"""What each step of a run cost: wall time, CPU time and peak memory, per step call (for benchmarks).

:class:`TimedExecutor` wraps another executor (the direct one by default) and records one
:class:`StepCost` per step call in ``records``, in call order. ``bench/year.py`` uses it to name the step
that grows over a year of nights, ``bench/retrain_scale.py`` to name the step that grows with the
catalogue.

CPU time (user + system of this process, from :func:`resource.getrusage`) is recorded beside wall time
because benchmarks here share two cores with other work: wall time then measures the load as much as the
step, CPU time much less so.

Peak memory is the step's own: on Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the process's
peak resident set (``VmHWM`` in ``/proc/self/status``) to its current size, so the peak read after the
step is the step's. Where that file is missing or not writable, the peak is the process's lifetime
maximum (``ru_maxrss``) and :attr:`StepCost.peak_is_lifetime` says so. Hand-written: psutil is not a
dependency, and it reads the same files.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from xray_core.pipeline.executor import DirectExecutor, Executor, options_of

if TYPE_CHECKING:
    from xray_core.pipeline.review import ReviewAnswer, ReviewRequest

P = ParamSpec("P")
T = TypeVar("T")

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class StepCost:
    """One step call: its name (``@step``'s), wall and CPU seconds, and peak resident memory in MB."""

    step: str
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    peak_is_lifetime: bool  # True where the per-step reset is unavailable: the process's peak so far
    failed: bool = False  # the step raised; its cost up to the exception is recorded

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_seconds() -> float:
    """User + system CPU seconds this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float | None:
    """``VmHWM`` of this process in MB, or None where /proc is unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _lifetime_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


class TimedExecutor:
    """An executor that runs each step through ``inner`` and records what it cost (:class:`StepCost`)."""

    def __init__(self, inner: Executor | None = None) -> None:
        self.inner: Executor = inner or DirectExecutor()
        self.records: list[StepCost] = []

    def step(self, fn: Callable[P, T]) -> Callable[P, T]:
        name = options_of(fn).name
        call = self.inner.step(fn)

        @functools.wraps(fn)
        def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            per_step = _reset_peak()
            wall, cpu = time.perf_counter(), cpu_seconds()
            failed = True
            try:
                value = call(*args, **kwargs)
                failed = False
                return value
            finally:
                peak = _peak_rss_mb() if per_step else None
                self.records.append(StepCost(
                    step=name, seconds=round(time.perf_counter() - wall, 4),
                    cpu_seconds=round(cpu_seconds() - cpu, 4),
                    peak_rss_mb=round(peak if peak is not None else _lifetime_peak_mb(), 1),
                    peak_is_lifetime=peak is None, failed=failed))

        return timed

    def review(self, ask: ReviewRequest, *, before_waiting: Callable[[], None] | None = None) -> ReviewAnswer:
        return self.inner.review(ask, before_waiting=before_waiting)

    def totals(self) -> dict[str, dict[str, float]]:
        """Per step name: summed seconds and CPU seconds over its calls, and the largest peak."""
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            t = out.setdefault(r.step, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_mb": 0.0, "calls": 0})
            t["seconds"] = round(t["seconds"] + r.seconds, 4)
            t["cpu_seconds"] = round(t["cpu_seconds"] + r.cpu_seconds, 4)
            t["peak_rss_mb"] = max(t["peak_rss_mb"], r.peak_rss_mb)
            t["calls"] += 1
        return out
