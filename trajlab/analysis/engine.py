"""Where a Dask graph runs: a local cluster, an existing scheduler, or a local scheduler.

Thread discipline: every graph node runs torch with one intra-op thread (inside Dask workers
and under the in-process "threads" scheduler alike), so that Dask's own parallelism does not
oversubscribe the cores; ``torch_threads=`` overrides it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import dask

LOCAL_SCHEDULERS = ("threads", "synchronous", "sync", "processes")
#: Estimated single-core seconds below which the default runs in-process (a LocalCluster's
#: start-up, ~2-4 s on 2 cores, does not pay for less).
IN_PROCESS_SECONDS = 30.0

_torch_threads_lock = threading.Lock()


def default_workers() -> int:
    """Worker processes for the default LocalCluster: the machine's usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def choose_scheduler(estimated_seconds: float) -> str | None:
    """The default scheduler for a graph of that much work: "threads" (in-process) when a
    cluster would not pay, None (a LocalCluster) otherwise."""
    return "threads" if estimated_seconds < IN_PROCESS_SECONDS else None


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
                               dashboard_address=None, silence_logs=40, env=env)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


@contextlib.contextmanager
def _local_torch_threads(n: int):
    """Limit torch's intra-op threads in this process for the duration (in-process
    schedulers), restoring the user's setting afterwards."""
    import torch

    with _torch_threads_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _torch_threads_lock:
            torch.set_num_threads(before)


def single_threaded_in_workers(n: int = 1) -> None:
    """Inside a distributed worker, keep torch to ``n`` intra-op threads."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def run_graph(nodes: Sequence[Any], where: Any, *, progress: bool, desc: str) -> list[Any]:
    """Compute delayed ``nodes`` on ``where`` with a progress bar; results in node order."""
    from tqdm.auto import tqdm

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
                return list(dask.compute(*nodes, scheduler=where))
        from distributed import as_completed

        with where.as_current():  # also when `where` is not the default client
            futures = where.compute(list(nodes))
            index = {f.key: i for i, f in enumerate(futures)}
            results: list[Any] = [None] * len(futures)
            for fut in as_completed(futures):
                results[index[fut.key]] = fut.result()
                bar.update(1)
        return results
    finally:
        bar.close()
