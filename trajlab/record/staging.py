"""A step record's tensors on their way from the training device to the host.

On a CUDA device the recorder must not wait for its copies: each tensor is copied into pinned
host memory with ``non_blocking=True`` and one event per device is recorded after the copies
(on that device's current stream, which orders them after the kernels that produced the
tensors). The writer waits on the events (:meth:`PendingRecord.wait`) before it reads a byte.
Tensors already on the CPU are passed through (the recorder hands over tensors that training
no longer writes to). Other devices are copied synchronously.

The CUDA-specific calls (pinned allocation, events) are parameters, so that the same logic is
tested on the CPU (tests/record/test_staging.py) where no device exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trajlab.store.run_store import StepRecord


def pinned_empty(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialised page-locked host tensor (PyTorch caches and reuses these blocks)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def cuda_event(device: torch.device) -> Any:
    """A CUDA event recorded now on ``device``'s current stream."""
    with torch.cuda.device(device):
        event = torch.cuda.Event()
        event.record()
    return event


@dataclass
class PendingRecord:
    """A step record whose tensors may still be in flight from the device.

    Attributes
    ----------
    root, layers : the record; tensors are host tensors, possibly still being filled.
    events : one per device the copies came from; all are waited on before the data is read.
    """

    root: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    events: list[Any] = field(default_factory=list)

    def wait(self) -> None:
        """Block until every copy of this record has landed in host memory."""
        for event in self.events:
            event.synchronize()

    def materialize(self) -> StepRecord:
        """The record as numpy arrays (after :meth:`wait`)."""
        self.wait()
        root = {k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in self.root.items()}
        layers = {
            name: {k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in tensors.items()}
            for name, tensors in self.layers.items()
        }
        return StepRecord(root=root, layers=layers)


def stage(root: dict[str, Any], layers: dict[str, dict[str, Any]], *,
          widen_bfloat16: bool = False,
          async_types: Iterable[str] = ("cuda",),
          empty: Callable[[torch.Size, torch.dtype], Tensor] = pinned_empty,
          record_event: Callable[[torch.device], Any] = cuda_event) -> PendingRecord:
    """Start moving a step record to the host and return it without waiting.

    Parameters
    ----------
    root, layers : the record (values: tensors on any device, numpy scalars, floats).
    widen_bfloat16 : store bfloat16 tensors as float32 (numpy has no bfloat16).
    async_types : device types copied without waiting (into ``empty`` buffers, then an event
        per device from ``record_event``); other non-CPU devices are copied synchronously.
    empty, record_event : the allocator of host buffers and the event factory (pinned memory
        and CUDA events by default; tests pass CPU stand-ins).
    """
    async_types = frozenset(async_types)
    devices: dict[str, torch.device] = {}

    def move(v: Any) -> Any:
        if not isinstance(v, Tensor):
            return v
        v = v.detach()
        if widen_bfloat16 and v.dtype == torch.bfloat16:
            v = v.to(torch.float32)
        if v.device.type in async_types:
            host = empty(v.shape, v.dtype)
            host.copy_(v, non_blocking=True)
            devices.setdefault(str(v.device), v.device)
            return host
        return v if v.device.type == "cpu" else v.cpu()

    host_layers = {name: {k: move(v) for k, v in row.items()} for name, row in layers.items()}
    host_root = {k: move(v) for k, v in root.items()}
    events = [record_event(d) for _, d in sorted(devices.items())]
    return PendingRecord(host_root, host_layers, events)
