"""Elementwise primitives: arithmetic, unary math, activations, comparisons.

One line per gradient rule; the rules return broadcast-shaped gradients and the engine sums them
back to each input's shape. ``g`` is the output's gradient, ``ans`` the output.
"""

from __future__ import annotations

import numbers

import numpy

from dptrain.engine.backend import (
    cpu_kernels,
    device_generator,
    get_array_module,
    get_device,
    special,
)
from dptrain.engine.dtypes import default_float
from dptrain.engine.ops.convert import _to
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.inplace import add_, clamp_, div_, mul_, sub_
from dptrain.engine.ops.registry import FUNCTION, FUNCTIONAL, METHOD, export
from dptrain.engine.tensor import Tensor, is_grad_enabled

# ---------------------------------------------------------------- arithmetic

_add = Op("add", lambda xp, x, y: x + y, (
    lambda xp, g, ans, x, y: g,
    lambda xp, g, ans, x, y: g,
), save=False)
_sub = Op("sub", lambda xp, x, y: x - y, (
    lambda xp, g, ans, x, y: g,
    lambda xp, g, ans, x, y: -g,
), save=False)
_mul = Op("mul", lambda xp, x, y: x * y, (
    lambda xp, g, ans, x, y: g * y,
    lambda xp, g, ans, x, y: g * x,
))
_div = Op("div", lambda xp, x, y: x / y, (
    lambda xp, g, ans, x, y: g / y,
    lambda xp, g, ans, x, y: -g * ans / y,
), save_ans=True)
def _power(xp, x, y):
    """``x ** y``, with the common constant exponents done by multiplication: numpy's general
    power is ~100x slower than a multiply on float32 arrays."""
    if type(y) in (int, float):
        if y == 2:
            return x * x
        if y == 3:
            return x * x * x
        if y == 1:
            return x.copy()
        if x.dtype.kind == "f":
            if y == 0.5:
                return xp.sqrt(x)
            if y == -1:
                return 1 / x
            if y == -0.5:
                return 1 / xp.sqrt(x)
    return x ** y


_pow = Op("pow", _power, (
    lambda xp, g, ans, x, y: g * (y * _power(xp, x, y - 1)),
    lambda xp, g, ans, x, y: g * ans * xp.log(xp.where(x > 0, x, 1)),
), save_ans=True)
_maximum = Op("maximum", lambda xp, x, y: xp.maximum(x, y), (
    lambda xp, g, ans, x, y: g * ((x > y) + 0.5 * (x == y)),
    lambda xp, g, ans, x, y: g * ((y > x) + 0.5 * (x == y)),
))
_minimum = Op("minimum", lambda xp, x, y: xp.minimum(x, y), (
    lambda xp, g, ans, x, y: g * ((x < y) + 0.5 * (x == y)),
    lambda xp, g, ans, x, y: g * ((y < x) + 0.5 * (x == y)),
))
_where = Op("where", lambda xp, c, x, y: xp.where(c, x, y), (
    None,
    lambda xp, g, ans, c, x, y: xp.where(c, g, 0),
    lambda xp, g, ans, c, x, y: xp.where(c, 0, g),
), save=(0,))

# ---------------------------------------------------------------- unary math

_neg = Op("neg", lambda xp, x: -x, (lambda xp, g, ans, x: -g,), save=False)
_exp = Op("exp", lambda xp, x: xp.exp(x), (lambda xp, g, ans, x: g * ans,),
         save=False, save_ans=True)
_log = Op("log", lambda xp, x: xp.log(x), (lambda xp, g, ans, x: g / x,))
_log1p = Op("log1p", lambda xp, x: xp.log1p(x), (lambda xp, g, ans, x: g / (1 + x),))
_sqrt = Op("sqrt", lambda xp, x: xp.sqrt(x), (lambda xp, g, ans, x: g / (2 * ans),),
          save=False, save_ans=True)
_rsqrt = Op("rsqrt", lambda xp, x: 1 / xp.sqrt(x), (lambda xp, g, ans, x: -0.5 * g * ans ** 3,),
           save=False, save_ans=True)
_square = Op("square", lambda xp, x: x * x, (lambda xp, g, ans, x: 2 * g * x,))
_abs = Op("abs", lambda xp, x: xp.abs(x), (lambda xp, g, ans, x: g * xp.sign(x),))  # noqa: A001
_sin = Op("sin", lambda xp, x: xp.sin(x), (lambda xp, g, ans, x: g * xp.cos(x),))
_cos = Op("cos", lambda xp, x: xp.cos(x), (lambda xp, g, ans, x: -g * xp.sin(x),))
_tanh = Op("tanh", lambda xp, x: xp.tanh(x), (lambda xp, g, ans, x: g * (1 - ans * ans),),
          save=False, save_ans=True)
