"""The reverse pass itself: graph shapes, accumulation, hooks, freeing, in-place detection."""

import gc
import weakref

import numpy as np
import pytest

from dptrain import engine
from dptrain.engine.tensor import Tensor


def f64(a, requires_grad=True):
    return engine.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad)


def test_shared_subexpression_gets_every_contribution():
    # y = a*b; z = y*y + y  =>  dz/da = (2y + 1) * b
    a, b = f64([1.5, -2.0]), f64([0.5, 3.0])
    y = a * b
    z = (y * y + y).sum()
    z.backward()
    yv = np.array([0.75, -6.0])
    np.testing.assert_allclose(a.grad.numpy(), (2 * yv + 1) * np.array([0.5, 3.0]))
    np.testing.assert_allclose(b.grad.numpy(), (2 * yv + 1) * np.array([1.5, -2.0]))


def test_each_rule_runs_once_on_a_diamond_lattice():
    # 30 layers of diamonds: naive recursive backprop would run 2**30 rules.
    from dptrain.engine.ops.elementwise import _mul

    calls = {"n": 0}
    orig = _mul.vjps

    def counted(rule):
        def run(*args, **kwargs):
            calls["n"] += 1
            return rule(*args, **kwargs)
        return run

    _mul.vjps = tuple(counted(r) for r in orig)
    try:
        x = f64(1.0)
        y = x
        for _ in range(30):
            y = (y * 1.0) + (y * 1.0)
        y.backward()
    finally:
        _mul.vjps = orig
    assert x.grad.item() == 2.0 ** 30
    assert calls["n"] == 60  # two mul nodes per layer, one input each needing grad


def test_residual_and_recurrence_reuse_parameters():
    # h_{t+1} = tanh(W h_t + h_t): W used at every step, residual path around it.
    rng = np.random.default_rng(0)
    W0, h0 = rng.standard_normal((3, 3)) * 0.5, rng.standard_normal(3)
    W = f64(W0)
    h = f64(h0, requires_grad=False)
    for _ in range(5):
        h = (W @ h + h).tanh()
    h.sum().backward()

    def loss(Wv):
        hv = h0
        for _ in range(5):
            hv = np.tanh(Wv @ hv + hv)
        return hv.sum()

    num = np.zeros_like(W0)
    for i in range(3):
        for j in range(3):
            d = np.zeros_like(W0)
            d[i, j] = 1e-6
            num[i, j] = (loss(W0 + d) - loss(W0 - d)) / 2e-6
    np.testing.assert_allclose(W.grad.numpy(), num, rtol=1e-6, atol=1e-8)


def test_long_chain_is_iterative():
    x = f64(1.0)
    y = x
    for _ in range(100_000):
        y = y + 1.0
    y.backward()
    assert x.grad.item() == 1.0
    del y  # freeing a 100k-node chain must not overflow the C stack either
    gc.collect()


def test_gradients_accumulate_until_zeroed():
    x = f64([1.0, 2.0])
    (x * 3).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [6.0, 6.0])
    x.grad = None
    (x * 2).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])


def test_grads_of_two_leaves_never_share_memory():
    a, b = f64([1.0]), f64([2.0])
    (a + b).sum().backward()  # add's rule hands the same array to both inputs
    a.grad.add_(1.0)
    assert b.grad.item() == 1.0


def test_backward_frees_saved_arrays_and_second_backward_raises():
    x = f64(np.ones(1000))
    y = x.exp()
    ans = weakref.ref(y.grad_fn)
    loss = y.sum()
    loss.backward()
    assert y.grad_fn.saved is None and y.grad_fn.ans is None
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    del y, loss
    gc.collect()
    assert ans() is None


def test_retain_graph_allows_a_second_backward():
    x = f64([2.0])
    loss = (x.exp() * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * (np.exp(2.0) * 3.0))


def test_non_scalar_backward_needs_gradient():
    x = f64([1.0, 2.0])
    y = x * 2
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        y.backward()
    y.backward(engine.tensor([1.0, 10.0], dtype=engine.float64))
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 20.0])
    with pytest.raises(RuntimeError, match="shape"):
        (x * 2).backward(engine.ones(3, dtype=engine.float64))


def test_backward_on_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        engine.ones(2).sum().backward()


