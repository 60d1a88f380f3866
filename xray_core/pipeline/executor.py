"""How the recipe's steps run: each step declares its options beside its definition (``@step``), in one
table (:data:`STEPS`) that every executor reads.

An executor turns a step into a callable with the step's own signature: ``run.step(train)(settings,
snapshot, flow_run_id)``. Go-to-definition and mypy follow the call to the step (the ``ParamSpec``
keeps its parameters and return type); no step is chosen by a string or by an argument's position.

- :class:`DirectExecutor` calls the step (``xray retrain --local``, tests, benchmarks).
- ``flows.retrain.PrefectExecutor`` runs it as a Prefect task named after the step, retried on
  transient I/O where the step says so, with a progress artifact, and fans the embedding out over
  Dask when ``XRAY_EMBED_DASK_WORKERS`` > 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar, cast

if TYPE_CHECKING:  # the recipe's module imports this one
    from xray_core.pipeline.review import ReviewAnswer, ReviewRequest

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# The progress a step can report: files ingested, (image, view) pairs embedded, epochs trained.
ProgressKey = Literal["ingest", "embed", "train"]


@dataclass(frozen=True)
class StepOptions:
    """What an executor needs to know about one step, declared with ``@step`` above it."""

    name: str  # the Prefect task's name: the runs list (and tests reading task runs) know steps by it
    # Retried once, after 5 s, when a flaky share fails it (flows.common.transient_io decides what is
    # transient); only steps that read or write files a network share may hold.
    retry_transient_io: bool = False
    # The step takes ``progress=``: the executor passes the reporter for this key (a Prefect progress
    # artifact, the CLI's progress bar) or nothing.
    progress: ProgressKey | None = None
    # The step takes ``fan_out=``: an executor that can spread the work over Dask workers passes one.
    dask_fan_out: bool = False


STEPS: dict[Callable[..., Any], StepOptions] = {}


def step(
    name: str,
    *,
    retry_transient_io: bool = False,
    progress: ProgressKey | None = None,
    dask_fan_out: bool = False,
) -> Callable[[F], F]:
    """Declare a function a step of the recipe, with its options; the function itself is unchanged."""

    def declare(fn: F) -> F:
        STEPS[fn] = StepOptions(
            name, retry_transient_io=retry_transient_io, progress=progress, dask_fan_out=dask_fan_out
        )
        return fn

    return declare


def options_of(fn: Callable[..., Any]) -> StepOptions:
    """The options ``fn`` was declared with; a function that is not a step is refused."""
    try:
        return STEPS[fn]
    except KeyError:
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} is not a step of the recipe: declare it with "
            f"@step(name, ...) (steps: {', '.join(o.name for o in STEPS.values())})"
        ) from None


class Executor(Protocol):
    """Runs the recipe's steps; ``step(fn)`` returns a callable with ``fn``'s signature.

    ``review(ask, before_waiting=...)`` asks a person and waits for the answer
    (:mod:`xray_core.pipeline.review`), calling ``before_waiting`` (it gives up the retrain lock) just
    before it starts to wait; an executor with nobody to ask returns ``ReviewAnswer.nobody(why)`` at once.
    """

    def step(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def review(
        self, ask: ReviewRequest, *, before_waiting: Callable[[], None] | None = None
    ) -> ReviewAnswer: ...


class DirectExecutor:
    """Plain calls: ``xray retrain --local``, tests and benchmarks. ``progress`` maps a progress key
    (:data:`ProgressKey`) to a callback, e.g. the CLI's progress bar; steps without one get none."""

    def __init__(self, progress: Mapping[str, Callable[..., None]] | None = None) -> None:
        self._progress = dict(progress or {})

    def step(self, fn: Callable[P, T]) -> Callable[P, T]:
        options = options_of(fn)
        reporter = self._progress.get(options.progress) if options.progress else None
        if reporter is None:
            return fn
        return cast(Callable[P, T], functools.partial(cast(Callable[..., T], fn), progress=reporter))

    def review(self, ask: ReviewRequest, *, before_waiting: Callable[[], None] | None = None) -> ReviewAnswer:
        """Nobody to ask: the run keeps the recipe's decision, as before review existed, and says so."""
        from xray_core.pipeline.review import ReviewAnswer

        return ReviewAnswer.nobody("a run without Prefect (xray retrain --local) has no reviewer")