_sigmoid = Op("sigmoid", lambda xp, x: special(xp).expit(x),
             (lambda xp, g, ans, x: g * ans * (1 - ans),), save=False, save_ans=True)
_ZERO_ROW = 1 << 14  # elements of the zero row `_relu_forward` broadcasts
_zero_rows: dict = {}


def _relu_forward(xp, x):
    """``max(x, 0)``. numpy runs a maximum against a scalar in a scalar loop, about 3x the
    time of its vector loop over two arrays (measured 0.5 against 0.17 ns per float32): so a
    contiguous x is compared row by row with a cached row of zeros broadcast over the rows
    (a 64 KiB row stays in cache), the tail that fills no row against the scalar."""
    n = x.size
    kernels = cpu_kernels(x)
    if kernels is not None:
        out = numpy.empty_like(x)
        kernels.relu(x.reshape(-1), out.reshape(-1))
        return out
    if xp is not numpy or n < _ZERO_ROW or not x.flags.c_contiguous:
        return xp.maximum(x, 0)
    zeros = _zero_rows.get(x.dtype)
    if zeros is None:
        zeros = _zero_rows[x.dtype] = numpy.zeros(_ZERO_ROW, dtype=x.dtype)
        zeros.flags.writeable = False
    out = xp.empty_like(x)
    flat, of = x.reshape(-1), out.reshape(-1)
    body = n - n % _ZERO_ROW
    xp.maximum(flat[:body].reshape(-1, _ZERO_ROW), zeros, out=of[:body].reshape(-1, _ZERO_ROW))
    xp.maximum(flat[body:], 0, out=of[body:])
    return out


def _relu_vjp(xp, g, ans, x, out=None):
    """``g * (ans > 0)``, into `out` (g itself, when backward owns it): no new array; on the
    CPU one compiled pass without the boolean array between."""
    kernels = cpu_kernels(g, ans, *(() if out is None else (out,)))
    if kernels is not None and g.shape == ans.shape:
        out = numpy.empty_like(g) if out is None else out
        kernels.relu_grad(g.reshape(-1), ans.reshape(-1), out.reshape(-1))
        return out
    return xp.multiply(g, ans > 0, out=out)


_relu = Op("relu", _relu_forward, (_relu_vjp,), save=False, save_ans=True, reuse_g=True)
_softplus = Op("softplus", lambda xp, x: xp.logaddexp(x, 0),
              (lambda xp, g, ans, x: g * special(xp).expit(x),))
_clamp = Op("clamp", lambda xp, x, lo, hi: xp.clip(x, lo, hi), (
    lambda xp, g, ans, x, lo, hi: g * ((lo is None or x >= lo) & (hi is None or x <= hi)),
    None,
    None,
))
_INV_SQRT_2 = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2PI = 0.3989422804014327
# The Gaussian CDF as a logistic, Phi(x) = 1 / (1 + exp(x r(x^2))), with r a polynomial fitted
# (weighted minimax, in float64) to log(Phi(-x) / Phi(x)) / x on |x| <= 5.5. In float32,
# x Phi(x) comes within 3.1 ulp of max(|gelu(x)|, 1) for all x, as erf's rational did, in 18
# passes over the data (one an exp) where that took 28. r < 0 for every x^2 >= 0, so past the
# fitted range exp overflows to inf (gelu -> -0) or underflows to 0 (gelu -> x): no clip.
_PHI_R = (-3.611126009e-09, 2.668884977e-07, -7.938155443e-06, 1.104798933e-04,
          6.626129965e-05, -7.266856873e-02, -1.595768432)  # highest power first


_NO_SLOPE = numpy.empty(0, dtype=numpy.float32)  # the kernel's `slope` when none is wanted
_GELU_BLOCK = 65536  # elements: the passes of one block run in cache


