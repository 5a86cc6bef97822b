"""What is at a store's location, and the only code that ever removes a store.

trajlab never removes or writes into anything that is not a trajlab store of the expected kind:
not an ordinary directory, not another Zarr group, not a run when an analysis was asked for (and
the reverse), with or without ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zarr
import zarr.errors

from trajlab.errors import StoreError, StoreExistsError
from trajlab.store.names import ATTR_KEY

StoreLike = Any  # str path, os.PathLike, fsspec URL, or a zarr Store
State = Literal["absent", "empty", "run", "analysis", "zarr", "other"]


def show(store: StoreLike) -> str:
    """A store's location as written in messages: a quoted path or URL, else the object's repr."""
    if isinstance(store, (str, os.PathLike)):
        return repr(os.fspath(store))
    return repr(store)


def local_path(store: StoreLike) -> Path | None:
    """The local directory behind ``store`` (paths, ``file://`` URLs, ``LocalStore``), or None."""
    root = getattr(store, "root", None)  # zarr.storage.LocalStore
    if root is not None and type(store).__name__ == "LocalStore":
        return Path(root)
    inner = getattr(store, "_store", None)  # zarr.storage.WrapperStore around one
    if inner is not None and inner is not store:
        return local_path(inner)
    if isinstance(store, (str, os.PathLike)):
        s = os.fspath(store)
        if "://" in s and not s.startswith("file://"):
            return None
        return Path(s.removeprefix("file://"))
    return None


@dataclass(frozen=True)
class Target:
    """What a store location holds.

    ``state``: ``"absent"`` (nothing there), ``"empty"`` (an empty directory), ``"run"`` or
    ``"analysis"`` (a trajlab store of that kind), ``"zarr"`` (another Zarr node) or
    ``"other"`` (a file, or a directory with other content).
    """

    store: StoreLike
    state: State
    path: Path | None
    storage_options: dict | None = None

    def describe(self) -> str:
        return {
            "absent": "nothing", "empty": "an empty directory", "run": "a trajlab run store",
            "analysis": "a trajlab analysis store", "zarr": "a Zarr node that is not a trajlab "
            "store", "other": "a file or a directory with other content",
        }[self.state]


def inspect(store: StoreLike, *, storage_options: dict | None = None) -> Target:
    """Look at ``store`` without changing anything."""
    path = local_path(store)
    if path is not None:
        return Target(store, _local_state(path), path, storage_options)
    kw: dict[str, Any] = {"mode": "r"}
    if storage_options is not None:
        kw["storage_options"] = storage_options
    try:
        g = zarr.open_group(store, **kw)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return Target(store, "absent", None, storage_options)
    except (ValueError, TypeError):
        return Target(store, "zarr", None, storage_options)
    meta = g.attrs.asdict().get(ATTR_KEY)
    return Target(store, _kind(meta), None, storage_options)


def _kind(meta: Any) -> State:
    if not isinstance(meta, dict):
        return "zarr"
    kind = meta.get("kind", "run")
    return kind if kind in ("run", "analysis") else "zarr"


def _local_state(path: Path) -> State:
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "other"
    doc = path / "zarr.json"
    if not doc.exists():
        return "empty" if not any(path.iterdir()) else "other"
    try:
        node = json.loads(doc.read_text())
    except (OSError, ValueError):
        return "zarr"
    if node.get("node_type") != "group":
        return "zarr"
    return _kind(node.get("attributes", {}).get(ATTR_KEY))


def check_writable(target: Target, kind: Literal["run", "analysis"], *, overwrite: bool,
                   resume: bool = False) -> None:
    """Raise unless ``target`` may be written as a ``kind`` store.

    Absent and empty locations are always writable; a trajlab store of the same kind only with
    ``overwrite`` (replace) or ``resume`` (continue); anything else never.
    """
    if target.state in ("absent", "empty"):
        return
    if target.state == kind:
        if overwrite or resume:
            return
        raise StoreExistsError(
            f"a trajlab {kind} store already exists at {show(target.store)}; "
            + ("pass mode='a' to append to it (resume) or mode='w' to overwrite it"
               if kind == "run" else "pass overwrite=True (--overwrite) to replace it")
            + ", or choose another path"
        )
    raise StoreExistsError(
        f"{show(target.store)} holds {target.describe()}, not a trajlab {kind} store; trajlab "
        "never overwrites or writes into it (with or without overwrite): choose another path"
    )


def create_group(target: Target, kind: Literal["run", "analysis"], attributes: dict
                 ) -> zarr.Group:
    """Create a fresh Zarr group for a ``kind`` store at ``target``, replacing a trajlab store of
    the same kind that is there (the caller checked :func:`check_writable`).

    The group document, with ``attributes``, is the first object written, atomically: a store
    killed while being laid out opens as a store with nothing committed.
    """
    fresh = inspect(target.store, storage_options=target.storage_options)
    if fresh.state not in ("absent", "empty", kind):
        raise StoreError(f"refusing to replace {show(target.store)}: it holds {fresh.describe()}")
    mode = "w-"
    if fresh.state == kind:
        if fresh.path is not None:
            shutil.rmtree(fresh.path)
        else:
            mode = "w"  # object stores: zarr deletes the old group's keys under its prefix
    kw: dict[str, Any] = {"mode": mode, "zarr_format": 3, "attributes": attributes}
    if target.storage_options is not None:
        kw["storage_options"] = target.storage_options
    return zarr.open_group(target.store, **kw)
