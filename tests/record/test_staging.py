"""The device-to-host staging of step records (trajlab.record.staging), exercised on the CPU
with stand-ins for pinned buffers and CUDA events: the same code path the CUDA branch runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trajlab.record.staging import PendingRecord, stage


class FakeEvent:
    """Records when it was created (after how many copies) and whether it was awaited."""

    def __init__(self, device, copies_so_far):
        self.device = device
        self.copies_at_record = copies_so_far
        self.synchronized = False

    def synchronize(self):
        self.synchronized = True


class FakeDevice:
    """Counts the buffers handed out and the events recorded."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.events: list[FakeEvent] = []

    def empty(self, shape, dtype):
        t = torch.full(shape, -7, dtype=dtype) if dtype.is_floating_point else torch.empty(
            shape, dtype=dtype)
        self.buffers.append(t)
        return t

    def record_event(self, device):
        e = FakeEvent(device, len(self.buffers))
        self.events.append(e)
        return e


def _record():
    w = torch.randn(3, 4)
    root = {"step": np.int64(5), "indices": torch.arange(6), "loss": 0.5}
    layers = {"a": {"weight": w, "lr": 0.1, "ps_input": torch.randn(6, 4).to(torch.bfloat16)},
              "b": {"weight": torch.randn(2, 2), "nonfinite": True}}
    return root, layers


def test_async_branch_copies_every_tensor_then_records_one_event_per_device():
    dev = FakeDevice()
    root, layers = _record()
    rec = stage(root, layers, widen_bfloat16=True, async_types=("cpu",), empty=dev.empty,
                record_event=dev.record_event)
    # every tensor went through a fresh host buffer (3 layer tensors + indices), none is shared
    assert len(dev.buffers) == 4
    assert rec.layers["a"]["weight"].data_ptr() != layers["a"]["weight"].data_ptr()
    assert torch.equal(rec.layers["a"]["weight"], layers["a"]["weight"])
    assert rec.layers["a"]["ps_input"].dtype == torch.float32  # bfloat16 widened before copying
    assert torch.equal(rec.layers["a"]["ps_input"], layers["a"]["ps_input"].float())
    assert torch.equal(rec.root["indices"], root["indices"])
    assert rec.root["step"] == 5 and rec.layers["a"]["lr"] == 0.1 and rec.layers["b"]["nonfinite"]
    # one event, recorded after the last copy was issued
    assert len(dev.events) == 1 and dev.events[0].copies_at_record == 4
    assert not dev.events[0].synchronized


def test_materialize_waits_for_every_event_before_reading():
    dev = FakeDevice()
    root, layers = _record()
    rec = stage(root, layers, widen_bfloat16=True, async_types=("cpu",), empty=dev.empty,
                record_event=dev.record_event)
    extra = FakeEvent("other", 0)
    rec.events.append(extra)  # a second device
    order = []

    original = torch.Tensor.numpy

    def numpy(self, *a, **k):
        order.append(all(e.synchronized for e in rec.events))
        return original(self, *a, **k)

    torch.Tensor.numpy = numpy
    try:
        out = rec.materialize()
    finally:
        torch.Tensor.numpy = original
    assert order and all(order)  # no tensor was read before every event was awaited
    np.testing.assert_array_equal(out.layers["a"]["weight"], layers["a"]["weight"].numpy())


def test_cpu_tensors_pass_through_without_copies_or_events():
    dev = FakeDevice()
    root, layers = _record()
    rec = stage(root, layers, empty=dev.empty, record_event=dev.record_event)
    assert dev.buffers == [] and dev.events == [] and rec.events == []
    assert rec.layers["a"]["weight"] is not None
    assert rec.layers["a"]["weight"].data_ptr() == layers["a"]["weight"].data_ptr()
    assert rec.layers["a"]["ps_input"].dtype == torch.bfloat16  # not asked to widen
    rec.wait()  # nothing to wait for


def test_pending_record_without_events_materializes():
    rec = PendingRecord({"x": torch.arange(3)}, {"l": {"y": torch.ones(2)}})
    out = rec.materialize()
    np.testing.assert_array_equal(out.root["x"], [0, 1, 2])


@pytest.mark.cuda
def test_cuda_staging_lands_in_pinned_memory():
    w = torch.randn(256, 256, device="cuda")
    rec = stage({"step": np.int64(0)}, {"a": {"weight": w * 2}})
    assert rec.layers["a"]["weight"].is_pinned() and len(rec.events) == 1
    out = rec.materialize()
    np.testing.assert_array_equal(out.layers["a"]["weight"], (w * 2).cpu().numpy())
