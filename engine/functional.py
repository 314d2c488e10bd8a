"""``engine.functional`` (import as ``F``): activations, losses and layers as functions.

Everything here is composed from primitives in `engine.ops`, so none of it needs a gradient
rule of its own; argument names, defaults and reductions follow ``torch.nn.functional``. The
ops that belong here (``linear``, ``relu``, ``conv2d``, ``dropout``, ...) declare it where they
are defined (``@export(FUNCTIONAL)``), as the functions below do; the module's names and
``__all__`` are built from those declarations at the end.
"""

from __future__ import annotations

import numpy

from dptrain.engine.backend import as_array, get_array_module
from dptrain.engine.ops.activation import log_softmax
from dptrain.engine.ops.elementwise import softplus, where
from dptrain.engine.ops.registry import FUNCTIONAL, export
from dptrain.engine.ops.shape import _dim
from dptrain.engine.tensor import Tensor

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    _check_reduction(reduction)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


@export(FUNCTIONAL)
def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """x where x > 0, else negative_slope * x."""
    return where(x > 0, x, x * negative_slope)


# ---------------------------------------------------------------- losses

def _class_targets(name: str, input: Tensor, target: Tensor):
    """Validate class-index targets against (N, C, d1, ...) or (C,) logits."""
    t = target.data if isinstance(target, Tensor) else as_array(target, input.data)
    if t.dtype.kind not in "iu":
        raise RuntimeError(f"{name}: class-index targets must be an integer tensor, got dtype "
                           f"{t.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.ndim > 1 else ()
    if t.shape != expected:
        raise RuntimeError(f"{name}: target of shape {t.shape} does not match input of shape "
                           f"{input.shape} (expected target shape {expected})")
    return t


def _per_class(weight: Tensor, ndim: int) -> Tensor:
    """Class weights (C,) shaped to broadcast along the class dim of an ndim-dim input."""
    return weight.reshape(weight.shape + (1,) * (ndim - 2)) if ndim > 1 else weight


@export(FUNCTIONAL)
def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None,
             ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of class-index `target` under log-probabilities `input`.

    Args:
        input: (N, C) or (N, C, d1, ...) log-probabilities, or (C,) for one sample.
        target: (N,) or (N, d1, ...) class indices in [0, C) or `ignore_index`.
        weight: optional (C,) per-class weights.
        ignore_index: targets with this value contribute nothing (and don't count in 'mean').
        reduction: 'mean' (weighted mean over non-ignored targets), 'sum' or 'none'.
    """
    return _nll(input, target, weight, ignore_index, reduction, 0.0, "nll_loss")


def _nll(logp, target, weight, ignore_index, reduction, label_smoothing, name):
    _check_reduction(reduction)
    t = _class_targets(name, logp, target)
    C = logp.shape[1] if logp.ndim > 1 else logp.shape[0]
    valid = t != ignore_index
    kept = t[valid]
    out_of_range = kept[(kept < 0) | (kept >= C)]
    if out_of_range.size:
        raise IndexError(f"{name}: target {int(out_of_range[0])} is out of bounds for {C} "
                         "classes")
    xp = get_array_module(t)
    safe = xp.where(valid, t, 0)
    cdim = 1 if logp.ndim > 1 else 0
    picked = logp.gather(cdim, xp.expand_dims(safe, cdim)).squeeze(cdim)
    if weight is not None:
        if weight.shape != (C,):
            raise RuntimeError(f"{name}: weight of shape {weight.shape} must have shape ({C},)")
        w = weight.data[safe] * valid
    else:
        w = valid.astype(logp.dtype)
    loss = -picked * Tensor(w.astype(logp.dtype))
    if label_smoothing:
        # The smoothed target puts label_smoothing / C on every class.
        all_logp = logp if weight is None else logp * _per_class(weight, logp.ndim)
        smooth = -all_logp.sum(cdim) / C * Tensor(valid.astype(logp.dtype))
        loss = loss * (1 - label_smoothing) + smooth * label_smoothing
    if reduction == "mean":
        total = float(w.sum())
        # Every target ignored: the mean is undefined (NaN, as in torch), without a warning.
        return loss.sum() / total if total else loss.sum() * float("nan")
    return loss.sum() if reduction == "sum" else loss


@export(FUNCTIONAL)
def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Cross entropy between logits `input` and class-index (or class-probability) `target`.

    Args:
        input: (N, C) or (N, C, d1, ...) unnormalised logits, or (C,).
        target: class indices of shape (N,) / (N, d1, ...), or probabilities shaped like input.
        weight: optional (C,) per-class weights.
        ignore_index: class-index targets with this value are skipped.
        reduction: 'mean', 'sum' or 'none'.
        label_smoothing: in [0, 1]; mixes the target with the uniform distribution.

    Example:
        >>> import dptrain.engine as engine, dptrain.engine.functional as F
        >>> logits = engine.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
        >>> round(F.cross_entropy(logits, engine.tensor([0])).item(), 4)
        0.2413
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    cdim = 1 if input.ndim > 1 else 0
    logp = log_softmax(input, cdim)
    if isinstance(target, Tensor) and target.data.dtype.kind == "f":
        if target.shape != input.shape:
            raise RuntimeError(f"cross_entropy: probability target of shape {target.shape} "
                               f"must match input of shape {input.shape}")
        C = input.shape[cdim]
        p = target * (1 - label_smoothing) + label_smoothing / C
        if weight is not None:
            p = p * _per_class(weight, input.ndim)
        return _reduce(-(logp * p).sum(cdim), reduction)
    return _nll(logp, target, weight, ignore_index, reduction, label_smoothing, "cross_entropy")


@export(FUNCTIONAL)
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error."""
    if input.shape != target.shape:
        raise RuntimeError(f"mse_loss: input of shape {input.shape} and target of shape "
                           f"{target.shape} differ")
    d = input - target
    return _reduce(d * d, reduction)


@export(FUNCTIONAL)
def l1_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean absolute error."""
    if input.shape != target.shape:
        raise RuntimeError(f"l1_loss: input of shape {input.shape} and target of shape "
                           f"{target.shape} differ")
    return _reduce((input - target).abs(), reduction)


@export(FUNCTIONAL)
def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Tensor | None = None, reduction: str = "mean",
                                     pos_weight: Tensor | None = None) -> Tensor:
    """Binary cross entropy on logits, computed stably: log(1 + exp(-|x|)) never overflows."""
    if input.shape != target.shape:
        raise RuntimeError(f"binary_cross_entropy_with_logits: input of shape {input.shape} "
                           f"and target of shape {target.shape} differ")
    # -[pw*y*log(sigmoid(x)) + (1-y)*log(1-sigmoid(x))] = (1-y)*x + (1+(pw-1)*y)*softplus(-x)
    coef = 1 if pos_weight is None else 1 + (pos_weight - 1) * target
    loss = (1 - target) * input + coef * softplus(-input)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


# ---------------------------------------------------------------- layers

@export(FUNCTIONAL)
def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Rows of `weight` picked by the integer tensor `input`; repeated indices accumulate
    gradient, and the `padding_idx` row gets none."""
    idx = input.data if isinstance(input, Tensor) else as_array(input, weight.data)
    if idx.dtype.kind not in "iu":
        raise RuntimeError(f"embedding: indices must be an integer tensor, got {idx.dtype}")
    n = weight.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"embedding: index out of range: values from {int(idx.min())} to "
                         f"{int(idx.max())} for an embedding of {n} rows")
    out = weight[idx]
    if padding_idx is not None and weight.requires_grad:
        keep = (idx != padding_idx)[..., None].astype(weight.dtype)
        out = where(Tensor(keep.astype(bool)), out, out.detach())
    return out


@export(FUNCTIONAL)
def one_hot(tensor: Tensor, num_classes: int = -1) -> Tensor:
    """(..., num_classes) int64 one-hot encoding of an integer tensor."""
    idx = tensor.data
    if idx.dtype.kind not in "iu":
        raise RuntimeError(f"one_hot: expected an integer tensor, got {idx.dtype}")
    xp = get_array_module(idx)
    if num_classes == -1:
        num_classes = int(idx.max()) + 1 if idx.size else 0
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        raise RuntimeError(f"one_hot: class values must be in [0, {num_classes}), got values "
                           f"from {int(idx.min())} to {int(idx.max())}")
    return Tensor((idx[..., None] == xp.arange(num_classes)).astype(numpy.int64))


@export(FUNCTIONAL)
def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """Divide by the Lp norm along `dim` (at least `eps`)."""
    d = _dim(dim, input.ndim)
    norm = (input.abs() ** p).sum(d, keepdim=True) ** (1.0 / p)
    return input / norm.clamp(min=eps)


_functions = export.functions(FUNCTIONAL)
globals().update(_functions)
__all__ = list(_functions)
