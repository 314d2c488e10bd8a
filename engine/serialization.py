"""Save and load dicts of Tensors as safetensors files, written atomically.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, a JSON header of N bytes mapping each name to ``{"dtype", "shape", "data_offsets"}`` (plus an
optional ``"__metadata__"`` map of strings), then the raw little-endian bytes of every tensor,
back to back. The files open with the `safetensors` library and with PyTorch's
``safetensors.torch.load_file``. We write the format ourselves so that the header lists the names
in the order they were saved, and `load` gives them back in that order.

A file is written to a temporary name in the same directory, flushed to disk and renamed over the
target, so a reader sees either the old file or the complete new one, never a partial write.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy

from dptrain.atomic_files import write_atomically
from dptrain.engine.backend import Device, to_device
from dptrain.engine.tensor import Tensor

__all__ = ["save", "load", "load_metadata"]

_DTYPE_CODES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64",
    "float16": "F16", "float32": "F32", "float64": "F64",
}
_CODE_DTYPES = {code: numpy.dtype(name).newbyteorder("<") for name, code in _DTYPE_CODES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's limit
_METADATA = "__metadata__"


def save(obj: Mapping[str, Tensor], path: str | os.PathLike, *,
         metadata: dict[str, str] | None = None) -> None:
    """Write a dict of Tensors (a state_dict) to a safetensors file, atomically.

    Args:
        obj: name -> Tensor (a dict, or any mapping such as a module's state_dict); Tensors
            on a GPU are copied to the host.
        path: the file to write; an existing file is replaced only once the new one is complete.
        metadata: strings to store in the header (read back with `load_metadata`).

    Example:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save({"w": Tensor(np.arange(3.0))}, path)
        >>> load(path)["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    arrays = _host_arrays(obj)
    header: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must be a dict of str -> str")
        header[_METADATA] = dict(metadata)
    # Data in order of decreasing alignment (as the safetensors library writes it), so that
    # every tensor is aligned in a memory-mapped file; the header keeps the caller's order.
    order = sorted(arrays, key=lambda name: -arrays[name].dtype.itemsize)
    offsets, start = {}, 0
    for name in order:
        offsets[name] = (start, start + arrays[name].nbytes)
        start += arrays[name].nbytes
    for name, a in arrays.items():
        header[name] = {"dtype": _DTYPE_CODES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": list(offsets[name])}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned
    write_atomically(path, [struct.pack("<Q", len(text)), text]
                     + [arrays[name].reshape(-1).view(numpy.uint8) for name in order])


def load(path: str | os.PathLike, map_location: str | Device | None = None
         ) -> dict[str, Tensor]:
    """Read a safetensors file into a dict of Tensors (not requiring grad).

    Args:
        path: the file to read.
        map_location: the device to put the Tensors on: None or "cpu" for the host, or
            "cuda[:N]" (or the test-only "strict").

    Returns:
        name -> Tensor, in the order the names were saved.
    """
    device = Device("cpu" if map_location is None else map_location)
    device.xp  # noqa: B018  (a device that is not available fails before the file is read)
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, data_start = _read_header(f, path, size)
        out = {}
        for name, (dtype, shape, begin, _) in header.items():
            arr = numpy.empty(shape, dtype=dtype)
            f.seek(data_start + begin)
            if f.readinto(arr.reshape(-1).view(numpy.uint8)) != arr.nbytes:
                raise ValueError(f"{path} is not a valid safetensors file: tensor {name!r} is "
                                 f"cut short")
            if not arr.dtype.isnative:  # a big-endian host
                arr = arr.astype(arr.dtype.newbyteorder("="))
            out[name] = Tensor(to_device(arr, device))
    return out


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Read the string metadata stored in a safetensors file's header.

    Args:
        path: the file to read.

    Returns:
        The ``__metadata__`` map (empty if the file has none).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = _read_header_json(f, path, os.fstat(f.fileno()).st_size)[0]
    meta = raw.get(_METADATA) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path} is not a valid safetensors file: __metadata__ must map "
                         f"strings to strings")
    return meta


# ---------------------------------------------------------------- writing

def _host_arrays(obj: Any) -> dict[str, numpy.ndarray]:
    """Check `obj` and return its arrays as C-contiguous little-endian host arrays."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"save expects a dict of name -> Tensor, got {type(obj).__name__}")
    arrays = {}
    for name, t in obj.items():
        if not isinstance(name, str):
            raise TypeError(f"save expects str keys, got {name!r} ({type(name).__name__})")
        if name == _METADATA:
            raise ValueError(f"{_METADATA!r} is reserved for the file's metadata")
        if not isinstance(t, Tensor):
            raise TypeError(f"save expects Tensor values, but {name!r} is a {type(t).__name__}")
        a = t.numpy()
        if a.dtype.name not in _DTYPE_CODES:
            raise TypeError(f"cannot save {name!r}: dtype {a.dtype} has no safetensors code")
        arrays[name] = numpy.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
    return arrays


# ---------------------------------------------------------------- reading

def _read_header_json(f, path: str, size: int) -> tuple[dict, int]:
    """The parsed JSON header of an open file and the offset where its data starts."""
    bad = f"{path} is not a valid safetensors file"
    if size < 8:
        raise ValueError(f"{bad}: only {size} bytes")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_HEADER or n > size - 8:
        raise ValueError(f"{bad}: header length {n} does not fit the file ({size} bytes)")
    try:
        raw = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{bad}: header is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{bad}: header is not a JSON object")
    return raw, 8 + n


def _read_header(f, path: str, size: int) -> tuple[dict[str, tuple], int]:
    """name -> (dtype, shape, begin, end) for every tensor, checked against the file size."""
    raw, data_start = _read_header_json(f, path, size)
    bad = f"{path} is not a valid safetensors file"
    tensors = {}
    for name, info in raw.items():
        if name == _METADATA:
            continue
        try:
            dtype = _CODE_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{bad}: bad or unsupported entry for {name!r}: {info!r}") from None
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise ValueError(f"{bad}: bad shape or offsets for {name!r}: {info!r}")
        if end - begin != dtype.itemsize * int(numpy.prod(shape, dtype=numpy.int64)):
            raise ValueError(f"{bad}: {name!r} has {end - begin} bytes for shape {shape} of "
                             f"{info['dtype']}")
        tensors[name] = (dtype, shape, begin, end)
    # The tensors must tile the data section exactly: no gaps, no overlaps, nothing after.
    position = 0
    for _, _, begin, end in sorted(tensors.values(), key=lambda e: (e[2], e[3])):
        if begin != position:
            raise ValueError(f"{bad}: tensor data overlaps or leaves a gap at byte {position}")
        position = end
    if data_start + position != size:
        raise ValueError(f"{bad}: the data section holds {size - data_start} bytes, the header "
                         f"describes {position}")
    return tensors, data_start
