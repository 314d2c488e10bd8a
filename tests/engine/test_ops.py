"""Every differentiable primitive of `engine.ops`, in float64: the forward against a numpy
expression written here, the backward against central finite differences (`engine.gradcheck`),
over broadcast shapes, keepdim, negative dims, 0-d tensors and size-1 dims. Then the
non-differentiable ops (values and dtypes) and the errors bad input must raise.
"""

from __future__ import annotations

import numpy as np
import pytest

from dptrain import engine

F64 = engine.float64

# Pairs that broadcast, each side bigger in turn; 0-d tensors and size-1 dims included.
BROADCAST_PAIRS = [
    ((), ()), ((3,), ()), ((), (2, 3)), ((2, 3), (3,)), ((3,), (2, 3)), ((2, 1), (1, 3)),
    ((1, 3), (2, 1, 1)), ((2, 1, 4), (3, 1)), ((1,), (2, 3)), ((2, 3), (2, 3)),
]
UNARY_SHAPES = [(), (1,), (5,), (2, 3), (2, 1, 3)]


def t(array, dtype=None, like: engine.Tensor | None = None) -> engine.Tensor:
    """A constant tensor (no grad) from numpy data, on the device of `like` if given."""
    device = None if like is None else like.device
    return engine.tensor(np.asarray(array), dtype=dtype, device=device)


# ---------------------------------------------------------------- arithmetic

BINARY = [
    pytest.param(lambda x, y: x + y, np.add, {}, id="add"),
    pytest.param(lambda x, y: x - y, np.subtract, {}, id="sub"),
    pytest.param(lambda x, y: x * y, np.multiply, {}, id="mul"),
    pytest.param(lambda x, y: x / y, np.divide, {"positive": True}, id="div"),
    pytest.param(lambda x, y: x ** y, np.power, {"positive": True}, id="pow"),
    pytest.param(engine.maximum, np.maximum, {}, id="maximum"),
    pytest.param(engine.minimum, np.minimum, {}, id="minimum"),
    pytest.param(lambda x, y: x.add(y) + engine.sub(x, y) * x.mul(y),
                 lambda a, b: (a + b) + (a - b) * (a * b), {}, id="methods"),
    pytest.param(lambda x, y: engine.div(x, y) + x.pow(y), lambda a, b: a / b + a ** b,
                 {"positive": True}, id="div_pow_functions"),
]


@pytest.mark.parametrize("shapes", BROADCAST_PAIRS, ids=str)
@pytest.mark.parametrize("fn, ref, domain", BINARY)
def test_binary_broadcast(check, fn, ref, domain, shapes):
    check(fn, ref, *shapes, **domain)


SCALAR_CASES = [
    pytest.param(lambda x: x + 2.5, lambda a: a + 2.5, {}, id="x+s"),
    pytest.param(lambda x: 2.5 + x, lambda a: 2.5 + a, {}, id="s+x"),
    pytest.param(lambda x: x - 1.5, lambda a: a - 1.5, {}, id="x-s"),
    pytest.param(lambda x: 1.5 - x, lambda a: 1.5 - a, {}, id="s-x"),
    pytest.param(lambda x: x * 3, lambda a: a * 3, {}, id="x*s"),
    pytest.param(lambda x: -0.5 * x, lambda a: -0.5 * a, {}, id="s*x"),
    pytest.param(lambda x: x / 4.0, lambda a: a / 4.0, {}, id="x/s"),
    pytest.param(lambda x: 2 / x, lambda a: 2 / a, {"positive": True}, id="s/x"),
    pytest.param(lambda x: x ** 3, lambda a: a ** 3, {}, id="x**3"),
    pytest.param(lambda x: x ** 2, lambda a: a * a, {}, id="x**2"),
    pytest.param(lambda x: x ** 0.5, np.sqrt, {"positive": True}, id="x**0.5"),
    pytest.param(lambda x: x ** -1.5, lambda a: a ** -1.5, {"positive": True}, id="x**-1.5"),
    pytest.param(lambda x: 2 ** x, lambda a: np.exp(a * np.log(2)), {}, id="2**x"),
    pytest.param(lambda x: 0.5 ** x, lambda a: 0.5 ** a, {}, id="0.5**x"),
    pytest.param(lambda x: engine.maximum(x, 0.3), lambda a: np.where(a > 0.3, a, 0.3), {},
                 id="maximum_s"),
    pytest.param(lambda x: x.minimum(-0.2), lambda a: np.where(a < -0.2, a, -0.2), {},
                 id="minimum_s"),
    pytest.param(lambda x: -x, np.negative, {}, id="neg"),
    pytest.param(lambda x: engine.neg(+x), np.negative, {}, id="engine.neg"),
]


@pytest.mark.parametrize("shape", [(), (1,), (2, 3)], ids=str)
@pytest.mark.parametrize("fn, ref, domain", SCALAR_CASES)
def test_scalar_operand(check, fn, ref, domain, shape):
    check(fn, ref, shape, **domain)


def test_maximum_minimum_ties_split_the_gradient(leaf):
    x, y = leaf([1.0, 2.0, 3.0]), leaf([1.0, 3.0, 1.0])
    engine.maximum(x, y).sum().backward()
    assert x.grad.tolist() == [0.5, 0.0, 1.0]
    assert y.grad.tolist() == [0.5, 1.0, 0.0]
    x, y = leaf([1.0, 2.0, 3.0]), leaf([1.0, 3.0, 1.0])
    engine.minimum(x, y).sum().backward()
    assert x.grad.tolist() == [0.5, 1.0, 0.0]
    assert y.grad.tolist() == [0.5, 0.0, 1.0]


# ---------------------------------------------------------------- unary math


