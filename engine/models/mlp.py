"""``mlp``: a multi-layer perceptron classifier."""

from __future__ import annotations

from collections.abc import Sequence

from dptrain.engine.models.checks import check_args, check_probability
from dptrain.engine.models.registry import register_model
from dptrain.engine.nn import Dropout, Linear, ReLU, Sequential

__all__ = ["mlp"]


@register_model("mlp")
def mlp(in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10,
        dropout: float = 0.0) -> Sequential:
    """Linear layers with ReLU between them (and dropout after each ReLU when `dropout` > 0).

    The defaults fit scikit-learn's 8x8 digits flattened to 64 features.

    Args:
        in_features: features of each input row.
        hidden: the widths of the hidden layers, in order.
        num_classes: outputs (logits) per row.
        dropout: dropout probability after each hidden layer, in training.

    Returns:
        A `Sequential`. Input: (N, in_features) floats; output: (N, num_classes) logits.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine.models import get_model
        >>> get_model("mlp", in_features=4, hidden=[8], num_classes=3)(engine.randn(2, 4)).shape
        (2, 3)
    """
    if not isinstance(hidden, (list, tuple)):
        raise ValueError(f"mlp: hidden must be a list of layer widths, got {hidden!r}")
    check_args("mlp", in_features=in_features, num_classes=num_classes)
    if hidden:
        check_args("mlp", hidden=hidden)
    check_probability("mlp", dropout=dropout)
    layers, width = [], in_features
    for h in hidden:
        layers += [Linear(width, h), ReLU()] + ([Dropout(dropout)] if dropout else [])
        width = h
    return Sequential(*layers, Linear(width, num_classes))