def _gelu_exact_float32(xp, x, slope):
    """``x Phi(x)`` for a float32 numpy array, block by block so that all the passes stay in
    cache (no full-size temporaries); with `slope`, also ``Phi(x) + x pdf(x)`` written there
    while Phi is at hand."""
    flat, sf = x.reshape(-1), None if slope is None else slope.reshape(-1)
    out = xp.empty_like(flat)
    sq = xp.empty(min(_GELU_BLOCK, flat.size), dtype=x.dtype)
    for i, j in _blocks(xp, flat.size):
        xb, ob, aa = flat[i:j], out[i:j], sq[:j - i]
        xp.multiply(xb, xb, out=aa)
        xp.multiply(aa, _PHI_R[0], out=ob)  # Horner's rule, its first step without a fill
        ob += _PHI_R[1]
        for c in _PHI_R[2:]:
            ob *= aa
            ob += c
        ob *= xb
        xp.exp(ob, out=ob)
        ob += 1
        xp.reciprocal(ob, out=ob)  # Phi(x); x / ob would round differently from the slope's
        if sf is not None:
            sb = sf[i:j]
            xp.multiply(aa, -0.5, out=sb)
            xp.exp(sb, out=sb)
            sb *= xb
            sb *= _INV_SQRT_2PI
            sb += ob
        ob *= xb
    return out.reshape(x.shape)


def _gelu_inner(xp, x):
    """tanh(sqrt(2/pi) * (x + 0.044715 x^3)), in one buffer."""
    t = x * x
    t *= 0.044715
    t += 1
    t *= x
    t *= _SQRT_2_OVER_PI
    return xp.tanh(t, out=t)


def _gelu_forward(xp, x, slope, approximate):
    """``x c(x)``, c the Gaussian CDF or its tanh approximation; with `slope` (an array of x's
    shape, given when a gradient will be needed), also gelu'(x) = ``c + x c'(x)`` written
    there: backward is then one multiply, and x need not be kept. Overflows to inf are by
    design, and at x = -inf (value) or +-inf (slope) the result is NaN, as in PyTorch,
    without a warning."""
    with numpy.errstate(over="ignore", invalid="ignore"):
        return _gelu_values(xp, x, slope, approximate)


def _gelu_values(xp, x, slope, approximate):
    if x.ndim == 0:  # numpy turns 0-d results into scalars, which the in-place steps need not
        return _gelu_values(xp, x.reshape(1), None if slope is None else slope.reshape(1),
                            approximate).reshape(())
    if approximate == "none" and x.dtype == "float32" and xp.__name__ == "numpy":
        kernels = cpu_kernels(x, *(() if slope is None else (slope,)))
        if kernels is not None:
            out = numpy.empty(x.shape, dtype=x.dtype)
            kernels.gelu_f32(x.reshape(-1), out.reshape(-1),
                             _NO_SLOPE if slope is None else slope.reshape(-1), _PHI_R)
            return out
        return _gelu_exact_float32(xp, x, slope)
    if approximate == "tanh":
        t = _gelu_inner(xp, x)
        if slope is not None:  # x c'(x) = (1 - t^2) / 2 * s (x + 3 * 0.044715 x^3)
            slope[...] = (1 - t * t) * (x * (1 + 3 * 0.044715 * x * x)) * (_SQRT_2_OVER_PI / 2)
        c = t
    else:
        c = special(xp).erf(x * _INV_SQRT_2)
        if slope is not None:  # x c'(x) = x pdf(x)
            slope[...] = x * xp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    c += 1
    c *= 0.5
    if slope is not None:
        slope += c
    return x * c


def _blocks(xp, size: int):
    """``(start, stop)`` ranges of `_GELU_BLOCK` elements on the CPU, so that a sequence of
    passes runs in cache; one range on a GPU, where one large kernel is best."""
    step = _GELU_BLOCK if xp.__name__ == "numpy" else max(size, 1)
    return [(i, min(size, i + step)) for i in range(0, size, step)]


def _gelu_vjp(xp, g, ans, x, slope, approximate, out=None):
    """``g * gelu'(x)``, the slope the forward wrote; into `out` (g itself, when backward owns
    it) where the dtype allows, so backward adds no activation-sized array."""
    if out is not None and out.dtype != xp.result_type(g, slope):
        out = None
    return xp.multiply(g, slope, out=out)


# The forward's second input is the slope buffer it fills (None without a gradient): the
# node keeps that one array, where PyTorch's GELU keeps x.
_gelu = Op("gelu", _gelu_forward, (_gelu_vjp, None), save=(1,), reuse_g=True)
_silu = Op("silu", lambda xp, x: x * special(xp).expit(x), (
    lambda xp, g, ans, x: g * (s := special(xp).expit(x)) * (1 + x * (1 - s)),
))


# ---------------------------------------------------------------- non-differentiable

def _nograd(name, fn):
    return Op(name, fn, (None, None), save=False)


