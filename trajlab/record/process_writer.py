"""A writer process fed through shared memory: the same contract as
:class:`trajlab.record.writer.BackgroundWriter`, with the compression and the Zarr machinery out
of the training process's interpreter (no GIL shared with training).

Three parts; this module holds the training process's two (the child is
:mod:`trajlab.record.writer_child`):

* the training thread only enqueues the step's host tensors (``put``, bounded queue), as with the
  writer thread;
* a feeder thread in the training process waits for device-to-host copies, copies the tensors
  into a free slot of an anonymous shared-memory ring (``queue_size`` slots, sized on the first
  record) and sends the child a small descriptor (offsets, dtypes, shapes) through a pipe; a
  record larger than a slot travels through the pipe itself;
* the child, forked on the first record (so the ring is inherited, nothing is named in
  ``/dev/shm`` and nothing leaks when the training process is killed), copies the row out,
  frees the slot and hands the row to the same :class:`~trajlab.record.writer.RowSink` the
  writer thread uses; so rows, flushes and commits are those of the thread, bit for bit.

Crash safety is that of the thread: the child leaves at once, without writing more, when the
training process is gone (its parent changes or the pipe closes), and every Zarr write is atomic.
A failure in the child is reported back as ``error`` (the store is marked truncated with the
reason, as the recorder does for the thread), and the child then drains so ``put`` never blocks.
Only local stores (a path) are written by a process; :func:`make_writer` falls back to the thread
for other stores.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from trajlab.priority import background_thread
from trajlab.record.writer import BackgroundWriter, PendingRecord, QueuedProducer, RowSink
from trajlab.record.writer_child import ForkedChild, Shm, child_main, lookup_prctl, nbytes
from trajlab.store.metadata import RunMeta
from trajlab.store.run_store import RunStoreWriter, StepRecord

_STOP = ("stop",)


def record_bytes(record: PendingRecord) -> int:
    """Bytes a record's tensors take in a slot (each aligned to 64 bytes)."""
    n = sum(nbytes(v) for v in record.root.values() if isinstance(v, torch.Tensor))
    for arrays in record.layers.values():
        n += sum(nbytes(v) for v in arrays.values() if isinstance(v, torch.Tensor))
    return n


