"""A lock beside a run store so that only one recorder writes it at a time.

The lock is a small JSON file ``<store>.lock`` next to the store (outside it, so that
overwriting the store never removes it), created exclusively. A lock is *stale* when the process
that took it is gone (same host) or when it has not been refreshed for ``stale_after`` seconds
(any host); a stale lock is taken over with a warning. The recorder's writer thread refreshes
the lock while it runs. Local paths only; for URL stores the lock is skipped (documented).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path


class StoreLockedError(RuntimeError):
    """Another live recorder holds the store's lock."""


def _lock_path(store) -> Path | None:
    if not isinstance(store, (str, os.PathLike)):
        return None
    s = os.fspath(store)
    if "://" in s and not s.startswith("file://"):
        return None
    s = s.removeprefix("file://").rstrip("/")
    return Path(s + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Exclusive writer lock of one store; a context manager."""

    def __init__(self, store, *, stale_after: float = 600.0) -> None:
        self.path = _lock_path(store)
        self.stale_after = stale_after
        self.held = False

    def _write_new(self) -> bool:
        assert self.path is not None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return True

    def _stale_reason(self) -> str | None:
        assert self.path is not None
        try:
            info = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return "unreadable lock file"
        if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
            return f"process {info.get('pid')} that held it is gone"
        if age > self.stale_after:
            return f"not refreshed for {age:.0f} s"
        return None

    def acquire(self) -> None:
        if self.path is None or self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._write_new():
            self.held = True
            return
        reason = self._stale_reason()
        if reason is None:
            try:
                info = json.loads(self.path.read_text())
            except (OSError, ValueError):
                info = {}
            raise StoreLockedError(
                f"another recorder is writing this store (pid {info.get('pid')} on "
                f"{info.get('host')}, lock {self.path}); wait for it to finish, or delete the "
                "lock file if that process is really gone"
            )
        warnings.warn(f"taking over a stale store lock {self.path} ({reason})", stacklevel=3)
        self.path.unlink(missing_ok=True)
        if not self._write_new():
            raise StoreLockedError(f"lost the race for the store lock {self.path}")
        self.held = True

    def refresh(self) -> None:
        if self.held and self.path is not None:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held and self.path is not None:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
