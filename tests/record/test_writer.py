"""The writer path: unrecorded steps cost nothing, and the codecs and writers change no bit."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

import trajlab
import trajlab.record.recorder as recorder_module
import trajlab.record.session as session_module
from trajlab.record.writer import same_bits
from trajlab.store.codecs import PROFILES, codecs_for
from trajlab.store.run_store import RunStoreWriter

TRAJLAB = str(Path(trajlab.__file__).parent)


class Net(nn.Module):
    """Conv2d (subspace sketch) and Linear layers (rank-one factors) behind ReLUs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.fc1 = nn.Linear(5 * 6 * 6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _record(store, *, steps=12, every=1, batch=8, lr=0.05, optimizer="sgd", edit_at=None,
            **kw):
    X, Y = _data()
    model = Net()
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr))
    g = torch.Generator().manual_seed(1)
    with trajlab.Recorder(model, store, optimizer=opt, every=every, loss_fn=F.cross_entropy,
                          **kw) as rec:
        for step in range(steps):
            idx = torch.randint(0, len(X), (batch - (step % 3 == 2),), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
            if step == edit_at:
                with torch.no_grad():
                    model.fc1.weight.mul_(0.5)  # weights edited between steps
    return model


# --------------------------------------------------------------------------- unrecorded steps
class _Calls:
    """Counts the recorder's hook products and profiles trajlab functions per step."""

    def __init__(self, rec: trajlab.Recorder):
        self.forward = self.capture = self.model_forward = 0
        self.functions: set[str] = set()
        make_callback, capture, on_model = (rec._forward_callback, rec._capture,
                                            rec._on_model_forward)

        def forward_callback(layer):
            product = make_callback(layer)

            @functools.wraps(product)
            def counted(*args, **kwargs):
                self.forward += 1
                return product(*args, **kwargs)

            return counted

        def counted_capture(*args, **kwargs):
            self.capture += 1
            return capture(*args, **kwargs)

        def counted_model_forward(*args, **kwargs):
            self.model_forward += 1
            return on_model(*args, **kwargs)

        # instance attributes shadow the methods the hooks look up when they are installed
        rec._forward_callback = forward_callback
        rec._capture = counted_capture
        rec._on_model_forward = counted_model_forward

    def profile(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(TRAJLAB):
            self.functions.add(frame.f_code.co_name)

    def reset(self):
        self.forward = self.capture = self.model_forward = 0
        self.functions = set()


#: What an unrecorded step may run: the optimizer step hooks counting steps.
STEP_COUNTER = {"pre_hook", "post_hook", "_before_step", "_before_step_local", "_after_step",
                "recording", "_reset_step", "_disarm", "_remove"}
#: ... and, on the step before a recorded one, installing the hooks for it.
ARMING = {"_arm", "forward_callback", "install", "_forward_callback"}
#: The user's own call of ``Recorder.log`` validates its arguments on every step.
USER_CALL = {"log", "_check_loss_type", "_check_indices_type"}  # argument checks only


def test_unrecorded_steps_run_no_recorder_code(tmp_path):
    every, steps = 4, 13
    X, Y = _data()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    n_layers = 3
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, every=every) as rec:
        calls = _Calls(rec)
        rec._disarm()  # hooks installed on entry were made before the counters
        rec._arm()
        per_step = []
        for step in range(steps):
            calls.reset()
            sys.setprofile(calls.profile)
            try:
                idx = torch.arange(8) + step
                opt.zero_grad()
                loss = F.cross_entropy(model(X[idx]), Y[idx])
                loss.backward()
                rec.log(loss=loss, indices=idx)
                opt.step()
            finally:
                sys.setprofile(None)
            per_step.append((calls.forward, calls.capture, calls.model_forward,
                             set(calls.functions)))
    for step, (fwd, cap, root, functions) in enumerate(per_step):
        if step % every == 0:
            assert (fwd, cap, root) == (n_layers, n_layers, 1), step
            continue
        assert (fwd, cap, root) == (0, 0, 0), (step, fwd, cap, root)
        allowed = STEP_COUNTER | USER_CALL | (ARMING if (step + 1) % every == 0 else set())
        assert functions <= allowed, (step, sorted(functions - allowed))
    assert trajlab.open_run(tmp_path / "r.zarr").steps.tolist() == [0, 4, 8, 12]


def test_no_layer_hooks_between_recorded_steps(tmp_path):
    X, Y = _data()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, every=3) as rec:
        seen = []
        for step in range(7):
            seen.append(hooks())
            opt.zero_grad()
            F.cross_entropy(model(X[:8]), Y[:8]).backward()
            rec.log()
            opt.step()
    assert [n > 0 for n in seen] == [step % 3 == 0 for step in range(7)]


