"""Engines that run the tasks of a night: in this process, a local process pool, Dask
distributed (a scheduler address or a LocalCluster) or Slurm through dask-jobqueue.

Every engine has ``submit(fn, *args, priority=...)`` returning a future, ``wait(futures)``
returning those of them that are done (at least one), ``result(future)`` and ``slots`` (how
many tasks to keep in flight), and is a context manager that shuts its workers down. Tasks
are module-level functions of picklable values, so the products do not depend on the
engine. After each task a worker gives its freed memory back to the system
(:func:`~panacea.allocator.release_freed_memory`), so that it does not hold the high-water
mark of its largest task while running small ones; between science tasks, which need about
the same memory each, it keeps it (:func:`trimmed_task`).
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import resource
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures

from ..allocator import release_freed_memory
from ..errors import PanaceaError
from .config import ExecutorSettings

log = logging.getLogger(__name__)


class Inline:
    """Run each task at once in this process (serial, ``--jobs 1``)."""

    parallel = False
    slots = 1

    def submit(self, fn, *args, priority: int = 0) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # re-raised by result(), as a pool would
            future.set_exception(err)
        return future

    def wait(self, futures: list) -> list:
        return list(futures)  # done when submitted

    def result(self, future: Future):
        return future.result()

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *exc) -> None:
        pass


class LocalPool:
    """A pool of ``jobs`` forked worker processes whose log records come back to this
    process (its console, the night's log file, and any handler a caller added)."""

    parallel = True

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.slots = jobs
        self._pool: ProcessPoolExecutor | None = None
        self._queue = None
        self._thread: threading.Thread | None = None

    def submit(self, fn, *args, priority: int = 0) -> Future:
        if self._pool is None:
            ctx = multiprocessing.get_context("fork")
            self._queue = ctx.Queue()
            self._thread = threading.Thread(target=_relay_logs, args=(self._queue,),
                                            daemon=True)
            self._thread.start()
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=ctx,
                                             initializer=_worker_init,
                                             initargs=(self._queue,))
        return self._pool.submit(trimmed_task, fn, *args)

    def wait(self, futures: list) -> list:
        return list(wait_futures(futures, return_when=FIRST_COMPLETED).done)

    def result(self, future: Future):
        return future.result()

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            self._queue.put(None)
            self._thread.join()
            self._queue.close()


def _relay_logs(queue) -> None:
    """Hand the workers' log records to this process's loggers until None arrives."""
    while True:
        record = queue.get()
        if record is None:
            return
        handle_record(record)


def handle_record(record: logging.LogRecord) -> None:
    """Hand a worker's log record to this process's logger of the same name (console,
    night log, any handler a caller added), if that logger takes its level."""
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


class DaskEngine:
    """Tasks on Dask distributed: the scheduler at ``address``, a SLURMCluster (``slurm``
    settings) or else a LocalCluster of ``jobs`` single-threaded worker processes."""

    parallel = True

    def __init__(self, settings: ExecutorSettings):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise PanaceaError("the dask and slurm engines need dask[distributed] (pip "
                               "install 'dask[distributed]' dask-jobqueue)") from None
        self.cluster = None
        self.slots = 10**6  # all ready tasks at once: the scheduler orders them by priority
        if settings.engine == "slurm":
            self.cluster = slurm_cluster(settings.slurm)
            self.cluster.scale(jobs=int(settings.slurm.get("jobs", 1)))
            self.client = Client(self.cluster)
            log.info("slurm: %s", self.cluster.job_script().splitlines()[1:6])
        elif settings.scheduler:
            self.client = Client(settings.scheduler)
        else:
            self.cluster = LocalCluster(n_workers=settings.jobs, threads_per_worker=1,
                                        processes=True, dashboard_address=None)
            self.client = Client(self.cluster)
            self.slots = settings.jobs
        log.info("dask: %s", self.client)

    def submit(self, fn, *args, priority: int = 0):
        return self.client.submit(logged_task, fn, *args, priority=priority, pure=False)

    def wait(self, futures: list) -> list:
        from dask.distributed import wait

        return list(wait(futures, return_when="FIRST_COMPLETED").done)

    def result(self, future):
        """The task's result; its log records are replayed here first."""
        value, records = future.result()
        for d in records:
            handle_record(logging.makeLogRecord(d))
        return value

    def __enter__(self) -> DaskEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def slurm_cluster(slurm: dict):
    """A dask-jobqueue SLURMCluster from the ``executor.slurm`` configuration section
    (queue, account, walltime, cores, memory); one single-threaded worker process per core
    of each job."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise PanaceaError("--slurm needs dask-jobqueue (pip install dask-jobqueue)") from None
    cores = int(slurm.get("cores", 1))
    return SLURMCluster(queue=slurm.get("queue"), account=slurm.get("account"),
                        walltime=slurm.get("walltime", "01:00:00"), cores=cores,
                        processes=cores, memory=slurm.get("memory", "4GB"),
                        log_directory=slurm.get("log_directory"),
                        job_extra_directives=list(slurm.get("extra", [])))


def make_engine(settings: ExecutorSettings, ntasks: int):
    """The engine of ``settings`` for a night of ``ntasks`` tasks."""
    if settings.engine in ("dask", "slurm"):
        return DaskEngine(settings)
    if settings.jobs > 1 and ntasks > 1:
        return LocalPool(min(settings.jobs, ntasks))
    return Inline()


def limit_threads() -> None:
    """One thread for the BLAS and OpenMP libraries of this process (threadpoolctl).

    The tasks' linear algebra is small (per-fiber normal equations, (280 x 12) by (12 x
    2064) products): a second BLAS thread only waits for the first, and with one task per
    core it spins on a core another task needs (one such product took 70 ms instead of
    1 ms on a loaded 2-core machine). The serial run, the pool's workers and Dask's
    workers then all compute with one thread, and give the same numbers.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def preload_compiled(modules: list | None = None) -> int:
    """Load the compiled machine code of the numba functions of ``modules`` (default: the
    imported ``panacea`` modules) from numba's on-disk cache (``cache=True``), for the
    signatures cached for this CPU; return how many were loaded.

    Called in the parent before the local pool forks: the workers then share the code
    instead of each loading it (~0.25 s of CPU and ~20 MB of private memory per process).
    Uses numba's cache index, which is not a public API: any error leaves the functions to
    load themselves at their first call, as without this.
    """
    import sys

    try:
        from numba.core.caching import NullCache
        from numba.core.registry import CPUDispatcher
    except ImportError:
        return 0
    if modules is None:
        modules = [m for name, m in list(sys.modules.items())
                   if name.startswith("panacea.") and m is not None]
    loaded = 0
    for module in modules:
        for fn in list(vars(module).values()):
            cache = getattr(fn, "_cache", None)
            if not isinstance(fn, CPUDispatcher) or cache is None or isinstance(cache, NullCache):
                continue
            try:
                magic = fn.targetctx.codegen().magic_tuple()
                for key in fn._cache._cache_file._load_index():
                    sig = key[0]
                    if key[1] != magic or sig in fn.overloads:
                        continue
                    # from the cache only, never compiled here (that is the first call's)
                    cres = fn._cache.load_overload(sig, fn.targetctx)
                    if cres is not None:
                        # as numba's own cache hit does: register the implementation so
                        # that a jitted caller compiled later can lower a call to it
                        if not cres.objectmode:
                            fn.targetctx.insert_user_function(cres.entry_point,
                                                              cres.fndesc, [cres.library])
                        fn.add_overload(cres)
                        loaded += 1
            except Exception as err:  # an optimisation only
                log.debug("numba cache of %s not preloaded: %s", fn, err)
    return loaded


