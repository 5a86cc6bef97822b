"""Where a Dask graph runs: a local cluster, an existing scheduler, or a local scheduler."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import dask

LOCAL_SCHEDULERS = ("threads", "synchronous", "sync", "processes")


def default_workers() -> int:
    """Worker processes for the default LocalCluster: the machine's usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def scheduler_context(scheduler: Any = None, *, workers: int | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client`` or the name of a local Dask scheduler.

    Parameters
    ----------
    scheduler : None, str or distributed.Client
        None: start a LocalCluster (one single-threaded process per core, or ``workers``) and
        close it afterwards. "threads", "processes", "synchronous": Dask's local schedulers.
        Any other string: the address of a running scheduler ("tcp://host:8786").
        A Client: use it as is (not closed).
    """
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
        yield "synchronous" if scheduler == "sync" else scheduler
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
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


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
