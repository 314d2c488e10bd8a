"""Tensor factories with PyTorch's names: ``engine.tensor``, ``zeros``, ``randn``, ...

Floating data defaults to float32; integer and boolean data keep an integer or bool dtype, as
``torch.tensor`` does. Random factories draw on the device they create on, from that device's
generator (`engine.manual_seed` seeds every device's from the one seed): the same seed gives the
same numbers again on a device, but not the same numbers on the CPU and a GPU (as in PyTorch).
"""

from __future__ import annotations

import numpy

from dptrain.engine.backend import (
    Device,
    check_dtype,
    device_generator,
    get_array_module,
    get_device,
    to_device,
)
from dptrain.engine.dtypes import default_float
from dptrain.engine.tensor import Tensor

__all__ = ["tensor", "from_numpy", "zeros", "ones", "full", "empty", "zeros_like", "ones_like",
           "full_like", "rand_like", "randn_like", "randn", "rand", "randint", "randperm",
           "arange", "linspace", "eye"]


def _xp(device):
    return Device(device if device is not None else "cpu").xp


def _shape(size) -> tuple:
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    for n in size:
        if not isinstance(n, (int, numpy.integer)) or n < 0:
            raise ValueError(f"sizes must be non-negative ints, got {tuple(size)}")
    return tuple(int(n) for n in size)


def _float_dtype(dtype):
    dt = check_dtype(default_float if dtype is None else dtype)
    return dt


def _wrap(array, requires_grad: bool) -> Tensor:
    return Tensor(array, requires_grad=requires_grad)