def test_gradient_with_respect_to_input_fgsm():
    engine.manual_seed(0)
    w = engine.randn(4, 3, dtype=engine.float64)
    x = engine.randn(2, 4, dtype=engine.float64, requires_grad=True)
    loss = engine.functional.cross_entropy(x @ w, engine.tensor([0, 2]))
    loss.backward()
    assert x.grad is not None and w.grad is None
    adv = x.detach() + 0.1 * x.grad.sign()
    with engine.no_grad():
        assert engine.functional.cross_entropy(adv @ w, engine.tensor([0, 2])).item() > \
            loss.item()


def test_in_place_change_of_a_saved_input_is_detected():
    w = f64([1.0, 2.0])
    x = f64([3.0, 4.0], requires_grad=False)
    y = (x * w).sum()
    with engine.no_grad():
        w.mul_(2.0)  # as an optimizer step between forward and backward would
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        y.backward()


def test_in_place_change_through_a_view_is_detected():
    x = f64([1.0, 2.0, 3.0])
    base = engine.tensor([1.0, 2.0, 3.0], dtype=engine.float64)
    v = base.reshape(3)  # a view sharing the version counter
    y = (x * v).sum()
    base.add_(1.0)
    with pytest.raises(RuntimeError, match="in-place"):
        y.backward()


def test_unsaved_inputs_may_change_in_place():
    x = f64([1.0, 2.0])
    c = engine.tensor([5.0, 5.0], dtype=engine.float64)
    y = (x + c).sum()  # add saves nothing
    c.add_(1.0)
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 1.0])


def test_in_place_on_leaf_requiring_grad_needs_no_grad():
    w = f64([1.0])
    with pytest.raises(RuntimeError, match="no_grad"):
        w.add_(1.0)
    with engine.no_grad():
        w.add_(1.0)
    assert w.item() == 2.0


def test_no_grad_and_enable_grad():
    x = f64([1.0])
    with engine.no_grad():
        y = x * 2
        with engine.enable_grad():
            z = x * 2
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad

    @engine.no_grad()
    def f(t):
        return t * 2

    assert not f(x).requires_grad
    assert engine.is_grad_enabled()
    engine.set_grad_enabled(False)
    assert not (x * 2).requires_grad
    engine.set_grad_enabled(True)
    assert (x * 2).requires_grad


def test_tensor_hooks_see_and_replace_gradients():
    x = f64([1.0, 2.0])
    y = x * 3
    seen = []
    y.register_hook(lambda g: seen.append(g.numpy().copy()))
    h = x.register_hook(lambda g: g * 10)
    y.sum().backward()
    np.testing.assert_array_equal(seen[0], [1.0, 1.0])
    np.testing.assert_array_equal(x.grad.numpy(), [30.0, 30.0])
    h.remove()
    x.grad = None
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])


def test_post_accumulate_hook_runs_once_per_backward_with_the_full_gradient():
    w = f64([1.0, 2.0])
    calls = []
    w.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.numpy().copy()))
    # w is used three times: the hook must fire once, after all three contributions.
    loss = (w * 2).sum() + (w * w).sum() + w.sum()
    loss.backward()
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], 2 + 2 * np.array([1.0, 2.0]) + 1)


def test_queue_callback_runs_after_all_leaves_are_done():
    a, b = f64([1.0]), f64([2.0])
    order = []

    def hook(p):
        order.append("leaf")
        if len(order) == 1:
            engine.queue_callback(lambda: order.append("end"))

    a.register_post_accumulate_grad_hook(hook)
    b.register_post_accumulate_grad_hook(hook)
    (a * b).sum().backward()
    assert order == ["leaf", "leaf", "end"]
    with pytest.raises(RuntimeError, match="during a backward"):
        engine.queue_callback(lambda: None)


def test_backward_pass_hook_runs_first_in_every_pass_and_can_queue_the_end():
    a = f64([1.0])
    order = []

    def on_pass():
        order.append("start")
        engine.queue_callback(lambda: order.append("end"))

    a.register_post_accumulate_grad_hook(lambda p: order.append("leaf"))
    handle = engine.register_backward_pass_hook(on_pass)
    try:
        (a * 3).sum().backward()
        (f64([2.0]) * 3).sum().backward()  # reaches no tensor the hooks watch: still runs
    finally:
        handle.remove()
    assert order == ["start", "leaf", "end", "start", "end"]
    (a * 3).sum().backward()
    assert order[5:] == ["leaf"]  # removed


