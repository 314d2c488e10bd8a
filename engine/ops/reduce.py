"""Reductions: sum, mean, var, amax/amin, logsumexp, cumsum; argmax/argmin without gradient.

``dim`` is an int, a tuple of ints or None (all dims); negative dims count from the end.
A reduction's gradient is the output gradient broadcast back over the reduced dims.
"""

from __future__ import annotations

import builtins
from collections import namedtuple

from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import FUNCTION, METHOD, export
from dptrain.engine.tensor import Tensor


def _axes(dim, ndim: int) -> tuple | None:
    """Normalise `dim` to a sorted tuple of non-negative axes (None: every axis)."""
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -builtins.max(ndim, 1) <= d < builtins.max(ndim, 1):
            raise IndexError(
                f"dimension out of range (expected to be in range of [{-builtins.max(ndim, 1)}, "
                f"{builtins.max(ndim, 1) - 1}], but got {d})")
        out.append(d % ndim if ndim else 0)
    return tuple(sorted(set(out))) if ndim else None


def _expand(xp, g, shape, axis, keepdim):
    """Broadcast a reduction's output gradient back to the input `shape`."""
    if axis is not None and not keepdim:
        g = xp.expand_dims(g, axis)
    return xp.broadcast_to(g, shape)


def _count(shape, axis) -> int:
    n = 1
    for i, s in enumerate(shape):
        if axis is None or i in axis:
            n *= s
    return n


_sum = Op("sum", lambda xp, x, axis, keepdim: xp.sum(x, axis=axis, keepdims=keepdim), (
    lambda xp, g, ans, x, axis, keepdim: _expand(xp, g, x.shape, axis, keepdim),
), save=False)
_mean = Op("mean", lambda xp, x, axis, keepdim: xp.mean(x, axis=axis, keepdims=keepdim), (
    lambda xp, g, ans, x, axis, keepdim:
        _expand(xp, g, x.shape, axis, keepdim) / _count(x.shape, axis),
), save=False)
_var = Op("var", lambda xp, x, axis, keepdim, correction:
          xp.var(x, axis=axis, keepdims=keepdim, ddof=correction), (
    lambda xp, g, ans, x, axis, keepdim, correction:
        _expand(xp, g, x.shape, axis, keepdim) * (x - x.mean(axis=axis, keepdims=True))
        * (2 / builtins.max(_count(x.shape, axis) - correction, 0)),
))



def _std_vjp(xp, g, ans, x, axis, keepdim, correction):
    sd = _expand(xp, ans, x.shape, axis, keepdim) * (_count(x.shape, axis) - correction)
    num = _expand(xp, g, x.shape, axis, keepdim) * (x - x.mean(axis=axis, keepdims=True))
    return xp.divide(num, sd, out=xp.zeros(x.shape, dtype=num.dtype), where=sd != 0)


_std = Op("std", lambda xp, x, axis, keepdim, correction:
          xp.std(x, axis=axis, keepdims=keepdim, ddof=correction), (_std_vjp,), save_ans=True)


def _extreme_vjp(xp, g, ans, x, axis, keepdim):
    # Ties share the gradient equally, as torch.amax does.
    hit = x == _expand(xp, ans, x.shape, axis, keepdim)
    return _expand(xp, g, x.shape, axis, keepdim) * hit / hit.sum(axis=axis, keepdims=True)


_amax = Op("amax", lambda xp, x, axis, keepdim: xp.max(x, axis=axis, keepdims=keepdim),
           (_extreme_vjp,), save_ans=True)
_amin = Op("amin", lambda xp, x, axis, keepdim: xp.min(x, axis=axis, keepdims=keepdim),
           (_extreme_vjp,), save_ans=True)


def _logsumexp(xp, x, axis, keepdim):
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdim else out.squeeze(axis)


_lse = Op("logsumexp", _logsumexp, (
    lambda xp, g, ans, x, axis, keepdim:
        _expand(xp, g, x.shape, axis, keepdim) * xp.exp(x - _expand(xp, ans, x.shape, axis,
                                                                     keepdim)),
), save_ans=True)
_cumsum = Op("cumsum", lambda xp, x, axis: xp.cumsum(x, axis=axis), (
    lambda xp, g, ans, x, axis: xp.flip(xp.cumsum(xp.flip(g, axis), axis=axis), axis),
), save=False)


@export(FUNCTION, METHOD)
def sum(x: Tensor, dim=None, keepdim: bool = False, dtype=None) -> Tensor:  # noqa: A001
    """Sum over `dim` (all dims when None)."""
    out = apply(_sum, x, axis=_axes(dim, x.ndim), keepdim=keepdim)
    return out if dtype is None else out.to(dtype)


