"""Torch-free checkpoint readers: safetensors and torch `.bin` zip pickles, single and sharded."""

from __future__ import annotations

import collections
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convert.readers import CheckpointReadError, CheckpointReader, write_safetensors, write_sharded_safetensors


def _torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def test_bin_reader_matches_torch_load(tmp_path):
    base = torch.randn(6, 5)
    shared = torch.randn(3, 4).to(torch.bfloat16)
    sd = collections.OrderedDict(
        fp32=torch.randn(4, 3),
        fp16=torch.randn(7).half(),
        bf16=shared,
        bf16_alias=shared,  # same tensor under a second name (γ-MoD's shared router in a .bin)
        transposed=base.t(),  # non-contiguous view
        sliced=base[2:, 1:4],  # storage offset + strides
        param=torch.nn.Parameter(torch.randn(2, 2)),
        ints=torch.arange(5),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
    )
    sd._metadata = {"": {"version": 1}}  # what Module.state_dict() attaches
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    reference = torch.load(path, weights_only=True)
    reader = CheckpointReader(path)
    assert list(reader.entries) == list(reference)
    got = dict(reader.iter_tensors())
    for key, value in reference.items():
        expected = _torch_to_numpy(value.detach())
        assert reader.entries[key].dtype == expected.dtype and reader.entries[key].shape == expected.shape
        assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
        np.testing.assert_array_equal(got[key], expected)
    assert np.shares_memory(got["bf16"], got["bf16_alias"])  # one storage, read once
    assert reader.entries["bf16"].locator[0] == reader.entries["bf16_alias"].locator[0]


def test_bin_reader_refuses_foreign_globals_and_legacy_format(tmp_path):
    evil = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "hook": os.getcwd}, evil)
    with pytest.raises(CheckpointReadError, match=r"evil\.bin: refusing to unpickle global posix\.getcwd"):
        CheckpointReader(evil)
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointReadError, match="legacy.*not supported"):
        CheckpointReader(legacy)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    st = tmp_path / "st" / "model.safetensors"
    st.parent.mkdir()
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, str(st))
    raw = st.read_bytes()
    st.write_bytes(raw[:-100])
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: truncated file: tensor '(a|b)'"):
        CheckpointReader(st.parent)
    st.write_bytes(raw[:4])
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: truncated safetensors file"):
        CheckpointReader(st.parent)
    st.write_bytes(struct.pack("<Q", 10) + b"{not json!" + raw[18:])
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: corrupt safetensors header"):
        CheckpointReader(st.parent)

    binf = tmp_path / "bin" / "pytorch_model.bin"
    binf.parent.mkdir()
    torch.save({"a": torch.randn(64, 64)}, binf)
    raw = binf.read_bytes()
    binf.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointReadError, match=r"pytorch_model\.bin: not a valid torch zip checkpoint"):
        CheckpointReader(binf.parent)
    # Flip payload bytes (zip CRC catches it when the storage is read).
    corrupt = bytearray(raw)
    start = raw.find(b"data/0") + 200
    corrupt[start:start + 16] = b"\xff" * 16
    binf.write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointReadError, match=r"pytorch_model\.bin: corrupt storage for a"):
        list(CheckpointReader(binf.parent).iter_tensors())


def test_sharded_index_validation_and_shard_order(tmp_path):
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(6)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: tensors[k] for k in ("t3", "t4", "t5")}, str(tmp_path / names[1]))
    save_file({k: tensors[k] for k in ("t0", "t1", "t2")}, str(tmp_path / names[0]))
    weight_map = {k: names[int(k[1]) // 3] for k in tensors}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = CheckpointReader(tmp_path)
    assert reader.container == "safetensors" and len(reader.files) == 2
    order = [k for k, _ in reader.iter_tensors(["t5", "t0", "t4"])]
    assert order[0] == "t0" and sorted(order[1:]) == ["t4", "t5"]  # shard by shard, not request order
    assert [reader.files.index(reader.entries[k].file) for k, _ in reader.iter_tensors()] == [0, 0, 0, 1, 1, 1]
    weight_map["t0"] = names[1]
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointReadError, match=r"lists 't0' in model-00002-of-00002.safetensors"):
        CheckpointReader(tmp_path)
    weight_map["t0"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointReadError, match=r"shard file model-00009-of-00009.safetensors is missing"):
        CheckpointReader(tmp_path)


def test_safetensors_writer_is_readable_by_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(7).astype(np.float16),
        "f32_t": rng.standard_normal((4, 6)).astype(np.float32).T,  # non-contiguous input
        "i64": np.arange(3, dtype=np.int64),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    with safe_open(str(path), "np") as f:  # ml_dtypes is imported, so BF16 works
        assert f.metadata() == {"format": "pt"}
        for key, value in tensors.items():
            got = f.get_tensor(key)
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)
    (tmp_path / "sh").mkdir()
    files = write_sharded_safetensors(tmp_path / "sh", iter(tensors.items()), max_shard_size=60)
    assert len(files) > 1
    reader = CheckpointReader(tmp_path / "sh")
    for key, value in reader.iter_tensors():
        np.testing.assert_array_equal(value, tensors[key])


def test_mapped_tensors_stay_valid_after_their_pages_are_released(tmp_path):
    """safetensors tensors are views of a mapping whose pages are released a window behind the
    reader (`_MAPPED_WINDOW`); views kept longer (a slow copy thread) still read the file's
    bytes, they are read-only, and they outlive the generator and the file's mapping handle."""
    from convert import readers

    rng = np.random.default_rng(1)
    tensors = {f"t{i:02d}": rng.standard_normal((rng.integers(1, 3000),)).astype(np.float32)
               for i in range(3 * readers._MAPPED_WINDOW)}
    tensors["empty"] = np.zeros((0, 4), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    got = dict(CheckpointReader(tmp_path).iter_tensors())  # every view kept past its release
    assert got.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(got[key], value)
    assert not got["t00"].flags.writeable
    with pytest.raises(ValueError):
        got["t00"][0] = 1.0


@pytest.mark.parametrize("case", ["linear", "heads_in", "heads_out", "conv", "conv1x1", "odd"])
def test_transposed_copies_equal_numpy(case):
    """The converter's staged transpose (padded tile buffer) and its detection of transposes
    behind the head reshapes give exactly numpy's result, for tile-unaligned shapes too."""
    from convert.pipeline import _as_transposed_matrix, _tiled_copy

    rng = np.random.default_rng(0)
    a = {"linear": rng.integers(0, 2**16, (300, 520)), "heads_in": rng.integers(0, 2**16, (6 * 40, 96)),
         "heads_out": rng.integers(0, 2**16, (96, 6 * 40)), "conv": rng.integers(0, 2**16, (8, 3, 5, 5)),
         "conv1x1": rng.integers(0, 2**16, (64, 40, 1, 1)), "odd": rng.integers(0, 2**16, (257, 3))}[case]
    a = a.astype(np.uint16)
    view = {"linear": lambda x: x.T, "heads_in": lambda x: x.reshape(6, 40, 96).transpose(2, 0, 1),
            "heads_out": lambda x: x.reshape(96, 6, 40).transpose(1, 2, 0), "conv": lambda x: x.transpose(2, 3, 1, 0),
            "conv1x1": lambda x: x[:, :, 0, 0].T, "odd": lambda x: x.T}[case](a)
    assert (_as_transposed_matrix(view) is None) == (case == "conv")
    dst = np.empty(view.shape, view.dtype)
    _tiled_copy(dst, view, tile=64)
    np.testing.assert_array_equal(dst, view)
