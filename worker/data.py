"""Data sets that jobs name, the train/validation split, and each epoch's order of batches.

A data set is anything with ``len()`` and ``gather(indices) -> (x, y)``: one vectorized
indexing per batch, never a Python loop over samples. File-backed arrays (``npy``, raw ``idx``)
stay memory-mapped, so a rank reads only the rows it gathers. The registry `DATASETS` maps
the names a job spec uses to constructors taking the spec's ``dataset.args`` as keywords:

========== =====================================================================
digits     scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)
synthetic  generated classification, regression or token data; any size, fixed by seed
npz        one ``.npz`` file with arrays ``x`` and ``y``
npy        a directory with ``x.npy`` and ``y.npy``, memory-mapped
idx        MNIST's IDX files (images and labels, optionally gzip-compressed)
text       a character-level corpus from a text file, cut into token windows
========== =====================================================================
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Dataset", "ArrayDataset", "TokenWindows", "Subset", "DATASETS", "load_dataset",
    "train_validation_split", "epoch_batches", "DataError",
    "digits", "synthetic", "npz", "npy", "idx", "text", "read_idx", "synthetic_problems",
    "SYNTHETIC_MAX_SAMPLES", "SYNTHETIC_MAX_VALUES", "reads_files", "data_paths",
]

TASKS = ("classification", "regression", "tokens")


class DataError(ValueError):
    """A data file that is missing, malformed or inconsistent, or a bad data set argument."""


class Dataset:
    """Base class: ``len(ds)`` samples, gathered a batch at a time by an index array.

    Attributes:
        task: ``"classification"`` (y: int64 class per sample), ``"regression"`` (y: float32
            targets) or ``"tokens"`` (x, y: int64 token sequences, y shifted by one).
        num_classes: classes (classification) or vocabulary size (tokens); None otherwise.
    """

    task: str = "classification"
    num_classes: int | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The samples at `indices`, as two arrays with a leading batch dimension.

        Args:
            indices: a 1-D integer array of sample indices.

        Returns:
            ``(x, y)``: inputs (float32 features, or int64 tokens) and targets.
        """
        raise NotImplementedError


class ArrayDataset(Dataset):
    """Samples are the rows of two arrays (in memory or memory-mapped).

    Args:
        x: inputs, one row per sample; integer inputs are cast to float32 and multiplied by
            `scale` at gather time (unless the task is ``tokens``), float inputs cast to float32.
        y: targets, one row per sample.
        task: one of `TASKS`; None infers it: integer 1-D y is classification, float y
            regression, integer x and 2-D y tokens.
        scale: factor for integer inputs (e.g. 1/255 for 8-bit pixels).
        num_classes: the number of classes (or vocabulary size); None: ``max(y) + 1``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, task: str | None = None,
                 scale: float = 1.0, num_classes: int | None = None):
        if len(x) != len(y):
            raise DataError(f"x has {len(x)} samples but y has {len(y)}")
        if task is None:
            if y.dtype.kind in "iu" and y.ndim == 1:
                task = "classification"
            elif y.dtype.kind in "iu" and x.dtype.kind in "iu":
                task = "tokens"
            elif y.dtype.kind == "f":
                task = "regression"
            else:
                raise DataError(f"cannot infer the task from y of dtype {y.dtype} and shape "
                                f"{y.shape}; pass task")
        if task not in TASKS:
            raise DataError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task != "regression" and y.dtype.kind not in "iu":
            raise DataError(f"{task} needs integer targets y, got dtype {y.dtype}")
        self.x, self.y, self.task, self.scale = x, y, task, float(scale)
        if task != "regression" and num_classes is None and len(y):
            num_classes = int(np.max(y)) + 1
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.x)

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(self.x[indices])
        y = np.asarray(self.y[indices])
        if self.task == "tokens":
            return x.astype(np.int64, copy=False), y.astype(np.int64, copy=False)
        if x.dtype.kind in "iub":
            x = x.astype(np.float32) * np.float32(self.scale)
        else:
            x = x.astype(np.float32, copy=False)
        y = y.astype(np.float32 if self.task == "regression" else np.int64, copy=False)
        return x, y


class TokenWindows(Dataset):
    """Windows of a token stream: sample i is ``tokens[s:s+seq_len]`` with targets shifted by
    one, ``tokens[s+1:s+seq_len+1]``, where ``s = i * stride``.

    Args:
        tokens: a 1-D integer array.
        seq_len: tokens per window, >= 1.
        stride: distance between window starts, >= 1 (None: `seq_len`, no overlap).
        vocab: the characters (or symbols) of the token ids, if known.
    """

    task = "tokens"

    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int | None = None,
                 vocab: Sequence[str] | None = None):
        stride = seq_len if stride is None else stride
        if seq_len < 1 or stride < 1:
            raise DataError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
        if len(tokens) < seq_len + 1:
            raise DataError(f"the corpus has {len(tokens)} tokens, fewer than seq_len + 1 = "
                            f"{seq_len + 1}")
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self.vocab = list(vocab) if vocab is not None else None
        self.num_classes = len(vocab) if vocab is not None else int(tokens.max()) + 1
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len - 1) // self.stride + 1

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        windows = self.tokens[np.asarray(indices)[:, None] * self.stride + self._offsets]
        windows = windows.astype(np.int64, copy=False)
        return windows[:, :-1], windows[:, 1:]


class Subset(Dataset):
    """The samples of `dataset` at `indices`, renumbered from 0.

    Args:
        dataset: the data set to take samples from.
        indices: 1-D integer array of indices into `dataset`.
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.task, self.num_classes = dataset.task, dataset.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.gather(self.indices[indices])