UNARY = [
    pytest.param(engine.exp, np.exp, {}, id="exp"),
    pytest.param(lambda x: x.log(), np.log, {"positive": True}, id="log"),
    pytest.param(engine.log1p, np.log1p, {"low": -0.5}, id="log1p"),
    pytest.param(lambda x: x.sqrt(), np.sqrt, {"positive": True}, id="sqrt"),
    pytest.param(engine.rsqrt, lambda a: 1 / np.sqrt(a), {"positive": True}, id="rsqrt"),
    pytest.param(lambda x: x.square(), lambda a: a * a, {}, id="square"),
    pytest.param(engine.abs, np.abs, {}, id="abs"),
    pytest.param(abs, np.abs, {}, id="builtin_abs"),
    pytest.param(engine.sin, np.sin, {}, id="sin"),
    pytest.param(lambda x: x.cos(), np.cos, {}, id="cos"),
    pytest.param(engine.tanh, np.tanh, {}, id="tanh"),
    pytest.param(lambda x: x.sigmoid(), lambda a: 1 / (1 + np.exp(-a)), {}, id="sigmoid"),
    pytest.param(engine.relu, lambda a: np.where(a > 0, a, 0.0), {}, id="relu"),
    pytest.param(lambda x: x.softplus(), lambda a: np.log(1 + np.exp(a)), {}, id="softplus"),
    pytest.param(lambda x: x.clamp(min=-0.5), lambda a: np.where(a < -0.5, -0.5, a), {},
                 id="clamp_min"),
    pytest.param(lambda x: x.clamp(max=0.7), lambda a: np.where(a > 0.7, 0.7, a), {},
                 id="clamp_max"),
    pytest.param(lambda x: engine.clamp(x, -0.5, 0.7),
                 lambda a: np.where(a < -0.5, -0.5, np.where(a > 0.7, 0.7, a)), {},
                 id="clamp_both"),
    pytest.param(lambda x: x.clip(-1.0, 1.0), lambda a: np.where(np.abs(a) > 1, np.sign(a), a),
                 {}, id="clip"),
]


@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=str)
@pytest.mark.parametrize("fn, ref, domain", UNARY)
def test_unary(check, fn, ref, domain, shape):
    check(fn, ref, shape, **domain)


