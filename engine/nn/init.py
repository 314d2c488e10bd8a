"""Weight initialisation, in place, with PyTorch's names and formulas (``torch.nn.init``).

Every function fills ``tensor.data`` in place, outside the graph, bumps the tensor's version
counter and returns the tensor. Random values are drawn from the generator of the
tensor's device (`engine.manual_seed` makes them reproducible; a CPU and a GPU draw different
numbers from one seed, as in PyTorch), and the values are computed there: `trunc_normal_`'s
rejection loop and `orthogonal_`'s QR decomposition run through the device's array module. A
module built on the CPU and then moved with ``.to(device)`` has the CPU's initial values
everywhere.
"""

from __future__ import annotations

import math

import numpy

from dptrain.engine import backend
from dptrain.engine.tensor import Tensor

__all__ = [
    "calculate_gain",
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "eye_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
]

_LINEAR_FNS = ("linear", "identity", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
               "conv_transpose2d", "conv_transpose3d", "sigmoid")


def _rng(generator: numpy.random.Generator | None, tensor: Tensor | None = None):
    # Looked up at every call: engine.manual_seed replaces the generators. With `tensor`, the
    # generator of its device, so the draws never cross to the host and back.
    if generator is not None:
        return generator
    return backend.device_generator(tensor.device if isinstance(tensor, Tensor) else None)


def _fill(tensor: Tensor, values) -> Tensor:
    """Write host or device `values` into ``tensor.data`` in place and bump its version."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected an engine Tensor, got {type(tensor).__name__}")
    xp = backend.get_array_module(tensor.data)
    tensor.data[...] = xp.asarray(values, dtype=tensor.dtype)
    tensor._version[0] += 1
    return tensor


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity (PyTorch's table).

    Args:
        nonlinearity: ``'linear'``, ``'conv2d'``, ``'sigmoid'``, ``'tanh'``, ``'relu'``,
            ``'leaky_relu'`` or ``'selu'``.
        param: the negative slope for ``'leaky_relu'`` (default 0.01).

    Returns:
        1 for linear and sigmoid, 5/3 for tanh, sqrt(2) for relu,
        sqrt(2 / (1 + slope**2)) for leaky_relu, 3/4 for selu.
    """
    if nonlinearity in _LINEAR_FNS:
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def _calculate_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of shape ``(out, in, *receptive_field)``.

    Raises:
        ValueError: for tensors with fewer than 2 dimensions.
    """
    if tensor.ndim < 2:
        raise ValueError(
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions")
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _calculate_correct_fan(tensor: Tensor, mode: str) -> int:
    mode = mode.lower()
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of fan_in, fan_out")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


# ---------------------------------------------------------------- plain distributions

def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0,
             generator: numpy.random.Generator | None = None) -> Tensor:
    """Fill `tensor` with draws from U(a, b).

    Args:
        tensor: the tensor to fill in place.
        a: the lower bound.
        b: the upper bound.
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    return _fill(tensor, _rng(generator, tensor).uniform(a, b, size=tensor.shape))


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0,
            generator: numpy.random.Generator | None = None) -> Tensor:
    """Fill `tensor` with draws from N(mean, std**2).

    Args:
        tensor: the tensor to fill in place.
        mean: the mean.
        std: the standard deviation.
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    return _fill(tensor, _rng(generator, tensor).normal(mean, std, size=tensor.shape))


def trunc_normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0, generator: numpy.random.Generator | None = None) -> Tensor:
    """Fill `tensor` with draws from N(mean, std**2) conditioned on lying in [a, b].

    Draws are exact (rejection sampling, over-drawing by the acceptance rate so that a couple
    of rounds suffice). `a` and `b` are absolute bounds, not multiples of `std`, as in PyTorch.

    Args:
        tensor: the tensor to fill in place.
        mean: the mean of the untruncated normal.
        std: its standard deviation.
        a: the lower bound.
        b: the upper bound.
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    if not a < b:
        raise ValueError(f"trunc_normal_ needs a < b, got a={a}, b={b}")

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))

    accept = cdf(b) - cdf(a)
    if accept < 1e-6:
        raise ValueError(f"trunc_normal_: [{a}, {b}] holds too little of N({mean}, {std}**2) "
                         "to sample by rejection")
    rng = _rng(generator, tensor)
    n = math.prod(tensor.shape)
    kept = []
    have = 0
    while have < n:
        need = n - have
        draw = rng.normal(mean, std, size=int(need / accept * 1.1) + 16)
        draw = draw[(draw >= a) & (draw <= b)][:need]
        kept.append(draw)
        have += int(draw.size)
    # The draws' module, not the tensor's: an explicit numpy `generator` draws on the host.
    xp = backend.get_array_module(kept[0])
    return _fill(tensor, xp.concatenate(kept).reshape(tensor.shape))


