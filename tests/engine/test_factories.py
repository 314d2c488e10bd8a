"""Tensor factories and conversions: dtype inference, shapes, random reproducibility,
unsupported dtypes, memory sharing with numpy, and the Python-facing conversions."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain import engine

# ---------------------------------------------------------------- tensor()

@pytest.mark.parametrize("data, dtype", [
    (1.5, np.float32), ([1.0, 2.0], np.float32), ([[1, 2.5]], np.float32),
    (3, np.int64), ([1, 2, 3], np.int64), ([[1], [2]], np.int64),
    (True, np.bool_), ([True, False], np.bool_),
    (np.array([1.0, 2.0]), np.float64), (np.float64(2.0), np.float64),
    (np.array([1.0], dtype=np.float32), np.float32), (np.array([1, 2], dtype=np.int32), np.int32),
    (np.array([1], dtype=np.uint8), np.uint8), (np.array([1.0], dtype=np.float16), np.float16),
], ids=lambda v: type(v).__name__ if not isinstance(v, type) else v.__name__)
def test_tensor_dtype_inference(data, dtype):
    x = engine.tensor(data)
    assert x.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(x.numpy(), np.asarray(data))


def test_tensor_explicit_dtype_and_shape():
    x = engine.tensor([1, 2, 3], dtype=engine.float64)
    assert x.dtype == np.float64 and x.tolist() == [1.0, 2.0, 3.0]
    assert engine.tensor([1.7, -1.2], dtype=engine.int32).tolist() == [1, -1]
    assert engine.tensor(np.zeros((2, 3)), dtype=engine.float32).dtype == np.float32
    assert engine.tensor([[1.0, 2.0, 3.0]]).shape == (1, 3)
    assert engine.tensor(2.0).shape == () and engine.tensor(2.0).ndim == 0
    assert engine.tensor([]).shape == (0,)


def test_tensor_copies_its_data():
    a = np.array([1.0, 2.0])
    x = engine.tensor(a)
    a[0] = 99.0
    assert x.tolist() == [1.0, 2.0]
    y = engine.tensor(x)
    y.data[1] = -1.0
    assert x.tolist() == [1.0, 2.0]


def test_dtype_names_match_torch():
    assert engine.float32 == engine.float == np.float32
    assert engine.float64 == engine.double == np.float64
    assert engine.float16 == engine.half == np.float16
    assert engine.int64 == engine.long == np.int64
    assert engine.bool == np.bool_


def test_requires_grad_only_for_floats(raises_msg):
    for dtype in (engine.float16, engine.float32, engine.float64):
        x = engine.tensor([1.0], dtype=dtype, requires_grad=True)
        assert x.requires_grad and x.is_leaf
    for data, kw in [([1, 2], {}), ([True], {}), ([1.0], {"dtype": engine.int32})]:
        with raises_msg(RuntimeError, "floating point", "require"):
            engine.tensor(data, requires_grad=True, **kw)
    with raises_msg(RuntimeError, "int64"):
        engine.arange(3, requires_grad=True)
    with raises_msg(RuntimeError, "floating point"):
        engine.zeros(2, dtype=engine.int64).requires_grad_()


def test_requires_grad_default_and_setter(raises_msg):
    x = engine.ones(2)
    assert not x.requires_grad and x.grad is None
    x.requires_grad_()
    assert x.requires_grad
    y = x * 2
    assert y.requires_grad and not y.is_leaf
    with raises_msg(RuntimeError, "leaf"):
        y.requires_grad = False


# ---------------------------------------------------------------- unsupported dtypes

@pytest.mark.parametrize("data, name", [
    ([1 + 2j], "complex128"), (np.array([1j], dtype=np.complex64), "complex64"),
    (["a", "b"], "<U1"), (np.array([object()]), "object"),
    (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64"),
], ids=["complex", "complex64", "str", "object", "datetime"])
def test_unsupported_data_raises_type_error_naming_the_dtype(data, name, raises_msg):
    with raises_msg(TypeError, "unsupported dtype", name):
        engine.tensor(data)
    if isinstance(data, np.ndarray):
        with raises_msg(TypeError, "unsupported dtype", name):
            engine.from_numpy(data)


@pytest.mark.parametrize("dtype, name", [(np.complex128, "complex128"), (complex, "complex128"),
                                         (str, "<U"), (object, "object"),
                                         ("not-a-dtype", "not-a-dtype")],
                         ids=["complex128", "complex", "str", "object", "garbage"])
@pytest.mark.parametrize("factory", [
    lambda dt: engine.zeros(2, dtype=dt), lambda dt: engine.ones(2, dtype=dt),
    lambda dt: engine.full((2,), 1, dtype=dt), lambda dt: engine.tensor([1.0], dtype=dt),
    lambda dt: engine.randn(2, dtype=dt), lambda dt: engine.arange(3, dtype=dt),
    lambda dt: engine.empty(2, dtype=dt), lambda dt: engine.eye(2, dtype=dt),
], ids=["zeros", "ones", "full", "tensor", "randn", "arange", "empty", "eye"])
def test_unsupported_dtype_argument_raises_type_error(factory, dtype, name, raises_msg):
    with raises_msg(TypeError, "unsupported dtype", name):
        factory(dtype)


# ---------------------------------------------------------------- constant factories

@pytest.mark.parametrize("make, shape, value", [
    (lambda **kw: engine.zeros(2, 3, **kw), (2, 3), 0.0),
    (lambda **kw: engine.zeros((2, 3), **kw), (2, 3), 0.0),
    (lambda **kw: engine.ones([4], **kw), (4,), 1.0),
    (lambda **kw: engine.ones(**kw), (), 1.0),
    (lambda **kw: engine.full((2, 2), 7.5, **kw), (2, 2), 7.5),
    (lambda **kw: engine.full(3, -1.0, **kw), (3,), -1.0),
    (lambda **kw: engine.zeros(0, 2, **kw), (0, 2), 0.0),
], ids=["zeros", "zeros_tuple", "ones_list", "ones_0d", "full", "full_int_size", "empty_dim"])
def test_constant_factories(make, shape, value):
    x = make()
    assert x.shape == shape and x.dtype == engine.float32
    np.testing.assert_array_equal(x.numpy(), np.full(shape, value, dtype=np.float32))
    y = make(dtype=engine.float64, requires_grad=True)
    assert y.dtype == engine.float64 and y.requires_grad


def test_full_infers_dtype_from_fill_value():
    assert engine.full((2,), 3).dtype == engine.int64
    assert engine.full((2,), True).dtype == engine.bool
    assert engine.full((2,), 0.5).dtype == engine.float32
    assert engine.full((2,), 3, dtype=engine.float64).tolist() == [3.0, 3.0]


def test_empty_and_like_factories():
    assert engine.empty(2, 3).shape == (2, 3) and engine.empty(2, 3).dtype == engine.float32
    x = engine.tensor([[1, 2, 3]], dtype=engine.int32)
    for fn, value in [(engine.zeros_like, 0), (engine.ones_like, 1)]:
        y = fn(x)
        assert y.shape == (1, 3) and y.dtype == engine.int32 and y.tolist() == [[value] * 3]
    assert engine.full_like(x, 4).tolist() == [[4, 4, 4]]
    assert engine.zeros_like(x, dtype=engine.float64).dtype == engine.float64
    r = engine.rand_like(engine.zeros(5, dtype=engine.float64))
    assert r.shape == (5,) and r.dtype == engine.float64
    assert engine.randn_like(engine.zeros(2, 2)).shape == (2, 2)


def test_negative_sizeraises_msg(raises_msg):
    with raises_msg(ValueError, "non-negative", "-1"):
        engine.zeros(2, -1)
    with pytest.raises(ValueError):
        engine.ones(1.5)


# ---------------------------------------------------------------- ranges

def test_arange():
    x = engine.arange(5)
    assert x.dtype == engine.int64 and x.tolist() == [0, 1, 2, 3, 4]
    assert engine.arange(2, 8, 3).tolist() == [2, 5]
    assert engine.arange(5, 0, -2).tolist() == [5, 3, 1]
    y = engine.arange(0, 1, 0.25)
    assert y.dtype == engine.float32 and y.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert engine.arange(3.0).dtype == engine.float32
    assert engine.arange(3, dtype=engine.float64).dtype == engine.float64
    assert engine.arange(0).shape == (0,)


def test_linspace():
    x = engine.linspace(0, 1, 5)
    assert x.dtype == engine.float32 and x.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert engine.linspace(-1, 1, 3, dtype=engine.float64).tolist() == [-1.0, 0.0, 1.0]
    assert engine.linspace(2, 2, 1).tolist() == [2.0]


def test_eye():
    assert engine.eye(3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert engine.eye(3).dtype == engine.float32
    assert engine.eye(2, 3).tolist() == [[1, 0, 0], [0, 1, 0]]
    assert engine.eye(2, dtype=engine.int64).dtype == engine.int64


# ---------------------------------------------------------------- random

def test_random_shapes_dtypes_and_ranges():
    engine.manual_seed(0)
    r = engine.rand(1000)
    assert r.dtype == engine.float32 and r.shape == (1000,)
    assert 0.0 <= r.numpy().min() and r.numpy().max() < 1.0
    assert abs(r.numpy().mean() - 0.5) < 0.05
    n = engine.randn(100, 50, dtype=engine.float64)
    assert n.dtype == engine.float64 and n.shape == (100, 50)
    assert abs(n.numpy().mean()) < 0.05 and abs(n.numpy().std() - 1) < 0.05
    assert engine.randn((2, 3)).shape == (2, 3) and engine.rand().shape == ()
    i = engine.randint(3, 7, (500,))
    assert i.dtype == engine.int64 and set(i.tolist()) == {3, 4, 5, 6}
    assert engine.randint(4, (2, 2)).shape == (2, 2)
    assert engine.randint(0, 2, (3,), dtype=engine.int32).dtype == engine.int32
    p = engine.randperm(10)
    assert p.dtype == engine.int64 and sorted(p.tolist()) == list(range(10))
    assert engine.rand(2, requires_grad=True).requires_grad


def test_randint_rejects_empty_range(raises_msg):
    with raises_msg(ValueError, "randint", "low=5", "high=5"):
        engine.randint(5, 5, (2,))
    with raises_msg(TypeError, "randint", "size"):
        engine.randint(5)


@pytest.mark.parametrize("draw", [
    lambda: engine.randn(4, 3), lambda: engine.rand(7), lambda: engine.randint(0, 100, (9,)),
    lambda: engine.randperm(12), lambda: engine.randn_like(engine.zeros(3)),
], ids=["randn", "rand", "randint", "randperm", "randn_like"])
def test_manual_seed_reproducibility(draw):
    engine.manual_seed(123)
    a, b = draw().numpy(), draw().numpy()
    engine.manual_seed(123)
    np.testing.assert_array_equal(draw().numpy(), a)
    np.testing.assert_array_equal(draw().numpy(), b)
    assert not np.array_equal(a, b)
    engine.manual_seed(124)
    assert not np.array_equal(draw().numpy(), a)


def test_rng_state_round_trip():
    engine.manual_seed(5)
    state = engine.get_rng_state()
    a = engine.randn(6).numpy()
    engine.set_rng_state(state)
    np.testing.assert_array_equal(engine.randn(6).numpy(), a)


def test_manual_seed_rejects_bad_seeds(raises_msg):
    for seed in (-1, 1.5, "3"):
        with raises_msg(ValueError, "seed"):
            engine.manual_seed(seed)


# ---------------------------------------------------------------- numpy interop

def test_from_numpy_shares_memory(raises_msg):
    a = np.arange(6.0).reshape(2, 3)
    x = engine.from_numpy(a)
    assert x.dtype == np.float64 and x.shape == (2, 3)
    a[0, 0] = -5.0
    assert x[0, 0].item() == -5.0
    with engine.no_grad():
        x.add_(1.0)
    assert a[0, 0] == -4.0
    assert np.shares_memory(x.numpy(), a)
    assert engine.from_numpy(np.array([1, 2], dtype=np.int16)).dtype == np.int16
    with raises_msg(TypeError, "from_numpy", "list"):
        engine.from_numpy([1.0, 2.0])


def test_numpy_shares_memory_on_cpu():
    x = engine.zeros(3)
    arr = x.numpy()
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
    arr[1] = 2.0
    assert x.tolist() == [0.0, 2.0, 0.0]


@pytest.mark.parametrize("reduce", [lambda x: x.sum(), lambda x: x.amax(), lambda x: x.argmax(),
                                    lambda x: x.mean()], ids=["sum", "amax", "argmax", "mean"])
def test_0d_results_are_ndarrays(reduce):
    out = reduce(engine.tensor([1.0, 3.0, 2.0]))
    assert out.shape == ()
    assert isinstance(out.numpy(), np.ndarray)
    with engine.no_grad():
        out.zero_()
    assert out.item() == 0


def test_tolist_and_item(raises_msg):
    assert engine.tensor([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    assert engine.tensor(2.5).tolist() == 2.5
    v = engine.tensor([7]).item()
    assert v == 7 and type(v) is int
    v = engine.tensor([[1.5]], dtype=engine.float64).item()
    assert v == 1.5 and type(v) is float
    assert type(engine.tensor(True).item()) is bool
    assert type(engine.tensor([1.0, 2.0]).tolist()[0]) is float
    with raises_msg(RuntimeError, "2 elements", "scalar"):
        engine.tensor([1, 2]).item()
    assert float(engine.tensor(1.5)) == 1.5 and int(engine.tensor([3])) == 3


def test_len_bool_and_index(raises_msg):
    assert len(engine.zeros(4, 2)) == 4
    with raises_msg(TypeError, "0-d"):
        len(engine.tensor(1.0))
    assert bool(engine.tensor([1.0])) and not bool(engine.tensor(0))
    with raises_msg(RuntimeError, "ambiguous"):
        bool(engine.ones(2))
    assert [10, 20, 30][engine.tensor(2)] == 30
    with raises_msg(TypeError, "integer"):
        [10, 20][engine.tensor(1.0)]


def test_size_dim_numel():
    x = engine.zeros(2, 3, 4)
    assert x.size() == (2, 3, 4) and x.size(-1) == 4 and x.size(0) == 2
    assert x.dim() == x.ndim == 3 and x.numel() == 24
    assert engine.tensor(1.0).numel() == 1


# ---------------------------------------------------------------- repr

def test_repr():
    assert repr(engine.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    assert repr(engine.tensor([1, 2])) == "tensor([1, 2])"
    assert repr(engine.tensor(1.5)) == "tensor(1.5)"
    assert repr(engine.tensor([True])) == "tensor([ True])"
    assert repr(engine.tensor([0.5], dtype=engine.float64)) == "tensor([0.5], dtype=float64)"
    assert repr(engine.tensor([1], dtype=engine.int32)) == "tensor([1], dtype=int32)"
    assert repr(engine.tensor([1.0], requires_grad=True)) == \
        "tensor([1.], requires_grad=True)"
    y = engine.tensor([1.0], requires_grad=True) * 2
    assert repr(y) == "tensor([2.], grad_fn=<MulBackward>)"
    assert repr(engine.tensor([[1.0, 2.0], [3.0, 4.0]])) == "tensor([[1., 2.],\n        [3., 4.]])"


def test_repr_of_a_large_tensor_is_summarised():
    text = repr(engine.arange(1000))
    assert text.startswith("tensor([  0,   1,") and "..." in text and len(text) < 200
