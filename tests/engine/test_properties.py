"""Property tests (hypothesis): broadcasting and shape ops over random shapes, against numpy
references computed here, independently of the engine's un-broadcasting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from dptrain import engine

F64 = engine.float64
SETTINGS = settings(max_examples=40, deadline=None)

pair_shapes = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=3)


def _values(shape, seed):
    return np.random.default_rng(seed).uniform(-2, 2, size=shape)


def _leaf(a):
    return engine.tensor(a, dtype=F64, requires_grad=True)


def sum_to_shape(g, shape):
    """Reference reduction of a broadcast gradient to `shape`: add up every element of `g` that
    was computed from the same input element, by walking the output indices."""
    out = np.zeros(shape)
    lead = g.ndim - len(shape)
    for idx in np.ndindex(*g.shape):
        src = tuple(0 if n == 1 else i for i, n in zip(idx[lead:], shape, strict=True))
        out[src] += g[idx]
    return out


@SETTINGS
@given(shapes=pair_shapes, seed=st.integers(0, 2**16))
def test_gradient_of_broadcast_product(shapes, seed):
    (sa, sb), out_shape = shapes.input_shapes, shapes.result_shape
    a, b = _values(sa, seed), _values(sb, seed + 1)
    x, y = _leaf(a), _leaf(b)
    out = x * y
    assert out.shape == out_shape
    np.testing.assert_allclose(out.numpy(), a * b, rtol=1e-15)
    out.sum().backward()
    assert x.grad.shape == sa and y.grad.shape == sb
    np.testing.assert_allclose(x.grad.numpy(), sum_to_shape(np.broadcast_to(b, out_shape), sa),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y.grad.numpy(), sum_to_shape(np.broadcast_to(a, out_shape), sb),
                               rtol=1e-12, atol=1e-12)


@SETTINGS
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       op=st.sampled_from(["add", "sub", "mul", "div", "maximum"]), seed=st.integers(0, 2**16))
def test_broadcast_binary_ops_gradcheck(shapes, op, seed):
    sa, sb = shapes.input_shapes
    a, b = _values(sa, seed), _values(sb, seed + 1)
    if op == "div":
        b = np.abs(b) + 0.5
    assert engine.gradcheck(getattr(engine, op), [_leaf(a), _leaf(b)], atol=1e-6, rtol=1e-4)


@SETTINGS
@given(shapes=pair_shapes, seed=st.integers(0, 2**16))
def test_weighted_broadcast_gradient_flows_back_summed(shapes, seed):
    (sa, sb), out_shape = shapes.input_shapes, shapes.result_shape
    a, b = _values(sa, seed), _values(sb, seed + 1)
    w = _values(out_shape, seed + 2)
    x, y = _leaf(a), _leaf(b)
    ((x + y) * engine.tensor(w, dtype=F64)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), sum_to_shape(w, sa), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y.grad.numpy(), sum_to_shape(w, sb), rtol=1e-12, atol=1e-12)


@st.composite
def shape_and_new_shape(draw):
    """A shape and another with the same number of elements: its dims shuffled, neighbours
    merged, size-1 dims inserted, and maybe one dim given as -1."""
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4))
    dims = draw(st.permutations(list(shape)))
    merged = []
    for d in dims:
        if merged and draw(st.booleans()):
            merged[-1] *= d
        else:
            merged.append(d)
    for _ in range(draw(st.integers(0, 2))):
        merged.insert(draw(st.integers(0, len(merged))), 1)
    if merged and draw(st.booleans()):
        merged[draw(st.integers(0, len(merged) - 1))] = -1
    return shape, tuple(merged)


@SETTINGS
@given(shapes=shape_and_new_shape(), seed=st.integers(0, 2**16))
def test_reshape_round_trip_preserves_data_and_gradient(shapes, seed):
    shape, new = shapes
    a = _values(shape, seed)
    x = _leaf(a)
    y = x.reshape(new)
    np.testing.assert_array_equal(y.numpy(), a.reshape(new))
    np.testing.assert_array_equal(y.reshape(shape).numpy(), a)
    w = _values(y.shape, seed + 1)
    (y * engine.tensor(w, dtype=F64)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), w.reshape(shape))


@st.composite
def shape_and_permutation(draw):
    shape = draw(array_shapes(min_dims=0, max_dims=5, min_side=1, max_side=3))
    perm = draw(st.permutations(range(len(shape))))
    # Half the time spell dims negatively: permute accepts both.
    perm = [p - len(shape) if draw(st.booleans()) else p for p in perm]
    return shape, tuple(perm)


@SETTINGS
@given(case=shape_and_permutation(), seed=st.integers(0, 2**16))
def test_permute_round_trip_preserves_data_and_gradient(case, seed):
    shape, perm = case
    pos = tuple(p % len(shape) for p in perm) if shape else ()
    a = _values(shape, seed)
    x = _leaf(a)
    y = x.permute(perm)
    np.testing.assert_array_equal(y.numpy(), np.transpose(a, pos))
    inverse = tuple(np.argsort(pos))
    np.testing.assert_array_equal(y.permute(inverse).numpy(), a)
    w = _values(y.shape, seed + 1)
    (y * engine.tensor(w, dtype=F64)).sum().backward()
    expected = np.empty(shape)
    for idx in np.ndindex(*y.shape):  # y[idx] = x[src] where src[pos[i]] = idx[i]
        src = [0] * len(shape)
        for i, p in enumerate(pos):
            src[p] = idx[i]
        expected[tuple(src)] = w[idx]
    np.testing.assert_array_equal(x.grad.numpy(), expected)


@st.composite
def cat_case(draw):
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(-ndim, ndim - 1))
    base = draw(array_shapes(min_dims=ndim, max_dims=ndim, min_side=1, max_side=3))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    shapes = [base[:dim % ndim] + (n,) + base[dim % ndim + 1:] for n in sizes]
    return dim, sizes, shapes


@SETTINGS
@given(case=cat_case(), seed=st.integers(0, 2**16))
def test_cat_then_split_recovers_inputs_and_gradients(case, seed):
    dim, sizes, shapes = case
    arrays = [_values(s, seed + i) for i, s in enumerate(shapes)]
    xs = [_leaf(a) for a in arrays]
    joined = engine.cat(xs, dim)
    np.testing.assert_array_equal(joined.numpy(), np.concatenate(arrays, axis=dim))
    pieces = joined.split(sizes, dim)
    assert len(pieces) == len(arrays)
    weights = [_values(s, seed + 100 + i) for i, s in enumerate(shapes)]
    total = None
    for piece, a, w in zip(pieces, arrays, weights, strict=True):
        np.testing.assert_array_equal(piece.numpy(), a)
        term = (piece * engine.tensor(w, dtype=F64)).sum()
        total = term if total is None else total + term
    total.backward()
    for x, w in zip(xs, weights, strict=True):
        np.testing.assert_array_equal(x.grad.numpy(), w)


@SETTINGS
@given(case=cat_case(), seed=st.integers(0, 2**16))
def test_stack_then_index_recovers_inputs(case, seed):
    dim, _, shapes = case
    arrays = [_values(shapes[0], seed + i) for i in range(len(shapes))]
    stacked = engine.stack([engine.tensor(a, dtype=F64) for a in arrays], dim)
    np.testing.assert_array_equal(stacked.numpy(), np.stack(arrays, axis=dim))
    d = dim % (arrays[0].ndim + 1)
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(stacked[(slice(None),) * d + (i,)].numpy(), a)


@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=3), data=st.data(),
       keepdim=st.booleans())
def test_sum_and_mean_gradients_over_random_dims(shape, data, keepdim):
    dims = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1,
                              max_size=len(shape), unique_by=lambda d: d % len(shape)))
    axes = tuple(d % len(shape) for d in dims)
    a = _values(shape, 0)
    x = _leaf(a)
    out = x.sum(tuple(dims), keepdim=keepdim)
    np.testing.assert_allclose(out.numpy(), a.sum(axis=axes, keepdims=keepdim), rtol=1e-12)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones(shape))
    x.grad = None
    x.mean(tuple(dims), keepdim=keepdim).sum().backward()
    count = int(np.prod([shape[i] for i in axes]))
    np.testing.assert_allclose(x.grad.numpy(), np.full(shape, 1 / count), rtol=1e-15)


@pytest.mark.parametrize("shape", [(), (1,), (2, 1, 3)], ids=str)
def test_sum_to_shape_reference_by_hand(shape):
    """The reference itself: a broadcast of ones sums to the number of copies."""
    out_shape = np.broadcast_shapes(shape, (4, 2, 2, 3))
    copies = int(np.prod(out_shape)) // max(int(np.prod(shape)), 1)
    np.testing.assert_array_equal(sum_to_shape(np.ones(out_shape), shape),
                                  np.full(shape, float(copies)))
