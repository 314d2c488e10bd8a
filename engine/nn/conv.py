"""Convolution and pooling layers: Conv1d, Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
with PyTorch's arguments, parameter names (``weight`` (out, in / groups, *kernel), ``bias``)
and default initialisation.

Each forward is one call into `engine.functional`, whose ops record the graph and check the
input (rank, channels against the weight, a kernel that fits the padded input), naming what they
expected and what came.
"""

from __future__ import annotations

import math
import numbers

from dptrain.engine import functional as F
from dptrain.engine.nn import init
from dptrain.engine.nn.layers import _empty
from dptrain.engine.nn.module import Module
from dptrain.engine.nn.parameter import Parameter
from dptrain.engine.tensor import Tensor

__all__ = ["Conv1d", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]


def _tuple(name: str, what: str, value, n: int, minimum: int) -> tuple:
    """`value` (an int or a sequence of `n` ints, each >= `minimum`) as an n-tuple."""
    items = (value,) * n if isinstance(value, numbers.Integral) else tuple(value)
    if len(items) != n or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                              or v < minimum for v in items):
        raise ValueError(f"{name}: {what} must be an int >= {minimum} or {n} such ints, got "
                         f"{value!r}")
    return tuple(int(v) for v in items)


# ---------------------------------------------------------------- convolution

class _ConvNd(Module):
    """The shared body of `Conv1d` and `Conv2d`: argument checks, parameters, init, repr."""

    _n = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        super().__init__()
        name, n = type(self).__name__, self._n
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels),
                           ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: in_channels ({in_channels}) and out_channels "
                             f"({out_channels}) must both be divisible by groups ({groups})")
        if padding_mode != "zeros":
            raise NotImplementedError(f"{name}: padding_mode={padding_mode!r} is not supported; "
                                      "only 'zeros'")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(name, "kernel_size", kernel_size, n, 1)
        self.stride = _tuple(name, "stride", stride, n, 1)
        self.dilation = _tuple(name, "dilation", dilation, n, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding must be 'same', 'valid', an int or {n} "
                                 f"ints, got {padding!r}")
            if padding == "same" and self.stride != (1,) * n:
                raise ValueError(f"{name}: padding='same' is not supported for strided "
                                 f"convolutions (stride={self.stride})")
            self.padding = padding
        else:
            self.padding = _tuple(name, "padding", padding, n, 0)
        self.groups = groups
        self.padding_mode = padding_mode
        self.weight = Parameter(_empty((out_channels, in_channels // groups)
                                       + self.kernel_size, dtype, device))
        if bias:
            self.bias = Parameter(_empty((out_channels,), dtype, device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default: kaiming_uniform_(a=sqrt(5)) for the weight, which is
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        n = self._n
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0,) * n:
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) \
                else f", padding={self.padding}"
        if self.dilation != (1,) * n:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Conv2d(_ConvNd):
    """2-D convolution (cross-correlation, as PyTorch) over (N, C_in, H, W) inputs.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (number of filters).
        kernel_size: an int or (kh, kw).
        stride: an int or (sh, sw).
        padding: an int, (ph, pw), ``'valid'`` (none) or ``'same'`` (output as large as the
            input; stride 1 only).
        dilation: an int or (dh, dw): spacing between kernel taps.
        groups: split the channels into this many independent groups.
        bias: learn an additive bias per output channel.
        padding_mode: only ``'zeros'``.
        device: where the parameters live.
        dtype: the parameters' floating dtype.

    Input (N, C_in, H, W) or unbatched (C_in, H, W); output (N, C_out, H_out, W_out) with
    H_out = floor((H + 2 ph - dh (kh - 1) - 1) / sh) + 1.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> nn.Conv2d(3, 8, 3, padding=1)(engine.randn(2, 3, 16, 16)).shape
        (2, 8, 16, 16)
    """

    _n = 2

    def forward(self, input: Tensor) -> Tensor:
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class Conv1d(_ConvNd):
    """1-D convolution over (N, C_in, L) inputs (or unbatched (C_in, L)).

    Args: as `Conv2d`, with ints (or 1-tuples) for kernel_size, stride, padding and dilation.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> nn.Conv1d(4, 6, 5)(engine.randn(2, 4, 20)).shape
        (2, 6, 16)
    """

    _n = 1

    def forward(self, input: Tensor) -> Tensor:
        return F.conv1d(input, self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


# ---------------------------------------------------------------- pooling

class MaxPool2d(Module):
    """The maximum over each kernel window (padding counts as -inf).

    Args:
        kernel_size: an int or (kh, kw).
        stride: an int or pair; defaults to `kernel_size`.
        padding: an int or pair, at most half the kernel size.
        dilation: an int or pair: spacing between window elements.
        return_indices: must be False (not supported).
        ceil_mode: round the output size up instead of down.

    Input (N, C, H, W) or (C, H, W); output (N, C, H_out, W_out) with
    H_out = floor((H + 2 ph - dh (kh - 1) - 1) / sh) + 1.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> nn.MaxPool2d(2)(engine.randn(1, 3, 8, 8)).shape
        (1, 3, 4, 4)
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices: bool = False, ceil_mode: bool = False) -> None:
        super().__init__()
        if return_indices:
            raise NotImplementedError("MaxPool2d(return_indices=True) is not supported")
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode

    def forward(self, input: Tensor) -> Tensor:
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """The mean over each kernel window.

    Args:
        kernel_size: an int or (kh, kw).
        stride: an int or pair; defaults to `kernel_size`.
        padding: an int or pair of implicit zeros, at most half the kernel size.
        ceil_mode: round the output size up instead of down.
        count_include_pad: count the padding zeros in each window's size.
        divisor_override: divide every window's sum by this instead.

    Input (N, C, H, W) or (C, H, W); output (N, C, H_out, W_out) with
    H_out = floor((H + 2 ph - kh) / sh) + 1.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, input: Tensor) -> Tensor:
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size: output cell i covers input rows
    floor(i H / H_out) .. ceil((i + 1) H / H_out) - 1 (and likewise for columns).

    Args:
        output_size: an int or (H_out, W_out); None in a pair keeps that input size.

    Input (N, C, H, W) or (C, H, W); output (N, C, H_out, W_out). ``AdaptiveAvgPool2d(1)``
    is global average pooling.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, input: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(input, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