def test_retain_grad_on_non_leaf():
    x = f64([1.0, 2.0])
    y = x * 2
    y.retain_grad()
    (y * y).sum().backward()
    np.testing.assert_array_equal(y.grad.numpy(), [4.0, 8.0])


def test_grad_assignment_is_checked():
    x = f64([1.0, 2.0])
    with pytest.raises(RuntimeError, match="shape"):
        x.grad = engine.zeros(3, dtype=engine.float64)
    with pytest.raises(TypeError):
        x.grad = np.zeros(2)


def test_requires_grad_rules():
    with pytest.raises(RuntimeError, match="floating point"):
        engine.tensor([1, 2], requires_grad=True)
    x = f64([1.0])
    y = x * 2
    with pytest.raises(RuntimeError, match="leaf"):
        y.requires_grad = False
    assert x.is_leaf and not y.is_leaf
    d = y.detach()
    assert d.is_leaf and not d.requires_grad


def test_numpy_works_on_tensors_that_require_grad():
    x = f64([1.0, 2.0])
    assert isinstance(x.numpy(), np.ndarray)
    assert x.tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="cannot be converted"):
        x.item()


def test_mixed_dtype_gradients_come_back_in_each_inputs_dtype():
    a = engine.tensor([1.0, 2.0], requires_grad=True)  # float32
    b = f64([3.0, 4.0])
    (a * b).sum().backward()
    assert a.grad.dtype == engine.float32 and b.grad.dtype == engine.float64
    np.testing.assert_array_equal(a.grad.numpy(), [3.0, 4.0])


def test_broadcast_gradient_is_summed_back_to_the_input_shape():
    x = f64(np.ones((3, 1)))
    b = f64(np.arange(4.0))
    (x * b).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((3, 1), 6.0))
    np.testing.assert_array_equal(b.grad.numpy(), np.full(4, 3.0))


def test_tensor_wraps_arrays_as_is():
    arr = np.zeros(3, dtype=np.float32)
    t = Tensor(arr)
    assert t.data is arr and t.dtype == np.float32


def test_slices_accumulate_into_one_buffer():
    # Overlapping and repeated slices, an integer-array index with repeats, and a dense use.
    x0 = np.arange(12.0).reshape(4, 3)
    x = f64(x0)
    y = (x[0:2] * 2).sum() + x[1:3].sum() + x[1].sum() + x[[0, 0, 3]].sum() + (x * x).sum()
    y.backward()
    expect = 2 * x0
    expect[0:2] += 2
    expect[1:3] += 1
    expect[1] += 1
    expect[0] += 2
    expect[3] += 1
    np.testing.assert_array_equal(x.grad.numpy(), expect)


def test_per_step_slices_of_a_sequence():
    # As a recurrent layer reads its input: every step a slice, all summed into one gradient.
    x0 = np.random.default_rng(0).standard_normal((50, 2, 3))
    x = f64(x0)
    w = f64(np.ones(3) * 0.5)
    h = f64(np.zeros((2, 3)), requires_grad=False)
    for t in range(50):
        h = (h + x[t] * w).tanh()
    h.sum().backward()
    assert engine.gradcheck(lambda xx: _rnn(xx, w), [f64(x0[:6])])


def _rnn(x, w):
    h = engine.zeros(x.shape[1:], dtype=engine.float64)
    for t in range(x.shape[0]):
        h = (h + x[t] * w).tanh()
    return h.sum()


def test_a_gradient_passed_to_two_inputs_is_never_updated_in_place():
    # add's rule hands g to both inputs; later contributions to one must not leak into the other
    x = f64([1.0, 2.0])
    a = x * 1.0
    b = x * 1.0
    s = a + b  # a and b receive the same array
    loss = (s * 3).sum() + (a * 5).sum()  # a gets a second contribution
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3 + 3 + 5, 3 + 3 + 5])