@pytest.mark.parametrize("size", [(1 << 14) * 3, (1 << 14) * 2 + 77], ids=["rows", "rows+tail"])
def test_relu_on_large_arrays_against_a_select(size):
    """Arrays of a 16K-element row and more are compared with a broadcast row of zeros (and
    the tail past the last full row with the scalar): values as ``where(x > 0, x, 0)`` with
    NaN kept and -inf to 0; the gradient, written into the incoming one, is g where x > 0."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal(size).astype(np.float32)
    a[[0, 5, size - 1, size - 3]] = [np.nan, -np.inf, np.inf, np.nan]
    x = engine.tensor(a.reshape(3, -1) if size % 3 == 0 else a, requires_grad=True)
    y = x.relu()
    want = np.where(a > 0, a, np.float32(0))
    want[[0, size - 3]] = np.nan
    np.testing.assert_array_equal(y.numpy().reshape(-1), want)
    g = rng.standard_normal(size).astype(np.float32)
    (y * t(g.reshape(y.shape))).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy().reshape(-1), np.where(a > 0, g, 0))


def test_clamp_one_bound_forward():
    x = engine.tensor([-1.0, 0.5, 2.0])
    assert x.clamp(min=0.0).tolist() == [0.0, 0.5, 2.0]
    assert x.clamp(max=1.0).tolist() == [-1.0, 0.5, 1.0]


def test_clamp_with_tensor_bounds(check):
    lo, hi = np.array([-1.0, 0.0, 0.5]), np.array([1.0, 0.2, 1.5])
    check(lambda x: x.clamp(t(lo, like=x), t(hi, like=x)),
          lambda a: np.minimum(np.maximum(a, lo), hi), (2, 3))


def test_clamp_needs_a_bound():
    with pytest.raises(ValueError, match="clamp"):
        engine.tensor([1.0]).clamp()


# ---------------------------------------------------------------- where

COND = np.array([True, False, True])


@pytest.mark.parametrize("shapes", [((2, 3), (3,)), ((2, 1), (1, 3)), ((3,), (3,)),
                                    ((), (2, 3))], ids=str)
def test_where_tensor_branches(check, shapes):
    check(lambda x, y: engine.where(t(COND, like=x), x, y), lambda a, b: np.where(COND, a, b),
          *shapes)


def test_where_scalar_branches(check):
    check(lambda x: engine.where(t(COND, like=x), x, 0.0), lambda a: np.where(COND, a, 0.0), (2, 3))
    check(lambda y: engine.where(t(COND, like=y), -1.5, y), lambda b: np.where(COND, -1.5, b),
          (2, 3))
    check(lambda x: x.where(t(COND, like=x), 2.0), lambda a: np.where(COND, a, 2.0), (3,))


def test_where_condition_from_comparison(check):
    check(lambda x: engine.where(x > 0, x, x * 0.1), lambda a: np.where(a > 0, a, 0.1 * a),
          (2, 4))


# ---------------------------------------------------------------- matmul

MATMUL_SHAPES = [
    ((4,), (4,)), ((4,), (4, 3)), ((2, 4), (4,)), ((2, 4), (4, 3)), ((1, 4), (4, 1)),
    ((3, 2, 4), (3, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((3, 2, 4), (4, 5)),
    ((2, 4), (3, 4, 5)), ((4,), (3, 4, 2)), ((3, 2, 4), (4,)), ((1, 2, 4), (3, 4, 2)),
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul(check, shapes):
    check(lambda x, y: x @ y, np.matmul, *shapes)


def test_matmul_function_and_method(check):
    check(lambda x, y: engine.matmul(x, y) + x.matmul(y), lambda a, b: 2 * (a @ b),
          (2, 3), (3, 2))


def test_matmul_by_hand():
    a = engine.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = engine.tensor([[5.0, 6.0], [7.0, 8.0]])
    assert (a @ b).tolist() == [[19.0, 22.0], [43.0, 50.0]]
    assert (a @ engine.tensor([1.0, -1.0])).tolist() == [-1.0, -1.0]
    assert (engine.tensor([1.0, 2.0]) @ engine.tensor([3.0, 4.0])).item() == 11.0


# ---------------------------------------------------------------- reductions

REDUCTIONS = [
    pytest.param(lambda x, d, k: x.sum(d, keepdim=k),
                 lambda a, d, k: np.sum(a, axis=d, keepdims=k), id="sum"),
    pytest.param(lambda x, d, k: engine.mean(x, d, keepdim=k),
                 lambda a, d, k: np.mean(a, axis=d, keepdims=k), id="mean"),
    pytest.param(lambda x, d, k: x.var(d, correction=0, keepdim=k),
                 lambda a, d, k: np.var(a, axis=d, keepdims=k), id="var0"),
    pytest.param(lambda x, d, k: x.var(d, keepdim=k),
                 lambda a, d, k: np.var(a, axis=d, ddof=1, keepdims=k), id="var1"),
    pytest.param(lambda x, d, k: x.std(d, correction=0, keepdim=k),
                 lambda a, d, k: np.sqrt(np.var(a, axis=d, keepdims=k)), id="std0"),
    pytest.param(lambda x, d, k: engine.std(x, d, correction=1, keepdim=k),
                 lambda a, d, k: np.std(a, axis=d, ddof=1, keepdims=k), id="std1"),
    pytest.param(lambda x, d, k: x.amax(d, keepdim=k),
                 lambda a, d, k: np.max(a, axis=d, keepdims=k), id="amax"),
    pytest.param(lambda x, d, k: engine.amin(x, d, keepdim=k),
                 lambda a, d, k: np.min(a, axis=d, keepdims=k), id="amin"),
    pytest.param(lambda x, d, k: x.logsumexp(d, keepdim=k),
                 lambda a, d, k: np.log(np.sum(np.exp(a), axis=d, keepdims=k)), id="logsumexp"),
]


@pytest.mark.parametrize("keepdim", [False, True], ids=["", "keepdim"])
@pytest.mark.parametrize("dim", [None, 0, 1, -1, (0, 2), (-1, 0), (-2,), (0, 1, 2)], ids=str)
@pytest.mark.parametrize("fn, ref", REDUCTIONS)
def test_reduction(check, fn, ref, dim, keepdim):
    check(lambda x: fn(x, dim, keepdim), lambda a: ref(a, dim, keepdim), (2, 3, 4))


# 0-d inputs and size-1 dims. Reductions over one element use the population variance
# (correction=1 divides by zero there); std over one element is 0, where sqrt has no derivative
# (see test_std_of_one_element_has_zero_gradient).
EDGE_REDUCTIONS = [p for p in REDUCTIONS if p.id not in ("var1", "std1", "std0")]


@pytest.mark.parametrize("keepdim", [False, True], ids=["", "keepdim"])
@pytest.mark.parametrize("shape, dim", [((), None), ((), 0), ((), -1), ((1,), 0), ((1,), None),
                                        ((3, 1, 2), 1), ((3, 1, 2), (0, 1)), ((1, 1), -1)],
                         ids=str)
@pytest.mark.parametrize("fn, ref", EDGE_REDUCTIONS)
def test_reduction_0d_and_size_1(check, fn, ref, shape, dim, keepdim):
    axis = None if shape == () else dim  # numpy rejects axis=0 on a 0-d array; torch accepts it
    check(lambda x: fn(x, dim, keepdim), lambda a: ref(a, axis, keepdim), shape)


def test_std_on_size_1_dims(check):
    check(lambda x: x.std((0, 1), correction=0), lambda a: np.std(a, axis=(0, 1)), (3, 1, 2))
    check(lambda x: x.std(-1, keepdim=True), lambda a: np.std(a, -1, ddof=1, keepdims=True),
          (1, 1, 3))


def test_std_of_one_element_has_zero_gradient(leaf):
    x = leaf([[1.5], [2.0]])
    x.std(1, correction=0).sum().backward()
    assert x.grad.tolist() == [[0.0], [0.0]]


def test_reduction_by_hand():
    x = engine.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    assert x.sum().item() == 24.0
    assert x.sum(1).tolist() == [6.0, 18.0]
    assert x.mean(0).tolist() == [2.5, 3.5, 6.0]
    assert x.var(1).tolist() == [1.0, 7.0]
    assert x.var(1, correction=0).tolist() == pytest.approx([2 / 3, 14 / 3])
    assert x.amax(-1, keepdim=True).tolist() == [[3.0], [9.0]]
    assert x.amin().item() == 1.0


@pytest.mark.parametrize("name", ["amax", "amin"])
def test_amax_amin_ties_share_the_gradient(leaf, name):
    sign = 1.0 if name == "amax" else -1.0
    x = leaf(sign * np.array([[3.0, 1.0, 3.0], [2.0, 2.0, 2.0]]))
    getattr(x, name)(1).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0.5, 0.0, 0.5], [1 / 3] * 3])
    x = leaf(sign * np.array([[3.0, 1.0, 3.0], [2.0, 2.0, 2.0]]))
    getattr(x, name)().backward()  # over all dims: the two 3s tie
    np.testing.assert_allclose(x.grad.numpy(), [[0.5, 0.0, 0.5], [0.0] * 3])


def test_max_min_with_dim_return_values_and_indices(leaf):
    x = leaf([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]])
    values, indices = x.max(1)
    assert values.tolist() == [5.0, 7.0]
    assert indices.tolist() == [1, 0] and indices.dtype == engine.int64
    values.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    values, indices = x.min(-1, keepdim=True)
    assert values.tolist() == [[1.0], [0.0]] and indices.tolist() == [[0], [1]]
    assert x.max().item() == 7.0 and x.min().item() == 0.0


@pytest.mark.parametrize("shape, dim", [((2, 3, 4), 0), ((2, 3, 4), 1), ((2, 3, 4), -1),
                                        ((5,), 0), ((5,), -1), ((3, 1), 1)], ids=str)
def test_cumsum(check, shape, dim):
    check(lambda x: x.cumsum(dim), lambda a: np.cumsum(a, axis=dim), shape)


def test_cumsum_0d(check):
    check(lambda x: engine.cumsum(x, 0), lambda a: a, ())


# ---------------------------------------------------------------- shapes

SHAPE_CASES = [
    pytest.param((2, 3, 4), lambda x: x.reshape(6, 4), lambda a: a.reshape(6, 4), id="reshape"),
    pytest.param((2, 3, 4), lambda x: x.reshape((4, -1, 2)), lambda a: a.reshape(4, 3, 2),
                 id="reshape_-1"),
    pytest.param((2, 3, 4), lambda x: engine.reshape(x, (-1,)), lambda a: a.ravel(),
                 id="engine.reshape"),
    pytest.param((), lambda x: x.reshape(1, 1), lambda a: a.reshape(1, 1), id="reshape_0d"),
    pytest.param((1, 1), lambda x: x.reshape(()), lambda a: a.reshape(()), id="reshape_to_0d"),
    pytest.param((2, 3, 4), lambda x: x.view(4, 6), lambda a: a.reshape(4, 6), id="view"),
    pytest.param((2, 3, 4), lambda x: x.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1),
                 id="permute"),
    pytest.param((2, 3, 4), lambda x: engine.permute(x, (-1, 0, -2)),
                 lambda a: a.transpose(2, 0, 1), id="permute_negative"),
    pytest.param((2, 3, 4), lambda x: x.transpose(0, 2), lambda a: np.swapaxes(a, 0, 2),
                 id="transpose"),
    pytest.param((2, 3, 4), lambda x: engine.transpose(x, -1, -2),
                 lambda a: np.swapaxes(a, 1, 2), id="transpose_negative"),
    pytest.param((2, 3, 4), lambda x: x.mT, lambda a: np.swapaxes(a, -1, -2), id="mT"),
    pytest.param((3, 4), lambda x: x.T, lambda a: a.transpose(), id="T"),
    pytest.param((3, 4), lambda x: x.t(), lambda a: a.transpose(), id="t"),
    pytest.param((4,), lambda x: x.t(), lambda a: a, id="t_1d"),
    pytest.param((2, 3), lambda x: x.unsqueeze(0), lambda a: a[None], id="unsqueeze_0"),
    pytest.param((2, 3), lambda x: x.unsqueeze(1), lambda a: a[:, None], id="unsqueeze_1"),
    pytest.param((2, 3), lambda x: engine.unsqueeze(x, -1), lambda a: a[..., None],
                 id="unsqueeze_-1"),
    pytest.param((), lambda x: x.unsqueeze(0), lambda a: a.reshape(1), id="unsqueeze_0d"),
    pytest.param((1, 3, 1, 2), lambda x: x.squeeze(), lambda a: a.reshape(3, 2), id="squeeze"),
    pytest.param((1, 3, 1, 2), lambda x: x.squeeze(2), lambda a: a.reshape(1, 3, 2),
                 id="squeeze_dim"),
    pytest.param((1, 3, 1, 2), lambda x: x.squeeze(-4), lambda a: a.reshape(3, 1, 2),
                 id="squeeze_negative"),
    pytest.param((1, 3, 1, 2), lambda x: x.squeeze(1), lambda a: a, id="squeeze_not_size_1"),
    pytest.param((1, 3, 1, 2), lambda x: engine.squeeze(x, (0, 2)), lambda a: a.reshape(3, 2),
                 id="squeeze_tuple"),
    pytest.param((2, 3, 4), lambda x: x.flatten(), lambda a: a.reshape(24), id="flatten"),
    pytest.param((2, 3, 4), lambda x: x.flatten(1), lambda a: a.reshape(2, 12), id="flatten_1"),
    pytest.param((2, 3, 4), lambda x: engine.flatten(x, 0, -2), lambda a: a.reshape(6, 4),
                 id="flatten_0_-2"),
    pytest.param((), lambda x: x.flatten(), lambda a: a.reshape(1), id="flatten_0d"),
    pytest.param((2, 1, 3), lambda x: x.expand(4, 2, 5, 3),
                 lambda a: np.broadcast_to(a, (4, 2, 5, 3)), id="expand"),
    pytest.param((2, 1, 3), lambda x: x.expand((4, -1, 5, -1)),
                 lambda a: np.broadcast_to(a, (4, 2, 5, 3)), id="expand_-1"),
    pytest.param((), lambda x: x.expand(3, 2), lambda a: np.broadcast_to(a, (3, 2)),
                 id="expand_0d"),
    pytest.param((3, 1), lambda x: x.expand_as(engine.zeros(2, 3, 4)),
                 lambda a: np.broadcast_to(a, (2, 3, 4)), id="expand_as"),
    pytest.param((3,), lambda x: x.broadcast_to((2, 3)), lambda a: np.broadcast_to(a, (2, 3)),
                 id="broadcast_to"),
    pytest.param((2, 3, 4), lambda x: x.flip(0), lambda a: a[::-1], id="flip"),
    pytest.param((2, 3, 4), lambda x: engine.flip(x, (0, -1)), lambda a: a[::-1, :, ::-1],
                 id="flip_tuple"),
    pytest.param((2, 3), lambda x: x.clone(), lambda a: a, id="clone"),
]


@pytest.mark.parametrize("shape, fn, ref", SHAPE_CASES)
def test_shape_op(check, shape, fn, ref):
    check(fn, ref, shape)


def test_view_shares_data_and_version():
    x = engine.zeros(2, 3)
    v = x.view(6)
    with engine.no_grad():
        x.add_(1.0)
    assert v.tolist() == [1.0] * 6


# ---------------------------------------------------------------- indexing

_MASK = np.random.default_rng(7).random((4, 5)) > 0.5

INDEX_KEYS = [
    pytest.param(1, id="int"),
    pytest.param(-1, id="negative_int"),
    pytest.param((1, 2), id="ints"),
    pytest.param((-1, -2, 0), id="all_ints_0d"),
    pytest.param(slice(1, 3), id="slice"),
    pytest.param(slice(None, None, 2), id="step"),
    pytest.param(slice(None, None, -1), id="negative_step"),
    pytest.param((slice(1, 4, 2), slice(None, None, -2)), id="steps"),
    pytest.param(None, id="None"),
    pytest.param((slice(None), None, 1), id="slice_None_int"),
    pytest.param(Ellipsis, id="Ellipsis"),
    pytest.param((Ellipsis, 1), id="Ellipsis_int"),
    pytest.param((Ellipsis, None), id="Ellipsis_None"),
    pytest.param((1, Ellipsis, 2), id="int_Ellipsis_int"),
    pytest.param(np.array([0, 2, 2, 0]), id="int_array_repeated"),
    pytest.param(np.array([[3, 3], [0, 3]]), id="int_array_2d"),
    pytest.param((slice(None), np.array([1, 1, 4])), id="slice_array"),
    pytest.param((np.array([0, 1, 1]), np.array([2, 2, 2])), id="array_pair"),
    pytest.param((np.array([0, 3]), slice(None), np.array([2, 0])), id="arrays_split_by_slice"),
    pytest.param(np.array([-1, 0, -1]), id="negative_array"),
    pytest.param(np.array([True, False, True, True]), id="bool_dim0"),
    pytest.param(_MASK, id="bool_mask_2d"),
    pytest.param((slice(None), np.array([False, True, True, False, True]), 0), id="bool_mixed"),
]


def _engine_key(key, like=None):
    """The same key with numpy index arrays turned into engine tensors (on `like`'s device)."""
    parts = key if isinstance(key, tuple) else (key,)
    parts = tuple(t(k, like=like) if isinstance(k, np.ndarray) else k for k in parts)
    return parts if isinstance(key, tuple) else parts[0]


@pytest.mark.parametrize("key", INDEX_KEYS)
def test_getitem(check, key):
    check(lambda x: x[_engine_key(key, x)], lambda a: a[key], (4, 5, 3))


def test_getitem_list_and_0d():
    x = engine.tensor([10.0, 20.0, 30.0])
    assert x[[2, 0, 2]].tolist() == [30.0, 10.0, 30.0]
    assert x[engine.tensor(1)].item() == 20.0
    assert engine.tensor(5.0)[None].shape == (1,)
    assert engine.tensor(5.0)[...].shape == ()


def test_getitem_repeated_indices_accumulate(leaf):
    x = leaf([1.0, 2.0, 3.0, 4.0])
    x[engine.tensor([0, 2, 2, 2, 0])].sum().backward()
    assert x.grad.tolist() == [2.0, 0.0, 3.0, 0.0]  # how often each element was picked

    x = leaf(np.zeros((3, 2)))
    w = engine.tensor([[1.0, 10.0], [100.0, 1000.0], [5.0, 7.0]], dtype=F64)
    (x[[2, 2, 0]] * w).sum().backward()
    assert x.grad.tolist() == [[5.0, 7.0], [0.0, 0.0], [101.0, 1010.0]]

    x = leaf(np.zeros((2, 3)))
    x[engine.tensor([1, 1]), engine.tensor([2, 2])].sum().backward()
    assert x.grad.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]


