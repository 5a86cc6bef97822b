"""A lock beside a store so that only one writer (recorder or analysis) writes it at a time.

The lock is a small JSON file ``<store>.lock`` next to the store (outside it, so that replacing
the store never removes it), created exclusively. It is keyed on the store's *resolved* local
location: a symlink, a relative path, a ``file://`` URL or a ``zarr.storage.LocalStore`` that
reach the same directory take the same lock. A lock is *stale* when the process that took it is
gone (same host) or when it has not been refreshed for ``stale_after`` seconds (any host); a stale
lock is taken over with a warning. Writers refresh their lock while they run.

Fencing: each acquisition writes a fresh random ``token`` into the lock file. A writer checks,
before every write of the store's metadata and before each flush's data (:class:`Fence`), that
the lock file still holds its token; a writer whose lock was taken over (it looked stale: its
process was killed, or paused for longer than ``stale_after``) therefore stops with
:class:`~trajlab.errors.StoreLockedError` instead of writing over the new owner's run.

Not locked (documented): object-store URLs (``s3://...``) and in-memory stores; two writers
there must be kept apart by the user.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import warnings
from pathlib import Path

from trajlab.errors import StoreError, StoreLockedError
from trajlab.store.target import StoreLike, local_path


def lock_path(store: StoreLike) -> Path | None:
    """Where the lock of ``store`` lives, or None for stores that are not locked."""
    path = local_path(store)
    if path is None:
        return None
    resolved = Path(os.path.realpath(path))
    return resolved.with_name(resolved.name + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Exclusive writer lock of one store; a context manager.

    Parameters
    ----------
    store : the store's location (anything :func:`trajlab.store.target.local_path` knows).
    stale_after : seconds without refresh after which another host's lock counts as stale.
    what : who holds it, for messages ("recorder", "analysis").
    """

    def __init__(self, store: StoreLike, *, stale_after: float = 600.0,
                 what: str = "writer") -> None:
        self.path = lock_path(store)
        self.stale_after = stale_after
        self.what = what
        self.held = False
        self.token: str | None = None

    def _write_new(self) -> bool:
        assert self.path is not None
        token = secrets.token_hex(16)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "what": self.what, "token": token}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise StoreError(
                f"cannot create the store lock {self.path}: {e.strerror or e} (the directory is "
                "not writable: read-only, or no permission); write the store into a directory "
                f"you can write, or make {self.path.parent} writable") from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self.token = token
        return True

    def fence(self) -> Fence | None:
        """The check a writer runs before its writes (None for stores that are not locked)."""
        if self.path is None or self.token is None:
            return None
        return Fence(self.path, self.token)

    def live_writer(self) -> bool:
        """Whether a live writer holds the lock now (False for unlocked kinds of store)."""
        return self.path is not None and self.path.exists() and self._stale_reason() is None

    def _stale_reason(self) -> str | None:
        assert self.path is not None
        try:
            info = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released meanwhile"
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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the directory {self.path.parent} of the store: "
                             f"{e.strerror or e}; choose a location you can write") from None
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
                f"another {info.get('what', 'writer')} is writing this store (pid "
                f"{info.get('pid')} on {info.get('host')}, lock {self.path}); wait for it to "
                "finish, or delete the lock file if that process is really gone"
            )
        if reason != "released meanwhile":
            warnings.warn(f"taking over a stale store lock {self.path} ({reason})", stacklevel=3)
        self.path.unlink(missing_ok=True)
        if not self._write_new():
            raise StoreLockedError(f"lost the race for the store lock {self.path}; another "
                                   "writer started at the same moment")
        self.held = True

    def refresh(self) -> None:
        if self.held and self.path is not None:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held and self.path is not None and Fence(self.path, self.token or "").holds():
            self.path.unlink(missing_ok=True)  # never another writer's lock
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Fence:
    """The fencing check of one lock acquisition: the lock file still holds ``token``.

    Picklable and cheap (one small file read); a writer process inherits it with its writer.
    """

    __slots__ = ("path", "token")

    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = Path(path), token

    def holds(self) -> bool:
        """Whether the lock file still holds this acquisition's token."""
        try:
            return json.loads(self.path.read_text() or "{}").get("token") == self.token
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return False

    def __call__(self) -> None:
        """Raise :class:`~trajlab.errors.StoreLockedError` unless the lock is still ours."""
        if not self.holds():
            try:
                info = json.loads(self.path.read_text() or "{}")
                now = (f"now held by pid {info.get('pid')} on {info.get('host')}"
                       if info else "now released")
            except (OSError, ValueError):
                now = "now gone"
            raise StoreLockedError(
                f"this writer's lock {self.path} changed hands ({now}): another writer took "
                "over the store (this process looked dead or stalled), so this one writes "
                "nothing more. Steps committed before are kept; record into another store or "
                "wait for the other writer")
