"""`engine.functional`: activations, losses and layers in float64, each checked against a numpy
reference written from the definition here and gradchecked against finite differences; then
the errors bad input must raise. A few tests also compare with PyTorch where it is installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import dptrain.engine.functional as F
from dptrain import engine

F64 = engine.float64


def t(array, dtype=None, like: engine.Tensor | None = None) -> engine.Tensor:
    """A constant tensor (no grad) from numpy data, on the device of `like` if given."""
    device = None if like is None else like.device
    return engine.tensor(np.asarray(array), dtype=dtype, device=device)


def log_softmax_ref(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))




# ---------------------------------------------------------------- linear

LINEAR_SHAPES = [
    pytest.param((4,), id="1d"), pytest.param((2, 4), id="2d"), pytest.param((2, 5, 4), id="3d"),
    pytest.param((3, 2, 5, 4), id="4d"),
]


@pytest.mark.parametrize("x_shape", LINEAR_SHAPES)
def test_linear(check, x_shape):
    check(lambda x, w, b: F.linear(x, w, b), lambda a, w, b: a @ w.T + b, x_shape, (3, 4), (3,))


@pytest.mark.parametrize("x_shape", LINEAR_SHAPES)
def test_linear_without_bias(check, x_shape):
    check(lambda x, w: F.linear(x, w), lambda a, w: np.einsum("...i,oi->...o", a, w),
          x_shape, (3, 4))
    check(lambda x, w: engine.linear(x, w, None), lambda a, w: a @ w.T, x_shape, (3, 4))


def test_linear_on_a_non_contiguous_input(check):
    """The leading dims are folded into one matrix product: a transposed input takes a copy."""
    check(lambda x, w, b: F.linear(x.transpose(0, 1), w, b),
          lambda a, w, b: a.transpose(1, 0, 2) @ w.T + b, (5, 2, 4), (3, 4), (3,))


# ---------------------------------------------------------------- activations

@pytest.mark.parametrize("dim", [0, 1, -1, -3], ids=str)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_log_softmax(check, name, dim):
    def ref(a):
        out = log_softmax_ref(a, dim)
        return out if name == "log_softmax" else np.exp(out)

    check(lambda x: getattr(F, name)(x, dim), ref, (2, 3, 4))
    check(lambda x: getattr(x, name)(dim), ref, (2, 3, 4), grad=False)


@pytest.mark.parametrize("shape, dim", [((5,), 0), ((5,), -1), ((3, 1), 1), ((1, 4), 0)],
                         ids=str)
def test_softmax_small_shapes(check, shape, dim):
    check(lambda x: F.softmax(x, dim), lambda a: np.exp(log_softmax_ref(a, dim)), shape)
    check(lambda x: engine.log_softmax(x, dim), lambda a: log_softmax_ref(a, dim), shape)


def test_softmax_is_stable_for_large_logits():
    x = engine.tensor([1000.0, 0.0, -1000.0], dtype=F64, requires_grad=True)
    np.testing.assert_allclose(F.softmax(x, 0).numpy(), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(F.log_softmax(x, 0).numpy(), [0.0, -1000.0, -2000.0])
    F.log_softmax(x, 0)[1].backward()
    np.testing.assert_allclose(x.grad.numpy(), [-1.0, 1.0, 0.0])


def test_softmax_rows_sum_to_one():
    out = F.softmax(engine.randn(4, 7), dim=-1)
    np.testing.assert_allclose(out.sum(-1).numpy(), np.ones(4), rtol=1e-6)


_erf = np.vectorize(math.erf)


@pytest.mark.parametrize("shape", [(), (7,), (2, 3)], ids=str)
def test_gelu_exact(check, shape):
    check(lambda x: F.gelu(x), lambda a: 0.5 * a * (1 + _erf(a / math.sqrt(2))), shape,
          low=-4, high=4)


@pytest.mark.parametrize("shape", [(), (7,), (2, 3)], ids=str)
def test_gelu_tanh(check, shape):
    check(lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_ref, shape, low=-4, high=4)


def _gelu_tanh_ref(a):
    return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


@pytest.mark.parametrize("x_shape", LINEAR_SHAPES)
def test_gelu_linear(check, x_shape):
    """``linear(gelu(x))`` as one op (the feed-forward block's), its GELU computed again in
    backward: against the definition and finite differences, with and without a bias."""
    from dptrain.engine.ops.linalg import gelu_linear

    check(lambda x, w, b: gelu_linear(x, w, b),
          lambda a, w, b: 0.5 * a * (1 + _erf(a / math.sqrt(2))) @ w.T + b,
          x_shape, (3, 4), (3,), low=-4, high=4)
    check(lambda x, w: gelu_linear(x, w, None, approximate="tanh"),
          lambda a, w: _gelu_tanh_ref(a) @ w.T, x_shape, (3, 4), low=-4, high=4)


def test_gelu_linear_bad_input_names_the_rule():
    from dptrain.engine.ops.linalg import gelu_linear

    with pytest.raises(ValueError, match="gelu: approximate must be 'none' or 'tanh', got 'x'"):
        gelu_linear(engine.ones(2, 4), engine.ones(3, 4), approximate="x")
    with pytest.raises(RuntimeError, match=r"linear: input of shape \(2, 5\) does not match "
                                           r"weight of shape \(3, 4\)"):
        gelu_linear(engine.ones(2, 5), engine.ones(3, 4))


def test_gelu_approximations_are_close_but_differ():
    x = engine.linspace(-3, 3, 61, dtype=F64)
    exact, approx = F.gelu(x).numpy(), F.gelu(x, approximate="tanh").numpy()
    assert np.abs(exact - approx).max() < 1e-3
    assert np.abs(exact - approx).max() > 1e-6


ACTIVATIONS = [
    pytest.param(F.silu, lambda a: a / (1 + np.exp(-a)), id="silu"),
    pytest.param(F.leaky_relu, lambda a: np.where(a > 0, a, 0.01 * a), id="leaky_relu"),
    pytest.param(lambda x: F.leaky_relu(x, 0.2), lambda a: np.where(a > 0, a, 0.2 * a),
                 id="leaky_relu_0.2"),
    pytest.param(F.relu, lambda a: np.maximum(a, 0), id="relu"),
    pytest.param(F.sigmoid, lambda a: 1 / (1 + np.exp(-a)), id="sigmoid"),
    pytest.param(F.tanh, np.tanh, id="tanh"),
    pytest.param(F.softplus, lambda a: np.log1p(np.exp(a)), id="softplus"),
]


@pytest.mark.parametrize("shape", [(), (1,), (2, 3)], ids=str)
@pytest.mark.parametrize("fn, ref", ACTIVATIONS)
def test_activation(check, fn, ref, shape):
    check(fn, ref, shape, low=-4, high=4)


def test_softplus_sigmoid_extremes_stay_finite():
    x = engine.tensor([-800.0, 0.0, 800.0], dtype=F64)
    np.testing.assert_allclose(F.softplus(x).numpy(), [0.0, math.log(2), 800.0])
    np.testing.assert_allclose(F.sigmoid(x).numpy(), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(F.silu(x).numpy(), [0.0, 0.0, 800.0])


# ---------------------------------------------------------------- cross entropy and nll

def ce_ref(logits, target, weight=None, ignore_index=-100, reduction="mean",
           label_smoothing=0.0, log_probs=False):
    """Cross entropy (or, with `log_probs`, nll) from its definition, one sample at a time:
    loss = (1 - ls) * -w[y] log p[y] + ls * sum_c -w[c] log p[c] / C; 'mean' divides by the
    summed weights w[y] of the non-ignored samples."""
    logits, target = np.asarray(logits), np.asarray(target)
    single = logits.ndim == 1
    if single:
        logits, target = logits[None], target[None]
    C = logits.shape[1]
    logp = logits if log_probs else log_softmax_ref(logits, 1)
    rows = np.moveaxis(logp, 1, -1).reshape(-1, C)
    w = np.ones(C) if weight is None else np.asarray(weight)
    losses, weights = [], []
    for row, y in zip(rows, target.reshape(-1), strict=True):
        if y == ignore_index:
            losses.append(0.0)
            weights.append(0.0)
            continue
        smooth = -(w * row).sum() / C
        losses.append((1 - label_smoothing) * -w[y] * row[y] + label_smoothing * smooth)
        weights.append(w[y])
    losses = np.array(losses).reshape(target.shape)
    if reduction == "none":
        return losses[0] if single else losses
    return losses.sum() if reduction == "sum" else losses.sum() / np.sum(weights)


TARGET = np.array([0, 2, 1, 2])
WEIGHT = np.array([0.2, 1.0, 3.0])

CE_CASES = [
    pytest.param({}, id="mean"),
    pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"reduction": "none"}, id="none"),
    pytest.param({"weight": WEIGHT}, id="weight"),
    pytest.param({"weight": WEIGHT, "reduction": "none"}, id="weight_none"),
    pytest.param({"weight": WEIGHT, "reduction": "sum"}, id="weight_sum"),
    pytest.param({"label_smoothing": 0.1}, id="smoothing"),
    pytest.param({"label_smoothing": 0.3, "reduction": "none"}, id="smoothing_none"),
    pytest.param({"label_smoothing": 0.2, "weight": WEIGHT}, id="smoothing_weight"),
    pytest.param({"ignore_index": 2}, id="ignore_index"),
    pytest.param({"ignore_index": 2, "weight": WEIGHT, "label_smoothing": 0.1},
                 id="ignore_weight_smoothing"),
    pytest.param({"ignore_index": 1, "reduction": "none"}, id="ignore_none"),
]


def _engine_kwargs(kw, like=None):
    return {k: t(v, F64, like) if k == "weight" else v for k, v in kw.items()}


@pytest.mark.parametrize("kw", CE_CASES)
def test_cross_entropy(check, kw):
    check(lambda z: F.cross_entropy(z, t(TARGET, like=z), **_engine_kwargs(kw, z)),
          lambda a: ce_ref(a, TARGET, **kw), (4, 3))


def test_cross_entropy_default_ignore_index():
    target = np.array([0, -100, 2, 1])
    x = engine.tensor(np.random.default_rng(0).normal(size=(4, 3)), requires_grad=True)
    loss = F.cross_entropy(x, t(target))
    np.testing.assert_allclose(loss.item(), ce_ref(x.numpy(), target), rtol=1e-12)
    loss.backward()
    assert x.grad.numpy()[1].tolist() == [0.0, 0.0, 0.0]  # the ignored sample gets no gradient


@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"weight": WEIGHT},
                                {"label_smoothing": 0.1, "ignore_index": 0}],
                         ids=["mean", "none", "weight", "smoothing_ignore"])
@pytest.mark.parametrize("shape, target", [
    ((2, 3, 4), np.array([[0, 1, 2, 2], [1, 1, 0, 2]])),
    ((2, 3, 2, 2), np.array([[[0, 1], [2, 2]], [[1, 0], [0, 2]]])),
], ids=["NCd", "NCdd"])
def test_cross_entropy_spatial(check, kw, shape, target):
    check(lambda z: F.cross_entropy(z, t(target, like=z), **_engine_kwargs(kw, z)),
          lambda a: ce_ref(a, target, **kw), shape)


def test_cross_entropy_single_sample(check):
    check(lambda z: F.cross_entropy(z, t(1, like=z)), lambda a: ce_ref(a, np.array(1)), (3,))


def test_cross_entropy_by_hand():
    logits = engine.tensor([[2.0, 0.5, -1.0]], dtype=F64)
    expected = math.log(math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)) - 2.0
    assert F.cross_entropy(logits, engine.tensor([0])).item() == pytest.approx(expected, 1e-12)
    uniform = engine.zeros(5, 4, dtype=F64)  # equal logits: log C whatever the target
    loss = F.cross_entropy(uniform, engine.tensor([0, 1, 2, 3, 3]))
    assert loss.item() == pytest.approx(math.log(4), 1e-12)


def ce_prob_ref(logits, p, weight=None, reduction="mean", label_smoothing=0.0):
    """Cross entropy with class-probability targets: -sum_c w[c] q[c] log softmax(x)[c], with
    q = p (1 - ls) + ls / C; 'mean' averages over every sample and position."""
    C = logits.shape[1]
    q = p * (1 - label_smoothing) + label_smoothing / C
    w = np.ones(C) if weight is None else weight
    w = w.reshape((1, C) + (1,) * (logits.ndim - 2))
    loss = -(w * q * log_softmax_ref(logits, 1)).sum(axis=1)
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"reduction": "none"},
                                {"weight": WEIGHT}, {"label_smoothing": 0.2}],
                         ids=["mean", "sum", "none", "weight", "smoothing"])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2)], ids=str)
def test_cross_entropy_probability_targets(check, kw, shape):
    p = np.exp(log_softmax_ref(np.random.default_rng(5).normal(size=shape), 1))
    check(lambda z: F.cross_entropy(z, t(p, F64, like=z), **_engine_kwargs(kw, z)),
          lambda a: ce_prob_ref(a, p, **kw), shape)
    # Soft targets are differentiable too (knowledge distillation).
    check(lambda z, q: F.cross_entropy(z, q, **_engine_kwargs(kw, z)),
          lambda a, q: ce_prob_ref(a, q, **kw), shape, shape, low=0.0, high=1.0)


def test_cross_entropy_one_hot_probabilities_equal_class_indices():
    x = engine.randn(6, 4, dtype=F64)
    y = engine.tensor([0, 3, 1, 1, 2, 0])
    probs = F.one_hot(y, 4).to(F64)
    assert F.cross_entropy(x, probs).item() == pytest.approx(F.cross_entropy(x, y).item())


NLL_CASES = [
    pytest.param({}, id="mean"), pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"reduction": "none"}, id="none"), pytest.param({"weight": WEIGHT}, id="weight"),
    pytest.param({"ignore_index": 0}, id="ignore_index"),
    pytest.param({"ignore_index": 2, "weight": WEIGHT, "reduction": "none"}, id="ignore_weight"),
]


@pytest.mark.parametrize("kw", NLL_CASES)
def test_nll_loss(check, kw):
    check(lambda z: F.nll_loss(z, t(TARGET, like=z), **_engine_kwargs(kw, z)),
          lambda a: ce_ref(a, TARGET, log_probs=True, **kw), (4, 3))


def test_nll_loss_spatial_and_with_log_softmax(check):
    target = np.array([[0, 1, 2, 2], [1, 1, 0, 2]])
    check(lambda z: F.nll_loss(z, t(target, like=z)), lambda a: ce_ref(a, target, log_probs=True),
          (2, 3, 4))
    check(lambda z: F.nll_loss(F.log_softmax(z, 1), t(TARGET, like=z), reduction="sum"),
          lambda a: ce_ref(a, TARGET, reduction="sum"), (4, 3))


# ---------------------------------------------------------------- regression losses

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3)], ids=str)
def test_mse_l1_loss(check, reduction, shape):
    red = {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction]
    check(lambda x, y: F.mse_loss(x, y, reduction=reduction), lambda a, b: red((a - b) ** 2),
          shape, shape)
    check(lambda x, y: F.l1_loss(x, y, reduction=reduction), lambda a, b: red(np.abs(a - b)),
          shape, shape)


def bce_ref(x, y, weight=None, pos_weight=None, reduction="mean"):
    """-w [pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], with the logs written as
    -logaddexp(0, -x) and -logaddexp(0, x) so that |x| = 100 stays finite."""
    pw = 1.0 if pos_weight is None else pos_weight
    loss = pw * y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)
    if weight is not None:
        loss = loss * weight
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


BCE_Y = np.array([[0.0, 1.0, 0.3], [1.0, 0.0, 0.8]])
BCE_CASES = [
    pytest.param({}, id="mean"), pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"reduction": "none"}, id="none"),
    pytest.param({"weight": np.array([0.5, 2.0, 1.0])}, id="weight_row"),
    pytest.param({"weight": np.array([[1.0, 0.0, 2.0], [0.5, 3.0, 1.0]])}, id="weight_full"),
    pytest.param({"pos_weight": np.array([3.0, 0.5, 1.0])}, id="pos_weight"),
    pytest.param({"pos_weight": np.array([3.0, 0.5, 1.0]), "weight": np.array([0.5, 2.0, 1.0]),
                  "reduction": "none"}, id="both_none"),
]


@pytest.mark.parametrize("kw", BCE_CASES)
def test_binary_cross_entropy_with_logits(check, kw):
    def ekw(like):
        return {k: t(v, F64, like) if isinstance(v, np.ndarray) else v for k, v in kw.items()}

    check(lambda x: F.binary_cross_entropy_with_logits(x, t(BCE_Y, F64, x), **ekw(x)),
          lambda a: bce_ref(a, BCE_Y, **kw), (2, 3), low=-4, high=4)
    check(lambda x, y: F.binary_cross_entropy_with_logits(x, y, **ekw(x)),
          lambda a, b: bce_ref(a, b, **kw), (2, 3), (2, 3), low=0.0, high=1.0)


def test_binary_cross_entropy_with_logits_large_logits_stay_finite(leaf):
    x = leaf([100.0, -100.0, 100.0, -100.0])
    y = engine.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    pw = engine.tensor(3.0, dtype=F64)
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=pw)
    expected = bce_ref(x.numpy(), y.numpy(), pos_weight=3.0, reduction="none")
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=1e-30)
    np.testing.assert_allclose(loss.numpy(), [0.0, 0.0, 100.0, 300.0], atol=1e-12)
    loss.mean().backward()
    # d/dx = (1 - y) - (1 + (pw - 1) y) sigmoid(-x), over 4 samples.
    np.testing.assert_allclose(x.grad.numpy(), [0.0, 0.0, 0.25, -0.75], atol=1e-12)


# ---------------------------------------------------------------- dropout

def test_dropout_zeroes_about_p_and_scales_survivors():
    engine.manual_seed(0)
    x = engine.ones(200_000)
    out = F.dropout(x, p=0.3).numpy()
    assert abs((out == 0).mean() - 0.3) < 0.01
    survivors = out[out != 0]
    np.testing.assert_allclose(survivors, 1 / 0.7, rtol=1e-6)
    assert out.dtype == np.float32


def test_dropout_gradient_is_the_scaled_mask(leaf):
    engine.manual_seed(1)
    x = leaf(np.ones((50, 40)))
    out = F.dropout(x, p=0.25)
    (out * 3.0).sum().backward()
    expected = np.where(out.numpy() != 0, 3.0 / 0.75, 0.0)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-12)


def test_dropout_eval_and_edge_probabilities_are_exact():
    x = engine.randn(10, 10, dtype=F64)
    assert F.dropout(x, 0.5, training=False).tolist() == x.tolist()
    assert F.dropout(x, 0.0).tolist() == x.tolist()
    assert F.dropout(x, 1.0).tolist() == np.zeros((10, 10)).tolist()


def test_dropout_is_reproducible_with_manual_seed():
    x = engine.ones(1000)
    engine.manual_seed(42)
    a = F.dropout(x, 0.5).numpy()
    b = F.dropout(x, 0.5).numpy()
    engine.manual_seed(42)
    c = F.dropout(x, 0.5).numpy()
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)


def test_dropout_rejects_bad_p(raises_msg):
    with raises_msg(ValueError, "dropout", "1.5"):
        F.dropout(engine.ones(3), 1.5)
    with raises_msg(ValueError, "dropout"):
        F.dropout(engine.ones(3), -0.1)


# ---------------------------------------------------------------- layer norm, embedding, ...

def layer_norm_ref(a, n, w=None, b=None, eps=1e-5):
    axes = tuple(range(a.ndim - n, a.ndim))
    mu = a.mean(axis=axes, keepdims=True)
    var = ((a - mu) ** 2).mean(axis=axes, keepdims=True)
    out = (a - mu) / np.sqrt(var + eps)
    return out * (1 if w is None else w) + (0 if b is None else b)


def test_layer_norm(check):
    check(lambda x, w, b: F.layer_norm(x, 4, w, b), lambda a, w, b: layer_norm_ref(a, 1, w, b),
          (2, 3, 4), (4,), (4,))
    check(lambda x, w, b: F.layer_norm(x, (3, 4), w, b),
          lambda a, w, b: layer_norm_ref(a, 2, w, b), (2, 3, 4), (3, 4), (3, 4))
    check(lambda x: F.layer_norm(x, (5,)), lambda a: layer_norm_ref(a, 1), (5,))
    check(lambda x: F.layer_norm(x, [2, 3], eps=0.1), lambda a: layer_norm_ref(a, 2, eps=0.1),
          (2, 3))


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_keeps_xhat_not_x_and_backward_twice_agrees(affine):
    # The op keeps the normalised input (not x): x may change in place after the forward, and
    # a retained graph's second backward reads the same xhat (backward builds dx in a new
    # array). The reference is finite differences of the float64 formula by hand.
    rng = np.random.default_rng(3)
    a, g = rng.normal(size=(3, 5)) * 2 + 1, rng.normal(size=(3, 5))
    w, b = rng.normal(size=5), rng.normal(size=5)
    x = engine.tensor(a, requires_grad=True)
    h = x * 1.0
    args = (engine.tensor(w, requires_grad=True), engine.tensor(b)) if affine else ()
    y = F.layer_norm(h, (5,), *args)
    with engine.no_grad():
        h.data[...] = 0.0
    y.backward(engine.tensor(g), retain_graph=True)
    first = x.grad.numpy().copy()
    x.grad = None
    y.backward(engine.tensor(g))
    np.testing.assert_array_equal(x.grad.numpy(), first)

    def loss(v):
        return float((layer_norm_ref(v, 1, *((w, b) if affine else ())) * g).sum())

    eps, numeric = 1e-6, np.zeros_like(a)
    for i in np.ndindex(a.shape):
        d = np.zeros_like(a)
        d[i] = eps
        numeric[i] = (loss(a + d) - loss(a - d)) / (2 * eps)
    np.testing.assert_allclose(first, numeric, rtol=1e-6, atol=1e-8)


def test_layer_norm_output_is_normalised():
    out = F.layer_norm(engine.randn(8, 16, dtype=F64) * 5 + 3, (16,), eps=0.0).numpy()
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(-1), 1, rtol=1e-10)


IDX = np.array([[0, 2], [2, 4]])


def test_embedding(check):
    check(lambda w: F.embedding(t(IDX), w), lambda w: w[IDX], (5, 3))
    check(lambda w: F.embedding(t(np.array(3)), w), lambda w: w[3], (5, 3))


def test_embedding_repeated_indices_accumulate(leaf):
    w = leaf(np.zeros((5, 3)))
    F.embedding(t(IDX), w).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.repeat([[1.0], [0], [2], [0], [1]], 3, 1))


def test_embedding_padding_idx_row_gets_no_gradient(leaf):
    weight = np.arange(15.0).reshape(5, 3)
    w = leaf(weight)
    out = F.embedding(t(IDX), w, padding_idx=2)
    np.testing.assert_array_equal(out.numpy(), weight[IDX])  # the forward still reads row 2
    (out * 2.0).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.repeat([[2.0], [0], [0], [0], [2]], 3, 1))


def test_one_hot():
    out = F.one_hot(engine.tensor([0, 2, 1]))
    assert out.dtype == engine.int64
    assert out.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    out = F.one_hot(engine.tensor([[1], [3]]), num_classes=5)
    assert out.shape == (2, 1, 5)
    assert out.tolist() == [[[0, 1, 0, 0, 0]], [[0, 0, 0, 1, 0]]]
    assert F.one_hot(engine.tensor(2), 3).tolist() == [0, 0, 1]


def normalize_ref(a, p, dim, eps=1e-12):
    norm = (np.abs(a) ** p).sum(axis=dim, keepdims=True) ** (1 / p)
    return a / np.maximum(norm, eps)


@pytest.mark.parametrize("p, dim, shape", [(2.0, 1, (2, 3)), (1.0, -1, (2, 3)),
                                           (2.0, 0, (4,)), (3.0, 1, (2, 3, 2))], ids=str)
def test_normalize_forward(check, p, dim, shape):
    check(lambda x: F.normalize(x, p=p, dim=dim), lambda a: normalize_ref(a, p, dim), shape,
          positive=p != 2.0, grad=False)


@pytest.mark.parametrize("p, dim, shape", [(2.0, 1, (2, 3)), (1.0, -1, (2, 3))], ids=str)
def test_normalize_gradient(check, p, dim, shape):
    check(lambda x: F.normalize(x, p=p, dim=dim), lambda a: normalize_ref(a, p, dim), shape,
          positive=p != 2.0)


def test_normalize_by_hand():
    out = F.normalize(engine.tensor([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.8], [0.0, 0.0]])


# ---------------------------------------------------------------- bad input

def test_linear_shape_mismatch_names_op_and_shapes(raises_msg):
    with raises_msg(RuntimeError, "linear", "(2, 3)", "(5, 4)"):
        F.linear(engine.ones(2, 3), engine.ones(5, 4))
    with raises_msg(RuntimeError, "linear", "(4,)", "(3, 4)"):
        F.linear(engine.ones(2, 4), engine.ones(3, 4), engine.ones(4))
    with raises_msg(RuntimeError, "linear", "()"):
        F.linear(engine.ones(()), engine.ones(3, 4))


def test_cross_entropy_target_shape_mismatch(raises_msg):
    with raises_msg(RuntimeError, "cross_entropy", "(3,)", "(2, 3)"):
        F.cross_entropy(engine.ones(2, 3), engine.tensor([0, 1, 2]))
    with raises_msg(RuntimeError, "cross_entropy", "(2, 3)", "(2, 3, 4)", "(2, 4)"):
        F.cross_entropy(engine.ones(2, 3, 4), engine.zeros(2, 3, dtype=engine.int64))
    with raises_msg(RuntimeError, "nll_loss", "(4,)", "(2, 3)"):
        F.nll_loss(engine.ones(2, 3), engine.tensor([0, 1, 2, 0]))


def test_cross_entropy_non_integer_targets(raises_msg):
    # A float target must be class probabilities shaped like the input.
    with raises_msg(RuntimeError, "cross_entropy", "(2,)", "(2, 3)"):
        F.cross_entropy(engine.ones(2, 3), engine.tensor([0.0, 1.0]))
    with raises_msg(RuntimeError, "nll_loss", "integer", "float32"):
        F.nll_loss(engine.ones(2, 3), engine.tensor([0.0, 1.0]))
    with raises_msg(RuntimeError, "cross_entropy", "integer", "bool"):
        F.cross_entropy(engine.ones(2, 3), engine.tensor([True, False]))


@pytest.mark.parametrize("target, bad", [([0, 3], 3), ([-1, 0], -1), ([5, 0], 5)], ids=str)
def test_cross_entropy_class_out_of_range(target, bad, raises_msg):
    with raises_msg(IndexError, "cross_entropy", f"target {bad}", "3 classes"):
        F.cross_entropy(engine.ones(2, 3), engine.tensor(target))
    with raises_msg(IndexError, "nll_loss", "out of bounds"):
        F.nll_loss(engine.ones(2, 3), engine.tensor(target))


def test_cross_entropy_bad_weight_and_smoothing(raises_msg):
    with raises_msg(RuntimeError, "cross_entropy", "(2,)", "(3,)"):
        F.cross_entropy(engine.ones(2, 3), engine.tensor([0, 1]), weight=engine.ones(2))
    with raises_msg(ValueError, "label_smoothing", "1.5"):
        F.cross_entropy(engine.ones(2, 3), engine.tensor([0, 1]), label_smoothing=1.5)


@pytest.mark.parametrize("loss", [
    lambda r: F.cross_entropy(engine.ones(2, 3), engine.tensor([0, 1]), reduction=r),
    lambda r: F.cross_entropy(engine.ones(2, 3), engine.ones(2, 3) / 3, reduction=r),
    lambda r: F.nll_loss(engine.ones(2, 3), engine.tensor([0, 1]), reduction=r),
    lambda r: F.mse_loss(engine.ones(3), engine.ones(3), reduction=r),
    lambda r: F.l1_loss(engine.ones(3), engine.ones(3), reduction=r),
    lambda r: F.binary_cross_entropy_with_logits(engine.ones(3), engine.ones(3), reduction=r),
], ids=["cross_entropy", "cross_entropy_probs", "nll_loss", "mse_loss", "l1_loss", "bce"])
def test_bad_reduction_raises_value_error(loss, raises_msg):
    with raises_msg(ValueError, "reduction", "'avg'", "mean"):
        loss("avg")


@pytest.mark.parametrize("fn, name", [(F.mse_loss, "mse_loss"), (F.l1_loss, "l1_loss"),
                                      (F.binary_cross_entropy_with_logits,
                                       "binary_cross_entropy_with_logits")])
def test_loss_shape_mismatch_names_op_and_shapes(fn, name, raises_msg):
    with raises_msg(RuntimeError, name, "(2, 3)", "(3,)"):
        fn(engine.ones(2, 3), engine.ones(3))


def test_layer_norm_embedding_one_hot_errors(raises_msg):
    with raises_msg(RuntimeError, "layer_norm", "(2, 3)", "(4,)"):
        F.layer_norm(engine.ones(2, 3), 4)
    with raises_msg(IndexError, "embedding", "5", "5 rows"):
        F.embedding(engine.tensor([0, 5]), engine.ones(5, 2))
    with raises_msg(IndexError, "embedding", "-1"):
        F.embedding(engine.tensor([-1]), engine.ones(5, 2))
    with raises_msg(RuntimeError, "embedding", "float32"):
        F.embedding(engine.tensor([1.0]), engine.ones(5, 2))
    with raises_msg(RuntimeError, "one_hot", "[0, 3)"):
        F.one_hot(engine.tensor([3]), 3)
    with raises_msg(RuntimeError, "one_hot", "float32"):
        F.one_hot(engine.tensor([1.0]))
    with raises_msg(ValueError, "gelu", "'fast'"):
        F.gelu(engine.ones(2), approximate="fast")


# ---------------------------------------------------------------- against PyTorch, if present

def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    rng = np.random.default_rng(3)
    z, target = rng.normal(size=(5, 4, 3)), rng.integers(0, 4, size=(5, 3))
    target[0, 0] = 1
    w = rng.uniform(0.5, 2.0, size=4)
    for kw in [{}, {"reduction": "none"}, {"label_smoothing": 0.15, "ignore_index": 1},
               {"weight": w, "label_smoothing": 0.1, "ignore_index": 1},
               {"weight": w, "reduction": "sum"}]:
        mine = F.cross_entropy(t(z, F64), t(target), **_engine_kwargs(kw)).numpy()
        ref = tf.cross_entropy(torch.tensor(z), torch.tensor(target),
                               **{k: torch.tensor(v) if k == "weight" else v
                                  for k, v in kw.items()})
        np.testing.assert_allclose(mine, ref.numpy(), rtol=1e-10, err_msg=str(kw))
        np.testing.assert_allclose(ce_ref(z, target, **kw), ref.numpy(), rtol=1e-10)
    p = rng.dirichlet(np.ones(4), size=(5, 3)).transpose(0, 2, 1)
    for kw in [{}, {"weight": w, "label_smoothing": 0.2}]:
        mine = F.cross_entropy(t(z, F64), t(p, F64), **_engine_kwargs(kw)).item()
        ref = tf.cross_entropy(torch.tensor(z), torch.tensor(p),
                               **{k: torch.tensor(v) if k == "weight" else v
                                  for k, v in kw.items()}).item()
        assert mine == pytest.approx(ref, rel=1e-10)
    x, y = rng.normal(size=(4, 3)) * 30, rng.uniform(size=(4, 3))
    pw, bw = rng.uniform(0.5, 3, size=3), rng.uniform(0.5, 3, size=(4, 3))
    mine = F.binary_cross_entropy_with_logits(t(x, F64), t(y, F64), weight=t(bw, F64),
                                              pos_weight=t(pw, F64), reduction="none")
    ref = tf.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y),
                                              weight=torch.tensor(bw),
                                              pos_weight=torch.tensor(pw), reduction="none")
    np.testing.assert_allclose(mine.numpy(), ref.numpy(), rtol=1e-10)


def test_layers_match_torch():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    a = np.random.default_rng(4).normal(size=(3, 4, 5)) * 3
    for approximate in ("none", "tanh"):
        np.testing.assert_allclose(F.gelu(t(a, F64), approximate=approximate).numpy(),
                                   tf.gelu(torch.tensor(a), approximate=approximate).numpy(),
                                   rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(F.layer_norm(t(a, F64), (4, 5)).numpy(),
                               tf.layer_norm(torch.tensor(a), (4, 5)).numpy(), rtol=1e-10)
    np.testing.assert_allclose(F.normalize(t(a, F64), p=3.0, dim=-1).numpy(),
                               tf.normalize(torch.tensor(a), p=3.0, dim=-1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(F.log_softmax(t(a, F64), 1).numpy(),
                               tf.log_softmax(torch.tensor(a), 1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_float32_matches_a_float64_reference(approximate):
    # float32 gelu uses its own approximation of the Gaussian CDF (within ~3 ulp of
    # max(|gelu|, 1)): in the far negative tail the error is absolute (~1e-6), as for any
    # float32 gelu built on 1 + erf(x).
    x64 = np.linspace(-8, 8, 100_001)
    ref = engine.functional.gelu(engine.tensor(x64), approximate=approximate).numpy()
    x = engine.tensor(x64.astype(np.float32), requires_grad=True)
    y = engine.functional.gelu(x, approximate=approximate)
    assert y.dtype == engine.float32
    np.testing.assert_allclose(y.numpy(), ref, rtol=2e-6, atol=2e-6)
    y.sum().backward()
    x_ref = engine.tensor(x64, requires_grad=True)
    engine.functional.gelu(x_ref, approximate=approximate).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), x_ref.grad.numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [engine.float32, F64], ids=str)
def test_gelu_gradient_at_and_near_zero(approximate, dtype):
    # At 0 and for tiny (even subnormal) x the derivative is 1/2: no 0 / 0 or lost digits.
    x = engine.tensor([0.0, 1e-40, -1e-40, 1e-30, -1e-20, 1.0, -1.0], dtype=dtype,
                      requires_grad=True)
    F.gelu(x, approximate=approximate).sum().backward()
    pdf = math.exp(-0.5) / math.sqrt(2 * math.pi)
    if approximate == "none":
        d1 = 0.5 * (1 + math.erf(1 / math.sqrt(2))) + pdf
    else:
        u = math.sqrt(2 / math.pi) * (1 + 0.044715)
        d1 = (0.5 * (1 + math.tanh(u)) + 0.5 * (1 - math.tanh(u) ** 2)
              * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715))
    expected = [0.5] * 5 + [d1, 1 - d1]
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_gelu_float32_gradient_near_zero_in_any_block_of_a_large_input():
    # Large inputs run in blocks: put special values in the second block, among ordinary
    # values, and compare with the float64 rule.
    x64 = np.random.default_rng(0).standard_normal(200_000)
    x64[[70_000, 70_001, 70_002, 150_000]] = [0.0, 1e-40, -1e-44, -0.0]
    x = engine.tensor(x64.astype(np.float32), requires_grad=True)
    F.gelu(x).sum().backward()
    grad = x.grad.numpy()
    assert grad[[70_000, 70_001, 70_002, 150_000]].tolist() == [0.5] * 4
    x_ref = engine.tensor(x64.astype(np.float32).astype(np.float64), requires_grad=True)
    F.gelu(x_ref).sum().backward()
    np.testing.assert_allclose(grad, x_ref.grad.numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [engine.float32, F64], ids=str)
def test_gelu_at_infinities_nan_and_huge_magnitudes(dtype):
    # Past the approximation's range exp saturates (no clip): values and slopes are gelu's
    # limits; at the infinities they are PyTorch's (gelu(-inf) and both slopes NaN), all
    # without a warning (warnings are errors here).
    x = engine.tensor([1e30, -1e30, 100.0, -100.0, np.inf, -np.inf, np.nan], dtype=dtype,
                      requires_grad=True)
    y = F.gelu(x)
    got = y.numpy()
    assert got[:5].tolist() == [float(np.array(1e30, dtype)), 0.0, 100.0, 0.0, np.inf]
    assert np.signbit(got[[1, 3]]).all() and np.isnan(got[5:]).all()
    y.sum().backward()
    assert x.grad.numpy()[:4].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert np.isnan(x.grad.numpy()[4:]).all()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradient_needs_not_the_input_kept(approximate):
    # The forward writes gelu'(x) for backward instead of keeping x (what PyTorch's GELU
    # keeps): x may change in place after the forward, and the gradient is still the one at
    # the x the forward saw (checked against the float64 formulas by hand).
    a = np.linspace(-3, 3, 13)
    x = engine.tensor(a, requires_grad=True)
    h = x * 1.0
    y = F.gelu(h, approximate=approximate)
    with engine.no_grad():
        h.data[...] = 7.0
    y.sum().backward()
    if approximate == "none":
        expected = [0.5 * (1 + math.erf(v / math.sqrt(2)))
                    + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi) for v in a]
    else:
        s = math.sqrt(2 / math.pi)
        expected = [0.5 * (1 + math.tanh(s * (v + 0.044715 * v ** 3)))
                    + 0.5 * v * (1 - math.tanh(s * (v + 0.044715 * v ** 3)) ** 2)
                    * s * (1 + 3 * 0.044715 * v * v) for v in a]
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_gelu_without_a_gradient_gives_the_same_values():
    x = engine.tensor(np.linspace(-6, 6, 100_001, dtype=np.float32), requires_grad=True)
    with engine.no_grad():
        plain = F.gelu(x)
    assert plain.grad_fn is None
    np.testing.assert_array_equal(plain.numpy(), F.gelu(x).numpy())


def test_gelu_float32_at_zero_subnormals_and_large_magnitudes_against_math_erf():
    xs = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -3e-39, 1.0, -1.0, 4.0, -4.0, 5.657, -5.657, 9.0,
          -9.0, 100.0, -100.0, 1e4, -1e4, 1e30, -1e30]
    x = np.array(xs, np.float32)
    got = F.gelu(engine.tensor(x)).numpy()
    expected = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)]
    # Within float32 rounding where the value is large, within 2e-6 absolute in the far
    # negative tail, where 1 + erf cancels; never the wrong sign.
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=2e-6)
    assert np.all(got[x > 1e-40] > 0) and np.all(got[x < -6] == 0)