def test_getitem_bool_mask_gradient(leaf):
    x = leaf(np.arange(6.0).reshape(2, 3))
    mask = np.array([[True, False, True], [False, False, True]])
    out = x[engine.tensor(mask)]
    assert out.tolist() == [0.0, 2.0, 5.0]
    (out * 2).sum().backward()
    assert x.grad.tolist() == (2.0 * mask).tolist()


def test_getitem_basic_slices_then_overlap_accumulates(leaf):
    x = leaf(np.zeros(5))
    (x[1:4] + x[::2].sum() + x[-1]).sum().backward()
    # x[1:4]: once each; x[::2].sum() and x[-1] are broadcast over 3 elements.
    assert x.grad.tolist() == [3.0, 1.0, 4.0, 1.0, 6.0]


# ---------------------------------------------------------------- joining and splitting

CAT_CASES = [
    pytest.param(0, [(2, 3), (1, 3), (4, 3)], id="dim0"),
    pytest.param(-1, [(2, 1), (2, 3), (2, 2)], id="dim-1"),
    pytest.param(1, [(2, 1, 2), (2, 3, 2)], id="dim1_3d"),
    pytest.param(-2, [(1, 2), (3, 2)], id="dim-2"),
    pytest.param(0, [(3,)], id="single"),
]


