"""batch_norm and scaled_dot_product_attention: forward against numpy written here (and the
running-statistics update against a hand computation), backward against central finite
differences in float64 — in training mode the batch statistics depend on the input, and the
gradient must include that. Then masks, causality, fully masked rows and the errors bad input
must raise. PyTorch is an optional second reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import dptrain.engine.functional as F
from dptrain import engine

F64 = engine.float64


def _const(array) -> engine.Tensor:
    return engine.tensor(np.array(array, dtype=np.float64), dtype=F64)


# ---------------------------------------------------------------- batch_norm

def bn_ref(x, mean, var, w=None, b=None, eps=1e-5):
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    out = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if w is not None:
        out = out * w.reshape(shape) + b.reshape(shape)
    return out


def _batch_stats(x):
    axes = (0,) + tuple(range(2, x.ndim))
    return x.mean(axis=axes), x.var(axis=axes)


SHAPES = [(6, 3), (4, 3, 5), (3, 2, 4, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_training_uses_batch_statistics(check, shape, affine):
    c = shape[1]
    if affine:
        check(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-3),
              lambda x, w, b: bn_ref(x, *_batch_stats(x), w, b, eps=1e-3), shape, (c,), (c,))
    else:
        check(lambda x: F.batch_norm(x, None, None, training=True),
              lambda x: bn_ref(x, *_batch_stats(x)), shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_eval_uses_running_statistics(check, shape):
    c = shape[1]
    rng = np.random.default_rng(1)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    rm, rv = _const(mean), _const(var)
    check(lambda x, w, b: F.batch_norm(x, rm.to(x.device), rv.to(x.device), w, b,
                                       training=False),
          lambda x, w, b: bn_ref(x, mean, var, w, b), shape, (c,), (c,))
    assert rm.tolist() == mean.tolist() and rv.tolist() == var.tolist()  # untouched


def test_batch_norm_updates_running_statistics_like_pytorch():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(4, 2, 3, 3))
    rm0, rv0 = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    rm, rv = _const(rm0), _const(rv0)
    versions = rm._version[0], rv._version[0]
    F.batch_norm(_const(x), rm, rv, training=True, momentum=0.2)
    n = x.size // 2  # values per channel
    batch_mean = x.mean(axis=(0, 2, 3))
    unbiased_var = ((x - batch_mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3)) / (n - 1)
    np.testing.assert_allclose(rm.numpy(), 0.8 * rm0 + 0.2 * batch_mean, rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), 0.8 * rv0 + 0.2 * unbiased_var, rtol=1e-12)
    assert rm._version[0] == versions[0] + 1 and rv._version[0] == versions[1] + 1


def test_batch_norm_training_gradient_through_the_statistics():
    # Hand-checkable: normalising two values gives -1 and +1 whatever they are (eps = 0), so
    # the gradient of any function of the output with respect to the input is zero along
    # shifts and scalings of the input.
    x = _const([[1.0], [3.0]]).requires_grad_()
    (F.batch_norm(x, None, None, training=True, eps=0.0) * _const([[2.0], [5.0]])).sum() \
        .backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0.0], [0.0]], atol=1e-12)


def test_batch_norm_float32_stays_float32():
    x = engine.randn(8, 4, 3, 3, requires_grad=True)
    w, b = engine.ones(4, requires_grad=True), engine.zeros(4, requires_grad=True)
    rm, rv = engine.zeros(4), engine.ones(4)
    out = F.batch_norm(x, rm, rv, w, b, training=True)
    out.sum().backward()
    assert out.dtype == x.grad.dtype == w.grad.dtype == rm.dtype == engine.float32


def test_batch_norm_float32_gradient_with_a_large_mean():
    # The rule sums g * x and subtracts mean * sum(g), which cancels when the mean is far from
    # zero: 100 standard deviations off, float32 must still give the float64 gradients to a few
    # units in the 6th digit (the weight's) and better (the input's, the bias'); measured
    # 1.7e-5, 8e-7 and 3e-7 (a sum of squares minus the squared mean would lose them all).
    rng = np.random.default_rng(5)
    x64, g64 = 100 + rng.normal(size=(16, 4, 8, 8)), rng.normal(size=(16, 4, 8, 8))
    w64, b64 = rng.uniform(0.5, 2, size=4), rng.normal(size=4)
    grads = {}
    for dtype in (engine.float32, F64):
        x, w, b = (engine.tensor(a, dtype=dtype, requires_grad=True) for a in (x64, w64, b64))
        F.batch_norm(x, None, None, w, b, training=True).backward(engine.tensor(g64, dtype=dtype))
        grads[dtype] = [t.grad.numpy().astype(np.float64) for t in (x, w, b)]
    for got, ref, tol in zip(grads[engine.float32], grads[F64], (4e-6, 5e-5, 1e-6)):
        np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("call, error, words", [
    (lambda: F.batch_norm(engine.ones(4), None, None, training=True), RuntimeError,
     ["at least 2 dims", "(4,)"]),
    (lambda: F.batch_norm(engine.ones(4, 3), engine.zeros(2), engine.ones(2)), RuntimeError,
     ["running_mean of shape (2,)", "3 channels", "expected (3,)"]),
    (lambda: F.batch_norm(engine.ones(4, 3), None, None, engine.ones(4), training=True),
     RuntimeError, ["weight of shape (4,)"]),
    (lambda: F.batch_norm(engine.ones(4, 3), None, None, training=False), RuntimeError,
     ["required in evaluation"]),
    (lambda: F.batch_norm(engine.ones(1, 3), None, None, training=True), ValueError,
     ["more than 1 value per channel", "(1, 3)"]),
    (lambda: F.batch_norm(engine.ones(4, 3), None, None, training=True, momentum=None),
     ValueError, ["momentum"]),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_batch_norm_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# ---------------------------------------------------------------- attention

def attention_ref(q, k, v, mask=None, causal=False, scale=None):
    """softmax(q k^T scale + mask) v in numpy; a bool mask is True where attention is allowed,
    and a row with nothing allowed gives zeros."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    if causal:
        mask = np.tril(np.ones(s.shape[-2:], dtype=bool))
    if mask is not None and mask.dtype == bool:
        s = np.where(mask, s, -np.inf)
    elif mask is not None:
        s = s + mask
    top = np.max(s, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(s - top)
    total = e.sum(axis=-1, keepdims=True)
    return (e / np.where(total == 0, 1, total)) @ v


RNG = np.random.default_rng(3)
ATTENTION = [
    # q, k, v shapes, mask (or "causal"), scale
    ((2, 3, 4), (2, 5, 4), (2, 5, 3), None, None),
    ((2, 2, 4, 3), (2, 2, 4, 3), (2, 2, 4, 2), "causal", None),
    ((2, 4, 3), (2, 3, 3), (2, 3, 2), "causal", None),  # more queries than keys
    ((3, 4, 3), (3, 5, 3), (3, 5, 2), RNG.random((4, 5)) > 0.3, None),
    ((2, 4, 3), (2, 5, 3), (2, 5, 2), RNG.normal(size=(2, 1, 5)), 0.5),
    ((2, 1, 4, 3), (1, 3, 5, 3), (5, 2), None, None),  # broadcast batch dims
]


@pytest.mark.parametrize("qs, ks, vs, mask, scale", ATTENTION, ids=str)
def test_attention_matches_numpy_and_finite_differences(check, qs, ks, vs, mask, scale):
    causal = isinstance(mask, str)
    m = None if causal else mask
    em = None if m is None else engine.tensor(m) if m.dtype == bool else _const(m)
    check(lambda q, k, v: F.scaled_dot_product_attention(
              q, k, v, None if em is None else em.to(q.device), is_causal=causal, scale=scale),
          lambda q, k, v: attention_ref(q, k, v, m, causal, scale), qs, ks, vs)


@pytest.mark.parametrize("L, S", [(70, 70), (70, 40), (40, 70)], ids=str)
def test_causal_attention_in_blocks_of_queries(check, L, S):
    # Causal attention runs by blocks of 32 queries, each against the keys it may see: rows
    # past the first block, and more queries or more keys than that, against the reference.
    check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
          lambda q, k, v: attention_ref(q, k, v, None, True, None), (1, L, 2), (1, S, 2),
          (1, S, 2))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_on_head_views_lays_out_its_results_for_the_merge(causal):
    # Multi-head attention passes (N, heads, L, E) views of (N, L, heads * E) projections:
    # the output and the gradients come back in that layout, so transposing them back to
    # (N, L, heads, E) needs no copy; values and gradients as for contiguous inputs, checked
    # against the numpy reference (forward) and finite differences (backward, float64).
    rng = np.random.default_rng(5)
    N, L, H, E = 2, 35, 3, 4
    arrays = [rng.normal(size=(N, L, H * E)) for _ in range(3)]
    q, k, v = (engine.tensor(a, requires_grad=True) for a in arrays)
    heads = [t.reshape(N, L, H, E).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*heads, is_causal=causal)
    assert out.transpose(1, 2).numpy().flags.c_contiguous
    plain = [a.reshape(N, L, H, E).transpose(0, 2, 1, 3) for a in arrays]
    np.testing.assert_allclose(out.numpy(), attention_ref(*plain, None, causal, None),
                               rtol=1e-12)
    g = rng.normal(size=out.shape)
    out.backward(engine.tensor(g))
    for i, t in enumerate((q, k, v)):
        def loss(a, i=i):
            ins = [x.reshape(N, L, H, E).transpose(0, 2, 1, 3) for x in arrays]
            ins[i] = a.reshape(N, L, H, E).transpose(0, 2, 1, 3)
            return float((attention_ref(*ins, None, causal, None) * g).sum())

        numeric = np.zeros_like(arrays[i])
        for j in np.ndindex(numeric.shape):
            d = np.zeros_like(numeric)
            d[j] = 1e-6
            numeric[j] = (loss(arrays[i] + d) - loss(arrays[i] - d)) / 2e-6
        np.testing.assert_allclose(t.grad.numpy(), numeric, rtol=1e-5, atol=1e-8)