_eq = _nograd("eq", lambda xp, x, y: x == y)
_ne = _nograd("ne", lambda xp, x, y: x != y)
_lt = _nograd("lt", lambda xp, x, y: x < y)
_le = _nograd("le", lambda xp, x, y: x <= y)
_gt = _nograd("gt", lambda xp, x, y: x > y)
_ge = _nograd("ge", lambda xp, x, y: x >= y)
_and = _nograd("logical_and", lambda xp, x, y: x & y)
_or = _nograd("logical_or", lambda xp, x, y: x | y)
_xor = _nograd("logical_xor", lambda xp, x, y: x ^ y)
_not = Op("logical_not", lambda xp, x: ~x, (None,), save=False)
_sign = Op("sign", lambda xp, x: xp.sign(x), (None,), save=False)
_floor = Op("floor", lambda xp, x: xp.floor(x), (None,), save=False)
_ceil = Op("ceil", lambda xp, x: xp.ceil(x), (None,), save=False)
_round = Op("round", lambda xp, x: xp.round(x), (None,), save=False)  # noqa: A001
_isnan = Op("isnan", lambda xp, x: xp.isnan(x), (None,), save=False)
_isfinite = Op("isfinite", lambda xp, x: xp.isfinite(x), (None,), save=False)


# ---------------------------------------------------------------- Python-facing wrappers

def _unary(op):
    def fn(x: Tensor) -> Tensor:
        return apply(op, x)

    fn.__name__ = fn.__qualname__ = op.name
    fn.__doc__ = f"Elementwise {op.name}."
    return fn


neg = export(FUNCTION, METHOD, operators=("__neg__",))(_unary(_neg))
exp = export(FUNCTION, METHOD)(_unary(_exp))
log = export(FUNCTION, METHOD)(_unary(_log))
log1p = export(FUNCTION, METHOD)(_unary(_log1p))
sqrt = export(FUNCTION, METHOD)(_unary(_sqrt))
rsqrt = export(FUNCTION, METHOD)(_unary(_rsqrt))
square = export(FUNCTION, METHOD)(_unary(_square))
abs = export(FUNCTION, METHOD, operators=("__abs__",))(_unary(_abs))  # noqa: A001
sin = export(FUNCTION, METHOD)(_unary(_sin))
cos = export(FUNCTION, METHOD)(_unary(_cos))
tanh = export(FUNCTION, METHOD, FUNCTIONAL)(_unary(_tanh))
sigmoid = export(FUNCTION, METHOD, FUNCTIONAL)(_unary(_sigmoid))
relu = export(FUNCTION, METHOD, FUNCTIONAL)(_unary(_relu))
softplus = export(FUNCTION, METHOD, FUNCTIONAL)(_unary(_softplus))
sign = export(FUNCTION, METHOD)(_unary(_sign))
floor = export(FUNCTION, METHOD)(_unary(_floor))
ceil = export(FUNCTION, METHOD)(_unary(_ceil))
round = export(FUNCTION, METHOD)(_unary(_round))  # noqa: A001
isnan = export(FUNCTION, METHOD)(_unary(_isnan))
isfinite = export(FUNCTION, METHOD)(_unary(_isfinite))
logical_not = export(FUNCTION, METHOD, operators=("__invert__",))(_unary(_not))


@export(operators=("__pos__",))
def positive(x: Tensor) -> Tensor:
    """``+x``: the tensor itself."""
    return x


def _coerce(t: Tensor, other):
    """``(t, other)`` ready for a binary op with the tensor `t`: a Python float meeting an
    integer tensor makes the tensor float32, as in PyTorch (numpy would give float64); a list
    or array becomes a tensor."""
    if isinstance(other, Tensor):
        return t, other
    if isinstance(other, numbers.Number):
        if isinstance(other, float) and t.data.dtype.kind in "iub":
            t = apply(_to, t, dtype=default_float)
        return t, other
    from dptrain.engine.factories import tensor

    return t, tensor(other)


def _rbinary(op):
    def fn(x, y):  # y (op) x, where y is not a Tensor
        x, y = _coerce(x, y)
        return apply(op, y, x)

    fn.__name__ = "r" + op.name
    return fn


def _binary(op):
    reflected = _rbinary(op)

    def fn(x, y):
        if not isinstance(x, Tensor):
            return reflected(y, x)
        x, y = _coerce(x, y)
        return apply(op, x, y)

    fn.__name__ = op.name
    return fn


