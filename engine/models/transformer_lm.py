"""``transformer_lm``: a GPT-style causal decoder-only language model."""

from __future__ import annotations

import math

from dptrain.engine import functional as F
from dptrain.engine.factories import arange
from dptrain.engine.models.checks import check_args, check_probability, check_tokens
from dptrain.engine.models.registry import register_model
from dptrain.engine.nn import (
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    MultiheadAttention,
    TransformerEncoderLayer,
    init,
)
from dptrain.engine.tensor import Tensor

__all__ = ["TransformerLM"]


@register_model("transformer_lm")
class TransformerLM(Module):
    """GPT-style language model: token + learned position embeddings, `n_layers` pre-norm
    blocks of causal self-attention and a GELU feed-forward (`TransformerEncoderLayer` with
    ``norm_first=True``), a final layer norm, and an output head tied to the token embedding
    (logits = h @ tok_emb.weight^T, no extra parameters).

    Weights start as GPT-2's: N(0, 0.02) for embeddings and linear layers, the residual
    projections (``out_proj``, ``linear2``) scaled by 1/sqrt(2 * n_layers), zero biases.
    Submodules: ``tok_emb``, ``pos_emb``, ``drop``, ``blocks.{i}`` (``self_attn``,
    ``linear1``, ``linear2``, ``norm1``, ``norm2``, ...), ``norm``.

    Args:
        vocab_size: distinct tokens (256 covers bytes / 8-bit characters).
        d_model: features per position.
        n_layers: transformer blocks.
        n_heads: attention heads per block; must divide `d_model`.
        context: the longest sequence the position embedding covers.
        d_ff: hidden features of each feed-forward block (default 4 * d_model).
        dropout: dropout probability (embeddings, attention, residual branches), in training.

    Input: (N, T) integer token ids with T <= context. Output: (N, T, vocab_size) logits;
    position t sees only tokens 0..t and scores the token that follows.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine.models import get_model
        >>> lm = get_model("transformer_lm", vocab_size=30, d_model=16, n_layers=1,
        ...                n_heads=2, context=8)
        >>> lm(engine.randint(0, 30, (2, 8))).shape
        (2, 8, 30)
    """

    def __init__(self, vocab_size: int = 256, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4, context: int = 128, d_ff: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        check_args("transformer_lm", vocab_size=vocab_size, d_model=d_model,
                   n_layers=n_layers, n_heads=n_heads, context=context, d_ff=d_ff)
        check_probability("transformer_lm", dropout=dropout)
        if d_model % n_heads:
            raise ValueError(f"transformer_lm: d_model ({d_model}) must be divisible by "
                             f"n_heads ({n_heads})")
        self.vocab_size = vocab_size
        self.context = context
        self.tok_emb = Embedding(vocab_size, d_model)
        self.pos_emb = Embedding(context, d_model)
        self.drop = Dropout(dropout)
        self.blocks = ModuleList([
            TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, activation="gelu",
                                    batch_first=True, norm_first=True)
            for _ in range(n_layers)])
        self.norm = LayerNorm(d_model)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        residual_std = 0.02 / math.sqrt(2 * n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (Linear, Embedding)):
                std = residual_std if name.endswith(("out_proj", "linear2")) else 0.02
                init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, MultiheadAttention):
                init.normal_(module.in_proj_weight, 0.0, 0.02)

    def forward(self, input: Tensor) -> Tensor:
        """Next-token logits.

        Args:
            input: (N, T) integer token ids, T <= context.

        Returns:
            (N, T, vocab_size) logits.
        """
        check_tokens("transformer_lm", input, self.vocab_size, self.context)
        positions = arange(input.shape[1])
        x = self.drop(self.tok_emb(input) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x, is_causal=True)
        return F.linear(self.norm(x), self.tok_emb.weight)