#: The task function whose freed memory this worker keeps for its next task of the same
#: kind (see :func:`trimmed_task`), or None.
_kept_for = None


def trimmed_task(fn, *args):
    """``fn(*args)`` in a worker, its freed memory given back to the system afterwards; its
    CPU time, system time, page faults and peak memory are logged (the peak is reset first
    where Linux allows).

    A task function marked ``keeps_freed_memory`` (the science of one exposure-channel,
    many of which run in a row, each needing about the same memory) leaves its freed
    memory to the next task of the worker when that is of the same kind: giving it back
    and faulting it in again cost ~20,000 page faults (0.05-0.2 s of system time) a task.
    It is given back before a task of another kind.
    """
    global _kept_for
    if _kept_for is not None and _kept_for is not fn:
        release_freed_memory()
    _kept_for = None
    _reset_peak_rss()
    t0 = time.process_time()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        return fn(*args)
    finally:
        cpu = time.process_time() - t0
        peak = _peak_rss()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if getattr(fn, "keeps_freed_memory", False):
            _kept_for = fn
        else:
            release_freed_memory()
        names = " ".join(a for a in args[1:4] if isinstance(a, str) and len(a) < 40)
        log.info("task %s %s: %.1f s CPU (%.2f s system, %d page faults), peak RSS %s",
                 fn.__name__, names, cpu, r1.ru_stime - r0.ru_stime,
                 r1.ru_minflt - r0.ru_minflt,
                 "unknown" if peak is None else f"{peak / 1e9:.2f} GB")


def _reset_peak_rss() -> None:
    """Start this process's peak-RSS count (``VmHWM``) again (Linux; else nothing)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    """This process's peak resident memory in bytes since the last reset (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Collector(logging.Handler):
    """Keeps a task's log records as plain dicts (picklable, message already formatted)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        d = dict(record.__dict__)
        d["msg"], d["args"], d["exc_info"] = record.getMessage(), None, None
        if record.exc_info and not record.exc_text:
            d["exc_text"] = logging.Formatter().formatException(record.exc_info)
        self.records.append(d)


def logged_task(fn, *args) -> tuple:
    """``fn(*args)`` on a Dask or Slurm worker, whose log lines would otherwise stay in the
    worker's own output: returns (result, records), the task's panacea records (INFO and
    above) as plain dicts, which :meth:`DaskEngine.result` replays into the night's log and
    the console."""
    collector = _Collector()
    logger = logging.getLogger("panacea")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(collector)
    limit_threads()  # a worker of a scheduler we did not start may allow more
    try:
        value = trimmed_task(fn, *args)
    finally:
        logger.removeHandler(collector)
        logger.setLevel(level)
    return value, collector.records


def _worker_init(queue=None) -> None:
    """Worker set-up: log records go to ``queue`` (to the parent) instead of the handlers
    inherited by fork; freed memory kept for reuse, as the CLI does in the main process."""
    from ..allocator import keep_freed_memory

    keep_freed_memory()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    limit_threads()  # inherited from the parent by fork; set again for other start methods
    if queue is not None:
        root = logging.getLogger()
        for logger in (root, logging.getLogger("panacea")):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
        root.addHandler(logging.handlers.QueueHandler(queue))
