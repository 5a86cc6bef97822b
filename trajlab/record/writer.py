"""Background writer: a thread draining a bounded queue of step records into the run store.

The training thread only enqueues; the writer thread waits for device-to-host copies, pads,
compresses and writes. The queue is bounded, so a slow disk applies backpressure to training
instead of growing memory. Rows are committed at chunk boundaries, every ``flush_seconds``, and
on close; a crash loses at most the uncommitted rows.

What happens to a row once it is on the host (flags, buffering, updates derived from
consecutive weights, commits) is :class:`RowSink`, shared with the writer process of
:mod:`trajlab.record.process_writer`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from trajlab.priority import background_thread
from trajlab.record.staging import PendingRecord
from trajlab.store.metadata import RunMeta
from trajlab.store.run_store import RunStoreWriter, StepRecord

_STOP = object()
#: Variables that are not gradient information (NaN there is not a non-finite gradient).
_NOT_CHECKED = frozenset({"weight", "weight_after", "probe_grad", "lr", "basis_residual",
                          "grad_scale", "basis_u", "basis_v"})


class RowSink:
    """Rows on the host -> committed rows of the store (single-threaded; numpy only).

    Flags non-finite gradient information, buffers rows until a chunk fills or
    ``flush_seconds`` pass, leaves out updates that consecutive weights give bit for bit, and
    appends and commits.

    Parameters
    ----------
    writer : the store writer (opened, maybe not yet created).
    flush_seconds : commit buffered rows at least this often.
    on_nonfinite : called with (step, layer) for a row whose gradient information holds NaN/Inf.
    on_tick : called before every flush (the recorder refreshes its store lock there).
    """

    def __init__(self, writer: RunStoreWriter, *, flush_seconds: float,
                 on_nonfinite: Callable[[int, str], None] | None = None,
                 on_tick: Callable[[], None] | None = None) -> None:
        self.writer = writer
        self.flush_seconds = flush_seconds
        self.on_nonfinite = on_nonfinite
        self.on_tick = on_tick
        self._buffer: list[StepRecord] = []
        self._last_flush = time.monotonic()

    def create(self, meta: RunMeta, sample_capacity: int) -> None:
        self.writer.create(meta, sample_capacity=sample_capacity)

    def add(self, rec: StepRecord) -> None:
        self._check_flags(rec)
        self._buffer.append(rec)
        if self._at_chunk_boundary() or self.due():
            self.flush()

    def close(self, truncated: str | None) -> None:
        self.flush()
        self.writer.finalize()
        if truncated:
            self.writer.set_truncated(truncated)

    def wait_seconds(self) -> float:
        """How long the feeder may wait for a row before :meth:`flush` is due."""
        return max(0.05, self.flush_seconds - (time.monotonic() - self._last_flush))

    def _check_flags(self, rec: StepRecord) -> None:
        """Flag layers whose gradient or per-sample information holds NaN/Inf (on the host,
        off the training thread), or whose capture failed (``nonfinite`` set by the recorder)."""
        for name, arrays in rec.layers.items():
            bad = bool(arrays.get("nonfinite", False)) or not all(
                np.isfinite(a).all()
                for k, a in arrays.items()
                if k not in _NOT_CHECKED and isinstance(a, np.ndarray) and a.dtype.kind == "f"
            )
            arrays["nonfinite"] = np.bool_(bad)
            if bad and self.on_nonfinite is not None:
                self.on_nonfinite(int(rec.root["step"]), name)

    def _at_chunk_boundary(self) -> bool:
        meta = self.writer.meta
        return (meta is not None
                and (self.writer.committed + len(self._buffer)) % meta.chunk_steps == 0)

    def due(self) -> bool:
        """Whether ``flush_seconds`` have passed since the last flush."""
        return time.monotonic() - self._last_flush >= self.flush_seconds

    def flush(self) -> None:
        """Write and commit the buffered rows."""
        if self.on_tick is not None:
            self.on_tick()
        if self._buffer:
            rows = self._settle_updates(self._buffer)
            self._buffer = []
            try:
                self.writer.append(rows)
            except Exception:
                # Commit every complete row before the one that fails (each storing its own
                # update, so no committed row depends on one that is not), then report.
                for row in rows:
                    for arrays in row.layers.values():
                        if arrays.get("update") is None:
                            arrays["update"] = np.subtract(arrays["_after"], arrays["weight"])
                            arrays["update_stored"] = np.bool_(True)
                    self.writer.append([row])
                raise
        self._last_flush = time.monotonic()

    def _settle_updates(self, rows: list[StepRecord]) -> list[StepRecord]:
        """Turn each row's ``weight_after`` into ``update``/``update_stored``.

        The update of row r is left out when row r + 1 is in the same flush, is the next
        optimizer step and starts from exactly the weights row r's step left (bit for bit: the
        reader's ``weight[r+1] - weight[r]`` is then the very subtraction the writer would have
        stored). The last row of a flush stores its update, so committed rows never depend on
        rows that may not be committed.
        """
        derive = self.writer.derives_updates
        for i, rec in enumerate(rows):
            nxt = rows[i + 1] if i + 1 < len(rows) else None
            consecutive = nxt is not None and int(nxt.root["step"]) == int(rec.root["step"]) + 1
            for name, arrays in rec.layers.items():
                after = arrays.pop("weight_after")
                same = derive and consecutive and same_bits(nxt.layers[name]["weight"], after)
                arrays["_after"] = after  # for a row-by-row commit after a failure
                arrays["update"] = None if same else np.subtract(after, arrays["weight"])
                arrays["update_stored"] = np.bool_(not same)
        return rows


class QueuedProducer:
    """The training-thread side of a writer: a bounded queue (backpressure) that stops
    accepting once the consumer has failed (``error`` set)."""

    _queue: queue.Queue
    error: BaseException | None
    _behind: bool = False  # see _set_behind

    def put(self, record: PendingRecord) -> None:
        """Enqueue a record; blocks while the queue is full."""
        self._put(("record", record))

    def _put(self, item: Any) -> None:
        if self.error is not None:
            return  # the consumer is gone; the recorder reports its error
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._set_behind(True)
            while self.error is None:
                try:
                    self._queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
        # behind: three quarters of the queue wait (at this pace training soon blocks on it)
        self._set_behind(4 * self._queue.qsize() >= 3 * self._queue.maxsize)

    def _set_behind(self, on: bool) -> None:
        if on != self._behind:
            self._behind = on
            self._writer_behind(on)

    def _writer_behind(self, on: bool) -> None:
        """Called when the writer falls behind (three quarters of its queue full, or ``put``
        waiting on the full queue) and when it has caught up again; subclasses may add encoders
        meanwhile."""


class BackgroundWriter(QueuedProducer):
    """Owns a :class:`RunStoreWriter` and a thread that feeds it.

    Parameters
    ----------
    writer : the store writer (already opened, maybe not yet created).
    queue_size : maximum records waiting; ``put`` blocks beyond (backpressure).
    flush_seconds : commit buffered rows at least this often.
    on_nonfinite : called in the writer thread with (step, layer) when a record has a NaN/Inf flag.
    on_tick : called in the writer thread before every flush.
    """

    def __init__(
        self,
        writer: RunStoreWriter,
        *,
        queue_size: int = 8,
        flush_seconds: float = 5.0,
        on_nonfinite: Callable[[int, str], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.writer = writer
        self.flush_seconds = flush_seconds
        self.on_nonfinite = on_nonfinite
        self.on_tick = on_tick
        self._sink = RowSink(writer, flush_seconds=flush_seconds, on_nonfinite=on_nonfinite,
                             on_tick=on_tick)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="trajlab-writer", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------- producer side
    def create(self, meta: RunMeta, sample_capacity: int) -> None:
        self._put(("create", meta, sample_capacity))

    def _writer_behind(self, on: bool) -> None:
        # training is about to wait on this writer: its core may encode meanwhile
        # (trajlab.store.encode_pool)
        self.writer.assist(on)

    def close(self, *, truncated: str | None = None) -> None:
        """Flush everything, stop the thread, and mark the store truncated if asked."""
        if self._thread.is_alive():
            self._put(("close", truncated))
            self._put(_STOP)
            self._thread.join()

    # --------------------------------------------------------------- writer thread
    def _run(self) -> None:
        background_thread()  # training runs first when both are ready (trajlab.priority)
        sink = self._sink
        try:
            while True:
                try:
                    item = self._queue.get(timeout=sink.wait_seconds())
                except queue.Empty:
                    sink.flush()
                    continue
                if item is _STOP:
                    return
                kind = item[0]
                if kind == "create":
                    sink.create(item[1], item[2])
                elif kind == "record":
                    sink.add(item[1].materialize())
                elif kind == "close":
                    sink.close(item[1])
        except BaseException as e:  # noqa: BLE001 - reported to the training thread
            self.error = e
            # Drain so that producers never block on a dead consumer.
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same bits (NaN payloads and the sign of zero included)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc" and a.dtype.itemsize in (2, 4, 8):
        view = np.dtype(f"u{a.dtype.itemsize}")
        a, b = np.ascontiguousarray(a).view(view), np.ascontiguousarray(b).view(view)
    return bool(np.array_equal(a, b))
