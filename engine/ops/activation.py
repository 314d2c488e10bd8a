"""Normalised exponentials along a dim: softmax and log_softmax, each stable and one op."""

from __future__ import annotations

from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import FUNCTION, FUNCTIONAL, METHOD, export
from dptrain.engine.ops.shape import _dim
from dptrain.engine.tensor import Tensor


def _softmax(xp, x, axis):
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _log_softmax(xp, x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


_softmax_op = Op("softmax", _softmax, (
    lambda xp, g, ans, x, axis: ans * (g - (g * ans).sum(axis=axis, keepdims=True)),
), save=False, save_ans=True)
def _log_softmax_vjp(xp, g, ans, x, axis):
    """``g - softmax * sum(g)``, in one new array: as an expression it held a second
    full-size temporary at the start of backward, which is a language model's peak."""
    out = xp.exp(ans)
    out *= g.sum(axis=axis, keepdims=True)
    return xp.subtract(g, out, out=out)


_log_softmax_op = Op("log_softmax", _log_softmax, (_log_softmax_vjp,), save=False,
                     save_ans=True)


@export(FUNCTION, METHOD, FUNCTIONAL)
def softmax(x: Tensor, dim: int) -> Tensor:
    """exp(x) / sum(exp(x)) along `dim`."""
    return apply(_softmax_op, x, axis=_dim(dim, max(x.ndim, 1)) if x.ndim else None)


@export(FUNCTION, METHOD, FUNCTIONAL)
def log_softmax(x: Tensor, dim: int) -> Tensor:
    """x - logsumexp(x) along `dim`."""
    return apply(_log_softmax_op, x, axis=_dim(dim, max(x.ndim, 1)) if x.ndim else None)