def test_attention_float_mask_gets_a_gradient():
    q, k, v = (engine.randn(2, 3, 4, dtype=F64) for _ in range(3))
    mask = engine.randn(3, 3, dtype=F64, requires_grad=True)
    assert engine.gradcheck(lambda m: F.scaled_dot_product_attention(q, k, v, m), [mask])


def test_attention_fully_masked_query_gives_zeros_not_nan():
    q, k, v = (engine.randn(1, 3, 4, dtype=F64, requires_grad=True) for _ in range(3))
    mask = np.ones((3, 3), dtype=bool)
    mask[1] = False  # query 1 may attend to nothing
    out = F.scaled_dot_product_attention(q, k, v, engine.tensor(mask))
    out.sum().backward()
    assert out[0, 1].tolist() == [0.0] * 4
    for t in (q, k, v):
        assert np.isfinite(t.grad.numpy()).all()
    assert q.grad[0, 1].tolist() == [0.0] * 4
    minus_inf = np.where(mask, 0.0, -np.inf)  # the same through a float mask
    out = F.scaled_dot_product_attention(q, k, v, _const(minus_inf))
    assert out[0, 1].tolist() == [0.0] * 4 and np.isfinite(out.numpy()).all()


def test_attention_causal_hand_computed():
    # Equal scores: query i averages values 0..i.
    q = k = engine.zeros(1, 3, 2)
    v = engine.tensor([[[1.0], [2.0], [6.0]]])
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out.numpy().ravel(), [1.0, 1.5, 3.0], rtol=1e-6)