@pytest.mark.parametrize("dim, shapes", CAT_CASES)
def test_cat(check, dim, shapes):
    check(lambda *xs: engine.cat(xs, dim), lambda *a: np.concatenate(a, axis=dim), *shapes)
    check(lambda *xs: engine.concat(list(xs), dim=dim), lambda *a: np.concatenate(a, dim),
          *shapes, grad=False)


@pytest.mark.parametrize("dim", [0, 1, -1, -3], ids=str)
def test_stack(check, dim):
    check(lambda *xs: engine.stack(xs, dim), lambda *a: np.stack(a, axis=dim),
          (2, 3), (2, 3), (2, 3))


def test_stack_0d(check):
    check(lambda x, y: engine.stack([x, y]), lambda a, b: np.array([a, b]), (), ())


SPLIT_CASES = [
    pytest.param(lambda x: x.split(2, dim=-1), (2, 5), [slice(0, 2), slice(2, 4), slice(4, 5)],
                 -1, id="split_size"),
    pytest.param(lambda x: engine.split(x, [1, 3, 1], 1), (2, 5),
                 [slice(0, 1), slice(1, 4), slice(4, 5)], 1, id="split_sections"),
    pytest.param(lambda x: x.chunk(3), (5, 2), [slice(0, 2), slice(2, 4), slice(4, 5)], 0,
                 id="chunk"),
    pytest.param(lambda x: engine.chunk(x, 2, -2), (4, 3), [slice(0, 2), slice(2, 4)], 0,
                 id="chunk_even"),
]


