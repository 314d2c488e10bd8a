"""All primitives, the torch-style free functions, and the Tensor methods built from them.

The primitives live by family in `elementwise`, `reduce`, `shape`, `linalg` and `activation`;
each is defined once (`core.Op`). This module binds them to `Tensor` as operators and methods,
and adds the in-place updates optimizers use (`add_`, `mul_`, ...), which record no graph.
"""

from __future__ import annotations

from engine.backend import Device, get_array_module
from engine.ops.activation import log_softmax, softmax
from engine.ops.core import Op, apply
from engine.ops.elementwise import (
    abs,  # noqa: A004
    add,
    ceil,
    clamp,
    cos,
    div,
    eq,
    exp,
    floor,
    ge,
    gelu,
    gt,
    isfinite,
    isnan,
    le,
    log,
    log1p,
    logical_and,
    logical_not,
    logical_or,
    logical_xor,
    lt,
    maximum,
    minimum,
    mul,
    ne,
    neg,
    pow,  # noqa: A004
    radd,
    rdiv,
    relu,
    rmul,
    round,  # noqa: A004
    rpow,
    rsqrt,
    rsub,
    sigmoid,
    sign,
    silu,
    sin,
    softplus,
    sqrt,
    square,
    sub,
    tanh,
    to_dtype,
    where,
)
from engine.ops.linalg import linear, matmul, rmatmul
from engine.ops.reduce import (
    all,  # noqa: A004
    amax,
    amin,
    any,  # noqa: A004
    argmax,
    argmin,
    cumsum,
    logsumexp,
    max,  # noqa: A004
    mean,
    min,  # noqa: A004
    std,
    sum,  # noqa: A004
    var,
)
from engine.ops.shape import (
    broadcast_to,
    cat,
    chunk,
    clone,
    concat,
    contiguous,
    expand,
    expand_as,
    flatten,
    flip,
    gather,
    getitem,
    masked_fill,
    permute,
    reshape,
    split,
    squeeze,
    stack,
    t,
    transpose,
    unsqueeze,
    view,
)
from engine.tensor import Tensor, _mode

__all__ = [
    "Op", "apply", "abs", "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "log1p",
    "sqrt", "rsqrt", "square", "sin", "cos", "tanh", "sigmoid", "relu", "gelu", "silu",
    "softplus", "clamp", "clip", "maximum", "minimum", "where", "sign", "floor", "ceil", "round",
    "isnan", "isfinite", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_xor", "logical_not", "matmul", "linear", "sum", "mean", "var", "std", "amax",
    "amin", "max", "min", "logsumexp", "cumsum", "argmax", "argmin", "all", "any", "reshape",
    "flatten", "unsqueeze", "squeeze", "permute", "transpose", "expand", "broadcast_to", "flip",
    "clone", "cat", "concat", "stack", "split", "chunk", "gather", "masked_fill", "softmax",
    "log_softmax", "t",
]

clip = clamp


# ---------------------------------------------------------------- in-place updates

def _check_inplace(name: str, t: Tensor, other=None) -> None:
    if _mode.enabled and (t.requires_grad or (isinstance(other, Tensor) and other.requires_grad)):
        who = "a leaf tensor that requires grad" if t.is_leaf else "a tensor in the graph"
        raise RuntimeError(
            f"{name}: in-place operation on {who} (or with an operand that requires grad) "
            "is not recorded by autograd; wrap it in `with engine.no_grad():` or use the "
            "out-of-place form")


def _raw(other):
    return other.data if isinstance(other, Tensor) else other


def _bump(t: Tensor) -> Tensor:
    t._version[0] += 1
    return t


def add_(self: Tensor, other, alpha=1) -> Tensor:
    """``self += alpha * other`` in place."""
    _check_inplace("add_", self, other)
    o = _raw(other)
    self.data += o if alpha == 1 else o * alpha
    return _bump(self)


def sub_(self: Tensor, other, alpha=1) -> Tensor:
    """``self -= alpha * other`` in place."""
    _check_inplace("sub_", self, other)
    o = _raw(other)
    self.data -= o if alpha == 1 else o * alpha
    return _bump(self)


def mul_(self: Tensor, other) -> Tensor:
    """``self *= other`` in place."""
    _check_inplace("mul_", self, other)
    self.data *= _raw(other)
    return _bump(self)


def div_(self: Tensor, other) -> Tensor:
    """``self /= other`` in place."""
    _check_inplace("div_", self, other)
    self.data /= _raw(other)
    return _bump(self)


def zero_(self: Tensor) -> Tensor:
    """Set every element to zero in place."""
    _check_inplace("zero_", self)
    self.data[...] = 0
    return _bump(self)


def fill_(self: Tensor, value) -> Tensor:
    """Set every element to `value` in place."""
    _check_inplace("fill_", self, value)
    self.data[...] = _raw(value)
    return _bump(self)


def copy_(self: Tensor, src) -> Tensor:
    """Copy `src` (broadcast to self's shape, cast to self's dtype) into self in place."""
    _check_inplace("copy_", self, src)
    s = _raw(src)
    xp = get_array_module(self.data)
    if get_array_module(s) is not xp:  # pragma: no cover - GPU only
        s = _move(get_array_module(s), s, self.device, None)
    self.data[...] = s
    return _bump(self)


