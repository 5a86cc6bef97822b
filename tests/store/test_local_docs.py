"""trajlab.store.local_docs: direct resizes of a local store's arrays equal Zarr's own."""

from __future__ import annotations

import numpy as np
import zarr

from trajlab.store.local_docs import array_root, resize_local
from trajlab.store.run_store import resize_many


def _pair(tmp_path):
    out = []
    for name in ("zarr", "direct"):
        g = zarr.open_group(tmp_path / name, mode="w-", zarr_format=3)
        a = g.create_array("x", shape=(8, 5), chunks=(2, 5), dtype="float32", fill_value=np.nan,
                           dimension_names=("step", "sample"),
                           attributes={"description": "d"})
        a[:] = np.arange(40, dtype=np.float32).reshape(8, 5)
        out.append((g, a))
    return out


def test_direct_resize_writes_zarrs_document_and_removes_the_same_chunks(tmp_path):
    (_, az), (_, ad) = _pair(tmp_path)
    root = array_root(ad)
    assert root == tmp_path / "direct"
    for shape in ((12, 5), (3, 5), (3, 7), (0, 7)):
        az.resize(shape)
        resize_local(ad, root, shape)
        assert ad.shape == shape
        doc_z = (tmp_path / "zarr" / "x" / "zarr.json").read_bytes()
        doc_d = (tmp_path / "direct" / "x" / "zarr.json").read_bytes()
        assert doc_d == doc_z
        files_z = sorted(p.relative_to(tmp_path / "zarr") for p in
                         (tmp_path / "zarr").rglob("*") if p.is_file())
        files_d = sorted(p.relative_to(tmp_path / "direct") for p in
                         (tmp_path / "direct").rglob("*") if p.is_file())
        assert files_d == files_z
        reopened = zarr.open_array(tmp_path / "direct" / "x", mode="r")
        np.testing.assert_array_equal(reopened[:], az[:])
    assert not list((tmp_path / "direct").rglob("*.partial"))


def test_resize_many_uses_zarr_for_other_stores():
    g = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    a = g.create_array("x", shape=(2,), chunks=(2,), dtype="int8", fill_value=-1)
    assert array_root(a) is None
    resize_many([(a, (6,))])
    assert a.shape == (6,)
    assert g["x"].shape == (6,)


def test_a_created_store_is_bound_to_what_is_on_disk(tmp_path):
    """The writer binds the arrays it created without re-opening them, and resizes them
    directly: its view must equal a fresh Zarr open of the store after each step."""
    import torch

    import trajlab
    from trajlab.store.run_store import RunStoreWriter

    seen = {}
    orig = RunStoreWriter.finalize

    def finalize(self):
        for (layer, name), arr in self._arrays.items():
            seen[(layer, name, "before")] = arr.metadata.to_dict()
        orig(self)
        for (layer, name), arr in self._arrays.items():
            seen[(layer, name, "after")] = (arr.path, arr.metadata.to_dict())

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    RunStoreWriter.finalize = finalize
    try:
        with trajlab.Recorder(model, tmp_path / "run", optimizer=opt) as rec:
            for _ in range(3):
                x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                rec.log(loss=loss)
                opt.step()
    finally:
        RunStoreWriter.finalize = orig
    after = {k: v for k, v in seen.items() if k[2] == "after"}
    assert after
    for path, meta in after.values():
        on_disk = zarr.open_array(tmp_path / "run" / path, mode="r").metadata.to_dict()
        assert on_disk == meta
        assert meta["shape"][0] == 3
    before = [v for k, v in seen.items() if k[2] == "before"]
    assert all(m["shape"][0] >= 64 for m in before)  # allocated at creation
    assert trajlab.open_run(tmp_path / "run").verify() == []
