"""The one place that chooses the array library: numpy on the CPU, CuPy on a GPU.

Everything else asks `get_array_module(array)` for the module that owns an array, so op code
never imports numpy for arrays that may live on a GPU. CuPy's import is guarded: the whole
package imports and runs on a machine without it.
"""

from __future__ import annotations

import numpy

try:  # pragma: no cover - exercised only where CuPy and a GPU exist
    import cupy

    cupy.cuda.runtime.getDeviceCount()
except Exception:  # ImportError, or CuPy without a usable driver
    cupy = None

__all__ = [
    "Device",
    "cupy_available",
    "gpu_count",
    "get_array_module",
    "get_device",
    "manual_seed",
    "generator",
    "get_rng_state",
    "set_rng_state",
    "FLOAT_DTYPES",
    "SUPPORTED_DTYPES",
    "check_dtype",
    "special",
]

FLOAT_DTYPES = frozenset(numpy.dtype(t) for t in ("float16", "float32", "float64"))
SUPPORTED_DTYPES = FLOAT_DTYPES | frozenset(
    numpy.dtype(t)
    for t in ("int8", "int16", "int32", "int64", "uint8", "bool")
)


def cupy_available() -> bool:
    """True when CuPy imported and sees at least one GPU."""
    return cupy is not None


def gpu_count() -> int:
    """How many GPUs CuPy sees (0 without CuPy): ranks pick ``cuda:{rank % gpu_count()}``."""
    return 0 if cupy is None else cupy.cuda.runtime.getDeviceCount()


def get_array_module(*arrays):
    """Return `cupy` if any argument is a CuPy array, else `numpy` (Chainer's switch)."""
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return numpy


def check_dtype(dtype) -> numpy.dtype:
    """Return `dtype` as a numpy dtype, or raise TypeError if tensors cannot hold it."""
    try:
        dt = numpy.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"unsupported dtype {dtype!r}: {e}") from None
    if dt not in SUPPORTED_DTYPES:
        names = ", ".join(sorted(str(d) for d in SUPPORTED_DTYPES))
        raise TypeError(f"unsupported dtype {dt}: tensors hold one of {names}")
    return dt


def special(xp):
    """The special-function module (erf, expit) matching array module `xp`."""
    if xp is numpy:
        import scipy.special

        return scipy.special
    import cupyx.scipy.special  # pragma: no cover

    return cupyx.scipy.special  # pragma: no cover


class Device:
    """Where a tensor's array lives: ``Device('cpu')`` or ``Device('cuda:0')``."""

    __slots__ = ("type", "index")

    def __init__(self, spec: str | Device = "cpu"):
        if isinstance(spec, Device):
            self.type, self.index = spec.type, spec.index
            return
        kind, _, idx = str(spec).partition(":")
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {spec!r}")
        if kind == "cpu" and idx:
            raise ValueError(f"device 'cpu' takes no index, got {spec!r}")
        self.type = kind
        self.index = int(idx) if idx else (0 if kind == "cuda" else None)

    @property
    def xp(self):
        """The array module for this device."""
        if self.type == "cpu":
            return numpy
        if cupy is None:
            raise RuntimeError(f"device {self} requested but CuPy with a GPU is not available")
        return cupy

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            other = Device(other)
        return isinstance(other, Device) and (self.type, self.index) == (other.type, other.index)

    def __hash__(self) -> int:
        return hash((self.type, self.index))

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"device(type='{self.type}'" + (
            "" if self.index is None else f", index={self.index}") + ")"


_CPU = Device("cpu")


def get_device(array) -> Device:
    """The Device holding `array`."""
    if cupy is not None and isinstance(array, cupy.ndarray):  # pragma: no cover
        return Device(f"cuda:{array.device.id}")
    return _CPU


# One generator for every random op of the process, as torch.manual_seed gives.
_generator = numpy.random.Generator(numpy.random.PCG64(0))


def manual_seed(seed: int) -> None:
    """Seed the generator that every random op of the process draws from."""
    global _generator
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _generator = numpy.random.Generator(numpy.random.PCG64(seed))
    if cupy is not None:  # pragma: no cover
        cupy.random.seed(seed)


def generator() -> numpy.random.Generator:
    """The process-wide random generator (its `bit_generator.state` is checkpointable)."""
    return _generator


def get_rng_state() -> dict:
    """The generator's state as a JSON-serialisable dict (for exact checkpoint/resume)."""
    return _generator.bit_generator.state


def set_rng_state(state: dict) -> None:
    """Restore a state returned by `get_rng_state`."""
    _generator.bit_generator.state = state