# ---------------------------------------------------------------- splitting and ordering

def train_validation_split(n: int, validation_fraction: float, seed: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into train and validation indices, the same way for the same seed.

    Args:
        n: the number of samples.
        validation_fraction: the share held out, in [0, 1); ``floor(n * fraction)`` samples.
        seed: the seed of the split's permutation.

    Returns:
        ``(train, validation)``, disjoint sorted int64 arrays covering ``range(n)`` (sorted, so
        memory-mapped files are read in order).
    """
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_val = int(math.floor(n * validation_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The global batches of one epoch: the epoch's order as `worker.DistributedSampler`
    draws it for (seed, epoch), cut into full batches (a last, partial batch is dropped so
    every rank gets an equal, contiguous shard of every batch).

    Args:
        n: the number of training samples.
        batch_size: the global batch size.
        seed: the job's seed.
        epoch: the epoch index (0-based).

    Returns:
        An int64 array of shape ``(n // batch_size, batch_size)``; row t is step t's batch.
    """
    from dptrain.worker.sampler import DistributedSampler

    sampler = DistributedSampler(n, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = sampler.epoch_indices()
    steps = n // batch_size
    return order[:steps * batch_size].reshape(steps, batch_size)


# ---------------------------------------------------------------- the registry

def reads_files(*arguments: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Declare which of a loader's arguments name files or directories (its ``data_paths``).

    The coordinator holds exactly these arguments of a submitted job to its ``--data-root``
    directories; a loader that declares none reads no files a job names.

    Args:
        arguments: the argument names, each a path (a string).

    Returns:
        A decorator that sets ``loader.data_paths`` and returns the loader.
    """
    def declare(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
        loader.data_paths = frozenset(arguments)  # type: ignore[attr-defined]
        return loader
    return declare


def data_paths(name: str) -> frozenset[str]:
    """The arguments of registered data set `name` that name files (empty for none).

    Example:
        >>> sorted(data_paths("idx"))
        ['images', 'labels']
    """
    return getattr(DATASETS.get(name), "data_paths", frozenset())  # a user's: none declared


def _path(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{what} {path!r} does not exist" if not os.path.exists(path)
                        else f"{what} {path!r} is not a file")
    return path


def digits(flatten: bool = True) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes.

    Args:
        flatten: 64 features per sample; False gives images of shape (1, 8, 8).

    Returns:
        float32 pixels scaled to [0, 1] and int64 labels.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return ArrayDataset(x, d.target.astype(np.int64), "classification", num_classes=10)


def synthetic(task: str = "classification", n: int = 1024, features: int | list[int] = 32,
              classes: int = 10, outputs: int = 1, seq_len: int = 32, vocab: int = 64,
              noise: float = 0.1, seed: int = 0) -> Dataset:
    """Generated data with learnable structure, for tests and benchmarks; the same for the
    same arguments.

    * classification: x ~ N(0, 1) of shape (n, *features); y = argmax of a random linear
      teacher plus `noise`-scaled Gaussian noise.
    * regression: y = x @ W / sqrt(F) + noise * N(0, 1), shape (n, outputs).
    * tokens: n sequences of a random Markov chain over `vocab` tokens (each token has four
      likely successors); x the first `seq_len` tokens, y the next `seq_len`.

    Args:
        task: classification, regression or tokens.
        n: the number of samples, >= 1.
        features: features per sample, or a sample shape such as [1, 28, 28].
        classes: classes (classification).
        outputs: targets per sample (regression).
        seq_len: tokens per sample (tokens).
        vocab: vocabulary size (tokens).
        noise: the noise scale, >= 0.
        seed: the data's seed (independent of the job's seed).

    Returns:
        The data set.
    """
    problems = synthetic_problems(dict(task=task, n=n, features=features, classes=classes,
                                       outputs=outputs, seq_len=seq_len, vocab=vocab,
                                       noise=noise, seed=seed))
    if problems:
        name, rule, value = problems[0]
        raise DataError(f"synthetic {name} {rule}, got {value!r}")
    shape = tuple(features) if isinstance(features, (list, tuple)) else (features,)
    rng = np.random.default_rng([seed, TASKS.index(task)])
    if task == "tokens":
        successors = rng.integers(0, vocab, size=(vocab, 4))
        p = np.array([0.55, 0.25, 0.15, 0.05])
        seq = np.empty((n, seq_len + 1), dtype=np.int64)
        seq[:, 0] = rng.integers(0, vocab, size=n)
        for t in range(seq_len):
            choice = np.searchsorted(np.cumsum(p), rng.random(n), side="right").clip(0, 3)
            seq[:, t + 1] = successors[seq[:, t], choice]
        return ArrayDataset(seq[:, :-1], seq[:, 1:], "tokens", num_classes=vocab)
    f = int(np.prod(shape))
    x = rng.standard_normal((n, f), dtype=np.float32)
    if task == "classification":
        w = rng.standard_normal((f, classes), dtype=np.float32)
        logits = x @ w / np.float32(math.sqrt(f))
        logits += np.float32(noise) * rng.standard_normal(logits.shape, dtype=np.float32)
        y = logits.argmax(axis=1).astype(np.int64)
        return ArrayDataset(x.reshape(n, *shape), y, "classification", num_classes=classes)
    w = rng.standard_normal((f, outputs), dtype=np.float32)
    y = x @ w / np.float32(math.sqrt(f))
    y += np.float32(noise) * rng.standard_normal(y.shape, dtype=np.float32)
    return ArrayDataset(x.reshape(n, *shape), y, "regression")


SYNTHETIC_MAX_SAMPLES = 2**26
"""The most samples `synthetic` generates."""

SYNTHETIC_MAX_VALUES = 2**28
"""The most numbers any one array of `synthetic` holds (1 GiB of float32): larger ones could
only fail, on every rank, for want of memory."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def synthetic_problems(args: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The rules `synthetic`'s arguments break, found without generating anything, so that a
    job asking for data that can never be made is refused when it is submitted.

    Args:
        args: keyword arguments for `synthetic` (those left out take its defaults).

    Returns:
        ``(argument, rule, value)`` for the broken rules (of the sizes: the first only);
        empty when the data can be made.
    """
    import inspect

    try:
        bound = inspect.signature(synthetic).bind(**args)
    except TypeError as e:
        return [("arguments", f"do not fit synthetic ({e})", sorted(args))]
    bound.apply_defaults()
    a = bound.arguments
    if a["task"] not in TASKS:
        return [("task", f"must be one of {', '.join(TASKS)}", a["task"])]
    features = a["features"]
    shape = list(features) if isinstance(features, (list, tuple)) else [features]
    sizes = [("n", a["n"]), ("classes", a["classes"]), ("outputs", a["outputs"]),
             ("seq_len", a["seq_len"]), ("vocab", a["vocab"]),
             *((f"features[{i}]", d) for i, d in enumerate(shape))]
    problems = [(name, "must be an integer >= 1", v) for name, v in sizes
                if not _is_int(v) or v < 1]
    if not _is_int(a["seed"]) or a["seed"] < 0:
        problems.append(("seed", "must be an integer >= 0", a["seed"]))
    noise = a["noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or \
            not math.isfinite(noise):
        problems.append(("noise", "must be a finite number", noise))
    if problems or not shape:
        return problems or [("features", "must give at least one dimension", features)]
    n, f, limit = a["n"], math.prod(shape), SYNTHETIC_MAX_VALUES
    if n > SYNTHETIC_MAX_SAMPLES:
        return [("n", f"must be at most {SYNTHETIC_MAX_SAMPLES} (2**26)", n)]
    cap = f"must be at most {limit} (2**28)"
    if a["task"] == "tokens":  # arrays: n x (seq_len + 1) tokens, vocab x 4 successors
        steps = a["seq_len"] + 1
        checks = [("seq_len", steps, f"plus one {cap}"),
                  ("vocab", 4 * a["vocab"], f"times 4 {cap}"),
                  ("n", n * steps, f"times seq_len + 1 ({steps}) {cap}")]
    else:  # arrays: x (n x features), the teacher (features x width), targets (n x width)
        name = "classes" if a["task"] == "classification" else "outputs"
        width = a[name]
        checks = [("features", f, f"(numbers per sample) {cap}"), (name, width, cap),
                  ("n", n * f, f"times the {f} numbers of a sample {cap}"),
                  ("n", n * width, f"times {name} ({width}) {cap}"),
                  (name, f * width, f"times the {f} numbers of a sample {cap}")]
    return [(name, rule, a[name]) for name, values, rule in checks if values > limit][:1]


@reads_files("path")
def npz(path: str, x_key: str = "x", y_key: str = "y", task: str | None = None,
        scale: float = 1.0) -> ArrayDataset:
    """Arrays from one ``.npz`` file (loaded into memory).

    Args:
        path: the ``.npz`` file.
        x_key: the name of the inputs array.
        y_key: the name of the targets array.
        task: classification, regression or tokens; None infers it from the arrays.
        scale: factor applied to integer inputs (e.g. 1/255).

    Returns:
        The data set.
    """
    path = _path(path, "npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in (x_key, y_key) if k not in f.files]
            if missing:
                raise DataError(f"{path} has no array {missing[0]!r} (it has "
                                f"{', '.join(f.files) or 'none'})")
            x, y = f[x_key], f[y_key]
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz file: {e}") from None
    return _checked(ArrayDataset, path, x, y, task, scale)


@reads_files("path")
def npy(path: str, task: str | None = None, scale: float = 1.0) -> ArrayDataset:
    """Memory-mapped ``x.npy`` and ``y.npy`` from a directory: data larger than memory, of
    which each rank reads only the rows it gathers.

    Args:
        path: the directory holding ``x.npy`` and ``y.npy``.
        task: classification, regression or tokens; None infers it from the arrays.
        scale: factor applied to integer inputs (e.g. 1/255).

    Returns:
        The data set (its ``x`` and ``y`` are `numpy.memmap` arrays).
    """
    if not os.path.isdir(path):
        raise DataError(f"npy directory {path!r} does not exist")
    arrays = []
    for name in ("x.npy", "y.npy"):
        file = _path(os.path.join(path, name), "npy file")
        try:
            arrays.append(np.load(file, mmap_mode="r", allow_pickle=False))
        except ValueError as e:
            raise DataError(f"{file} is not a readable .npy file: {e}") from None
    return _checked(ArrayDataset, path, arrays[0], arrays[1], task, scale)


def _checked(cls: type, where: str, x: np.ndarray, y: np.ndarray, task: str | None,
             scale: float) -> ArrayDataset:
    if x.ndim < 1 or y.ndim < 1:
        raise DataError(f"{where}: x and y need a leading sample dimension, got shapes "
                        f"{x.shape} and {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)}")
    try:
        return cls(x, y, task, scale)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzip-compressed or not.

    The format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, each dimension as a big-endian
    uint32, then the data, big-endian, row-major.

    Args:
        path: the file (``.gz`` or not: compression is recognised by its magic bytes).

    Returns:
        The array; memory-mapped when the file is not compressed.

    Raises:
        DataError: the file is missing, has the wrong magic number, or is truncated.
    """
    path = _path(path, "IDX file")
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                raise DataError(f"{path} is not an IDX file: wrong magic number "
                                f"{head.hex() or '(empty file)'} (expected 0000 then a type "
                                f"code 08/09/0b/0c/0d/0e and the number of dimensions)")
            dtype, ndim = np.dtype(_IDX_TYPES[head[2]]), head[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path} is truncated: its header promises {ndim} dimensions "
                                f"but ends after {len(dims_raw) // 4}")
            shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            offset = 4 + 4 * ndim
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if compressed:
                raw = f.read(expected + 1)
                found = len(raw)
            else:
                found = os.fstat(f.fileno()).st_size - offset
    except (OSError, EOFError) as e:  # a gzip stream cut short or corrupt
        raise DataError(f"{path} is not a readable IDX file: {e}") from None
    if found < expected:
        raise DataError(f"{path} is truncated: shape {shape} of {dtype.str[1:]} needs "
                        f"{expected} bytes of data, the file has {found}")
    if found > expected:
        raise DataError(f"{path} is not a valid IDX file: {found - expected} bytes after the "
                        f"data its header describes (shape {shape})")
    if compressed:
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


@reads_files("images", "labels")
def idx(images: str, labels: str, flatten: bool = True, scale: float = 1.0 / 255.0
        ) -> ArrayDataset:
    """MNIST-style images and labels in IDX files (MNIST, Fashion-MNIST, EMNIST...).

    Args:
        images: the images file, e.g. ``train-images-idx3-ubyte(.gz)``, shape (n, rows, cols).
        labels: the labels file, e.g. ``train-labels-idx1-ubyte(.gz)``, shape (n,).
        flatten: rows*cols features per sample; False gives images of shape (1, rows, cols).
        scale: factor applied to integer pixels (1/255 maps bytes to [0, 1]).

    Returns:
        The data set: float32 pixels and int64 labels.
    """
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DataError(f"{images}: expected images of shape (n, rows, cols), got {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{labels}: expected labels of shape (n,), got {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, *x.shape[1:])
    return ArrayDataset(x, y, "classification", scale)


@reads_files("path")
def text(path: str, seq_len: int = 64, stride: int | None = None, encoding: str = "utf-8"
         ) -> TokenWindows:
    """A character-level corpus: every distinct character is a token (ids in sorted order).

    Args:
        path: the text file.
        seq_len: characters per window (the model's context).
        stride: distance between window starts (None: `seq_len`).
        encoding: the file's encoding.

    Returns:
        Token windows; ``.vocab`` lists the characters, ``.num_classes`` their number.
    """
    path = _path(path, "text file")
    try:
        with open(path, encoding=encoding) as f:
            corpus = f.read()
    except (UnicodeDecodeError, LookupError) as e:
        raise DataError(f"{path} cannot be read as {encoding}: {e}") from None
    codes = np.frombuffer(corpus.encode("utf-32-le"), dtype="<u4")
    chars, tokens = np.unique(codes, return_inverse=True)
    vocab = [chr(c) for c in chars]
    dtype = np.uint8 if len(vocab) <= 256 else np.int32
    try:
        return TokenWindows(tokens.astype(dtype).reshape(-1), seq_len, stride, vocab)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits, "synthetic": synthetic, "npz": npz, "npy": npy, "idx": idx, "text": text,
}


def load_dataset(name: str, args: dict[str, Any] | None = None) -> Dataset:
    """Build a registered data set, or a user's (``package.module:function``, imported here:
    `dptrain.worker.job_code.load_user_dataset`).

    Args:
        name: a key of `DATASETS`, or a reference.
        args: keyword arguments of its constructor.

    Returns:
        The data set.

    Example:
        >>> ds = load_dataset("synthetic", {"n": 8, "features": 4, "classes": 3})
        >>> x, y = ds.gather(np.array([0, 5]))
        >>> x.shape, x.dtype.name, y.dtype.name
        ((2, 4), 'float32', 'int64')
    """
    if ":" in name:
        from dptrain.worker.job_code import load_user_dataset

        return load_user_dataset(name, args or {})
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(sorted(DATASETS))})")
    try:
        return DATASETS[name](**(args or {}))
    except DataError:
        raise
    except (TypeError, ValueError) as e:  # an argument it does not take, or a value it cannot
        raise DataError(f"data set {name!r}: {e}") from None
