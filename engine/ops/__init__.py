"""All primitives, the torch-style free functions, and the Tensor methods built from them.

The primitives live by family in `elementwise`, `reduce`, `shape`, `linalg` and `activation`;
each is defined once (`core.Op`); `inplace` holds the updates optimizers use (`add_`, `mul_`,
...), which record no graph, and `convert` the dtype and device conversions. This module binds
them to `Tensor` as operators and methods.
"""

from __future__ import annotations

from engine.ops.activation import log_softmax, softmax
from engine.ops.convert import _new, to, to_dtype
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
    where,
)
from engine.ops.inplace import (
    add_,
    clamp_,
    copy_,
    div_,
    fill_,
    mul_,
    setitem,
    sub_,
    zero_,
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
from engine.tensor import Tensor

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


_bind()
