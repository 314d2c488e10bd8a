"""Dtype and device conversions (``to``, ``float()``, ``cuda()`` ...), differentiable, and the
``new_zeros``/``new_ones`` that make a tensor of this one's dtype and device."""

from __future__ import annotations

from dptrain.engine.backend import Device, check_dtype, get_array_module, to_device
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import METHOD, export
from dptrain.engine.ops.shape import clone
from dptrain.engine.tensor import Tensor

_to = Op("to", lambda xp, x, dtype: x.astype(dtype), (lambda xp, g, ans, x, dtype: g,),
         save=False)


def to_dtype(x: Tensor, dtype) -> Tensor:
    """Cast to `dtype`; gradients flow back cast to the source dtype."""
    dtype = check_dtype(dtype)
    if dtype == x.data.dtype:
        return x
    if dtype.kind not in "f":
        return Tensor(x.data.astype(dtype))
    return apply(_to, x, dtype=dtype)


def _move(xp, x, device, src):
    """Copy array `x` to `device`; `src` is where it came from (the gradient goes back there)."""
    return to_device(x, device)


_to_device = Op("to_device", _move,
                (lambda xp, g, ans, x, device, src: _move(xp, g, src, device),), save=False)


@export(METHOD)
def to(self: Tensor, *args, dtype=None, device=None, copy: bool = False) -> Tensor:
    """``x.to(dtype)``, ``x.to(device)`` or ``x.to(device, dtype)``; differentiable."""
    for a in args:
        if isinstance(a, (str, Device)):
            device = a
        elif isinstance(a, Tensor):
            dtype, device = a.dtype, a.device
        else:
            dtype = a
    out = self
    if device is not None and Device(device) != self.device:
        out = apply(_to_device, out, device=Device(device), src=self.device)
    if dtype is not None:
        out = to_dtype(out, dtype)
    if copy and out is self:
        out = clone(self)
    return out


def _cast_to(dtype: str):
    def cast(x: Tensor) -> Tensor:
        return to_dtype(x, dtype)

    cast.__doc__ = f"``x.to({dtype})``."
    return cast


export(METHOD, name="float")(_cast_to("float32"))
export(METHOD, name="double")(_cast_to("float64"))
export(METHOD, name="half")(_cast_to("float16"))
export(METHOD, name="long")(_cast_to("int64"))
export(METHOD, name="int")(_cast_to("int32"))
export(METHOD, name="bool")(_cast_to("bool"))


@export(METHOD)
def cpu(x: Tensor) -> Tensor:
    """A copy on the host (the tensor itself when it is there already)."""
    return to(x, "cpu")


@export(METHOD)
def cuda(x: Tensor, device=None) -> Tensor:
    """A copy on `device` (default: the current GPU)."""
    return to(x, device or "cuda")


@export(METHOD)
def type_as(x: Tensor, other: Tensor) -> Tensor:
    """Cast to `other`'s dtype."""
    return to_dtype(x, other.dtype)


def _new(x: Tensor, kind: str, size) -> Tensor:
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    return Tensor(getattr(get_array_module(x.data), kind)(size, dtype=x.dtype))


@export(METHOD)
def new_zeros(x: Tensor, *size) -> Tensor:
    """Zeros of `size` with this tensor's dtype and device."""
    return _new(x, "zeros", size)


@export(METHOD)
def new_ones(x: Tensor, *size) -> Tensor:
    """Ones of `size` with this tensor's dtype and device."""
    return _new(x, "ones", size)