def constant_(tensor: Tensor, val: float) -> Tensor:
    """Fill `tensor` with `val`. Returns `tensor`."""
    return _fill(tensor, val)


def zeros_(tensor: Tensor) -> Tensor:
    """Fill `tensor` with 0. Returns `tensor`."""
    return _fill(tensor, 0)


def ones_(tensor: Tensor) -> Tensor:
    """Fill `tensor` with 1. Returns `tensor`."""
    return _fill(tensor, 1)


def eye_(tensor: Tensor) -> Tensor:
    """Fill a 2-D `tensor` with the identity matrix (ones on the diagonal). Returns `tensor`."""
    if tensor.ndim != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    return _fill(tensor, numpy.eye(*tensor.shape))


# ---------------------------------------------------------------- scaled by fan

def xavier_uniform_(tensor: Tensor, gain: float = 1.0,
                    generator: numpy.random.Generator | None = None) -> Tensor:
    """Glorot uniform: U(-bound, bound), bound = gain * sqrt(6 / (fan_in + fan_out)).

    Args:
        tensor: a tensor of at least 2 dimensions, filled in place.
        gain: a scaling factor (see `calculate_gain`).
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / float(fan_in + fan_out))
    return uniform_(tensor, -bound, bound, generator)


def xavier_normal_(tensor: Tensor, gain: float = 1.0,
                   generator: numpy.random.Generator | None = None) -> Tensor:
    """Glorot normal: N(0, std**2), std = gain * sqrt(2 / (fan_in + fan_out)).

    Args:
        tensor: a tensor of at least 2 dimensions, filled in place.
        gain: a scaling factor (see `calculate_gain`).
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / float(fan_in + fan_out)), generator)


def kaiming_uniform_(tensor: Tensor, a: float = 0, mode: str = "fan_in",
                     nonlinearity: str = "leaky_relu",
                     generator: numpy.random.Generator | None = None) -> Tensor:
    """He uniform: U(-bound, bound), bound = gain * sqrt(3 / fan), gain from `nonlinearity`.

    ``Linear`` uses ``a=sqrt(5)``, which gives bound = 1 / sqrt(fan_in).

    Args:
        tensor: a tensor of at least 2 dimensions, filled in place.
        a: the negative slope of the rectifier after this layer (``'leaky_relu'`` only).
        mode: ``'fan_in'`` (preserves forward variance) or ``'fan_out'`` (backward).
        nonlinearity: the nonlinearity's functional name, ``'relu'`` or ``'leaky_relu'``.
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    if 0 in tensor.shape:
        return tensor
    std = calculate_gain(nonlinearity, a) / math.sqrt(_calculate_correct_fan(tensor, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound, generator)


def kaiming_normal_(tensor: Tensor, a: float = 0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu",
                    generator: numpy.random.Generator | None = None) -> Tensor:
    """He normal: N(0, std**2), std = gain / sqrt(fan), gain from `nonlinearity`.

    Args:
        tensor: a tensor of at least 2 dimensions, filled in place.
        a: the negative slope of the rectifier after this layer (``'leaky_relu'`` only).
        mode: ``'fan_in'`` (preserves forward variance) or ``'fan_out'`` (backward).
        nonlinearity: the nonlinearity's functional name, ``'relu'`` or ``'leaky_relu'``.
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    if 0 in tensor.shape:
        return tensor
    std = calculate_gain(nonlinearity, a) / math.sqrt(_calculate_correct_fan(tensor, mode))
    return normal_(tensor, 0.0, std, generator)


def orthogonal_(tensor: Tensor, gain: float = 1.0,
                generator: numpy.random.Generator | None = None) -> Tensor:
    """Fill `tensor` with a (semi-)orthogonal matrix times `gain`; dimensions after the first
    are flattened. Uses the QR decomposition of a Gaussian matrix, signs fixed so that the
    result is uniformly (Haar) distributed.

    Args:
        tensor: a tensor of at least 2 dimensions, filled in place.
        gain: a scaling factor.
        generator: a numpy Generator to draw from instead of the process-wide one.

    Returns:
        `tensor`.
    """
    if tensor.ndim < 2:
        raise ValueError("Only tensors with 2 or more dimensions are supported")
    if tensor.numel() == 0:
        return tensor
    rows = tensor.shape[0]
    cols = tensor.numel() // rows
    flat = _rng(generator, tensor).normal(0.0, 1.0, size=(rows, cols))
    xp = backend.get_array_module(flat)
    if rows < cols:
        flat = flat.T
    q, r = xp.linalg.qr(flat)
    q = q * xp.sign(xp.diag(r))
    if rows < cols:
        q = q.T
    return _fill(tensor, (gain * q).reshape(tensor.shape))
