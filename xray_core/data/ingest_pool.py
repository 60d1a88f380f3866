"""Where files are prepared for ingest: in this process, or in a pool of worker processes.

Preparing a file (:func:`~xray_core.data.prepare.examine`: read, sha256, decode and validate, pHash,
and for DICOM the de-identified copy) is independent, CPU-bound work. With ``XRAY_INGEST_WORKERS``
above 1 it runs in worker processes (:class:`PreparePool`) while this process stays the *single
writer*: it alone writes store files and catalogue rows (:mod:`xray_core.data.ingest`), so the
crash-safety argument (store file first, then the row, in short transactions) and the per-file
outcomes are the same as with one process. A worker reads the file from its path itself and sends
back everything the writer needs (sha256, facts, pHash, verdict, the bytes to store).

Workers start by ``fork`` when this process runs no other thread, else from a ``forkserver`` (see
:func:`start_method`). Results come back in submission order through a bounded window of files in
flight (at most :data:`IN_FLIGHT_BYTES` of them, by size), so progress, groups and outcomes follow
the source's order.
"""

from __future__ import annotations

import functools
import gc
import itertools
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from xray_core.data.prepare import Prepared, examine
from xray_core.data.scan import Candidate
from xray_core.errors import XrayError
from xray_core.faults import crash_point
from xray_core.settings import Settings

# In flight: 4 files per worker, plus a write group's worth, so that workers keep going while the
# writer writes a group (store copies, fsyncs, transaction); and at most this many of their bytes.
FILES_IN_FLIGHT_PER_WORKER, FILES_AHEAD, IN_FLIGHT_BYTES = 4, 32, 128 * 2**20
HEAD_START_FILES = 32  # at most this many files examined in the writer while the workers start


class IngestWorkerError(XrayError):
    """A worker process died (killed, or out of memory) while preparing files (exit code 1)."""

def resolve_workers(settings: Settings) -> int:
    """XRAY_INGEST_WORKERS, with 0 meaning the cores this process may use."""
    if settings.ingest_workers > 0:
        return settings.ingest_workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_STOP: list[Any] = []  # in a worker: the pool's "results no longer wanted" event (init_worker)


def examine_in_worker(cand: Candidate, st: os.stat_result, settings: Settings,
                      regex: re.Pattern[str] | None) -> Prepared | None:
    if _STOP and _STOP[0].is_set():
        return None  # the pool is closing: files still queued to a worker are not examined
    prep = examine(cand, st, settings, regex)  # as a worker process runs it
    crash_point("ingest.worker_prepared")
    return prep


