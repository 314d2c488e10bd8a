"""Scaled dot-product attention: ``softmax(q k^T * scale + mask) v``.

Without dropout and with no mask, a causal mask or a boolean one, attention is one primitive,
`_attention`, that keeps only q, k and v: its backward computes the (…, L, S) weights again
(one more matrix product and softmax) instead of keeping them, as PyTorch's fused CPU kernels
do. A causal mask runs by blocks of queries, each against only the keys it may see, so about
a third of the products and exponentials are never computed. With a float mask (which may
itself need a gradient) or dropout on the weights, attention is composed of matmul, an add and
`_masked_softmax`. Either way the softmax is `_masked_softmax_forward`: stable, and a row with
no allowed key is all zeros, as PyTorch 2.5+ does, so a fully masked query gets a zero output
and a zero gradient instead of NaN.
"""

from __future__ import annotations

import math

import numpy

from dptrain.engine.backend import cpu_kernels, get_array_module, sum_matrix
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.elementwise import dropout
from dptrain.engine.ops.registry import FUNCTIONAL, export
from dptrain.engine.tensor import Tensor


def _softmax_in_place(xp, scores):
    """Softmax over the last dim in `scores`' own memory; -inf entries get 0, and a row with
    no finite entry all zeros (its shift is 0 instead of -inf, which would give exp(nan))."""
    top = scores.max(axis=-1, keepdims=True)
    top[top == -numpy.inf] = 0
    scores -= top
    xp.exp(scores, out=scores)
    total = sum_matrix(xp, scores.reshape(-1, scores.shape[-1]), 1).reshape(
        scores.shape[:-1] + (1,))
    total[total == 0] = 1
    scores *= xp.reciprocal(total, out=total)  # one division per row, not per element
    return scores


def _masked_softmax_forward(xp, x, mask):
    return _softmax_in_place(xp, x.copy() if mask is None else xp.where(mask, x, -numpy.inf))


_masked_softmax = Op("masked_softmax", _masked_softmax_forward, (
    lambda xp, g, ans, x, mask: ans * (g - (g * ans).sum(axis=-1, keepdims=True)),
    None,
), save=False, save_ans=True)


_FLOAT32 = (numpy.dtype(numpy.float32),)  # the softmax kernels' one signature
# Queries per block of a causal attention: block b sees keys [0, (b + 1) * block) only.
_CAUSAL_BLOCK = 32


def _query_blocks(L: int, S: int, causal: bool):
    """``(i0, i1, s1)``: query rows [i0, i1) and the keys [0, s1) they may see."""
    if not causal:
        return [(0, L, S)]
    return [(i0, min(L, i0 + _CAUSAL_BLOCK), min(S, i0 + _CAUSAL_BLOCK))
            for i0 in range(0, L, _CAUSAL_BLOCK)]


def _block_weights(xp, q, k, mask, scale, causal, i0, i1, s1):
    """softmax over the keys [0, s1) of the scores of query rows [i0, i1)."""
    scores = q[..., i0:i1, :] @ k[..., :s1, :].swapaxes(-1, -2)
    kernels = cpu_kernels(scores, dtypes=_FLOAT32) if mask is None else None
    if kernels is not None:  # scale, causal mask and softmax in one pass per row
        kernels.attention_softmax_f32(scores.reshape(-1, s1), i1 - i0, i0 if causal else -1,
                                      scale)
        return scores
    scores *= scale
    if causal:  # query i sees keys j <= i
        xp.copyto(scores, -numpy.inf, where=~xp.tri(i1 - i0, s1, i0, dtype=bool))
    elif mask is not None:
        xp.copyto(scores, -numpy.inf, where=~mask[..., i0:i1, :s1])
    return _softmax_in_place(xp, scores)


def _full_mask(xp, mask, L: int, S: int):
    """A boolean mask as a (…, L, S) view, so that blocks of rows can be sliced from it."""
    if mask is None:
        return None
    return xp.broadcast_to(mask, numpy.broadcast_shapes(mask.shape, (L, S)))


def _laid_out_like(xp, a, shape: tuple, dtype, zeros: bool = False):
    """A new array of `shape` whose memory is ordered like `a`'s (when the dims agree).
    Multi-head attention passes (N, heads, L, E) views of (N, L, heads * E) projections:
    outputs and gradients laid out the same way make its transpose back to (N, L, heads, E)
    contiguous, so the merge of the heads copies nothing."""
    return (xp.zeros_like if zeros else xp.empty_like)(a, dtype=dtype, shape=shape)


def _attention_forward(xp, q, k, v, mask, scale, causal):
    L, S = q.shape[-2], k.shape[-2]
    batch = numpy.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    mask = _full_mask(xp, mask, L, S)
    out = _laid_out_like(xp, q, batch + (L, v.shape[-1]), xp.result_type(q, k, v))
    for i0, i1, s1 in _query_blocks(L, S, causal):
        xp.matmul(_block_weights(xp, q, k, mask, scale, causal, i0, i1, s1), v[..., :s1, :],
                  out=out[..., i0:i1, :])
    return out


def _attention_backward(xp, g, ans, q, k, v, mask, scale, causal):
    L, S = q.shape[-2], k.shape[-2]
    batch = g.shape[:-2]
    mask = _full_mask(xp, mask, L, S)
    dq = _laid_out_like(xp, q, batch + q.shape[-2:], g.dtype)
    dk = _laid_out_like(xp, k, batch + k.shape[-2:], g.dtype, zeros=True)
    dv = _laid_out_like(xp, v, batch + v.shape[-2:], g.dtype, zeros=True)
    for i0, i1, s1 in _query_blocks(L, S, causal):
        w = _block_weights(xp, q, k, mask, scale, causal, i0, i1, s1)
        gb = g[..., i0:i1, :]
        dv[..., :s1, :] += w.swapaxes(-1, -2) @ gb
        # the softmax's rule, in dw's memory: w * (dw - sum(dw * w)) * scale
        dw = gb @ v[..., :s1, :].swapaxes(-1, -2)
        kernels = cpu_kernels(dw, w, dtypes=_FLOAT32)
        if kernels is not None:
            kernels.softmax_rule_f32(dw.reshape(-1, s1), w.reshape(-1, s1), scale)
        else:
            dw -= xp.einsum("...ij,...ij->...i", dw, w)[..., None]
            dw *= w
            dw *= scale
        xp.matmul(dw, k[..., :s1, :], out=dq[..., i0:i1, :])
        dk[..., :s1, :] += dw.swapaxes(-1, -2) @ q[..., i0:i1, :]
    return dq, dk, dv, None


_attention = Op("attention", _attention_forward, backward=_attention_backward, save=(0, 1, 2, 3))


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
    if attn_mask is not None:
        _check_mask(attn_mask, scores_shape)
    m = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
    if dropout_p == 0.0 and (m is None or m.dtype.kind == "b"):
        return apply(_attention, query, key, value, m, scale=scale, causal=bool(is_causal))
    scores = (query * scale) @ key.transpose(-2, -1)
    mask = None
    if is_causal:
        mask = get_array_module(query.data).tri(L, S, dtype=bool)
    elif attn_mask is not None:
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
