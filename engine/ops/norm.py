"""Batch and layer normalisation, each one primitive with a fused backward.

``y = (x - mean) * invstd * weight + bias`` per channel (dim 1). In training, mean and the
biased variance come from the batch, so they depend on x: the fused rule gives the whole
gradient in a few passes,

    dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat)),   xhat = (x - mean) * invstd,

where a graph of primitives would keep several full-size intermediates alive. The statistics are
computed by `batch_norm` (no graph) and handed to the op as constant inputs; the rule knows they
are functions of x. The running statistics are updated in place there too, as PyTorch does.
"""

from __future__ import annotations

import math

import numpy

from dptrain.engine.backend import cpu_kernels, get_array_module, sum_matrix
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import FUNCTIONAL, export
from dptrain.engine.tensor import Tensor


def _planes(a):
    """An (N, C, ...) array as (N, C, S), each channel's plane flattened."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def _channel_sum(xp, a):
    """Sum over every dim but 1, reading contiguous runs: (N, C, ...) -> (C,)."""
    if a.ndim == 2:
        return sum_matrix(xp, a, 0)
    n, c = a.shape[:2]
    return sum_matrix(xp, a.reshape(n * c, -1), 1).reshape(n, c).sum(axis=0)


def _bshape(x) -> tuple:
    """The shape that broadcasts a (C,) vector along dim 1 of x."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _bn_forward(xp, x, weight, bias, mean, invstd, training):
    scale = invstd if weight is None else weight * invstd
    shift = -mean * scale
    if bias is not None:
        shift += bias
    kernels = cpu_kernels(x, scale, shift) if x.ndim > 2 else None
    if kernels is not None:
        out = numpy.empty_like(x)
        kernels.channel_affine(_planes(x), scale, shift, _planes(out))
        return out
    out = x * scale.reshape(_bshape(x))
    out += shift.reshape(_bshape(x))
    return out


def _channel_dot(xp, a, b):
    """``sum(a * b)`` per channel (dim 1) as one batched dot product per (sample, channel) row:
    one read of each, no temporary."""
    n, c = a.shape[:2]
    if a.ndim == 2:
        return xp.matmul(a.T[:, None, :], b.T[:, :, None]).reshape(c)
    return xp.matmul(a.reshape(n, c, 1, -1), b.reshape(n, c, -1, 1)).reshape(n, c).sum(axis=0)


def _bn_backward(xp, g, ans, x, weight, bias, mean, invstd, training):
    shape = _bshape(x)
    m = x.size // x.shape[1]
    kernels = cpu_kernels(g, x) if x.ndim > 2 else None
    if kernels is not None:
        db, g_dot_x = numpy.empty(x.shape[1], x.dtype), numpy.empty(x.shape[1], x.dtype)
        kernels.channel_sums(_planes(g), _planes(x), db, g_dot_x)
    else:
        db, g_dot_x = _channel_sum(xp, g), _channel_dot(xp, g, x)
    dot = g_dot_x - mean * db  # sum(g * (x - mean)) = sum(g * xhat) / invstd
    dw = dot * invstd
    k = invstd if weight is None else weight * invstd
    if not training:  # mean and invstd are constants
        return g * k.reshape(shape), dw, db, None, None
    # dx = k (g - mean(g) - xhat mean(g xhat)) = g A + x B + C per channel: three passes over
    # full-size arrays instead of building it from (x - mean)
    b = -k * invstd * invstd * dot / m
    c = -k * db / m - b * mean
    if kernels is not None and k.dtype == b.dtype == c.dtype == x.dtype:
        dx = numpy.empty_like(x)
        kernels.channel_combine(_planes(g), _planes(x), k, b, c, _planes(dx))
        return dx, dw, db, None, None
    dx = x * b.reshape(shape)
    dx += c.reshape(shape)
    dx += g * k.reshape(shape)
    return dx, dw, db, None, None


_batch_norm = Op("batch_norm", _bn_forward, backward=_bn_backward, save=(0, 1, 3, 4))


def _check_vector(name: str, t, c: int, shape) -> None:
    if t is not None and tuple(t.shape) != (c,):
        raise RuntimeError(f"batch_norm: {name} of shape {tuple(t.shape)} does not match the "
                           f"{c} channels of the input of shape {shape} (expected ({c},))")