@export(FUNCTION, METHOD)
def mean(x: Tensor, dim=None, keepdim: bool = False, dtype=None) -> Tensor:
    """Mean over `dim` (all dims when None)."""
    if dtype is not None:
        x = x.to(dtype)
    if x.data.dtype.kind not in "f":
        raise RuntimeError(f"mean(): expected a floating point input, got {x.dtype}; "
                           "convert it with .float() first")
    return apply(_mean, x, axis=_axes(dim, x.ndim), keepdim=keepdim)


@export(FUNCTION, METHOD)
def var(x: Tensor, dim=None, *, correction: int = 1, keepdim: bool = False,
        unbiased: bool | None = None) -> Tensor:
    """Variance over `dim` with Bessel's `correction` (1: unbiased, 0: population)."""
    if unbiased is not None:
        correction = int(unbiased)
    return apply(_var, x, axis=_axes(dim, x.ndim), keepdim=keepdim, correction=correction)


@export(FUNCTION, METHOD)
def std(x: Tensor, dim=None, *, correction: int = 1, keepdim: bool = False) -> Tensor:
    """Standard deviation over `dim`; where it is zero the gradient is zero, as in torch."""
    return apply(_std, x, axis=_axes(dim, x.ndim), keepdim=keepdim, correction=correction)


@export(FUNCTION, METHOD)
def amax(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Maximum over `dim`; tied maxima share the gradient."""
    return apply(_amax, x, axis=_axes(dim, x.ndim), keepdim=keepdim)


@export(FUNCTION, METHOD)
def amin(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Minimum over `dim`; tied minima share the gradient."""
    return apply(_amin, x, axis=_axes(dim, x.ndim), keepdim=keepdim)


@export(FUNCTION, METHOD)
def logsumexp(x: Tensor, dim, keepdim: bool = False) -> Tensor:
    """log(sum(exp(x))) over `dim`, computed stably."""
    return apply(_lse, x, axis=_axes(dim, x.ndim), keepdim=keepdim)


@export(FUNCTION, METHOD)
def cumsum(x: Tensor, dim: int) -> Tensor:
    """Cumulative sum along `dim`."""
    if x.ndim == 0:
        _axes(dim, 0)
        return x.clone()
    return apply(_cumsum, x, axis=_axes(dim, x.ndim)[0])


def _arg(fn_name):
    def fn(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
        arr = x.data
        if dim is None:
            out = getattr(arr.reshape(-1), fn_name)()
            return Tensor(out.reshape((1,) * arr.ndim) if keepdim else out)
        axis = _axes(dim, arr.ndim)
        return Tensor(getattr(arr, fn_name)(axis=axis[0] if axis else None, keepdims=keepdim))

    fn.__name__ = fn_name
    fn.__doc__ = f"Indices of the {fn_name[3:]}ima along `dim` (no gradient)."
    return fn


argmax = export(FUNCTION, METHOD)(_arg("argmax"))
argmin = export(FUNCTION, METHOD)(_arg("argmin"))

values_indices = namedtuple("values_indices", ["values", "indices"])


@export(FUNCTION, METHOD)
def max(x: Tensor, dim=None, keepdim: bool = False):  # noqa: A001
    """``x.max()``: the largest value; ``x.max(dim)``: (values, indices) along `dim`.
    With a Tensor as second argument: the elementwise maximum."""
    if isinstance(dim, Tensor):
        from dptrain.engine.ops.elementwise import maximum

        return maximum(x, dim)
    if dim is None:
        return amax(x)
    return values_indices(amax(x, dim, keepdim), argmax(x, dim, keepdim))


@export(FUNCTION, METHOD)
def min(x: Tensor, dim=None, keepdim: bool = False):  # noqa: A001
    """``x.min()``: the smallest value; ``x.min(dim)``: (values, indices) along `dim`."""
    if isinstance(dim, Tensor):
        from dptrain.engine.ops.elementwise import minimum

        return minimum(x, dim)
    if dim is None:
        return amin(x)
    return values_indices(amin(x, dim, keepdim), argmin(x, dim, keepdim))


@export(FUNCTION, METHOD)
def all(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001
    return Tensor(x.data.all(axis=_axes(dim, x.ndim), keepdims=keepdim))


@export(FUNCTION, METHOD)
def any(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001
    return Tensor(x.data.any(axis=_axes(dim, x.ndim), keepdims=keepdim))
