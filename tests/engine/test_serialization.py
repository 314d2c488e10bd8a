"""engine.save / engine.load: safetensors files, round trips, atomic replacement, errors."""

import json
import os
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from dptrain.engine.optim import Adam
from dptrain.engine.serialization import load, load_metadata, save
from dptrain.engine.tensor import Tensor


def sample():
    """Mixed dtypes, in an order that is neither sorted by name nor by dtype size."""
    rng = np.random.default_rng(0)
    return {
        "mask": np.array([[True, False, True]]),
        "layer.weight": rng.standard_normal((2, 3)).astype(np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
        "counts": np.array([-1, 2**40, 7], dtype=np.int64),
        "bias": rng.standard_normal(4),  # float64
        "empty": np.zeros((0, 4), dtype=np.float16),
        "bytes": np.array([0, 255, 7], dtype=np.uint8),
        "step": np.array(12, dtype=np.int64),
    }


def tensors(arrays):
    return {k: Tensor(v) for k, v in arrays.items()}


def test_round_trip_preserves_dtype_shape_values_and_order(tmp_path):
    arrays = sample()
    path = tmp_path / "model.safetensors"
    save(tensors(arrays), path)
    loaded = load(path)
    assert list(loaded) == list(arrays)
    for name, want in arrays.items():
        got = loaded[name]
        assert isinstance(got, Tensor) and not got.requires_grad
        assert got.data.dtype == want.dtype and got.data.shape == want.shape, name
        assert np.array_equal(got.data, want), name
        assert got.data.flags.writeable and got.data.flags.owndata


def test_file_opens_with_the_safetensors_library(tmp_path):
    arrays = sample()
    path = tmp_path / "model.safetensors"
    save(tensors(arrays), str(path), metadata={"format": "np", "epoch": "3"})
    theirs = safetensors.numpy.load_file(str(path))
    assert set(theirs) == set(arrays)
    for name, want in arrays.items():
        assert theirs[name].dtype == want.dtype and np.array_equal(theirs[name], want), name
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "np", "epoch": "3"}


def test_reads_files_written_by_the_safetensors_library(tmp_path):
    arrays = sample()
    path = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"k": "v"})
    loaded = load(path)
    assert set(loaded) == set(arrays)
    for name, want in arrays.items():
        assert loaded[name].data.dtype == want.dtype and np.array_equal(loaded[name].data, want)
    assert load_metadata(path) == {"k": "v"}


def test_layout_on_disk(tmp_path):
    # Header length, JSON header padded to 8 bytes, tensors by decreasing alignment.
    path = tmp_path / "x.safetensors"
    save({"b": Tensor(np.array([True])), "f": Tensor(np.array([1.5], dtype=np.float64))}, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header) == ["b", "f"]
    assert header["f"] == {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}
    assert header["b"] == {"dtype": "BOOL", "shape": [1], "data_offsets": [8, 9]}
    assert raw[8 + n:] == struct.pack("<d", 1.5) + b"\x01"


def test_saves_data_of_tensors_that_require_grad_and_views(tmp_path):
    w = Tensor(np.arange(6.0, dtype=np.float32).reshape(2, 3), requires_grad=True)
    view = Tensor(np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2].T)  # not contiguous
    save({"w": w, "view": view}, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors", map_location="cpu")
    assert np.array_equal(loaded["w"].data, w.data)
    assert np.array_equal(loaded["view"].data, [[0, 4, 8], [2, 6, 10]])


def test_empty_dict_and_metadata(tmp_path):
    path = tmp_path / "empty.safetensors"
    save({}, path, metadata={"note": "nothing"})
    assert load(path) == {}
    assert load_metadata(path) == {"note": "nothing"}
    assert safetensors.numpy.load_file(str(path)) == {}


def test_optimizer_state_survives_a_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(3).astype(np.float32) for _ in range(4)]
    p = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    opt = Adam([p], lr=0.1)

    def step(opt, p, g):
        p.grad = Tensor(g.copy())
        opt.step()

    for g in grads[:2]:
        step(opt, p, g)
    sd = opt.state_dict()
    save({"param": p, **{f"state.0.{k}": v for k, v in sd["state"][0].items() if k != "step"}},
         tmp_path / "ckpt.safetensors", metadata={"step": str(sd["state"][0]["step"])})
    for g in grads[2:]:
        step(opt, p, g)

    files = load(tmp_path / "ckpt.safetensors")
    q = Tensor(files.pop("param").data, requires_grad=True)
    state = {k.removeprefix("state.0."): v for k, v in files.items()}
    state["step"] = int(load_metadata(tmp_path / "ckpt.safetensors")["step"])
    resumed = Adam([q], lr=0.1)
    resumed.load_state_dict({"state": {0: state}, "param_groups": sd["param_groups"]})
    for g in grads[2:]:
        step(resumed, q, g)
    assert np.array_equal(p.data, q.data)


