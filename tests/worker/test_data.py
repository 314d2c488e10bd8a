"""Data sets: shapes and dtypes, determinism, memory mapping, IDX parsing, text windows, split."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from dptrain.worker import data
from dptrain.worker.data import DataError, Subset, load_dataset


def test_digits_shapes_and_dtypes():
    ds = load_dataset("digits")
    x, y = ds.gather(np.array([0, 1796, 5]))
    assert len(ds) == 1797 and ds.task == "classification" and ds.num_classes == 10
    assert x.shape == (3, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == np.int64 and y.tolist() == [0, 8, 5]
    images, _ = load_dataset("digits", {"flatten": False}).gather(np.array([5]))
    assert images.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(images.reshape(1, 64), x[2:3])


@pytest.mark.parametrize("task, x_shape, x_dtype, y_shape, y_dtype", [
    ("classification", (4, 2, 3), np.float32, (4,), np.int64),
    ("regression", (4, 2, 3), np.float32, (4, 2), np.float32),
    ("tokens", (4, 7), np.int64, (4, 7), np.int64),
])
def test_synthetic_tasks(task, x_shape, x_dtype, y_shape, y_dtype):
    args = {"task": task, "n": 300, "features": [2, 3], "classes": 4, "outputs": 2,
            "seq_len": 7, "vocab": 11, "seed": 5}
    ds = load_dataset("synthetic", args)
    idx = np.array([0, 299, 7, 7])
    x, y = ds.gather(idx)
    assert len(ds) == 300 and ds.task == task
    assert (x.shape, x.dtype, y.shape, y.dtype) == (x_shape, x_dtype, y_shape, y_dtype)
    again = load_dataset("synthetic", args).gather(idx)
    np.testing.assert_array_equal(x, again[0])
    np.testing.assert_array_equal(y, again[1])
    other = load_dataset("synthetic", {**args, "seed": 6}).gather(idx)
    assert not np.array_equal(x, other[0])
    if task == "classification":
        labels = ds.gather(np.arange(300))[1]
        assert set(labels.tolist()) == {0, 1, 2, 3}  # every class occurs
    if task == "tokens":
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert 0 <= x.min() and y.max() < 11 and ds.num_classes == 11


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(DataError, match="synthetic n must be an integer >= 1, got 0"):
        load_dataset("synthetic", {"n": 0})
    with pytest.raises(DataError, match="task must be one of"):
        load_dataset("synthetic", {"task": "ranking"})


def test_unknown_data_set_and_argument():
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="data set 'digits'.*unexpected keyword"):
        load_dataset("digits", {"size": 3})


# ---------------------------------------------------------------- npz and npy files

def test_npz(tmp_path):
    x = np.arange(40, dtype=np.uint8).reshape(10, 4)
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, extra=y)
    ds = load_dataset("npz", {"path": str(tmp_path / "d.npz"), "scale": 0.5})
    xb, yb = ds.gather(np.array([9, 2]))
    np.testing.assert_array_equal(xb, x[[9, 2]].astype(np.float32) * 0.5)
    assert xb.dtype == np.float32 and yb.tolist() == [0, 2] and ds.num_classes == 3
    np.savez(tmp_path / "bad.npz", x=x, labels=y)
    with pytest.raises(DataError, match=r"bad.npz has no array 'y' \(it has x, labels\)"):
        load_dataset("npz", {"path": str(tmp_path / "bad.npz")})
    np.savez(tmp_path / "short.npz", x=x, y=y[:9])
    with pytest.raises(DataError, match="x has 10 samples but y has 9"):
        load_dataset("npz", {"path": str(tmp_path / "short.npz")})
    with pytest.raises(DataError, match="npz file .*missing.npz' does not exist"):
        load_dataset("npz", {"path": str(tmp_path / "missing.npz")})


class RecordingArray:
    """Wraps an array and records every index it is asked for."""

    def __init__(self, array):
        self.array, self.requests = array, []

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        self.requests.append(np.asarray(index).copy())
        return self.array[index]


def test_npy_is_memory_mapped_and_a_shard_reads_only_its_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 5)).astype(np.float32)
    y = np.arange(1000) % 7
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    ds = load_dataset("npy", {"path": str(tmp_path)})
    assert isinstance(ds.x, np.memmap) and isinstance(ds.y, np.memmap)
    assert ds.x.filename == str((tmp_path / "x.npy").resolve())
    # What the trainer does for rank 1 of 2: its contiguous half of a global batch.
    train = Subset(ds, np.arange(100, 900))
    batch = np.array([5, 17, 300, 2, 640, 41])
    shard = batch[3:]
    ds.x, ds.y = RecordingArray(ds.x), RecordingArray(ds.y)
    xb, yb = train.gather(shard)
    assert type(xb) is np.ndarray and not isinstance(xb, np.memmap)
    np.testing.assert_array_equal(xb, x[100 + shard])
    np.testing.assert_array_equal(yb, y[100 + shard])
    assert [r.tolist() for r in ds.x.requests] == [(100 + shard).tolist()]
    assert [r.tolist() for r in ds.y.requests] == [(100 + shard).tolist()]


def test_npy_errors(tmp_path):
    with pytest.raises(DataError, match="npy directory .* does not exist"):
        load_dataset("npy", {"path": str(tmp_path / "nope")})
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(DataError, match="y.npy' does not exist"):
        load_dataset("npy", {"path": str(tmp_path)})
    (tmp_path / "y.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="y.npy is not a readable .npy file"):
        load_dataset("npy", {"path": str(tmp_path)})


# ---------------------------------------------------------------- IDX (MNIST's format)

def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand from the format's definition."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_idx_images_and_labels(tmp_path, compressed):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    suffix = ".gz" if compressed else ""
    write = gzip.compress if compressed else (lambda b: b)
    (tmp_path / f"images{suffix}").write_bytes(write(idx_bytes(images, 0x08)))
    (tmp_path / f"labels{suffix}").write_bytes(write(idx_bytes(labels, 0x08)))
    args = {"images": str(tmp_path / f"images{suffix}"),
            "labels": str(tmp_path / f"labels{suffix}")}
    ds = load_dataset("idx", args)
    assert isinstance(ds.x, np.memmap) != compressed  # raw files stay on disk
    x, y = ds.gather(np.array([5, 0]))
    np.testing.assert_allclose(x, images[[5, 0]].reshape(2, 12) / 255.0, rtol=1e-6)
    assert x.dtype == np.float32 and y.tolist() == [9, 3] and y.dtype == np.int64
    x, _ = load_dataset("idx", {**args, "flatten": False}).gather(np.array([1]))
    assert x.shape == (1, 1, 4, 3)


def test_idx_multibyte_types_are_big_endian(tmp_path):
    values = np.array([[1, -2], [300, -40000]], dtype=np.int32)
    (tmp_path / "a").write_bytes(idx_bytes(values, 0x0C))
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "a")), values)
    floats = np.array([0.5, -1.25, 3e10])
    (tmp_path / "f").write_bytes(idx_bytes(floats, 0x0E))
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "f")), floats)


def test_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((4, 2, 2), dtype=np.uint8), 0x08)
    cases = {
        "magic": (b"\x08\x03" + good[2:], "wrong magic number 0803"),
        "type": (b"\x00\x00\x07\x03" + good[4:], "wrong magic number 00000703"),
        "empty": (b"", r"wrong magic number \(empty file\)"),
        "header": (good[:9], "truncated: its header promises 3 dimensions but ends after 1"),
        "data": (good[:-3], "truncated: shape \\(4, 2, 2\\) of u1 needs 16 bytes of data, "
                            "the file has 13"),
        "extra": (good + b"\x00", "1 bytes after the data its header describes"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            data.read_idx(str(tmp_path / name))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(DataError, match="cut.gz is (truncated|not a readable IDX file)"):
        data.read_idx(str(tmp_path / "cut.gz"))
    with pytest.raises(DataError, match="IDX file .*nothing' does not exist"):
        data.read_idx(str(tmp_path / "nothing"))
    (tmp_path / "images").write_bytes(good)
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8), 0x08))
    with pytest.raises(DataError, match="holds 4 images but .* holds 3 labels"):
        load_dataset("idx", {"images": str(tmp_path / "images"),
                             "labels": str(tmp_path / "labels")})


# ---------------------------------------------------------------- text

def test_text_windows(tmp_path):
    corpus = "abracadabra, abracadabra!"
    (tmp_path / "t.txt").write_text(corpus)
    ds = load_dataset("text", {"path": str(tmp_path / "t.txt"), "seq_len": 6, "stride": 4})
    assert ds.vocab == sorted(set(corpus)) and ds.num_classes == len(set(corpus))
    assert len(ds) == (len(corpus) - 6 - 1) // 4 + 1 == 5
    x, y = ds.gather(np.array([0, 4, 2]))
    assert x.dtype == np.int64 and x.shape == y.shape == (3, 6)
    decode = ["".join(ds.vocab[t] for t in row) for row in x]
    assert decode == [corpus[0:6], corpus[16:22], corpus[8:14]]
    assert ["".join(ds.vocab[t] for t in row) for row in y] == [corpus[1:7], corpus[17:23],
                                                               corpus[9:15]]
    with pytest.raises(DataError, match="the corpus has 25 tokens, fewer than seq_len \\+ 1"):
        load_dataset("text", {"path": str(tmp_path / "t.txt"), "seq_len": 25})


def test_text_unicode_and_errors(tmp_path):
    (tmp_path / "u.txt").write_text("héllo wörld ✓", encoding="utf-8")
    ds = load_dataset("text", {"path": str(tmp_path / "u.txt"), "seq_len": 3})
    x, _ = ds.gather(np.array([0]))
    assert "".join(ds.vocab[t] for t in x[0]) == "hél"
    with pytest.raises(DataError, match="cannot be read as ascii"):
        load_dataset("text", {"path": str(tmp_path / "u.txt"), "encoding": "ascii"})


# ---------------------------------------------------------------- split and order

def test_train_validation_split_is_a_deterministic_partition():
    train, val = data.train_validation_split(103, 0.25, seed=4)
    assert len(val) == 25 and len(train) == 78
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(103))
    again = data.train_validation_split(103, 0.25, seed=4)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, data.train_validation_split(103, 0.25, seed=5)[1])
    assert len(data.train_validation_split(10, 0.0, seed=0)[1]) == 0


def test_epoch_batches_cover_the_epoch_without_repeats():
    b0 = data.epoch_batches(50, 8, seed=1, epoch=0)
    assert b0.shape == (6, 8) and len(set(b0.ravel().tolist())) == 48
    np.testing.assert_array_equal(b0, data.epoch_batches(50, 8, seed=1, epoch=0))
    assert not np.array_equal(b0, data.epoch_batches(50, 8, seed=1, epoch=1))
