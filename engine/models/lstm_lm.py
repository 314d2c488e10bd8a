"""``lstm_lm``: a character-level (or any token-level) LSTM language model."""

from __future__ import annotations

from dptrain.engine.models.checks import check_args, check_probability, check_tokens
from dptrain.engine.models.registry import register_model
from dptrain.engine.nn import LSTM, Dropout, Embedding, Linear, Module
from dptrain.engine.tensor import Tensor

__all__ = ["LSTMLanguageModel"]


@register_model("lstm_lm")
class LSTMLanguageModel(Module):
    """Embedding, a (stacked) LSTM and a linear head that predicts the next token at every
    position. Submodules: ``embedding``, ``lstm`` (batch first), ``head``.

    Args:
        vocab_size: distinct tokens (256 covers bytes / 8-bit characters).
        embed_dim: features of a token's embedding.
        hidden_size: the LSTM's hidden features.
        num_layers: stacked LSTM layers.
        dropout: dropout probability on the embeddings, between LSTM layers and before the
            head, in training.

    Input: (N, T) integer token ids in [0, vocab_size). Output: (N, T, vocab_size) logits;
    position t scores the token that follows input[:, t].

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine.models import get_model
        >>> lm = get_model("lstm_lm", vocab_size=30, embed_dim=8, hidden_size=16)
        >>> lm(engine.randint(0, 30, (2, 5))).shape
        (2, 5, 30)
    """

    def __init__(self, vocab_size: int = 256, embed_dim: int = 64, hidden_size: int = 256,
                 num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        check_args("lstm_lm", vocab_size=vocab_size, embed_dim=embed_dim,
                   hidden_size=hidden_size, num_layers=num_layers)
        check_probability("lstm_lm", dropout=dropout)
        self.vocab_size = vocab_size
        self.embedding = Embedding(vocab_size, embed_dim)
        self.lstm = LSTM(embed_dim, hidden_size, num_layers, batch_first=True,
                         dropout=dropout if num_layers > 1 else 0.0)
        self.drop = Dropout(dropout)
        self.head = Linear(hidden_size, vocab_size)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Next-token logits.

        Args:
            input: (N, T) integer token ids.
            hx: an optional initial LSTM state ``(h_0, c_0)``, each (num_layers, N, hidden).

        Returns:
            (N, T, vocab_size) logits.
        """
        check_tokens("lstm_lm", input, self.vocab_size)
        out, _ = self.lstm(self.drop(self.embedding(input)), hx)
        return self.head(self.drop(out))
