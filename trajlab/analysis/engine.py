"""Where a Dask graph runs: a local cluster, an existing scheduler, or a local scheduler.

Thread discipline: every graph node runs torch, and the BLAS/LAPACK libraries that numpy and
scipy load, with one thread (inside Dask workers and under the in-process schedulers alike), so
that Dask's own parallelism does not oversubscribe the cores; ``torch_threads=`` overrides it.
In-process schedulers set it around the whole graph and restore the caller's settings
afterwards; worker processes set it in their first node (:func:`node_threads`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask

LOCAL_SCHEDULERS = ("threads", "synchronous", "sync", "processes")
#: Estimated single-core seconds below which the default always runs in-process.
IN_PROCESS_SECONDS = 10.0
#: A LocalCluster's start-up plus the first import of torch and trajlab in its workers:
#: 5-15 s measured on the 2-core VM (benchmarks/analysis.py, load average 1-6).
CLUSTER_START_SECONDS = 8.0
#: Speed-up of the in-process threaded scheduler over one thread: the GIL bounds it (the
#: kernels release it in LAPACK/BLAS calls only); 1.0-1.5x measured on 2 cores.
THREADS_SPEEDUP = 1.5

_torch_threads_lock = threading.Lock()
#: Threads a worker process's nodes were set to (None: not a worker, or not set yet).
_worker_threads: int | None = None


def default_workers() -> int:
    """Worker processes for the default LocalCluster: the machine's usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def choose_scheduler(estimated_seconds: float, workers: int | None = None) -> str | None:
    """The default scheduler for a graph of ``estimated_seconds`` of single-core work:
    "threads" (in-process) unless a LocalCluster of ``workers`` processes (default: the
    usable cores) is predicted to finish first, start-up included:
    ``CLUSTER_START_SECONDS + W / workers < W / min(workers, THREADS_SPEEDUP)``. On 2 cores
    that is above ~48 s of work; on 8 cores above ~15 s; never below
    :data:`IN_PROCESS_SECONDS`."""
    if estimated_seconds < IN_PROCESS_SECONDS:
        return "threads"
    n = workers or default_workers()
    threads = estimated_seconds / min(n, THREADS_SPEEDUP)
    cluster = CLUSTER_START_SECONDS + estimated_seconds / n
    return None if cluster < threads else "threads"


def describe(scheduler: Any, workers: int | None) -> str:
    """Human-readable name of where the graph runs (printed by the CLI)."""
    if scheduler is None:
        return f"a local Dask cluster ({workers or default_workers()} worker processes)"
    if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
        return {"threads": "threads in this process", "processes": "local processes",
                "synchronous": "this thread", "sync": "this thread"}[scheduler]
    if isinstance(scheduler, str):
        return f"the Dask scheduler at {scheduler}"
    return "the given Dask client"


@contextlib.contextmanager
def scheduler_context(scheduler: Any = None, *, workers: int | None = None,
                      torch_threads: int = 1) -> Iterator[Any]:
    """Yield a ``distributed.Client`` or the name of a local Dask scheduler.

    Parameters
    ----------
    scheduler : None, str or distributed.Client
        None: start a LocalCluster (one single-threaded process per core, or ``workers``) and
        close it afterwards. "threads", "processes", "synchronous": Dask's local schedulers.
        Any other string: the address of a running scheduler ("tcp://host:8786").
        A Client: use it as is (not closed).
    workers : worker processes of the LocalCluster, or threads of the "threads" scheduler.
    torch_threads : torch intra-op threads per node.
    """
    from distributed import Client, LocalCluster

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
        name = "synchronous" if scheduler == "sync" else scheduler
        cfg: dict[str, Any] = {}
        if name == "threads" and workers:
            cfg["num_workers"] = workers
        with dask.config.set(cfg), _local_torch_threads(torch_threads):
            yield name
        return
    if isinstance(scheduler, str):
        with Client(scheduler) as client:
            yield client
        return
    if scheduler is not None:
        raise TypeError(
            f"scheduler must be None, a scheduler address, one of {LOCAL_SCHEDULERS} or a "
            f"distributed.Client, got {type(scheduler).__name__}"
        )
    n = workers or default_workers()
    env = {"OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": str(torch_threads),
           "OPENBLAS_NUM_THREADS": str(torch_threads), "OMP_WAIT_POLICY": "PASSIVE"}
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40, env=env)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


@contextlib.contextmanager
def _local_torch_threads(n: int):
    """Limit torch's intra-op threads and the BLAS/OpenMP pools of this process (numpy's,
    scipy's) to ``n`` for the duration (in-process schedulers), restoring the caller's settings
    afterwards (also after an exception)."""
    import torch

    with _torch_threads_lock:
        before = torch.get_num_threads()
        blas = _blas_limits(n)  # first: it records the settings to restore
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _torch_threads_lock:
            if blas is not None:
                blas.restore_original_limits()
            torch.set_num_threads(before)


def _blas_limits(n: int):
    """``threadpoolctl.threadpool_limits(n)`` (None without threadpoolctl), after loading the
    LAPACK the kernels call (scipy's), so that the limit reaches it too."""
    try:
        import scipy.linalg  # noqa: F401 - loads its BLAS/LAPACK before the limits are set
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings both
        return None
    return threadpool_limits(limits=n)


def node_threads(n: int, home_pid: int) -> None:
    """At the start of a graph node: torch with ``n`` intra-op threads in this thread (OpenMP
    keeps the setting per thread, so a Dask worker thread does not see the caller's), and in a
    worker process (not ``home_pid``, the process that built the graph, whose BLAS pools the
    in-process schedulers limit) the BLAS pools too, once per process; the worker keeps them.
    """
    global _worker_threads
    import torch

    if _worker_threads != n and (os.getpid() != home_pid or _in_distributed_worker()):
        with _torch_threads_lock:
            _blas_limits(n)
            _worker_threads = n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _in_distributed_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def run_graph(nodes: Sequence[Any], where: Any, *, progress: bool, desc: str,
              on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Compute delayed ``nodes`` on ``where`` with a progress bar; results in node order.

    ``on_result(i, result)`` is called in this thread for each node as it completes on a
    distributed cluster (so that the caller's own work overlaps the workers'), and after the
    whole graph with the local schedulers.
    """
    from tqdm import tqdm  # plain text bars: no ipywidgets needed in notebooks

    bar = tqdm(total=len(nodes), disable=not progress, desc=desc, unit="chunk", leave=False)
    try:
        if isinstance(where, str):
            from dask.callbacks import Callback

            keys = {n.key for n in nodes}

            class _Bar(Callback):
                def _posttask(self, key, result, dsk, state, id):
                    if key in keys:
                        bar.update(1)

            with _Bar():
                results = list(dask.compute(*nodes, scheduler=where))
            if on_result is not None:
                for i, r in enumerate(results):
                    on_result(i, r)
            return results
        from distributed import as_completed

        with where.as_current():  # also when `where` is not the default client
            futures = where.compute(list(nodes))
            index = {f.key: i for i, f in enumerate(futures)}
            results = [None] * len(futures)
            for fut in as_completed(futures):
                i = index[fut.key]
                results[i] = fut.result()
                bar.update(1)
                if on_result is not None:
                    on_result(i, results[i])
        return results
    finally:
        bar.close()