def clamp_(self: Tensor, min=None, max=None) -> Tensor:  # noqa: A002
    """Clamp in place."""
    _check_inplace("clamp_", self)
    get_array_module(self.data).clip(self.data, min, max, out=self.data)
    return _bump(self)


def setitem(self: Tensor, key, value) -> None:
    """``self[key] = value`` in place (outside the graph)."""
    from engine.ops.shape import _index_key

    _check_inplace("__setitem__", self, value)
    self.data[_index_key(key)] = _raw(value)
    _bump(self)


# ---------------------------------------------------------------- dtype and device

def to(self: Tensor, *args, dtype=None, device=None, copy: bool = False) -> Tensor:
    """``x.to(dtype)``, ``x.to(device)`` or ``x.to(device, dtype)``; differentiable."""
    for a in args:
        if isinstance(a, (str, Device)):
            device = a
        elif isinstance(a, Tensor):
            dtype, device = a.dtype, a.device
        else:
            dtype = a
    out = self
    if device is not None and Device(device) != self.device:
        out = apply(_to_device, out, device=Device(device), src=self.device)
    if dtype is not None:
        out = to_dtype(out, dtype)
    if copy and out is self:
        out = clone(self)
    return out


def _move(xp, x, device, src):
    """Copy array `x` (owned by `xp`) to `device`; `src` is where it came from."""
    return device.xp.asarray(x) if device.type == "cuda" else xp.asnumpy(x)  # pragma: no cover


_to_device = Op("to_device", _move,
                (lambda xp, g, ans, x, device, src: _move(xp, g, src, device),), save=False)


# ---------------------------------------------------------------- binding to Tensor

def _bind() -> None:
    methods = {
        "__add__": add, "__radd__": radd, "__sub__": sub, "__rsub__": rsub, "__mul__": mul,
        "__rmul__": rmul, "__truediv__": div, "__rtruediv__": rdiv, "__pow__": pow,
        "__rpow__": rpow, "__matmul__": matmul, "__rmatmul__": rmatmul, "__neg__": neg,
        "__pos__": lambda x: x, "__abs__": abs, "__eq__": eq, "__ne__": ne, "__lt__": lt,
        "__le__": le, "__gt__": gt, "__ge__": ge, "__and__": logical_and,
        "__or__": logical_or, "__xor__": logical_xor, "__invert__": logical_not,
        "__getitem__": getitem, "__setitem__": setitem,
        "add": add, "sub": sub, "mul": mul, "div": div, "pow": pow, "neg": neg, "matmul": matmul,
        "exp": exp, "log": log, "log1p": log1p, "sqrt": sqrt, "rsqrt": rsqrt, "square": square,
        "abs": abs, "sin": sin, "cos": cos, "tanh": tanh, "sigmoid": sigmoid, "relu": relu,
        "softplus": softplus, "clamp": clamp, "clip": clamp, "maximum": maximum,
        "minimum": minimum, "sign": sign, "floor": floor, "ceil": ceil, "round": round,
        "isnan": isnan, "isfinite": isfinite, "eq": eq, "ne": ne, "lt": lt, "le": le, "gt": gt,
        "ge": ge, "logical_not": logical_not, "logical_and": logical_and,
        "logical_or": logical_or, "sum": sum, "mean": mean, "var": var, "std": std,
        "amax": amax, "amin": amin, "max": max, "min": min, "logsumexp": logsumexp,
        "cumsum": cumsum, "argmax": argmax, "argmin": argmin, "all": all, "any": any,
        "reshape": reshape, "view": view, "flatten": flatten, "unsqueeze": unsqueeze,
        "squeeze": squeeze, "permute": permute, "transpose": transpose, "t": t,
        "expand": expand, "expand_as": expand_as, "broadcast_to": broadcast_to, "flip": flip,
        "clone": clone, "contiguous": contiguous, "split": split, "chunk": chunk,
        "gather": gather, "masked_fill": masked_fill, "softmax": softmax,
        "log_softmax": log_softmax, "where": lambda x, cond, other: where(cond, x, other),
        "add_": add_, "sub_": sub_, "mul_": mul_, "div_": div_, "zero_": zero_, "fill_": fill_,
        "copy_": copy_, "clamp_": clamp_, "to": to,
        "float": lambda x: to_dtype(x, "float32"), "double": lambda x: to_dtype(x, "float64"),
        "half": lambda x: to_dtype(x, "float16"), "long": lambda x: to_dtype(x, "int64"),
        "int": lambda x: to_dtype(x, "int32"), "bool": lambda x: to_dtype(x, "bool"),
        "cpu": lambda x: to(x, "cpu"), "cuda": lambda x, device=None: to(x, device or "cuda"),
        "type_as": lambda x, other: to_dtype(x, other.dtype),
        "new_zeros": lambda x, *size: _new(x, "zeros", size),
        "new_ones": lambda x, *size: _new(x, "ones", size),
    }
    for name, fn in methods.items():
        setattr(Tensor, name, fn)
    Tensor.T = property(lambda x: permute(x, tuple(reversed(range(x.ndim)))))
    Tensor.mT = property(lambda x: transpose(x, -2, -1))


def _new(x: Tensor, kind: str, size) -> Tensor:
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    return Tensor(getattr(get_array_module(x.data), kind)(size, dtype=x.dtype))


_bind()