add = export(FUNCTION, METHOD, operators=("__add__",), inplace=add_)(_binary(_add))
radd = export(operators=("__radd__",))(_rbinary(_add))
sub = export(FUNCTION, METHOD, operators=("__sub__",), inplace=sub_)(_binary(_sub))
rsub = export(operators=("__rsub__",))(_rbinary(_sub))
mul = export(FUNCTION, METHOD, operators=("__mul__",), inplace=mul_)(_binary(_mul))
rmul = export(operators=("__rmul__",))(_rbinary(_mul))
pow = export(FUNCTION, METHOD, operators=("__pow__",))(_binary(_pow))  # noqa: A001
rpow = export(operators=("__rpow__",))(_rbinary(_pow))
maximum = export(FUNCTION, METHOD)(_binary(_maximum))
minimum = export(FUNCTION, METHOD)(_binary(_minimum))
eq = export(FUNCTION, METHOD, operators=("__eq__",))(_binary(_eq))
ne = export(FUNCTION, METHOD, operators=("__ne__",))(_binary(_ne))
lt = export(FUNCTION, METHOD, operators=("__lt__",))(_binary(_lt))
le = export(FUNCTION, METHOD, operators=("__le__",))(_binary(_le))
gt = export(FUNCTION, METHOD, operators=("__gt__",))(_binary(_gt))
ge = export(FUNCTION, METHOD, operators=("__ge__",))(_binary(_ge))
logical_and = export(FUNCTION, METHOD, operators=("__and__",))(_binary(_and))
logical_or = export(FUNCTION, METHOD, operators=("__or__",))(_binary(_or))
logical_xor = export(FUNCTION, operators=("__xor__",))(_binary(_xor))


_true_div, _rtrue_div = _binary(_div), _rbinary(_div)


@export(FUNCTION, METHOD, operators=("__truediv__",), inplace=div_)
def div(x, y) -> Tensor:
    """True division; integer operands give float32, as in PyTorch."""
    if not isinstance(x, Tensor):
        return rdiv(y, x)
    if x.data.dtype.kind in "iub" and (
            not isinstance(y, Tensor) or y.data.dtype.kind in "iub"):
        x = apply(_to, x, dtype=default_float)
    return _true_div(x, y)


@export(operators=("__rtruediv__",))
def rdiv(x, y) -> Tensor:
    """``y / x`` where y is not a Tensor."""
    if x.data.dtype.kind in "iub":
        x = apply(_to, x, dtype=default_float)
    return _rtrue_div(x, y)


@export(FUNCTION)
def where(condition: Tensor, input, other) -> Tensor:
    """``input`` where `condition` holds, else ``other`` (either may be a Python scalar)."""
    cond = condition.data if isinstance(condition, Tensor) else condition
    if isinstance(input, Tensor) != isinstance(other, Tensor):
        t, s = _coerce(*((input, other) if isinstance(input, Tensor) else (other, input)))
        input, other = (t, s) if isinstance(input, Tensor) else (s, t)
    return apply(_where, cond, input, other)


@export(METHOD, name="where")
def _where_method(x: Tensor, cond, other) -> Tensor:
    """``x.where(cond, other)``: `x` where `cond` holds, else `other`."""
    return where(cond, x, other)


@export(FUNCTION, METHOD, inplace=clamp_)
def clamp(x: Tensor, min=None, max=None) -> Tensor:  # noqa: A002
    """Limit values to [min, max]; the gradient flows where the value was not clipped."""
    if min is None and max is None:
        raise ValueError("clamp: at least one of min and max must be given")
    lo = min.data if isinstance(min, Tensor) else min
    hi = max.data if isinstance(max, Tensor) else max
    return apply(_clamp, x, lo, hi)


clip = export(FUNCTION, METHOD, name="clip")(clamp)


def _check_gelu_approximate(approximate: str) -> None:
    """GELU's `approximate` argument (of `gelu` and `linalg.gelu_linear`): one of two names."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


@export(FUNCTION, FUNCTIONAL)
def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """Gaussian error linear unit; ``approximate='tanh'`` for the tanh approximation."""
    _check_gelu_approximate(approximate)
    slope = None
    if is_grad_enabled() and x.requires_grad:
        slope = get_array_module(x.data).empty(x.shape, dtype=x.dtype)
    return apply(_gelu, x, slope, approximate=approximate)


@export(FUNCTION, FUNCTIONAL)
def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x)."""
    return apply(_silu, x)


# ---------------------------------------------------------------- dropout
# Composed of a random mask and a multiply, so it needs no rule; it lives with the ops (not in
# engine.functional) because attention, an op, applies it to its weights.

@export(FUNCTIONAL)
def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability `p` and scale the rest by 1/(1-p), in training."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input * 0.0
    xp = get_array_module(input.data)
    draws = device_generator(get_device(input.data)).random(input.shape, dtype=numpy.float32)
    keep = draws >= p
    mask = xp.asarray(keep, dtype=input.dtype) * (1.0 / (1.0 - p))
    return input * Tensor(mask.astype(input.dtype, copy=False))