class ProcessWriter(QueuedProducer):
    """Owns a child process that writes the run store; same interface as
    :class:`~trajlab.record.writer.BackgroundWriter`.

    Parameters
    ----------
    writer : the store writer (opened, maybe not yet created) of a local store; the child
        process writes through its copy of it.
    queue_size : records that may wait (in the queue and in the ring) before ``put`` blocks.
    flush_seconds : commit buffered rows at least this often.
    on_nonfinite : called (in a thread of this process) with (step, layer) for a flagged row.
    on_tick : called (in a thread of this process) before every flush of the child.
    slot_bytes : size of one shared-memory slot; default twice the first record.
    """

    def __init__(
        self,
        writer: RunStoreWriter,
        *,
        queue_size: int = 8,
        flush_seconds: float = 5.0,
        on_nonfinite: Callable[[int, str], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        slot_bytes: int | None = None,
    ) -> None:
        if writer.target.path is None:
            raise ValueError("a writer process needs a local store (a path); use the thread")
        self.writer = writer
        self.flush_seconds = flush_seconds
        self.on_nonfinite = on_nonfinite
        self.on_tick = on_tick
        self.error: BaseException | None = None
        self.slot_bytes = slot_bytes
        self.n_slots = max(2, int(queue_size))
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._pending_create: tuple | None = None
        self._proc: ForkedChild | None = None
        self._stopping = False  # the child was told to stop (its exit is then expected)
        self._closed = threading.Event()
        # set while this process waits on the writer (QueuedProducer._writer_behind); the child
        # then encodes with one more thread (trajlab.store.encode_pool)
        self._behind_flag = multiprocessing.get_context("fork").RawValue("b", 0)
        self._feeder = threading.Thread(target=self._feed, name="trajlab-feeder", daemon=True)
        self._listener: threading.Thread | None = None
        self._feeder.start()

    # --------------------------------------------------------------- training thread
    def create(self, meta: RunMeta, sample_capacity: int) -> None:
        self.writer.meta = meta  # the recorder's checks read it (dtype of the run)
        self._put(("create", meta, sample_capacity))

    def _writer_behind(self, on: bool) -> None:
        self._behind_flag.value = int(on)

    def close(self, *, truncated: str | None = None) -> None:
        """Flush everything, stop the child and the threads, mark the store truncated if asked."""
        for item in (("close", truncated), _STOP):  # delivered after an error too
            while self._feeder.is_alive():
                try:
                    self._queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
        self._feeder.join()

    # --------------------------------------------------------------- feeder thread
    def _feed(self) -> None:
        background_thread()  # (and the child forked from it) yields to training
        try:
            while True:
                item = self._queue.get()
                kind = item[0]
                if kind == "create":
                    self._pending_create = item
                elif kind == "record":
                    self._send_record(item[1])
                elif kind == "close":
                    self._finish(item[1])
                elif kind == "stop":
                    return
        except BaseException as e:  # noqa: BLE001 - reported to the training thread
            if self.error is None:
                self.error = e
            self._drain_queue()
            if self._proc is not None and self._proc.is_alive():
                self._proc.kill()

    def _drain_queue(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _start(self, first: PendingRecord) -> None:
        """Allocate the ring and fork the child (on the first record)."""
        ctx = multiprocessing.get_context("fork")
        self.slot_bytes = self.slot_bytes or max(1 << 20, 2 * record_bytes(first))
        self._ring = mmap.mmap(-1, self.slot_bytes * self.n_slots)  # anonymous, MAP_SHARED
        self._free = ctx.Semaphore(self.n_slots)
        self._next_slot = 0
        self._to_child, child_in = ctx.Pipe(duplex=False)[::-1]
        reports, self._to_parent = ctx.Pipe(duplex=False)
        lookup_prctl()
        gc.freeze()  # the child never collects (and finalizes) the training process's objects
        try:
            self._proc = ForkedChild(
                child_main, (self.writer, child_in, self._to_parent, self._ring, self.slot_bytes,
                              self._free, self.flush_seconds, os.getpid(),
                              (self._to_child, reports), self._behind_flag))
        finally:
            gc.unfreeze()
        child_in.close()
        self._to_parent.close()
        self._reports = reports
        self._listener = threading.Thread(target=self._listen, name="trajlab-writer-reports",
                                          daemon=True)
        self._listener.start()
        if self._pending_create is not None:
            self._to_child.send(self._pending_create)
            self._pending_create = None

    def _send_record(self, record: PendingRecord) -> None:
        if self.error is not None:
            return
        record.wait()  # device-to-host copies done
        if self._proc is None:
            self._start(record)
        if record_bytes(record) > self.slot_bytes:
            self._to_child.send(("inline", _as_numpy(record)))  # larger than a slot
            return
        while not self._free.acquire(timeout=0.5):
            if self.error is not None or not self._child_alive():
                return
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.n_slots
        base = slot * self.slot_bytes
        cursor = [0]

        def place(v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            src = v.detach().numpy()
            dst = np.ndarray(src.shape, src.dtype, buffer=self._ring, offset=base + cursor[0])
            np.copyto(dst, src)
            ref = Shm(cursor[0], src.dtype.str, src.shape)
            cursor[0] += nbytes(v)
            return ref

        root = {k: place(v) for k, v in record.root.items()}
        layers = {n: {k: place(v) for k, v in a.items()} for n, a in record.layers.items()}
        self._to_child.send(("slot", slot, root, layers))

    def _finish(self, truncated: str | None) -> None:
        if self._proc is None:
            # no record reached the child: do in this process what the thread would do
            sink = RowSink(self.writer, flush_seconds=self.flush_seconds,
                           on_nonfinite=self.on_nonfinite, on_tick=self.on_tick)
            if self._pending_create is not None:
                sink.create(*self._pending_create[1:])
            sink.close(truncated)
            return
        self._stopping = True
        try:
            self._to_child.send(("close", truncated))
            self._to_child.send(_STOP)
        except OSError:
            pass
        self._proc.join()
        if self._listener is not None:
            self._listener.join()
        if self.error is None and self._proc.exitcode != 0:
            self.error = _died(self._proc.exitcode)
        if truncated and self.error is not None and self._proc.exitcode != 0:
            self._mark_truncated(truncated)  # the child that would have marked it is gone
        self._to_child.close()
        self._reports.close()

    def _child_alive(self) -> bool:
        """Whether the child runs; when it is gone without having been told to stop, the
        writer has failed (``error`` set), so that nothing waits on it."""
        proc = self._proc
        if proc is None or proc.is_alive():
            return True
        if self.error is None and not self._stopping:
            self.error = _died(proc.exitcode)
        return False

    def _mark_truncated(self, reason: str) -> None:
        """Mark the store truncated from this process (best effort, as the recorder's own
        marking); a store with no committed row is left as it is (it opens as empty)."""
        with contextlib.suppress(Exception):
            w = RunStoreWriter(self.writer.store, mode="a",
                               storage_options=self.writer.storage_options)
            w.fence = self.writer.fence
            if w.is_created:
                w.set_truncated(reason)

    # --------------------------------------------------------------- listener thread
    def _listen(self) -> None:
        while True:
            try:
                msg = self._reports.recv()
            except (EOFError, OSError):
                # The child closed its end: it stopped when told to, or it died (killed, out of
                # memory). A death must fail the writer, or the feeder waits forever for a
                # free slot that only the child could release.
                if self._proc is not None and not self._stopping:
                    self._proc.join(timeout=60)
                    self._child_alive()
                return
            kind = msg[0]
            if kind == "nonfinite" and self.on_nonfinite is not None:
                self.on_nonfinite(msg[1], msg[2])
            elif kind == "tick" and self.on_tick is not None:
                self.on_tick()
            elif kind == "error":
                self.error = msg[1]


def _died(exitcode: int | None) -> RuntimeError:
    """The error of a writer process that ended without being told to."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return RuntimeError(f"the trajlab writer process {how}; the rows it had not committed are "
                        "lost, committed steps are kept")


def _as_numpy(record: PendingRecord) -> StepRecord:
    def conv(v):
        return v.detach().numpy().copy() if isinstance(v, torch.Tensor) else v

    return StepRecord(root={k: conv(v) for k, v in record.root.items()},
                      layers={n: {k: conv(v) for k, v in a.items()}
                              for n, a in record.layers.items()})


def make_writer(kind: str, writer: RunStoreWriter, **kwargs: Any
                ) -> BackgroundWriter | ProcessWriter:
    """``"thread"`` or ``"process"`` writer; a process only for local stores (else a thread)."""
    if kind == "process" and writer.target.path is not None:
        return ProcessWriter(writer, **kwargs)
    if kind not in ("thread", "process"):
        raise ValueError(f"writer must be 'thread' or 'process', got {kind!r}")
    return BackgroundWriter(writer, **kwargs)


__all__ = ["ProcessWriter", "make_writer", "record_bytes"]