def start_method() -> str:
    """How worker processes start: ``fork`` when this process runs no other Python thread (the ``xray
    ingest`` command, the benchmark), else ``forkserver``, or ``spawn`` where neither exists.

    A forked worker is a copy of this process, which has imported everything already: it starts in
    milliseconds, where a forkserver spends ~0.8 s of CPU importing pydicom, Pillow, numpy and the
    settings once per ingest (on 2 cores, a fifth of the 162 shared films' whole preparation). Forking
    while another thread runs could copy a lock that thread holds into the worker (a deadlock there),
    so a process with threads (a Prefect flow run: its event loop, log and API threads) keeps the
    forkserver: workers forked from a clean single-threaded server. Threads that native libraries
    start are not Python threads: numpy's OpenBLAS stops its own around ``fork`` (pthread_atfork).
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


class PreparePool:
    """An ordered queue of files being prepared: by :func:`examine` in ``workers`` processes, or
    in this process when ``workers`` is 1 (then nothing runs ahead and no process is started).

    ``put`` takes a file to examine or a ready item (a skipped file, a known rejection); ``ready``
    says whether the oldest item must be taken before more are put; ``take`` returns items in the
    order they were put, not yet settled (:func:`~xray_core.data.prepare.settle_group` does that per
    write group). A worker that dies (SIGKILL, out of memory) fails the ingest with
    :class:`IngestWorkerError`: the rows already committed stay, and the next ingest carries on.

    Start-up: the workers are started when the first file needs examining (a re-scan of unchanged
    files starts none). Forked workers (:func:`start_method`) are ready at once. Otherwise they start
    in a background thread, and until they answer the first files (at most :data:`HEAD_START_FILES`)
    are examined in this process, so the ~1 s a forkserver takes to start (importing pydicom,
    Pillow, numpy) is not spent waiting.
    """

    def __init__(self, workers: int, settings: Settings, regex: re.Pattern[str] | None,
                 known_sha: Callable[[str], str | None]):
        self.workers, self.settings, self.regex, self.known_sha = workers, settings, regex, known_sha
        self.window = workers * FILES_IN_FLIGHT_PER_WORKER + FILES_AHEAD if workers > 1 else 0
        self._queue: deque = deque()
        self._sizes: deque[int] = deque()  # the queue's file sizes (stat), summed in _bytes
        self._bytes = 0
        self._executor: ProcessPoolExecutor | None = None
        self._stop: Any = None  # a multiprocessing Event the workers see, made with the executor
        self._starter: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._head_start = 0  # files examined here while the workers started
        self._blas_limit: Any = None  # this process's BLAS limit while forked workers run (_fork_workers)
        # Files whose examination began before the catalogue was open (prefetch): id(cand) -> entry,
        # and the entry that put((cand, st)) hands over next (its stat was just taken by the caller).
        self._ahead: dict[int, tuple[Candidate, os.stat_result, Future]] = {}
        self._handover: tuple[Candidate, os.stat_result, Future] | None = None

    def __enter__(self) -> PreparePool:
        return self

    def prefetch(self, candidates: Iterator[Candidate]) -> Iterator[Candidate]:
        """Forked workers only: stat the first files and start examining them now, while the caller
        opens the catalogue (~0.3 s of CPU in a new process: importing Alembic, checking or upgrading
        the schema), then return the same candidates in the same order.

        The caller takes each one's stat back with :meth:`prefetched_stat` and then ``put((cand,
        st))`` hands over the examination already under way; a file the caller skips as unchanged
        since last seen was examined for nothing (at most :attr:`window` files on a re-scan, in the
        workers, while this process opens the catalogue). Started here, before this process opens a
        database connection or any thread: the workers are forked from a process holding neither."""
        if self.workers < 2 or start_method() != "fork":
            return candidates
        head = list(itertools.islice(candidates, self.window))
        held = 0
        for cand in head:
            if cand.problem or held > IN_FLIGHT_BYTES:
                continue
            try:
                st = cand.path.stat()
            except (OSError, ValueError):
                continue  # the caller's own stat says why
            pool = self._pool()
            assert pool is not None  # forked: started at once
            self._ahead[id(cand)] = (cand, st, pool.submit(examine_in_worker, cand, st, self.settings,
                                                           self.regex))
            held += st.st_size
        return itertools.chain(head, candidates)

    def prefetched_stat(self, cand: Candidate) -> os.stat_result | None:
        """The stat taken when ``cand`` was prefetched, or None (then the caller stats it itself)."""
        self._drop_handover()
        self._handover = self._ahead.pop(id(cand), None)
        return self._handover[1] if self._handover is not None else None

    def _drop_handover(self) -> None:
        if self._handover is not None:
            self._handover[2].cancel()  # the file was skipped: its result, if any, is not needed
            self._handover = None

    def __exit__(self, *exc: object) -> None:
        self._drop_handover()
        for _, _, future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        if self._starter is not None:
            self._starter.join()
        if self._executor is not None:
            self._stop.set()  # nothing still in flight is wanted now: queued files are not examined
            self._executor.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._executor = None
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None

    def _new_executor(self, method: str, limit_blas: bool = True) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload([__name__, "xray_core.data.images"])
        self._stop = ctx.Event()
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=init_worker,
                                   initargs=(os.getpid(), self._stop, limit_blas))

    def _fork_workers(self) -> ProcessPoolExecutor:
        """The executor, its workers forked now (its first submit forks them all) with one BLAS thread
        and the garbage collector's objects frozen.

        BLAS: OpenBLAS stops its threads around ``fork``; a worker setting its own limit would start
        them again, and a new OpenBLAS thread spins for ~0.1 s of CPU before it sleeps (each worker,
        each ingest). Set here, the workers inherit the limit and never start one; this process keeps
        it until the pool closes (:meth:`__exit__`), as it needs no BLAS threads meanwhile.

        ``gc.freeze``: the objects this process holds (modules, settings, SQLAlchemy's tables) are
        never visited by a worker's collections, which would otherwise copy every page they touch.
        """
        executor = self._new_executor("fork", limit_blas=False)
        self._blas_limit = _blas().limit(limits=1)
        gc.freeze()
        try:
            executor.submit(os.getpid)  # forks the workers (the "fork" start method starts them all)
        except BaseException:  # e.g. fork failing for memory after the first worker: stop those started.
            # Their manager thread never started, so shutdown() alone would leave them waiting for work,
            # and this process waiting for them at exit: they are killed and reaped.
            started = list((getattr(executor, "_processes", None) or {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            for process in started:
                process.kill()
                process.join()
            raise
        finally:
            gc.unfreeze()
        return executor

    def _start(self, method: str) -> None:
        """Background thread: create the executor and wait until every worker has answered once."""
        try:
            self._executor = self._new_executor(method)
            for probe in [self._executor.submit(os.getpid) for _ in range(self.workers)]:
                probe.result()
        except BaseException as exc:  # noqa: BLE001 - handed to the ingesting thread, which raises it
            self._start_error = exc
        finally:
            self._started.set()

    def _pool(self) -> ProcessPoolExecutor | None:
        """The started executor, or None while it starts (the first call starts it)."""
        if self._starter is None and not self._started.is_set():
            method = start_method()
            if method == "fork":
                # The workers are forked at the first submit, from this thread, before the executor
                # starts its own threads: copies of this process, ready in milliseconds.
                self._executor = self._fork_workers()
                self._started.set()
                return self._executor
            self._starter = threading.Thread(target=self._start, args=(method,), name="xray-ingest-workers",
                                             daemon=True)
            self._starter.start()
        if not self._started.is_set():
            return None
        if self._start_error is not None:
            if isinstance(self._start_error, BrokenProcessPool):
                raise _worker_died()
            raise self._start_error
        return self._executor

    def put(self, item: object) -> None:
        """A ready item, or a ``(cand, st)`` pair to examine."""
        size = item[1].st_size if isinstance(item, tuple) else 0
        handover, self._handover = self._handover, None
        if isinstance(item, tuple) and handover is not None and handover[0] is item[0]:
            item = handover[2]  # examined since prefetch, with the same stat
        elif handover is not None:
            handover[2].cancel()
        if isinstance(item, tuple):
            cand, st = item
            pool = self._pool() if self.workers > 1 else None
            if pool is None and self.workers > 1 and self._head_start >= HEAD_START_FILES:
                self._started.wait()
                pool = self._pool()
            if pool is not None:
                try:
                    item = pool.submit(examine_in_worker, cand, st, self.settings, self.regex)
                except BrokenProcessPool:
                    raise _worker_died() from None
            else:
                self._head_start += 1
                # One BLAS thread here too, as in a worker (init_worker): with 1 worker on a loaded 2-core
                # machine the pHash's BLAS threads spun (23 s of CPU for 162 films, against about 6 s).
                with _blas().limit(limits=1):
                    item = examine(cand, st, self.settings, self.regex, self.known_sha)
        self._queue.append(item)
        self._sizes.append(size)
        self._bytes += size

    def ready(self) -> bool:
        return len(self._queue) > self.window or (len(self._queue) > 1 and self._bytes > IN_FLIGHT_BYTES)

    def __len__(self) -> int:
        return len(self._queue)

    def take(self) -> Prepared | None:
        item = self._queue.popleft()
        self._bytes -= self._sizes.popleft()
        if isinstance(item, Future):
            try:
                return item.result()
            except BrokenProcessPool:
                raise _worker_died() from None
        return item


@functools.cache
def _blas() -> Any:  # threadpoolctl's ThreadpoolController, made once: its limit() then costs ~10 us
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def init_worker(pid: int, stop: Any, limit_blas: bool = True) -> None:
    """Worker initializer.

    One BLAS thread per worker: the pHash's matrix products would otherwise start a thread per core
    in every worker, and N workers x N threads on N cores spin against each other (measured: no
    speed-up at all with 2 workers on 2 cores). threadpoolctl comes with scikit-learn.

    Exit once the ingesting process is gone: a SIGKILLed ingest cannot shut its pool down, and
    workers blocked on their queue would otherwise live on, holding its output pipes open (a caller
    reading them would wait forever).

    SIGTERM ends a worker, as it would a fresh process: a forked one inherits the CLI's handler that
    turns SIGTERM into an exception, which the pool would carry back as that file's result.

    ``stop``: set by the pool when it closes, so that files already queued to a worker (prefetched
    files found unchanged, or an ingest that failed) are not examined while the pool waits for it.
    """
    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _STOP[:] = [stop]
    if limit_blas:  # not when forked with the limit already set (PreparePool._fork_workers)
        threadpool_limits(limits=1)
    threading.Thread(target=_watch, args=(pid,), name="xray-watch-parent", daemon=True).start()


def _watch(pid: int) -> None:
    while _alive(pid):
        time.sleep(0.5)
    os._exit(1)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed parent nobody has reaped yet is a zombie, which kill(pid, 0)
    still finds, so Linux's /proc state is read first."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux)
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _worker_died() -> IngestWorkerError:
    return IngestWorkerError(
        "an ingest worker process died (killed, or out of memory) while preparing files; the files "
        "committed before it are kept and the next ingest carries on from there. Run the ingest again "
        "(XRAY_INGEST_WORKERS=1 prepares files in the ingesting process)")
