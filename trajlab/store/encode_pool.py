"""Threads that encode and write chunks during a flush, with one more while training waits.

A flush of the run-store writer encodes one whole chunk per array; the chunks are independent,
so a small pool encodes them while the writer thread stacks the next array's rows. On a machine
with few cores the pool keeps one core for training (``regular`` workers =
:func:`trajlab.priority.spare_cpus`): a second encoder that runs beside the training thread
slowed a plain MLP step 1.25x during flushes on a 2-core VM (1.07x with one,
``benchmarks/writer_contention.py``). But when the writer falls behind (recording every step of
a model that stores megabytes per step), the training thread waits on the writer's full queue
and its core idles. The ``standby`` workers take tasks only while :meth:`EncodePool.assist` is
on, which the producer turns on while it is behind (three quarters of its queue waiting, or
blocked on the full queue: :class:`trajlab.record.writer.QueuedProducer`), so that the core
training is about to leave idle encodes then and only then (at most one task of each standby
worker can still be running once training resumes). A writer process learns it from a flag in
shared memory (``assist_source``), which the standby threads poll while chunks wait.

Pure threading (no trajlab imports besides what callers pass): tested on its own in
``tests/store/test_encode_pool.py``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class EncodePool:
    """A fixed pool of ``regular`` threads, plus ``standby`` threads that run tasks only while
    assisting.

    Parameters
    ----------
    regular : threads that always take tasks (at least 1).
    standby : threads that take tasks only while :meth:`assist` is on.
    initializer : called first in every thread (e.g. lowering its priority).
    name : thread name prefix.
    assist_source : also assisting while this returns True (a flag another process sets; the
        standby threads poll it every :attr:`POLL_SECONDS` while tasks are queued).

    Tasks run in submission order; :meth:`submit` returns a :class:`concurrent.futures.Future`
    that carries the task's result or exception. :meth:`shutdown` runs every task already
    submitted, then stops the threads.
    """

    POLL_SECONDS = 0.002

    def __init__(self, regular: int, standby: int = 0, *,
                 initializer: Callable[[], None] | None = None,
                 name: str = "trajlab-encode",
                 assist_source: Callable[[], bool] | None = None) -> None:
        if regular < 1 or standby < 0:
            raise ValueError(f"EncodePool needs regular >= 1 and standby >= 0, got {regular}, "
                             f"{standby}")
        self._tasks: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._assist = False
        self._closed = False
        self._initializer = initializer
        self._source = assist_source
        self._threads = [
            threading.Thread(target=self._loop, args=(i >= regular,), daemon=True,
                             name=f"{name}-{'standby' if i >= regular else 'worker'}-{i}")
            for i in range(regular + standby)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ callers
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; its future completes when a thread has run it."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("EncodePool.submit after shutdown")
            self._tasks.append((fut, fn, args))
            self._cv.notify_all()
        return fut

    def assist(self, on: bool) -> None:
        """Let the standby threads take tasks (``on``), or stop them taking new ones."""
        with self._cv:
            self._assist = bool(on)
            if on:
                self._cv.notify_all()

    @property
    def assisting(self) -> bool:
        return self._assist or (self._source is not None and bool(self._source()))

    def shutdown(self) -> None:
        """Run the tasks already submitted, then stop every thread (idempotent)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    # ------------------------------------------------------------------ threads
    def _loop(self, standby: bool) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            with self._cv:
                while True:
                    if self._tasks and (not standby or self.assisting):
                        fut, fn, args = self._tasks.popleft()
                        break
                    if self._closed and (standby or not self._tasks):
                        return  # regular threads drain the queue; standby ones just stop
                    if standby and self._tasks and self._source is not None:
                        self._cv.wait(self.POLL_SECONDS)  # the signal may come from elsewhere
                    else:
                        self._cv.wait()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on it
                fut.set_exception(e)
            else:
                fut.set_result(result)