@pytest.mark.parametrize("kept_first", [False, True], ids=["kept_last", "kept_first"])
def test_a_contribution_a_hook_kept_is_not_added_into(kept_first):
    # The hook on s keeps the array add's rule then hands on to a; a's other contribution
    # must go into a new buffer, whichever of the two arrives first.
    x = f64([1.0, 2.0])
    a = x * 1.0
    s = a + 0.0
    kept = []
    s.register_hook(lambda g: kept.append(g))
    hooked, other = (s * 3).sum(), (a * 5).sum()
    (hooked + other if kept_first else other + hooked).backward()
    assert kept[0].tolist() == [3.0, 3.0]
    np.testing.assert_array_equal(x.grad.numpy(), [8.0, 8.0])


def test_a_residual_input_gradient_sums_both_paths():
    # y = relu(x @ w) + x: x's gradient is the first path's plus the shortcut's, by hand.
    x0, w0 = np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([[2.0, -1.0], [1.0, 1.0]])
    x, w = f64(x0), f64(w0)
    ((x @ w).relu() + x).sum().backward()
    mask = (x0 @ w0 > 0).astype(float)
    np.testing.assert_array_equal(x.grad.numpy(), mask @ w0.T + 1.0)


@pytest.mark.parametrize("slices_first", [False, True], ids=["dense_first", "slices_first"])
def test_a_slice_gradient_is_never_added_into_a_shared_array(slices_first):
    # add hands one array to both a and b; the slice of each adds into a buffer of its own
    x = f64([1.0, 2.0])
    a = x * 1.0
    b = x * 1.0
    dense, sliced = ((a + b) * 3).sum(), a[0] * 5 + b[1] * 7
    loss = sliced + dense if slices_first else dense + sliced
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3 + 5 + 3, 3 + 3 + 7])


def _gelu_grad(x: np.ndarray) -> np.ndarray:
    """d/dx of x Phi(x), by hand in float64: Phi(x) + x pdf(x)."""
    import math

    return np.array([0.5 * (1 + math.erf(v / math.sqrt(2)))
                     + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi) for v in x])


def test_a_gradient_two_vertices_share_is_not_overwritten_by_either():
    # add hands one array to both GELUs; the first one's rule may write its result into its
    # g only when nothing else holds g, else the second would read the first one's result.
    a, b = np.linspace(-3, 3, 7), np.linspace(2, -1, 7)
    x, x2 = engine.tensor(a, requires_grad=True), engine.tensor(b, requires_grad=True)
    scale = np.arange(1.0, 8.0)
    ((engine.functional.gelu(x) + engine.functional.gelu(x2)) * engine.tensor(scale)).sum(
    ).backward()
    np.testing.assert_allclose(x.grad.numpy(), scale * _gelu_grad(a), rtol=1e-12)
    np.testing.assert_allclose(x2.grad.numpy(), scale * _gelu_grad(b), rtol=1e-12)


def test_gradients_a_hook_or_retain_grad_kept_are_not_overwritten():
    a = np.linspace(-2, 2, 5)
    x = engine.tensor(a, requires_grad=True)
    y = engine.functional.gelu(x)
    kept = []
    y.register_hook(lambda g: kept.append(g))
    y.retain_grad()
    (y * 3.0).sum().backward()
    assert kept[0].tolist() == [3.0] * 5
    assert y.grad.tolist() == [3.0] * 5
    np.testing.assert_allclose(x.grad.numpy(), 3.0 * _gelu_grad(a), rtol=1e-12)


def test_gelu_backward_writes_into_the_gradient_it_owns():
    # The input gradient takes the output gradient's memory (no second activation-sized
    # array on backward's peak) when nothing else holds that gradient. The hook notes where
    # the gradient lives without keeping it.
    a = np.random.default_rng(0).standard_normal(1000)
    x = engine.tensor(a, requires_grad=True)
    y = engine.functional.gelu(x)
    where = []
    y.register_hook(lambda g: where.append(g.data.__array_interface__["data"][0]))
    (y * 2.0).sum().backward()
    assert x.grad.data.__array_interface__["data"][0] == where[0]
    np.testing.assert_allclose(x.grad.numpy(), 2.0 * _gelu_grad(a), rtol=1e-12)


def test_reuse_g_needs_an_op_with_exactly_one_rule():
    from dptrain.engine.ops.core import Op

    with pytest.raises(ValueError, match="op pair: reuse_g needs exactly one rule"):
        Op("pair", lambda xp, x, y: x + y, (lambda xp, g, ans, x, y: g,) * 2, reuse_g=True)