@pytest.mark.parametrize("fn, shape, pieces, dim", SPLIT_CASES)
def test_split_chunk(check, fn, shape, pieces, dim):
    assert len(fn(engine.zeros(*shape))) == len(pieces)
    for k, sl in enumerate(pieces):
        key = (slice(None),) * (dim % len(shape)) + (sl,)
        check(lambda x, k=k: fn(x)[k], lambda a, key=key: a[key], shape)


def test_split_pieces_accumulate_into_one_gradient(leaf):
    x = leaf(np.zeros(5))
    a, b, c = x.split(2)
    (a * 1.0 + b * 2.0).sum().backward()  # c unused
    assert x.grad.tolist() == [1.0, 1.0, 2.0, 2.0, 0.0]
    assert c.shape == (1,)


# ---------------------------------------------------------------- masked_fill, gather, pad

@pytest.mark.parametrize("mask", [np.array([True, False, True]),
                                  np.array([[False, True, True], [True, False, False]])],
                         ids=["broadcast", "full"])
def test_masked_fill(check, mask):
    check(lambda x: x.masked_fill(t(mask, like=x), -1.0), lambda a: np.where(mask, -1.0, a), (2, 3))
    check(lambda x: engine.masked_fill(x, t(mask, like=x), 0.25), lambda a: np.where(mask, 0.25, a),
          (2, 3))


GATHER_CASES = [
    pytest.param((3, 4), 1, [[0, 0], [3, 1], [2, 2]], id="dim1_repeats"),
    pytest.param((3, 4), 0, [[0, 1, 2, 0], [2, 2, 1, 0]], id="dim0"),
    pytest.param((3, 4), -1, [[1], [1], [3]], id="dim-1"),
    pytest.param((2, 3, 2), 1, [[[0, 1], [2, 2], [0, 0], [1, 1]], [[2, 0]] * 4], id="3d"),
]


def _gather_ref(a, dim, idx):
    """out[i][j][k] = a[i][idx[i][j][k]][k] (dim=1), written as an explicit loop."""
    out = np.empty(idx.shape)
    for pos in np.ndindex(*idx.shape):
        src = list(pos)
        src[dim] = idx[pos]
        out[pos] = a[tuple(src)]
    return out


@pytest.mark.parametrize("shape, dim, index", GATHER_CASES)
def test_gather(check, shape, dim, index):
    idx = np.array(index)
    check(lambda x: x.gather(dim, t(idx, like=x)), lambda a: _gather_ref(a, dim, idx), shape)


def test_gather_index_smaller_than_input(check):
    idx = np.array([[0, 3], [1, 1]])
    check(lambda x: x.gather(1, t(idx, like=x)), lambda a: _gather_ref(a, 1, idx), (3, 4))


