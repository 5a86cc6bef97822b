"""trajlab.store.local_create: a local run store laid out directly equals Zarr's own layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn
from zarr.core.buffer import default_buffer_prototype

import trajlab
from trajlab.store import run_store
from trajlab.store.local_create import Unsupported
from trajlab.store.metadata import RunMeta
from trajlab.store.names import ATTR_KEY, SAMPLES_KEY


class Net(nn.Module):
    """Layers of the sketch kinds rows, diagonal, subspace and rank1."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 5, 3)
        self.lin = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(self.norm(self.emb(x)).transpose(1, 2)))
        return self.lin(h.mean(-1))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(meta, sample capacity) of a one-step recording of ``Net``."""
    path = tmp_path_factory.mktemp("rec") / "r.zarr"
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 4, (6,))
    with trajlab.Recorder(model, path, optimizer=opt) as rec:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.log(loss=loss)
        opt.step()
    attrs = zarr.open_group(path, mode="r").attrs.asdict()
    return RunMeta.from_dict(attrs[ATTR_KEY], where=str(path)), int(attrs[SAMPLES_KEY])


def _doc(meta) -> bytes:
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("profile", ["fast", "small", "plain"])
def test_direct_layout_is_zarrs_byte_for_byte(tmp_path, monkeypatch, recorded, profile):
    meta, samples = recorded
    direct = run_store.RunStoreWriter(tmp_path / "direct.zarr", codec_profile=profile)
    direct.create(meta, sample_capacity=samples)

    def refuse(*a, **kw):
        raise Unsupported("test: through Zarr")

    monkeypatch.setattr(run_store, "create_nodes", refuse)
    through = run_store.RunStoreWriter(tmp_path / "zarr.zarr", codec_profile=profile)
    through.create(meta, sample_capacity=samples)
    got, want = _files(tmp_path / "direct.zarr"), _files(tmp_path / "zarr.zarr")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    # the bound arrays equal a fresh open of the store, and both writers hold the same arrays
    assert sorted(direct._arrays) == sorted(through._arrays)
    fresh = zarr.open_group(tmp_path / "direct.zarr", mode="r")
    for arr in [*direct._arrays.values(), direct._manifest]:
        other = fresh[arr.path]
        assert _doc(arr.metadata) == _doc(other.metadata) and arr.path == other.path
        assert arr._async_array.store_path.store.root == (tmp_path / "direct.zarr")


def test_unknown_create_arguments_fall_back_before_writing(tmp_path):
    from trajlab.store.local_create import array_metadata

    with pytest.raises(Unsupported, match="shards"):
        array_metadata({"name": "x", "shape": (2,), "chunks": (1,), "dtype": "f4",
                        "shards": (2,)})
