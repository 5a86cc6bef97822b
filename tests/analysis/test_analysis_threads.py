"""Thread discipline: one torch and one BLAS thread per graph node unless ``torch_threads=``
says otherwise, the caller's settings restored afterwards, and the default scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_analyses_close, mlp64, train
from threadpoolctl import threadpool_info

import trajlab
from trajlab.analysis import engine
from trajlab.analysis import tasks as tasks_module
from trajlab.analysis.pipeline import _estimate_seconds
from trajlab.analysis.plan import AnalysisOptions, make_plan


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    store = tmp_path_factory.mktemp("t") / "run.zarr"
    train(mlp64(), X, Y, steps=8, store=store)
    return store


def _blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture
def spy(monkeypatch):
    """Record (torch threads, BLAS threads) inside every layer node."""
    seen: list[tuple[int, set[int]]] = []
    real = tasks_module.layer_chunk

    def layer_chunk(*args):
        seen.append((torch.get_num_threads(), _blas_threads()))
        return real(*args)

    monkeypatch.setattr("trajlab.analysis.pipeline.layer_chunk", layer_chunk)
    return seen


@pytest.fixture
def two_threads():
    """The caller's setting during the test: 2 torch threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("scheduler", ["threads", "synchronous", "auto"])
def test_nodes_run_single_threaded_and_the_setting_is_restored(run, spy, two_threads,
                                                               scheduler):
    blas_before = _blas_threads()
    trajlab.analyze(run, scheduler=scheduler, chunk_rows=3, progress=False)
    assert spy and all(t == 1 and b <= {1} for t, b in spy), spy
    assert torch.get_num_threads() == 2
    assert _blas_threads() == blas_before


def test_torch_threads_sets_the_threads_of_every_node(run, spy, two_threads):
    torch.set_num_threads(1)
    trajlab.analyze(run, scheduler="threads", chunk_rows=3, torch_threads=2, progress=False)
    assert spy and all(t == 2 and b <= {2} for t, b in spy), spy
    assert torch.get_num_threads() == 1


def test_restored_after_a_failing_node(run, monkeypatch, two_threads):
    def boom(*args):
        raise RuntimeError("node failed")

    monkeypatch.setattr("trajlab.analysis.pipeline.layer_chunk", boom)
    with pytest.raises(RuntimeError, match="node failed"):
        trajlab.analyze(run, scheduler="threads", progress=False)
    assert torch.get_num_threads() == 2


def test_worker_processes_run_nodes_with_the_requested_threads(run, tmp_path):
    """In a cluster's worker processes the first node sets torch and BLAS threads (and a
    single worker lays out and finishes analysis stores without waiting on itself)."""

    def threads():
        import torch
        from threadpoolctl import threadpool_info

        return torch.get_num_threads(), sorted({i["num_threads"] for i in threadpool_info()
                                                if i["user_api"] == "blas"})

    with engine.scheduler_context(None, workers=1, torch_threads=1) as client:
        a = trajlab.analyze(run, scheduler=client, progress=False)
        # a task on the (single-threaded) worker runs in the thread the nodes ran in
        assert client.submit(threads, pure=False).result() == (1, [1])
        c = trajlab.analyze(run, out=tmp_path / "a.zarr", scheduler=client, torch_threads=2,
                            progress=False)
        assert client.submit(threads, pure=False).result() == (2, [2])
    # 1 and 2 threads per node, a cluster and this process: equal up to rounding
    assert_analyses_close(c, a, names=("K",))
    b = trajlab.analyze(run, scheduler="synchronous", progress=False)
    assert_analyses_close(b, a, names=("logK_diffusion2",))


def test_default_scheduler_runs_small_analyses_in_process(run):
    where = []
    trajlab.analyze(run, progress=False, on_schedule=where.append)
    assert where == ["threads in this process"]
    plan = make_plan(trajlab.open_run(run), None, None, None, AnalysisOptions())
    assert _estimate_seconds([plan]) < engine.IN_PROCESS_SECONDS
    assert engine.choose_scheduler(1000.0, workers=2) is None  # a cluster pays for that
    assert engine.choose_scheduler(1000.0, workers=1) == "threads"  # one process never does
    assert engine.choose_scheduler(20.0, workers=2) == "threads"
    assert engine.choose_scheduler(20.0, workers=8) is None
