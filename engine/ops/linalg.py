"""Matrix products: matmul (1-D, 2-D, batched, broadcast batch dims) and linear (x W^T + b)."""

from __future__ import annotations

from dptrain.engine.backend import sum_matrix
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.elementwise import _check_gelu_approximate, _gelu_forward, _gelu_vjp
from dptrain.engine.ops.registry import FUNCTION, FUNCTIONAL, METHOD, export
from dptrain.engine.tensor import Tensor


def _mT(a):
    return a.swapaxes(-1, -2)


def _fold(xp, a, b):
    """``a @ b`` for a (..., k) and a 2-D b as one 2-D GEMM over all of a's rows: numpy runs a
    stacked product as one small GEMM per leading index (measured ~20% slower for (16, 128,
    256) @ (256, 768)). The reshape copies only when a is not contiguous. The result owns its
    memory (not a reshaped view), so backward may reuse it as a gradient buffer."""
    if a.ndim <= 2:
        return a @ b
    out = xp.empty(a.shape[:-1] + b.shape[-1:], dtype=xp.result_type(a, b))
    xp.matmul(a.reshape(-1, a.shape[-1]), b, out=out.reshape(-1, b.shape[-1]))
    return out


def _matmul_dx(xp, g, ans, x, y):
    if y.ndim == 1:
        return g * y if x.ndim == 1 else g[..., None] * y
    if x.ndim == 1:
        return (g[..., None, :] @ _mT(y))[..., 0, :]
    if y.ndim == 2:
        return _fold(xp, g, y.T)
    return g @ _mT(y)


def _matmul_dy(xp, g, ans, x, y):
    if x.ndim == 1:
        return g * x if y.ndim == 1 else x[:, None] * g[..., None, :]
    if y.ndim == 1:
        return (g[..., None, :] @ x)[..., 0, :]
    if y.ndim == 2:  # batched x times one matrix: fold the batch into one product
        return x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    return _mT(x) @ g


_matmul = Op("matmul", lambda xp, x, y: _fold(xp, x, y) if y.ndim == 2 else x @ y,
             (_matmul_dx, _matmul_dy))


def _linear_forward(xp, x, w, b):
    out = _fold(xp, x, w.T)
    if b is not None:
        out += b
    return out


def _linear_dw(xp, g, ans, x, w, b):
    return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _linear_db(xp, g, ans, x, w, b):
    return sum_matrix(xp, g.reshape(-1, g.shape[-1]), 0)


_linear = Op("linear", _linear_forward, (
    lambda xp, g, ans, x, w, b: _fold(xp, g, w),
    _linear_dw,
    _linear_db,
), save=(0, 1))


def _gelu_linear_forward(xp, x, w, b, approximate):
    return _linear_forward(xp, _gelu_forward(xp, x, None, approximate), w, b)


def _gelu_linear_backward(xp, g, ans, x, w, b, approximate):
    """The GELU's values and slope computed again from x, the hidden activation's gradient
    written into the values' buffer once the weight gradient has read them: three arrays of
    x's size at most (x, the slope, the values / gradient), as the two ops' rules had."""
    slope = xp.empty_like(x)
    y = _gelu_forward(xp, x, slope, approximate)
    dw = _linear_dw(xp, g, None, y, w, b)
    db = None if b is None else _linear_db(xp, g, None, y, w, b)
    g2 = g.reshape(-1, g.shape[-1])
    if y.dtype == xp.result_type(g, w) and y.flags.c_contiguous:  # y is the GELU's own array
        dy = y
        xp.matmul(g2, w, out=y.reshape(g2.shape[0], -1))
    else:
        dy = g2 @ w
    return _gelu_vjp(xp, dy.reshape(x.shape), None, x, slope, approximate,
                     out=dy.reshape(x.shape)), dw, db


# ``linear(gelu(x), w, b)`` keeping x alone, where the two ops keep gelu's slope and its values
# (both of x's size): the feed-forward block's largest saved arrays, halved.
_gelu_linear = Op("gelu_linear", _gelu_linear_forward, backward=_gelu_linear_backward,
                  save=(0, 1))


def gelu_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                approximate: str = "none") -> Tensor:
    """``linear(gelu(x, approximate), weight, bias)`` as one op that keeps x and computes the
    GELU again in backward: one array of x's size saved where the two ops save two, for one
    more GELU forward in backward. The feed-forward block of `nn.TransformerEncoderLayer`.

    Args:
        x: (..., in), the hidden activation before the GELU.
        weight: (out, in).
        bias: (out,) or None.
        approximate: ``'none'`` (exact) or ``'tanh'``, as `gelu`'s.

    Returns:
        (..., out), equal to ``linear(gelu(x, approximate), weight, bias)``.
    """
    _check_gelu_approximate(approximate)
    _check_linear(x, weight, bias)
    return apply(_gelu_linear, x, weight, bias, approximate=approximate)


def _check_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"linear: input of shape {x.shape} does not match weight of shape "
                           f"{weight.shape} (expected input (..., {weight.shape[-1]}))")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise RuntimeError(f"linear: bias of shape {bias.shape} does not match weight of "
                           f"shape {weight.shape} (expected ({weight.shape[0]},))")


@export(FUNCTION, METHOD, operators=("__matmul__",))
def matmul(x: Tensor, y: Tensor) -> Tensor:
    """Matrix product with numpy/PyTorch semantics: 1-D operands are vectors, leading dims
    broadcast as batch dims."""
    if not isinstance(y, Tensor) or not isinstance(x, Tensor):
        raise TypeError(f"matmul: both operands must be Tensors, got {type(x).__name__} and "
                        f"{type(y).__name__}")
    if x.ndim == 0 or y.ndim == 0:
        raise RuntimeError(f"matmul: both arguments need at least 1 dimension, got shapes "
                           f"{x.shape} and {y.shape}")
    k_y = y.shape[0] if y.ndim == 1 else y.shape[-2]
    if x.shape[-1] != k_y:
        raise RuntimeError(f"matmul: shapes {x.shape} and {y.shape} cannot be multiplied "
                           f"({x.shape[-1]} != {k_y})")
    return apply(_matmul, x, y)


@export(operators=("__rmatmul__",))
def rmatmul(x: Tensor, y) -> Tensor:
    """``y @ x`` where y is not a Tensor."""
    from dptrain.engine.factories import tensor

    return matmul(tensor(y), x)


@export(FUNCTION, FUNCTIONAL)
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` in one op: x (..., in), weight (out, in), bias (out,)."""
    _check_linear(x, weight, bias)
    return apply(_linear, x, weight, bias)