def test_attention_dropout_keeps_the_expectation():
    engine.manual_seed(0)
    q = k = engine.zeros(4000, 4, 2)
    v = engine.ones(4000, 4, 1)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).numpy()
    assert 0.97 < out.mean() < 1.03  # each weight 1/4 kept with p = 0.5, scaled by 2
    assert set(np.unique(out)) <= {0.0, 0.5, 1.0, 1.5, 2.0}


@pytest.mark.parametrize("call, error, words", [
    (lambda: F.scaled_dot_product_attention(engine.ones(2, 3, 4), engine.ones(2, 5, 3),
                                            engine.ones(2, 5, 3)), RuntimeError,
     ["same last dim", "(2, 3, 4)", "(2, 5, 3)"]),
    (lambda: F.scaled_dot_product_attention(engine.ones(2, 3, 4), engine.ones(2, 5, 4),
                                            engine.ones(2, 6, 3)), RuntimeError,
     ["sequence length", "(2, 6, 3)"]),
    (lambda: F.scaled_dot_product_attention(engine.ones(2, 3, 4), engine.ones(3, 5, 4),
                                            engine.ones(3, 5, 4)), RuntimeError,
     ["do not broadcast"]),
    (lambda: F.scaled_dot_product_attention(engine.ones(4), engine.ones(4), engine.ones(4)),
     RuntimeError, ["at least 2 dims"]),
    (lambda: F.scaled_dot_product_attention(engine.ones(2, 3, 4), engine.ones(2, 5, 4),
                                            engine.ones(2, 5, 4),
                                            engine.ones(3, 4, dtype=engine.bool)),
     RuntimeError, ["attn_mask of shape (3, 4)", "(2, 3, 5)"]),
    (lambda: F.scaled_dot_product_attention(engine.ones(2, 3, 4), engine.ones(2, 5, 4),
                                            engine.ones(2, 5, 4),
                                            engine.ones(3, 5, dtype=engine.int64)),
     TypeError, ["bool or floating point", "int64"]),
    (lambda: F.scaled_dot_product_attention(engine.ones(2, 3, 4), engine.ones(2, 3, 4),
                                            engine.ones(2, 3, 4),
                                            engine.ones(3, 3, dtype=engine.bool),
                                            is_causal=True), ValueError, ["not both"]),
    (lambda: F.scaled_dot_product_attention(engine.ones(2, 3, 4), engine.ones(2, 3, 4),
                                            engine.ones(2, 3, 4), dropout_p=1.0), ValueError,
     ["dropout_p"]),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_attention_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# ---------------------------------------------------------------- PyTorch, when installed

def test_matches_pytorch():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    rng = np.random.default_rng(4)
    x, w, b = rng.normal(size=(8, 3, 5, 4)), rng.normal(size=3), rng.normal(size=3)
    for training in (True, False):
        ours = [_const(a).requires_grad_() for a in (x, w, b)]
        theirs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
        rm, rv = _const(np.zeros(3)), _const(np.ones(3))
        trm, trv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        out = F.batch_norm(ours[0], rm, rv, ours[1], ours[2], training, 0.3, 1e-4)
        ref = tf.batch_norm(theirs[0], trm, trv, theirs[1], theirs[2], training, 0.3, 1e-4)
        (out * out).sum().backward()
        (ref * ref).sum().backward()
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rm.numpy(), trm.numpy(), rtol=1e-12)
        np.testing.assert_allclose(rv.numpy(), trv.numpy(), rtol=1e-12)
        for a, t in zip(ours, theirs):
            np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-8, atol=1e-10)
    q, k, v = (rng.normal(size=(2, 2, 5, 4)) for _ in range(3))
    bool_mask = rng.random((5, 5)) > 0.4
    bool_mask[2] = False  # a fully masked query: zeros in PyTorch >= 2.5
    for kw in ({}, {"is_causal": True}, {"attn_mask": bool_mask}, {"scale": 0.3}):
        ours = [_const(a).requires_grad_() for a in (q, k, v)]
        theirs = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
        our_kw = dict(kw, attn_mask=engine.tensor(kw["attn_mask"])) if "attn_mask" in kw \
            else kw
        their_kw = dict(kw, attn_mask=torch.tensor(kw["attn_mask"])) if "attn_mask" in kw \
            else kw
        out = F.scaled_dot_product_attention(*ours, **our_kw)
        ref = tf.scaled_dot_product_attention(*theirs, **their_kw)
        (out * out).sum().backward()
        (ref * ref).sum().backward()
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
        for a, t in zip(ours, theirs):
            np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-8, atol=1e-10)