def tensor(data, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A new tensor holding a copy of `data` (nested lists, scalars, numpy arrays, Tensors).

    Args:
        data: the values. Python floats become float32; ints int64; bools bool.
        dtype: the dtype to convert to, e.g. ``engine.float64``.
        device: ``'cpu'``, ``'cuda[:N]'`` (or the test-only ``'strict'``); by default the
            device `data` is on (a CuPy array stays on its GPU), else the CPU.
        requires_grad: make the result a leaf that collects gradients.
    """
    if isinstance(data, Tensor):
        data = data.data
    src = get_array_module(data)
    if src is not numpy:  # a device array: stays on its device unless told otherwise
        data = to_device(data, get_device(data) if device is None else device)
    xp = _xp(device if device is not None or src is numpy else get_device(data))
    if dtype is None:
        arr = xp.array(data)
        python_values = src is numpy and not isinstance(data, (numpy.ndarray, numpy.generic))
        if arr.dtype.kind == "f" and python_values:
            arr = arr.astype(default_float)  # Python floats: float32, as torch.tensor
        elif arr.dtype.kind in "iu" and python_values:
            arr = arr.astype(numpy.int64)
        check_dtype(arr.dtype)
    else:
        arr = xp.array(data, dtype=check_dtype(dtype))
    return _wrap(arr, requires_grad)


def from_numpy(array: numpy.ndarray) -> Tensor:
    """A tensor sharing memory with a numpy array (dtype kept)."""
    if not isinstance(array, numpy.ndarray):
        raise TypeError(f"from_numpy expects a numpy.ndarray, got {type(array).__name__}")
    check_dtype(array.dtype)
    return Tensor(array)


def zeros(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A tensor of zeros of the given size (float32 unless `dtype`)."""
    return _wrap(_xp(device).zeros(_shape(size), dtype=_float_dtype(dtype)), requires_grad)


def ones(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A tensor of ones of the given size (float32 unless `dtype`)."""
    return _wrap(_xp(device).ones(_shape(size), dtype=_float_dtype(dtype)), requires_grad)


def empty(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """An uninitialised tensor of the given size."""
    return _wrap(_xp(device).empty(_shape(size), dtype=_float_dtype(dtype)), requires_grad)


def full(size, fill_value, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A tensor of `size` filled with `fill_value` (dtype inferred from it, as torch.full)."""
    if dtype is None:
        dtype = (numpy.bool_ if isinstance(fill_value, bool) else
                 numpy.int64 if isinstance(fill_value, int) else default_float)
    arr = _xp(device).full(_shape((size,)), fill_value, dtype=check_dtype(dtype))
    return _wrap(arr, requires_grad)


def _like(t: Tensor, dtype):
    return t.data.dtype if dtype is None else check_dtype(dtype)


def zeros_like(t: Tensor, dtype=None, requires_grad: bool = False) -> Tensor:
    return _wrap(get_array_module(t.data).zeros(t.shape, dtype=_like(t, dtype)), requires_grad)


def ones_like(t: Tensor, dtype=None, requires_grad: bool = False) -> Tensor:
    return _wrap(get_array_module(t.data).ones(t.shape, dtype=_like(t, dtype)), requires_grad)


def full_like(t: Tensor, fill_value, dtype=None, requires_grad: bool = False) -> Tensor:
    arr = get_array_module(t.data).full(t.shape, fill_value, dtype=_like(t, dtype))
    return _wrap(arr, requires_grad)


def randn(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Standard normal samples from `device`'s generator."""
    dt = _float_dtype(dtype)
    draws = device_generator(device).standard_normal(_shape(size), dtype=numpy.float64)
    return _wrap(draws.astype(dt), requires_grad)


def rand(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Uniform samples on [0, 1) from `device`'s generator."""
    dt = _float_dtype(dtype)
    draws = device_generator(device).random(_shape(size), dtype=numpy.float64)
    return _wrap(draws.astype(dt), requires_grad)


def randn_like(t: Tensor, dtype=None) -> Tensor:
    return randn(*t.shape, dtype=_like(t, dtype), device=t.device)


def rand_like(t: Tensor, dtype=None) -> Tensor:
    return rand(*t.shape, dtype=_like(t, dtype), device=t.device)


def randint(low: int, high: int | None = None, size=None, dtype=None, device=None) -> Tensor:
    """Integers uniform on [low, high) (``randint(high, size)`` also accepted, as in torch)."""
    if size is None:
        if not isinstance(high, (tuple, list)):
            raise TypeError("randint() needs a size, e.g. randint(0, 10, (3,))")
        low, high, size = 0, low, high
    if high is None:
        low, high = 0, low
    if high <= low:
        raise ValueError(f"randint: high must be greater than low, got low={low}, high={high}")
    dt = check_dtype(numpy.int64 if dtype is None else dtype)
    draws = device_generator(device).integers(low, high, size=_shape((size,)), dtype=numpy.int64)
    return Tensor(draws.astype(dt))


def randperm(n: int, dtype=None, device=None) -> Tensor:
    """A random permutation of 0..n-1."""
    draws = device_generator(device).permutation(n)
    return Tensor(draws.astype(check_dtype(numpy.int64 if dtype is None else dtype)))


def arange(start, end=None, step=1, dtype=None, device=None,
           requires_grad: bool = False) -> Tensor:
    """Values from `start` to `end` (exclusive) by `step`; int64 for int arguments."""
    if end is None:
        start, end = 0, start
    if dtype is None:
        ints = all(isinstance(v, (int, numpy.integer)) for v in (start, end, step))
        dtype = numpy.int64 if ints else default_float
    return _wrap(_xp(device).arange(start, end, step, dtype=check_dtype(dtype)), requires_grad)


def linspace(start, end, steps: int, dtype=None, device=None,
             requires_grad: bool = False) -> Tensor:
    """`steps` evenly spaced values from `start` to `end` inclusive."""
    arr = _xp(device).linspace(start, end, steps, dtype=_float_dtype(dtype))
    return _wrap(arr, requires_grad)


def eye(n: int, m: int | None = None, dtype=None, device=None,
        requires_grad: bool = False) -> Tensor:
    """The identity matrix of n rows (and m columns)."""
    return _wrap(_xp(device).eye(n, m, dtype=_float_dtype(dtype)), requires_grad)