def test_gather_repeated_index_accumulates(leaf):
    x = leaf(np.zeros((2, 3)))
    engine.gather(x, 1, engine.tensor([[2, 2, 2, 0], [1, 0, 1, 1]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 3.0], [1.0, 3.0, 0.0]]


PAD_CASES = [
    pytest.param((2, 3), (1, 2), 0.0, id="last_dim"),
    pytest.param((2, 3), (1, 1, 0, 2), 0.5, id="last_two_dims"),
    pytest.param((2, 1, 3), (0, 0, 2, 0), -1.0, id="middle_only"),
    pytest.param((3,), (0, 0), 0.0, id="no_padding"),
]


@pytest.mark.parametrize("shape, pad, value", PAD_CASES)
def test_pad(check, shape, pad, value):
    widths = [(0, 0)] * len(shape)
    for i in range(len(pad) // 2):
        widths[len(shape) - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    check(lambda x: engine.functional.pad(x, pad, value=value),
          lambda a: np.pad(a, widths, constant_values=value), shape)


# ---------------------------------------------------------------- dtype conversion

@pytest.mark.parametrize("convert", [lambda x: x.to(engine.float32), lambda x: x.float(),
                                     lambda x: x.to(dtype=engine.float32)], ids=["to", "float",
                                                                                 "to_kw"])
def test_to_float32_and_back_carries_gradient(leaf, convert):
    x = leaf([1.5, -2.0, 3.0])
    y = convert(x)
    assert y.dtype == engine.float32
    np.testing.assert_array_equal(y.numpy(), np.float32([1.5, -2.0, 3.0]))
    (y * engine.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.dtype == F64
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_to_float64(check):
    check(lambda x: x.to(engine.float64) * x.double(), lambda a: a * a, (2, 3))
    x = engine.tensor([1.0, 2.0], requires_grad=True)  # float32 leaf
    y = x.to(F64)
    assert y.dtype == F64
    (y * y).sum().backward()
    assert x.grad.dtype == engine.float32 and x.grad.tolist() == [2.0, 4.0]


def test_to_integer_leaves_the_graph():
    x = engine.tensor([1.7, -2.2], requires_grad=True)
    y = x.to(engine.int64)
    assert y.dtype == engine.int64 and y.tolist() == [1, -2] and not y.requires_grad
    assert x.long().dtype == engine.int64 and x.bool().dtype == engine.bool


# ---------------------------------------------------------------- non-differentiable outputs

def test_comparisons_return_bool():
    x = engine.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = engine.tensor([3.0, 2.0, 1.0])
    cases = {
        "==": (x == y, [False, True, False]), "!=": (x != y, [True, False, True]),
        "<": (x < y, [True, False, False]), "<=": (x <= y, [True, True, False]),
        ">": (x > y, [False, False, True]), ">=": (x >= y, [False, True, True]),
        "> s": (x > 2, [False, False, True]), "== s": (x == 2.0, [False, True, False]),
        "s < x": (1.5 < x, [False, True, True]), "eq": (engine.eq(x, y), [False, True, False]),
        "ge": (x.ge(2.0), [False, True, True]), "lt": (engine.lt(x, 3), [True, True, False]),
    }
    for name, (out, expected) in cases.items():
        assert out.dtype == engine.bool, name
        assert out.tolist() == expected, name
        assert not out.requires_grad, name


def test_comparisons_broadcast():
    out = engine.tensor([[1.0], [2.0]]) < engine.tensor([0.0, 1.5, 3.0])
    assert out.shape == (2, 3)
    assert out.tolist() == [[False, True, True], [False, False, True]]


def test_logical_ops():
    a, b = engine.tensor([True, True, False, False]), engine.tensor([True, False, True, False])
    assert (a & b).tolist() == [True, False, False, False]
    assert (a | b).tolist() == [True, True, True, False]
    assert (a ^ b).tolist() == [False, True, True, False]
    assert (~a).tolist() == [False, False, True, True]
    assert engine.logical_not(b).dtype == engine.bool
    assert a.any().item() is True and a.all().item() is False
    assert engine.tensor([[True, False], [True, True]]).all(1).tolist() == [False, True]


@pytest.mark.parametrize("name", ["argmax", "argmin"])
def test_argmax_argmin(name):
    a = np.array([[1.0, 9.0, 3.0], [7.0, 0.0, 8.0]])
    x = engine.tensor(a, requires_grad=True)
    fn = getattr(np, name)
    flat = getattr(x, name)()
    assert flat.dtype == engine.int64 and flat.shape == ()
    assert flat.item() == fn(a)
    for dim in (0, 1, -1):
        out = getattr(engine, name)(x, dim)
        assert out.dtype == engine.int64
        assert out.tolist() == fn(a, axis=dim).tolist()
        assert not out.requires_grad
    kept = getattr(x, name)(1, keepdim=True)
    assert kept.shape == (2, 1) and kept.tolist() == fn(a, axis=1)[:, None].tolist()


def test_sign_floor_ceil_round():
    x = engine.tensor([-2.5, -0.4, 0.0, 0.6, 3.5], dtype=F64, requires_grad=True)
    assert x.sign().tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert x.sign().dtype == F64
    assert x.floor().tolist() == [-3.0, -1.0, 0.0, 0.0, 3.0]
    assert engine.ceil(x).tolist() == [-2.0, -0.0, 0.0, 1.0, 4.0]
    assert x.round().tolist() == [-2.0, -0.0, 0.0, 1.0, 4.0]  # half to even, as torch


def test_isnan_isfinite():
    x = engine.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert x.isnan().tolist() == [False, True, False, False]
    assert engine.isfinite(x).tolist() == [True, False, False, False]
    assert x.isnan().dtype == engine.bool


def test_where_float_scalar_with_integer_tensor_is_float32():
    out = engine.where(engine.tensor([True, False]), 1.5, engine.tensor([1, 2]))
    assert out.tolist() == [1.5, 2.0]
    assert out.dtype == engine.float32


def test_integer_arithmetic_dtypes():
    i = engine.tensor([1, 2, 3])
    assert (i + 1).dtype == engine.int64 and (i + 1).tolist() == [2, 3, 4]
    assert (i * 2).dtype == engine.int64
    assert (i + 0.5).dtype == engine.float32 and (i + 0.5).tolist() == [1.5, 2.5, 3.5]
    assert (i / 2).dtype == engine.float32 and (i / 2).tolist() == [0.5, 1.0, 1.5]
    assert (2.0 * i).dtype == engine.float32


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow", "maximum"])
def test_elementwise_shape_mismatch_names_op_and_shapes(op, raises_msg):
    x, y = engine.ones(2, 3), engine.ones(4)
    with raises_msg(RuntimeError, op, "(2, 3)", "(4,)"):
        getattr(engine, op)(x, y)


def test_matmul_inner_dim_mismatch_names_op_and_shapes(raises_msg):
    with raises_msg(RuntimeError, "matmul", "(2, 3)", "(4, 2)"):
        engine.ones(2, 3) @ engine.ones(4, 2)
    with raises_msg(RuntimeError, "matmul", "(3,)", "(2,)"):
        engine.matmul(engine.ones(3), engine.ones(2))
    with raises_msg(RuntimeError, "matmul", "()"):
        engine.ones(()) @ engine.ones(2)


def test_matmul_batch_mismatch_names_op_and_shapes(raises_msg):
    with raises_msg(RuntimeError, "matmul", "(2, 3, 4)", "(5, 4, 2)"):
        engine.ones(2, 3, 4) @ engine.ones(5, 4, 2)


def test_cat_stack_shape_mismatch_names_op_and_shapes(raises_msg):
    with raises_msg(RuntimeError, "cat", "(2, 3)", "(2, 4)"):
        engine.cat([engine.ones(2, 3), engine.ones(2, 4)], 0)
    with raises_msg(RuntimeError, "cat", "(2, 3)", "(3,)"):
        engine.cat([engine.ones(2, 3), engine.ones(3)], 0)
    with raises_msg(RuntimeError, "stack", "(2, 3)", "(3, 2)"):
        engine.stack([engine.ones(2, 3), engine.ones(3, 2)])
    with raises_msg(RuntimeError, "cat"):
        engine.cat([])


def test_reshape_expand_mismatch_names_op_and_shapes(raises_msg):
    with raises_msg(RuntimeError, "reshape", "(4, 2)", "(2, 3)"):
        engine.ones(2, 3).reshape(4, 2)
    with raises_msg(RuntimeError, "reshape", "(2, 3)"):
        engine.ones(2, 3).view(-1, -1)
    with raises_msg(RuntimeError, "expand", "(2, 3)"):
        engine.ones(2, 3).expand(4, 3, 4)
    with raises_msg(RuntimeError, "expand", "(2, 3)"):
        engine.ones(2, 3).expand(3)


def test_permute_split_errors(raises_msg):
    with raises_msg(RuntimeError, "permute", "(2, 3)"):
        engine.ones(2, 3).permute(0, 0)
    with raises_msg(RuntimeError, "split", "(5,)"):
        engine.ones(5).split([2, 2])
    with pytest.raises(ValueError, match="split"):
        engine.ones(5).split(0)
    with pytest.raises(ValueError, match="chunk"):
        engine.ones(5).chunk(0)


@pytest.mark.parametrize("call", [
    lambda x: x.sum(3), lambda x: x.mean(-4), lambda x: x.amax((0, 5)),
    lambda x: x.unsqueeze(4), lambda x: x.transpose(0, 3), lambda x: x.softmax(3),
    lambda x: x.cumsum(-4), lambda x: x.flatten(0, 3), lambda x: engine.cat([x, x], 3),
], ids=["sum", "mean", "amax", "unsqueeze", "transpose", "softmax", "cumsum", "flatten", "cat"])
def test_dim_out_of_range_raises_index_error(call):
    with pytest.raises(IndexError, match="out of range"):
        call(engine.ones(2, 3, 4))


@pytest.mark.parametrize("key", [5, -4, (0, 3), (0, 0, 4), np.array([0, 3]), np.array([-4])],
                         ids=["int", "negative", "second_dim", "third_dim", "array", "neg_array"])
def test_index_out_of_range_raises_index_error(key, raises_msg):
    x = engine.ones(3, 3, 4)
    k = engine.tensor(key) if isinstance(key, np.ndarray) else key
    with raises_msg(IndexError, "out of range", "(3, 3, 4)"):
        x[k]


def test_bad_index_dtype_and_too_many_indices(raises_msg):
    x = engine.ones(3, 4)
    with raises_msg(IndexError, "float32"):
        x[engine.tensor([0.0, 1.0])]
    with pytest.raises(IndexError):
        x[0, 0, 0]
    with pytest.raises(IndexError):
        x[engine.tensor([True, False])]  # mask shape does not match


def test_gather_errors(raises_msg):
    x = engine.ones(2, 3)
    with raises_msg(IndexError, "gather", "3", "dim 1"):
        x.gather(1, engine.tensor([[0, 3], [1, 1]]))
    with raises_msg(RuntimeError, "gather", "int"):
        x.gather(1, engine.tensor([[0.0], [1.0]]))
    with raises_msg(RuntimeError, "gather", "(2,)", "(2, 3)"):
        x.gather(1, engine.tensor([0, 1]))


def test_mean_of_integersraises_msg(raises_msg):
    with raises_msg(RuntimeError, "mean", "int64", "float"):
        engine.arange(3).mean()


def test_masked_fill_needs_bool_mask(raises_msg):
    with raises_msg(RuntimeError, "masked_fill", "bool"):
        engine.ones(3).masked_fill(engine.tensor([1, 0, 1]), 0.0)


def test_pad_errors():
    x = engine.ones(2, 3)
    with pytest.raises(ValueError, match="pad"):
        engine.functional.pad(x, (1,))
    with pytest.raises(ValueError, match="pad"):
        engine.functional.pad(x, (1, 1, 1, 1, 1, 1))
    with pytest.raises(NotImplementedError, match="reflect"):
        engine.functional.pad(x, (1, 1), mode="reflect")


def test_unsupported_dtype_conversion_raises_type_error(raises_msg):
    with raises_msg(TypeError, "complex128"):
        engine.ones(2).to(np.complex128)
    with raises_msg(TypeError, "unsupported dtype"):
        engine.ones(2).to(dtype=str)
    with raises_msg(TypeError, "unsupported dtype", "object"):
        engine.ones(2).to(object)


# ---------------------------------------------------------------- against PyTorch, if present

def test_gradients_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    a = rng.normal(size=(3, 4))
    a[1, 2] = a[1, 0]  # a tie for amax along dim 1, if it is the maximum
    a[2] = 1.0  # a whole row of ties
    idx = np.array([[0, 0, 3], [2, 1, 2], [3, 3, 3]])

    def program(lib, x):
        y = lib.gather(x, 1, idx) * x[[0, 0, 2]][:, :3]
        z = x.amax(1, keepdim=True) + x.var(0, correction=0).sum() + x.cumsum(-1)
        return (y.sum() + (z ** 2).mean() + x.std(0).sum() + x.logsumexp(-1).sum()
                + (x.clamp(-0.5, 0.5) * x.flip(0)).sum())

    mine = engine.tensor(a, dtype=F64, requires_grad=True)
    theirs = torch.tensor(a, requires_grad=True)
    out = program(_EngineLib, mine)
    ref = program(_TorchLib(torch), theirs)
    out.backward()
    ref.backward()
    np.testing.assert_allclose(out.item(), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


class _EngineLib:
    @staticmethod
    def gather(x, dim, idx):
        return engine.gather(x, dim, engine.tensor(idx))


class _TorchLib:
    def __init__(self, torch):
        self.torch = torch

    def gather(self, x, dim, idx):
        return self.torch.gather(x, dim, self.torch.tensor(idx))
