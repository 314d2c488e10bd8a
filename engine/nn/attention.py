"""Attention layers: MultiheadAttention, TransformerEncoderLayer and TransformerEncoder, with
PyTorch's parameter names (``in_proj_weight``, ``out_proj.weight``, ``self_attn.*``,
``linear1``, ``norm1`` ...), initialisation, shapes and mask conventions.

Masks follow ``torch.nn.MultiheadAttention``: in a boolean ``attn_mask`` or
``key_padding_mask`` True means "may not attend"; a float mask is added to the attention scores.
Both are turned into one additive float mask before the scores are computed.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable

import numpy

from dptrain.engine import functional as F
from dptrain.engine.backend import get_array_module
from dptrain.engine.nn import init
from dptrain.engine.nn.containers import ModuleList
from dptrain.engine.nn.layers import Dropout, LayerNorm, Linear, _empty
from dptrain.engine.nn.module import Module
from dptrain.engine.nn.parameter import Parameter
from dptrain.engine.ops import softmax
from dptrain.engine.ops.linalg import gelu_linear
from dptrain.engine.tensor import Tensor

__all__ = ["MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder"]


def _attention_weights(q: Tensor, k: Tensor, mask) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask): the weights themselves, for need_weights."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.mT
    if mask is not None:
        scores = scores + Tensor(mask)
    return softmax(scores, -1)


def _causal_mask(xp, L: int, S: int, dtype):
    """(L, S) additive mask: -inf above the diagonal (query i sees keys j <= i)."""
    return xp.where(xp.tri(L, S, dtype=bool), 0.0, -numpy.inf).astype(dtype)


def _additive(name: str, what: str, mask, dtype):
    """A bool mask (True = masked) as an additive float array; a float mask as is."""
    m = mask.data if isinstance(mask, Tensor) else mask
    if not hasattr(m, "dtype"):
        raise TypeError(f"{name}: {what} must be a Tensor, got {type(mask).__name__}")
    if m.dtype.kind == "b":
        return get_array_module(m).where(m, -numpy.inf, 0.0).astype(dtype)
    if m.dtype.kind != "f":
        raise TypeError(f"{name}: {what} must be a bool or float tensor, got {m.dtype}")
    return m.astype(dtype, copy=False)


class MultiheadAttention(Module):
    """Multi-head attention (Vaswani et al.), PyTorch's ``nn.MultiheadAttention``.

    Queries, keys and values are projected by the three row blocks of `in_proj_weight`
    (3 * embed_dim, embed_dim) and `in_proj_bias`, split into `num_heads` heads of
    embed_dim // num_heads features, attended with softmax(q k^T / sqrt(head_dim)), joined and
    projected by `out_proj`. `in_proj_weight` is Xavier-uniform, the biases start at zero and
    `out_proj.weight` has `Linear`'s default initialisation, as in PyTorch.

    Args:
        embed_dim: features of queries, keys, values and output.
        num_heads: parallel heads; must divide `embed_dim`.
        dropout: dropout probability on the attention weights, in training.
        bias: learn `in_proj_bias` and `out_proj.bias`.
        batch_first: inputs and output are (N, L, E) instead of (L, N, E).
        device: where the parameters live.
        dtype: the parameters' floating dtype.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True)
        >>> x = engine.randn(2, 5, 16)
        >>> out, weights = mha(x, x, x)
        >>> out.shape, weights.shape
        ((2, 5, 16), (2, 5, 5))
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        for key, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MultiheadAttention: {key} must be a positive integer, got "
                                 f"{value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be in [0, 1], got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.in_proj_weight = Parameter(_empty((3 * embed_dim, embed_dim), dtype, device))
        if bias:
            self.in_proj_bias = Parameter(_empty((3 * embed_dim,), dtype, device))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform `in_proj_weight`, zero biases (`out_proj.weight` keeps its init)."""
        init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def _check_inputs(self, query, key, value) -> None:
        name = type(self).__name__
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        for what, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
            if t.ndim not in (2, 3):
                raise ValueError(f"{name}: expected {what} of 3 dims {layout} or 2 dims (L, E) "
                                 f"unbatched, got shape {t.shape}")
            if t.ndim != query.ndim:
                raise ValueError(f"{name}: query, key and value must have the same number of "
                                 f"dims, got shapes {query.shape}, {key.shape}, {value.shape}")
            if t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name}: expected {what} with {self.embed_dim} features "
                                 f"(embed_dim) in its last dim, got shape {t.shape}")
        if key.shape != value.shape:
            raise ValueError(f"{name}: key and value must have the same shape, got "
                             f"{key.shape} and {value.shape}")
        if query.ndim == 3:
            b = 0 if self.batch_first else 1
            if query.shape[b] != key.shape[b]:
                raise ValueError(f"{name}: query and key must have the same batch size, got "
                                 f"shapes {query.shape} and {key.shape} (batch dim {b})")

    def _merge_masks(self, attn_mask, key_padding_mask, N: int, L: int, S: int, dtype):
        """One additive float array broadcastable to (N, heads, L, S), or None."""
        name, H = type(self).__name__, self.num_heads
        merged = None
        if attn_mask is not None:
            m = _additive(name, "attn_mask", attn_mask, dtype)
            if m.shape == (L, S):
                merged = m
            elif m.shape == (N * H, L, S):
                merged = m.reshape(N, H, L, S)
            else:
                raise ValueError(f"{name}: attn_mask of shape {m.shape} does not fit; expected "
                                 f"(L, S) = {(L, S)} or (N * num_heads, L, S) = "
                                 f"{(N * H, L, S)}")
        if key_padding_mask is not None:
            m = _additive(name, "key_padding_mask", key_padding_mask, dtype)
            if m.shape != (N, S):
                raise ValueError(f"{name}: key_padding_mask of shape {m.shape} does not fit; "
                                 f"expected (N, S) = {(N, S)}")
            m = m.reshape(N, 1, 1, S)
            merged = m if merged is None else merged + m
        return merged

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend from `query` over `key`/`value`.

        Args:
            query: (L, N, E), or (N, L, E) with `batch_first`, or (L, E) unbatched.
            key: (S, N, E) (or batch first, or unbatched) like `query`.
            value: the same shape as `key`.
            key_padding_mask: (N, S) (or (S,) unbatched); True (bool) marks keys to ignore, a
                float mask is added to the scores.
            need_weights: also return the attention weights.
            attn_mask: (L, S) or (N * num_heads, L, S); True (bool) forbids a query/key pair,
                a float mask is added to the scores.
            average_attn_weights: average the returned weights over heads.
            is_causal: forbid attending to later positions (when `attn_mask` is None; a given
                `attn_mask` is taken to be that causal mask, as PyTorch's hint).

        Returns:
            ``(output, weights)``: output shaped like `query`; weights (N, L, S), or
            (N, num_heads, L, S) without averaging (no batch dim when unbatched), or None when
            `need_weights` is False.
        """
        self._check_inputs(query, key, value)
        batched = query.ndim == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None and key_padding_mask.ndim == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, E = query.shape
        S, H, hd = key.shape[1], self.num_heads, self.head_dim
        mask = self._merge_masks(attn_mask, key_padding_mask, N, L, S, query.dtype)
        causal = is_causal and attn_mask is None
        if causal and mask is not None:  # a causal mask merged with padding
            mask = mask + _causal_mask(get_array_module(mask), L, S, query.dtype)
            causal = False

        ws = self.in_proj_weight.chunk(3, 0)
        bs = self.in_proj_bias.chunk(3, 0) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), ws, bs))
        q = q.reshape(N, L, H, hd).transpose(1, 2)
        k = k.reshape(N, S, H, hd).transpose(1, 2)
        v = v.reshape(N, S, H, hd).transpose(1, 2)
        p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:  # the caller wants the weights: compute them explicitly, as PyTorch
            if causal:
                mask = _causal_mask(get_array_module(q.data), L, S, q.dtype)
            weights = F.dropout(_attention_weights(q, k, mask), p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else Tensor(mask), dropout_p=p,
                is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class TransformerEncoderLayer(Module):
    """Self-attention and a feed-forward block, each with a residual connection and layer norm
    (PyTorch's ``nn.TransformerEncoderLayer``)::

        post-norm (default): x = norm1(x + sa(x));  x = norm2(x + ff(x))
        pre-norm (norm_first): x = x + sa(norm1(x)); x = x + ff(norm2(x))

    where ``ff(x) = dropout2(linear2(dropout(activation(linear1(x)))))`` and
    ``sa(x) = dropout1(self_attn(x, x, x)[0])``.

    Args:
        d_model: features per position.
        nhead: attention heads.
        dim_feedforward: hidden features of the feed-forward block.
        dropout: dropout probability everywhere in the layer.
        activation: ``'relu'``, ``'gelu'`` or a callable on Tensors.
        layer_norm_eps: the layer norms' eps.
        batch_first: input and output are (N, L, E) instead of (L, N, E).
        norm_first: pre-norm instead of post-norm.
        bias: learn the biases of the linear layers, attention and layer norms.
        device: where the parameters live.
        dtype: the parameters' floating dtype.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable[[Tensor], Tensor] = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"TransformerEncoderLayer: activation must be 'relu', 'gelu' "
                                 f"or a callable, got {activation!r}")
            activation = _ACTIVATIONS[activation]
        elif not callable(activation):
            raise TypeError(f"TransformerEncoderLayer: activation must be 'relu', 'gelu' or a "
                            f"callable, got {type(activation).__name__}")
        kw = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, **kw)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = activation

    def _sa_block(self, x: Tensor, attn_mask, key_padding_mask, is_causal: bool) -> Tensor:
        out = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                             need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(out)

    def _ff_block(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        if self.activation is F.gelu and self._foldable(self.dropout, self.linear2):
            # one op keeps h alone (GELU again in backward): the layer's largest saved array
            return self.dropout2(gelu_linear(h, self.linear2.weight, self.linear2.bias))
        return self.dropout2(self.linear2(self.dropout(self.activation(h))))

    def _foldable(self, dropout: Module, linear: Module) -> bool:
        """Whether `dropout` does nothing here and `linear` is a plain `Linear`, neither with
        hooks, so that the two may be folded into one op with the activation between them."""
        return (type(dropout) is Dropout and type(linear) is Linear
                and (not self.training or dropout.p == 0.0)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in (dropout, linear)))

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Encode a sequence.

        Args:
            src: (L, N, E), or (N, L, E) with `batch_first`, or (L, E) unbatched.
            src_mask: attention mask (L, S) or (N * nhead, L, S), as `MultiheadAttention`.
            src_key_padding_mask: (N, S); True marks padding positions.
            is_causal: attend only to earlier positions (see `MultiheadAttention`).

        Returns:
            A Tensor shaped like `src`.
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


class TransformerEncoder(Module):
    """A stack of `num_layers` copies of `encoder_layer` (each an independent deep copy,
    starting from the same weights, as PyTorch), optionally followed by `norm`.

    Args:
        encoder_layer: the layer to copy, e.g. a `TransformerEncoderLayer`.
        num_layers: how many copies.
        norm: an optional module applied to the last layer's output.
    """

    def __init__(self, encoder_layer: Module, num_layers: int,
                 norm: Module | None = None) -> None:
        super().__init__()
        if not isinstance(num_layers, numbers.Integral) or num_layers <= 0:
            raise ValueError(f"TransformerEncoder: num_layers must be a positive integer, got "
                             f"{num_layers!r}")
        self.layers = ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Run `src` through every layer (arguments as `TransformerEncoderLayer.forward`).

        Returns:
            A Tensor shaped like `src`.
        """
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=is_causal)
        return x if self.norm is None else self.norm(x)
