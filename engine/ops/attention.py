"""Scaled dot-product attention, composed of matmul, an additive mask and one masked softmax.

``softmax(q k^T * scale + mask) v``. The only primitive of its own is `_masked_softmax`: a stable
softmax over the last dim that takes a boolean mask (True = take part) and gives a row with no
allowed key all zeros, as PyTorch 2.5+ does, so a fully masked query gets a zero output and a
zero gradient instead of NaN. The (…, L, S) attention weights are the only array kept for
backward besides q, k and v.
"""

from __future__ import annotations

import math

import numpy

from dptrain.engine.backend import get_array_module
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.elementwise import dropout
from dptrain.engine.ops.registry import FUNCTIONAL, export
from dptrain.engine.tensor import Tensor


def _masked_softmax_forward(xp, x, mask):
    if mask is not None:
        x = xp.where(mask, x, -numpy.inf)
    top = x.max(axis=-1, keepdims=True)
    # A row of -inf (every key masked) would give exp(nan); shift it by 0 instead: all zeros.
    top = xp.where(top == -numpy.inf, 0, top)
    e = xp.exp(x - top)
    total = e.sum(axis=-1, keepdims=True)
    e /= xp.where(total == 0, 1, total)
    return e


_masked_softmax = Op("masked_softmax", _masked_softmax_forward, (
    lambda xp, g, ans, x, mask: ans * (g - (g * ans).sum(axis=-1, keepdims=True)),
    None,
), save=False, save_ans=True)


def _check_mask(mask, scores_shape: tuple):
    m = mask.data if isinstance(mask, Tensor) else mask
    if not hasattr(m, "dtype") or m.dtype.kind not in "bf":
        raise TypeError(f"scaled_dot_product_attention: attn_mask must be a bool or floating "
                        f"point Tensor, got {getattr(m, 'dtype', type(mask).__name__)}")
    try:
        fits = numpy.broadcast_shapes(m.shape, scores_shape) == tuple(scores_shape)
    except ValueError:
        fits = False
    if not fits:
        raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {tuple(m.shape)} "
                           f"does not broadcast to the attention weights' shape "
                           f"{tuple(scores_shape)} (..., L, S)")


@export(FUNCTIONAL)
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None) -> Tensor:
    """``softmax(query @ key^T * scale + mask) @ value``, as PyTorch's function of that name.

    Args:
        query: (..., L, E).
        key: (..., S, E).
        value: (..., S, Ev). The leading dims of the three broadcast together.
        attn_mask: broadcastable to (..., L, S): a bool mask, True where a query may attend to a
            key, or a float mask added to the scores (-inf to forbid).
        dropout_p: dropout on the attention weights (applied whenever > 0, as in PyTorch).
        is_causal: query i attends to keys 0..i only (the top-left aligned lower triangle);
            cannot be combined with attn_mask.
        scale: multiplies the scores; defaults to 1 / sqrt(E).

    Returns:
        (..., L, Ev). A query whose keys are all masked gets zeros (and a zero gradient), as in
        PyTorch 2.5 and later (earlier versions gave NaN).

    Example:
        >>> import dptrain.engine as engine, dptrain.engine.functional as F
        >>> q = k = v = engine.ones(2, 3, 4)
        >>> F.scaled_dot_product_attention(q, k, v, is_causal=True).shape
        (2, 3, 4)
    """
    fn = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.ndim < 2:
            raise RuntimeError(f"{fn}: {name} must be a Tensor of at least 2 dims (..., seq, "
                               f"features), got {getattr(t, 'shape', type(t).__name__)}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"{fn}: query (..., L, E) and key (..., S, E) must have the same "
                           f"last dim, got shapes {query.shape} and {key.shape}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"{fn}: key (..., S, E) and value (..., S, Ev) must have the same "
                           f"sequence length S, got shapes {key.shape} and {value.shape}")
    try:
        batch = numpy.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except ValueError:
        raise RuntimeError(f"{fn}: the leading dims of query {query.shape}, key {key.shape} and "
                           f"value {value.shape} do not broadcast") from None
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}: give either attn_mask or is_causal=True, not both")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    L, S = query.shape[-2], key.shape[-2]
    scores_shape = tuple(batch) + (L, S)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    scores = (query * scale) @ key.transpose(-2, -1)
    mask = None
    if is_causal:
        mask = get_array_module(query.data).tri(L, S, dtype=bool)
    elif attn_mask is not None:
        _check_mask(attn_mask, scores_shape)
        m = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
        if m.dtype.kind == "b":
            mask = m
        else:  # added in the scores' dtype (a float64 mask must not promote float32 scores)
            if not isinstance(attn_mask, Tensor):
                attn_mask = Tensor(m)
            scores = scores + attn_mask.to(scores.dtype)
    weights = apply(_masked_softmax, scores, mask)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return weights @ value
