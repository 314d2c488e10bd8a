"""Batch normalisation layers: BatchNorm1d and BatchNorm2d, with PyTorch's parameters
(``weight``, ``bias``) and buffers (``running_mean``, ``running_var``,
``num_batches_tracked``), so their state dicts load into PyTorch and back.

In training a layer normalises with the batch's statistics and updates the running estimates
in place (`engine.functional.batch_norm`: the unbiased batch variance, blended by `momentum`);
in evaluation it normalises with the running estimates.
"""

from __future__ import annotations

import numbers

from dptrain.engine import functional as F
from dptrain.engine.backend import Device
from dptrain.engine.nn import init
from dptrain.engine.nn.layers import _empty
from dptrain.engine.nn.module import Module
from dptrain.engine.nn.parameter import Parameter
from dptrain.engine.tensor import Tensor

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _BatchNorm(Module):
    """The shared body of the BatchNorm layers; subclasses say which input ranks they take."""

    _ranks: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
                or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive integer, got "
                             f"{num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = Parameter(_empty((num_features,), dtype, device))
            self.bias = Parameter(_empty((num_features,), dtype, device))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", Tensor(_empty((num_features,), dtype, device)))
            self.register_buffer("running_var", Tensor(_empty((num_features,), dtype, device)))
            self.register_buffer("num_batches_tracked", Tensor(
                Device(device or "cpu").xp.zeros((), dtype="int64")))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            init.zeros_(self.running_mean)
            init.ones_(self.running_var)
            init.zeros_(self.num_batches_tracked)

    def reset_parameters(self) -> None:
        """Reset the running statistics; weight 1 and bias 0."""
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def _check_input(self, input) -> None:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.ndim not in self._ranks:
            raise ValueError(f"{name}: expected a {' or '.join(f'{r}-D' for r in self._ranks)} "
                             f"input {self._layout}, got a {input.ndim}-D input of shape "
                             f"{input.shape}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected input with {self.num_features} channels "
                             f"(num_features) in dim 1, got {input.shape[1]} in an input of "
                             f"shape {input.shape}")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise each channel (dim 1) over the batch and any spatial dims.

        Args:
            input: see the class's expected layout.

        Returns:
            A Tensor shaped like `input`.
        """
        self._check_input(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                factor = 1.0 / int(self.num_batches_tracked.item())
        use_batch_stats = self.training or self.running_mean is None
        # Buffers are updated only in training with running stats; evaluation reads them.
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None,
                            self.running_var if track else None, self.weight, self.bias,
                            use_batch_stats, factor, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L) inputs, per channel C.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with the batch's mean and biased
    variance in training (the running variance is updated with the unbiased one) and the
    running estimates in evaluation.

    Args:
        num_features: C, the channels.
        eps: added to the variance for stability.
        momentum: weight of the new batch in the running estimates; None for a cumulative
            average over all batches seen.
        affine: learn `weight` (init 1) and `bias` (init 0).
        track_running_stats: keep running estimates (else always use batch statistics).
        device: where the parameters and buffers live.
        dtype: their floating dtype.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> bn = nn.BatchNorm1d(4)
        >>> bn(engine.randn(8, 4)).shape, int(bn.num_batches_tracked)
        ((8, 4), 1)
    """

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W) inputs, per channel C.

    Args: as `BatchNorm1d`.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> nn.BatchNorm2d(3)(engine.randn(4, 3, 5, 5)).shape
        (4, 3, 5, 5)
    """

    _ranks = (4,)
    _layout = "(N, C, H, W)"