# --------------------------------------------------------------------------- bit-exactness
def _stored(path) -> dict[str, np.ndarray]:
    """Every stored array of a store, as raw values (no derived variables; not the chunk
    manifest, whose checksums are of the encoded bytes, which differ between codecs)."""
    out = {}
    root = zarr.open_group(str(path), mode="r")

    def walk(group, prefix):
        for name, arr in group.arrays():
            if prefix + name != "trajlab_chunks":
                out[prefix + name] = arr[...]
        for name, sub in group.groups():
            walk(sub, prefix + name + "/")

    walk(root, "")
    return out


def _assert_same_store(a, b):
    sa, sb = _stored(a), _stored(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert same_bits(sa[k], sb[k]), k
    ra, rb = trajlab.open_run(a), trajlab.open_run(b)
    for name in ra.layers:
        la, lb = ra.layer(name).compute(), rb.layer(name).compute()
        for v in la.data_vars:
            assert same_bits(la[v].values, lb[v].values), f"{name}/{v}"


def _with_profile(monkeypatch, profile):
    def writer(*args, **kwargs):
        return RunStoreWriter(*args, **{**kwargs, "codec_profile": profile})

    monkeypatch.setattr(session_module, "RunStoreWriter", writer)  # the Session opens it


def use_writer(monkeypatch, make):
    """Recorders of this test get their writer from ``make(store_writer, **options)`` (whether
    the recorder builds ``BackgroundWriter`` itself or asks ``make_writer``)."""
    monkeypatch.setattr(recorder_module, "BackgroundWriter", make, raising=False)
    monkeypatch.setattr(recorder_module, "make_writer",
                        lambda kind, w, **kwargs: make(w, **kwargs), raising=False)


@pytest.mark.parametrize("kw", [{}, {"optimizer": "adamw", "every": 2, "edit_at": 4},
                                {"per_sample_dtype": "float16", "flush_seconds": 0.0}],
                         ids=["sgd", "adamw-every2-edited", "float16-flush-every-row"])
def test_codecs_change_no_bit(tmp_path, monkeypatch, kw):
    kw = {"flush_seconds": 3600.0, **kw}  # rows flushed at the same moments in every store
    stores = {}
    for profile in PROFILES:
        _with_profile(monkeypatch, profile)
        stores[profile] = tmp_path / f"{profile}.zarr"
        _record(stores[profile], **kw)
    for profile in PROFILES[1:]:
        _assert_same_store(stores[PROFILES[0]], stores[profile])


def test_profiles_write_the_codecs_they_name(tmp_path, monkeypatch):
    for profile in PROFILES:
        _with_profile(monkeypatch, profile)
        _record(tmp_path / f"{profile}.zarr", steps=2)
        w = zarr.open_array(str(tmp_path / f"{profile}.zarr/layers/fc1/weight"), mode="r")
        codecs = [c["name"] for c in w.metadata.to_dict()["codecs"]]
        assert codecs[-1] == "crc32c"  # the checksum is always the last codec
        assert (codecs[0] == "transpose") == (profile != "plain")
        blosc = next(c for c in w.metadata.to_dict()["codecs"] if c["name"] == "blosc")
        assert blosc["configuration"]["cname"] == ("zstd" if profile == "small" else "lz4")


def test_codecs_for_every_kind_of_variable():
    for profile in PROFILES:
        for name, ndim, dtype in [("weight", 3, "f4"), ("ps_input", 3, "f2"), ("lr", 1, "f8"),
                                  ("indices", 2, "i8"), ("probe", 1, "bool"),
                                  ("basis_u", 3, "f8")]:
            c = codecs_for(name, ndim, np.dtype(dtype), profile=profile)
            assert type(c["compressors"][-1]).__name__ == "Crc32cCodec"
            assert codecs_for(name, ndim, np.dtype(dtype), checksum=False,
                              profile=profile)["compressors"][-1] == c["compressors"][0]
    with pytest.raises(ValueError, match="profile"):
        codecs_for("weight", 3, np.dtype("f4"), profile="tiny")


def test_same_bits_tells_apart_what_array_equal_does_not():
    a = np.array([0.0, 1.0, np.nan], dtype=np.float32)
    assert same_bits(a, a.copy())
    assert not same_bits(a, np.array([-0.0, 1.0, np.nan], dtype=np.float32))
    assert not same_bits(a, a.astype(np.float64))
    assert not same_bits(a[:2], a)
