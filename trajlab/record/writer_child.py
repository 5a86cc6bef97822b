"""The child process of :class:`~trajlab.record.process_writer.ProcessWriter`: forked from
the feeder thread on the first record, it copies each row out of the shared-memory ring, frees
the slot and hands the row to a :class:`~trajlab.record.writer.RowSink` (the writer thread's),
until told to stop.

It also holds the ring's layout, which both processes use: a tensor's place in a slot
(:class:`Shm`, each tensor aligned to :data:`ALIGN` bytes, :func:`nbytes`) and
:func:`copy_out`.

Crash safety: the child leaves at once, writing nothing more, when the training process is gone
(the kernel kills it with its parent where it can, its parent changes, or the pipe closes). A
failure is reported to the training process as ``("error", exc)`` and the child then drains so
the feeder never blocks. It leaves with ``os._exit``: no interpreter shutdown, so nothing the
training process had buffered runs or prints twice.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from trajlab.record.writer import RowSink
from trajlab.store.run_store import RunStoreWriter, StepRecord

#: Alignment of each tensor in a slot, in bytes.
ALIGN = 64


class Shm:
    """A tensor's place in a slot: (offset from the slot start, dtype string, shape)."""

    __slots__ = ("dtype", "offset", "shape")

    def __init__(self, offset: int, dtype: str, shape: tuple[int, ...]) -> None:
        self.offset, self.dtype, self.shape = offset, dtype, shape

    def __reduce__(self):
        return (Shm, (self.offset, self.dtype, self.shape))


def nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` takes in a slot (aligned to :data:`ALIGN`)."""
    return -(-t.numel() * t.element_size() // ALIGN) * ALIGN


class ForkedChild:
    """The writer process, forked directly (``os.fork``), with the part of
    :class:`multiprocessing.Process`'s interface the writer uses.

    Not a ``multiprocessing.Process``: its start-up in the child closes ``sys.stdin``, which
    waits forever on the stdin buffer's lock when another thread of the training process was
    reading stdin at the fork (a lock the child inherits held, with no thread to release it).
    The child here runs ``target(*args)`` and leaves with ``os._exit``, touching nothing else.
    """

    def __init__(self, target: Callable[..., Any], args: tuple) -> None:
        self.exitcode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child
            try:
                target(*args)
            finally:
                os._exit(1)  # target leaves with its own os._exit; this only if it raised

    def _reap(self, flags: int) -> None:
        if self.exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped by another thread meanwhile
                return
            if pid == self.pid:
                self.exitcode = os.waitstatus_to_exitcode(status)

    def is_alive(self) -> bool:
        self._reap(os.WNOHANG)
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        if timeout is None:
            self._reap(0)
            return
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def child_main(*args: Any) -> None:
    """The writer process. It leaves with ``os._exit``: no interpreter shutdown, so nothing the
    training process had buffered (stdout, atexit handlers) runs or prints twice."""
    code = 1
    try:
        _child_loop(*args)
        code = 0
    finally:
        os._exit(code)


_PRCTL: list = []  # libc's prctl, looked up in the training process before the fork


def lookup_prctl() -> None:
    """Find libc's ``prctl`` now, in the training process: the child must not ``dlopen``
    (the loader's lock may have been held by another thread at the fork)."""
    if not _PRCTL:
        try:
            import ctypes

            _PRCTL.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (OSError, AttributeError):  # not Linux
            _PRCTL.append(None)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the training process's feeder thread (the one
    that forked it) is gone, so that an orphan never writes after a new writer took the store
    (Linux; elsewhere the child's own checks of its parent and pipe remain)."""
    if _PRCTL and _PRCTL[0] is not None:
        _PRCTL[0](1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:
        os._exit(0)  # the parent died before the request above took effect


def _child_loop(writer: RunStoreWriter, inbox, reports, ring: mmap.mmap, slot_bytes: int,
                free, flush_seconds: float, parent: int, parent_ends: tuple,
                behind=None) -> None:
    """Rows from the ring into a :class:`RowSink` until told to stop."""
    _die_with_parent(parent)
    for conn in parent_ends:  # so that the pipe closes when the training process is gone
        conn.close()

    def orphaned() -> bool:
        return os.getppid() != parent

    def on_tick() -> None:
        if orphaned():
            os._exit(0)  # the training process is gone: write nothing more
        reports.send(("tick",))

    sink = RowSink(writer, flush_seconds=flush_seconds,
                   on_nonfinite=lambda s, n: reports.send(("nonfinite", s, n)),
                   on_tick=on_tick)
    if behind is not None:  # one more encoder while the training process waits on us
        writer.assist_when(lambda: behind.value != 0)
    failed = False
    while True:
        try:
            ready = inbox.poll(min(0.2, sink.wait_seconds()))
            if orphaned():
                os._exit(0)
            if not ready:
                if not failed and sink.due():
                    sink.flush()
                continue
            msg = inbox.recv()
        except (EOFError, OSError):
            os._exit(0)  # the pipe closed: the training process is gone
        kind = msg[0]
        if kind == "stop":
            return
        try:
            if kind == "slot":
                row = copy_out(ring, msg[1] * slot_bytes, msg[2], msg[3])
                free.release()
                if not failed:
                    sink.add(row)
            elif failed:
                continue
            elif kind == "inline":
                sink.add(msg[1])
            elif kind == "create":
                sink.create(msg[1], msg[2])
            elif kind == "close":
                sink.close(msg[1])
        except BaseException as e:  # noqa: BLE001 - reported to the training process
            failed = True
            try:
                reports.send(("error", e))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                reports.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
            with contextlib.suppress(Exception):  # best effort, as the recorder's own marking
                writer.set_truncated(f"{type(e).__name__}: {e}")


def copy_out(ring: mmap.mmap, base: int, root: dict, layers: dict) -> StepRecord:
    """The row of a slot at ``base`` in ``ring``: its :class:`Shm` entries copied out."""
    def take(v: Any) -> Any:
        if not isinstance(v, Shm):
            return v
        return np.ndarray(v.shape, np.dtype(v.dtype), buffer=ring, offset=base + v.offset).copy()

    return StepRecord(root={k: take(v) for k, v in root.items()},
                      layers={n: {k: take(v) for k, v in a.items()} for n, a in layers.items()})



__all__ = ["ALIGN", "ForkedChild", "Shm", "child_main", "copy_out", "lookup_prctl", "nbytes"]
