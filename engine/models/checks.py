"""Argument and input checks shared by the model constructors: each error names the model,
what it expected and what came."""

from __future__ import annotations

from dptrain.engine.tensor import Tensor

__all__ = ["check_args", "check_tokens"]


def check_args(model: str, **values) -> None:
    """Raise ValueError naming `model` unless every value is a positive int, or, for a tuple or
    list value, a non-empty sequence of positive ints. For constructors' own checks."""
    for key, value in values.items():
        seq = isinstance(value, (tuple, list))
        items = value if seq else (value,)
        if (seq and not value) or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0
                                      for v in items):
            what = "a non-empty sequence of positive integers" if seq else "a positive integer"
            raise ValueError(f"{model}: {key} must be {what}, got {value!r}")


def check_tokens(model: str, input, vocab_size: int, context: int | None = None) -> None:
    """Raise unless `input` is an (N, T) integer Tensor of token ids in [0, vocab_size) with
    T <= `context` (when given)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{model}: expected an (N, T) Tensor of token ids, got "
                        f"{type(input).__name__}")
    if input.ndim != 2 or input.dtype.kind not in "iu":
        raise ValueError(f"{model}: expected an (N, T) integer Tensor of token ids, got shape "
                         f"{input.shape} and dtype {input.dtype}")
    if context is not None and input.shape[1] > context:
        raise ValueError(f"{model}: the sequence length {input.shape[1]} exceeds the model's "
                         f"context of {context} positions")
    ids = input.data
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{model}: token ids must be in [0, {vocab_size}) (vocab_size), got "
                         f"values from {int(ids.min())} to {int(ids.max())}")


def check_probability(model: str, **values) -> None:
    """Raise ValueError naming `model` unless every value is a number in [0, 1)."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value < 1:
            raise ValueError(f"{model}: {key} must be a number in [0, 1), got {value!r}")