# ---------------------------------------------------------------- atomic replacement

def test_no_temporary_files_are_left_and_a_file_is_replaced(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save({"a": Tensor(np.zeros(2))}, path)
    save({"b": Tensor(np.ones(3))}, path)
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert list(load(path)) == ["b"]


def test_a_failed_save_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save({"a": Tensor(np.arange(3.0))}, path)
    with pytest.raises(TypeError, match="'bad' is a list"):
        save({"a": Tensor(np.zeros(3)), "bad": [1, 2]}, path)
    assert load(path)["a"].tolist() == [0.0, 1.0, 2.0]
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_a_write_that_fails_midway_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save({"a": Tensor(np.arange(3.0))}, path)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        save({"a": Tensor(np.zeros(1000))}, path)
    monkeypatch.undo()
    assert load(path)["a"].tolist() == [0.0, 1.0, 2.0]
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_file_permissions_follow_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        save({"a": Tensor(np.zeros(1))}, tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("obj, error, message", [
    ([Tensor(np.zeros(1))], TypeError, "dict of name -> Tensor, got list"),
    ({"w": np.zeros(2)}, TypeError, "'w' is a ndarray"),
    ({"w": 1.0}, TypeError, "'w' is a float"),
    ({1: Tensor(np.zeros(1))}, TypeError, "str keys, got 1"),
    ({"__metadata__": Tensor(np.zeros(1))}, ValueError, "reserved"),
])
def test_save_rejects_bad_input(tmp_path, obj, error, message):
    with pytest.raises(error, match=message):
        save(obj, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_rejects_bad_metadata_and_a_missing_directory(tmp_path):
    with pytest.raises(TypeError, match="metadata must be a dict of str -> str"):
        save({}, tmp_path / "x.safetensors", metadata={"epoch": 3})
    missing = tmp_path / "no" / "such" / "x.safetensors"
    with pytest.raises(FileNotFoundError, match="no directory") as info:
        save({}, missing)
    assert info.value.filename == str(missing)


def test_load_a_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        load(path)
    assert str(path) in str(info.value)


def write_raw(path, header, data=b""):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"abc"), "only 3 bytes"),
    (lambda p: p.write_bytes(b"not a safetensors file at all"), "does not fit the file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "header is not JSON"),
    (lambda p: write_raw(p, [1, 2]), "not a JSON object"),
    (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                         b"\0" * 4), "describes 8"),
    (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                         b"\0" * 4), "4 bytes for shape"),
    (lambda p: write_raw(p, {"w": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}},
                         b"\0" * 4), "unsupported entry for 'w'"),
    (lambda p: write_raw(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                             "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}},
                         b"\0" * 3), "overlaps or leaves a gap"),
])
def test_load_rejects_invalid_files_naming_the_path(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_load_rejects_an_unknown_device(tmp_path):
    save({}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="device must be"):
        load(tmp_path / "x.safetensors", map_location="tpu")


# ---------------------------------------------------------------- PyTorch

def test_file_opens_with_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    arrays = sample()
    path = tmp_path / "model.safetensors"
    save(tensors(arrays), path)
    theirs = load_file(str(path))
    assert set(theirs) == set(arrays)
    for name, want in arrays.items():
        got = theirs[name]
        assert got.dtype == getattr(torch, str(want.dtype)) and tuple(got.shape) == want.shape
        assert np.array_equal(got.numpy(), want), name
