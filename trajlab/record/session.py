"""One recording's hold on its store: the store's lock, its :class:`RunStoreWriter` and the
writer that commits rows in the background (a thread or a process).

The order is fixed: the lock first (no second writer), then the store (its fence stops every
write once the lock is lost), then the background writer (which refreshes the lock as it
ticks). :meth:`Session.close_writer` and :meth:`Session.release` undo it in reverse; the
writer's error, if any, is returned, for the recorder's failure policy to decide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trajlab.record.options import RecorderOptions
from trajlab.record.process_writer import ProcessWriter
from trajlab.record.writer import BackgroundWriter
from trajlab.store.lock import StoreLock
from trajlab.store.run_store import RunStoreWriter
from trajlab.store.target import StoreLike

#: ``make_writer(kind, store_writer, **options)``: :func:`trajlab.record.process_writer.make_writer`
#: or a stand-in (tests choose the writer this way).
WriterFactory = Callable[..., "BackgroundWriter | ProcessWriter"]


class Session:
    """The lock, the store writer and the background writer of one recording.

    Parameters
    ----------
    store : the run store's target (path, URL or zarr store).
    options : the recording's options (``mode``, ``storage_options``, ``compression``,
        ``writer``, ``queue_size``, ``flush_seconds``).
    """

    def __init__(self, store: StoreLike, options: RecorderOptions) -> None:
        self.store = store
        self.options = options
        self.lock: StoreLock | None = None
        self.store_writer: RunStoreWriter | None = None
        self.writer: BackgroundWriter | ProcessWriter | None = None

    def open_store(self) -> RunStoreWriter:
        """Take the store's lock and open the store behind it (its writes fenced by the lock).
        On failure the lock is released before the error propagates."""
        o = self.options
        self.lock = StoreLock(self.store, what="recorder")
        self.lock.acquire()
        try:
            sw = RunStoreWriter(self.store, mode=o.mode, storage_options=o.storage_options,
                                codec_profile=o.compression)
            sw.fence = self.lock.fence()  # no writes once the lock is lost
        except BaseException:
            self.lock.release()
            raise
        self.store_writer = sw
        return sw

    def start_writer(self, make_writer: WriterFactory,
                     on_nonfinite: Callable[[int, str], Any]) -> None:
        """Start the background writer on the open store (call :meth:`open_store` first)."""
        assert self.lock is not None and self.store_writer is not None
        o = self.options
        self.writer = make_writer(o.writer, self.store_writer, queue_size=o.queue_size,
                                  flush_seconds=o.flush_seconds, on_nonfinite=on_nonfinite,
                                  on_tick=self.lock.refresh)

    def abort(self) -> None:
        """Undo a start that failed: close the writer, if started, and release the lock."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.lock is not None:
            self.lock.release()

    def close_writer(self, truncated: str | None) -> BaseException | None:
        """Flush and close the writer (marking the store truncated with ``truncated``, if
        given); the writer's error, if it failed. The lock stays held (:meth:`release`), so
        that the store can still be marked. Idempotent."""
        err = None
        if self.writer is not None:
            self.writer.close(truncated=truncated)
            err = self.writer.error
            self.writer = None
        return err

    def release(self) -> None:
        """Release the store's lock (after :meth:`close_writer`)."""
        if self.lock is not None:
            self.lock.release()


__all__ = ["Session", "WriterFactory"]
