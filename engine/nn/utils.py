"""Gradient clipping and flat-vector views of parameters (``torch.nn.utils``).

Clipping works in place on the gradient arrays, outside the graph, with the array module that
owns them (numpy or CuPy), and bumps each gradient's version counter.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable

import numpy

from dptrain.engine.backend import get_array_module
from dptrain.engine.ops import cat
from dptrain.engine.tensor import Tensor

__all__ = ["clip_grad_norm_", "clip_grad_value_", "parameters_to_vector",
           "vector_to_parameters"]


def _as_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        return [parameters]
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = list(parameters)
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return parameters


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Scale all gradients together so that their joint norm is at most `max_norm`.

    The norm is that of every gradient concatenated into one vector. Gradients are multiplied
    in place by ``max_norm / (total_norm + 1e-6)`` when that is below 1 (PyTorch's formula).

    Args:
        parameters: a Tensor or an iterable of Tensors; those without ``.grad`` are skipped.
        max_norm: the largest norm allowed.
        norm_type: the p of the p-norm; ``float('inf')`` for the largest absolute value.
        error_if_nonfinite: raise if the total norm is nan or infinite instead of scaling by it.

    Returns:
        The total norm before clipping, as a 0-d Tensor (in the gradients' dtype).

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> p = nn.Parameter(engine.zeros(2))
        >>> p.grad = engine.tensor([3.0, 4.0])
        >>> nn.utils.clip_grad_norm_([p], max_norm=1.0).item()
        5.0
        >>> [round(g, 4) for g in p.grad.tolist()]
        [0.6, 0.8]
    """
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return Tensor(numpy.zeros((), dtype=numpy.float32))
    xp = get_array_module(grads[0].data)
    dtype = grads[0].dtype
    # numpy's vector norm covers p = inf (max |g|) and -inf (min |g|); empty grads add nothing.
    norms = [xp.linalg.norm(g.data.ravel(), norm_type) for g in grads if g.data.size]
    total = (xp.linalg.norm(xp.stack(norms), norm_type) if norms else xp.zeros(())).astype(dtype)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = float(max_norm) / (float(total) + 1e-6)
    if not coef >= 1.0:  # also when nan: the gradients become nan, as in PyTorch
        for g in grads:
            g.data *= g.dtype.type(coef)
            g._version[0] += 1
    return Tensor(total)


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float) -> None:
    """Clamp every gradient element to [-clip_value, clip_value], in place.

    Args:
        parameters: a Tensor or an iterable of Tensors; those without ``.grad`` are skipped.
        clip_value: the largest absolute value allowed.
    """
    clip_value = float(clip_value)
    for p in _as_list(parameters):
        if p.grad is not None:
            g = p.grad.data
            get_array_module(g).clip(g, -clip_value, clip_value, out=g)
            p.grad._version[0] += 1


def parameters_to_vector(parameters: Iterable[Tensor]) -> Tensor:
    """Concatenate the flattened parameters into one vector (differentiable, a copy).

    Args:
        parameters: an iterable of Tensors.

    Returns:
        A 1-D Tensor of their total number of elements.
    """
    return cat([p.reshape(-1) for p in parameters])


def vector_to_parameters(vec: Tensor, parameters: Iterable[Tensor]) -> None:
    """Copy consecutive slices of `vec` into the parameters, in place (each keeps its array).

    Args:
        vec: a 1-D Tensor with as many elements as all parameters together.
        parameters: an iterable of Tensors, in the order used by `parameters_to_vector`.
    """
    if not isinstance(vec, Tensor):
        raise TypeError(f"expected vec to be a Tensor, but got: {type(vec).__name__}")
    if vec.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {vec.shape}")
    params = list(parameters)
    total = sum(p.numel() for p in params)
    if total != vec.shape[0]:
        raise ValueError(f"vector has {vec.shape[0]} elements, the parameters have {total}")
    offset = 0
    for p in params:
        n = p.numel()
        p.data[...] = vec.data[offset:offset + n].reshape(p.shape)
        p._version[0] += 1
        offset += n