@export(FUNCTIONAL)
def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalise each channel (dim 1) to zero mean and unit variance, then scale and shift.

    In training the batch statistics are used (the biased variance), and running_mean and
    running_var, when given, are updated in place exactly as PyTorch does:
    ``running = (1 - momentum) * running + momentum * batch``, with the *unbiased* batch
    variance. In evaluation the running statistics are used.

    Args:
        input: (N, C), (N, C, L), (N, C, H, W) or more dims, floating point.
        running_mean, running_var: (C,) buffers; may be None in training (then nothing is
            tracked). Required in evaluation.
        weight, bias: optional (C,) affine parameters.
        training: use (and track) batch statistics instead of the running ones.
        momentum: weight of the new batch in the running statistics (a float; a cumulative
            average is the module's business: pass 1 / batches_seen).
        eps: added to the variance before the square root.

    Returns:
        A tensor shaped like `input`.

    Example:
        >>> import dptrain.engine as engine, dptrain.engine.functional as F
        >>> x = engine.tensor([[1.0], [3.0]])
        >>> [round(v, 4) for v in F.batch_norm(x, None, None, training=True).flatten().tolist()]
        [-1.0, 1.0]
    """
    if input.ndim < 2:
        raise RuntimeError(f"batch_norm: expected an input of at least 2 dims (N, C, ...), got "
                           f"shape {input.shape}")
    if input.dtype.kind != "f":
        raise TypeError(f"batch_norm: expected a floating point input, got {input.dtype}")
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_vector(name, t, c, input.shape)
    if momentum is None or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"batch_norm: momentum must be a float in [0, 1], got {momentum!r}")
    x = input.data
    xp = get_array_module(x)
    if training:
        m = x.size // c
        if m <= 1:
            raise ValueError(f"batch_norm: expected more than 1 value per channel when "
                             f"training, got input of shape {input.shape}")
        kernels = cpu_kernels(x) if x.ndim > 2 else None
        if kernels is not None:
            mean, var = numpy.empty(c, x.dtype), numpy.empty(c, x.dtype)
            kernels.channel_mean_var(_planes(x), mean, var)
        else:
            mean = _channel_sum(xp, x) / m
            xc = x - mean.reshape(_bshape(x))
            var = _channel_dot(xp, xc, xc) / m
            del xc
        for buf, stat in ((running_mean, mean), (running_var, var * (m / (m - 1)))):
            if buf is not None:
                buf.data *= 1.0 - momentum
                buf.data += momentum * stat.astype(buf.dtype, copy=False)
                buf._version[0] += 1
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError("batch_norm: running_mean and running_var are required in "
                               "evaluation (training=False)")
        # Copies: a later in-place update of the buffers must not change this graph's gradient.
        mean = running_mean.data.astype(x.dtype, copy=True)
        var = running_var.data.astype(x.dtype, copy=True)
    invstd = 1.0 / xp.sqrt(var + eps)
    return apply(_batch_norm, input, weight, bias, mean, invstd.astype(x.dtype, copy=False),
                 training=bool(training))


# ---------------------------------------------------------------- layer norm
# Statistics over the trailing dims, per row; like batch_norm they are computed outside the
# graph and handed in as constants. The op gets the normalised input xhat itself and keeps it
# with rstd (a small array), where a graph of primitives would keep several full-size
# intermediates: the forward's last passes and the whole backward read xhat, never x again.

def _row_dot(xp, a, b, axes):
    """``sum(a * b)`` over the trailing `axes`, keeping them as size-1 dims: one batched dot
    product per row, no temporary."""
    lead = a.shape[:a.ndim - len(axes)]
    rows = a.reshape(-1, 1, math.prod(a.shape[len(lead):]))
    dot = xp.matmul(rows, b.reshape(rows.shape[0], -1, 1))
    return dot.reshape(lead + (1,) * len(axes))


def _row_sum(xp, a, axes):
    """The sum over the trailing `axes`, keeping them as size-1 dims (a BLAS product with
    ones: see `sum_matrix`)."""
    lead = a.shape[:a.ndim - len(axes)]
    return sum_matrix(xp, a.reshape(math.prod(lead), -1), 1).reshape(lead + (1,) * len(axes))


def _ln_forward(xp, x, weight, bias, xhat, rstd, axes):
    kernels = None if weight is None or bias is None else cpu_kernels(xhat, weight, bias)
    if kernels is not None:
        out = numpy.empty_like(xhat)
        kernels.layer_norm_affine(xhat.reshape(-1, weight.size), weight.reshape(-1),
                                  bias.reshape(-1), out.reshape(-1, weight.size))
        return out
    if weight is None:
        out = xhat.copy()  # the op's own output: xhat stays as the rule saw it
    else:
        out = xhat * weight
    if bias is not None:
        out += bias
    return out


def _ln_backward(xp, g, ans, x, weight, bias, xhat, rstd, axes):
    # bias is not saved (the rule needs only its shape); dw and db are made in g's dtype
    kernels = None if weight is None or bias is None else cpu_kernels(g, xhat, rstd, weight)
    if kernels is not None:
        n = weight.size
        dx, dw, db = numpy.empty_like(xhat), numpy.zeros_like(weight), numpy.zeros_like(weight)
        kernels.layer_norm_backward(g.reshape(-1, n), xhat.reshape(-1, n), rstd.reshape(-1),
                                    weight.reshape(-1), dx.reshape(-1, n), dw.reshape(-1),
                                    db.reshape(-1))
        return dx, dw, db, None, None
    lead = tuple(range(xhat.ndim - len(axes)))
    letters = "abcdefghijklmnopqrstuvwxyz"[:xhat.ndim]
    # sum over the rows of g * xhat without a full-size product
    dw = None if weight is None else xp.einsum(
        f"{letters},{letters}->{letters[len(lead):]}", g, xhat)
    n = math.prod(xhat.shape[len(lead):])
    db = None if bias is None else sum_matrix(xp, g.reshape(-1, n), 0).reshape(bias.shape)
    # dx = rstd * (gx - mean(gx) - xhat * mean(gx * xhat)), gx = g * weight, built in one new
    # array: xhat is kept (a retained graph reads it again) and g may be shared
    gx = g if weight is None else g * weight
    dot, total = _row_dot(xp, gx, xhat, axes), _row_sum(xp, gx, axes)
    dx = xhat * (dot * (rstd / -n))
    if weight is None:
        dx += gx * rstd
    else:
        gx *= rstd
        dx += gx
    dx -= total * (rstd / n)
    return dx, dw, db, None, None


_layer_norm = Op("layer_norm", _ln_forward, backward=_ln_backward, save=(1, 3, 4))


@export(FUNCTIONAL)
def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise over the trailing `normalized_shape` dims (biased variance), then scale by
    `weight` and shift by `bias` (each of shape `normalized_shape`), as
    ``torch.nn.functional.layer_norm``.

    Args:
        input: (..., *normalized_shape).
        normalized_shape: an int or a tuple: the trailing dims to normalise over.
        weight, bias: optional affine parameters of shape `normalized_shape`.
        eps: added to the variance.

    Returns:
        A tensor of the input's shape.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if input.shape[input.ndim - len(shape):] != shape or len(shape) > input.ndim:
        raise RuntimeError(f"layer_norm: input of shape {input.shape} does not end with "
                           f"normalized_shape {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(f"layer_norm: {name} of shape {tuple(t.shape)} must have the "
                               f"normalized_shape {shape}")
    x = input.data
    xp = get_array_module(x)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    kernels = cpu_kernels(x)
    if kernels is not None:
        n = math.prod(shape)
        xhat = numpy.empty_like(x)
        rstd = numpy.empty(x.shape[:len(x.shape) - len(shape)] + (1,) * len(shape), x.dtype)
        kernels.layer_norm_rows(x.reshape(-1, n), eps, xhat.reshape(-1, n), rstd.reshape(-1))
        return apply(_layer_norm, input, weight, bias, xhat, rstd, axes=axes)
    xhat = x - _row_sum(xp, x, axes) / math.prod(shape)
    var = _row_dot(xp, xhat, xhat, axes) / math.prod(shape)
    var += eps
    rstd = 1 / xp.sqrt(var)
    xhat *= rstd
    return apply(_layer_norm, input, weight, bias, xhat, rstd, axes=axes)
