"""conv2d, conv1d and the pooling ops: the forward against naive loop-by-loop numpy references
written here, the backward against central finite differences (float64), over strides,
padding, dilation, groups and rectangular kernels; then PyTorch's semantics on the edge cases
(ties, NaN, ceil mode) and the errors bad input must raise. PyTorch itself is an optional
second reference.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine.ops import conv as conv_ops

F64 = engine.float64


# ---------------------------------------------------------------- naive references

def conv2d_ref(x, w, b=None, stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """Direct convolution: one dot product per output element. pads = (top, bottom, left,
    right)."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    xp = np.zeros((N, C, H + pads[0] + pads[1], W + pads[2] + pads[3]))
    xp[:, :, pads[0]:pads[0] + H, pads[2]:pads[2] + W] = x
    Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((N, O, Ho, Wo))
    og = O // groups
    for n, o, i, j in itertools.product(range(N), range(O), range(Ho), range(Wo)):
        g = o // og
        patch = xp[n, g * Cg:(g + 1) * Cg, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                   j * sw:j * sw + dw * (kw - 1) + 1:dw]
        out[n, o, i, j] = (patch * w[o]).sum() + (0.0 if b is None else b[o])
    return out


def pool_ref(x, kernel, stride, pad, reduce, dilation=(1, 1), ceil_mode=False,
             count_include_pad=True, divisor=None):
    """Loop-by-loop max or average pooling with PyTorch's output-size and divisor rules."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation

    def size(n, k, s, p, d):
        span = n + 2 * p - d * (k - 1) - 1
        out = -(-span // s) + 1 if ceil_mode else span // s + 1
        return out - 1 if ceil_mode and (out - 1) * s >= n + p else out

    Ho, Wo = size(H, kh, sh, ph, dh), size(W, kw, sw, pw, dw)
    out = np.zeros((N, C, Ho, Wo))
    for n, c, i, j in itertools.product(range(N), range(C), range(Ho), range(Wo)):
        rows = [i * sh - ph + a * dh for a in range(kh)]
        cols = [j * sw - pw + b * dw for b in range(kw)]
        vals = [x[n, c, r, q] for r in rows for q in cols if 0 <= r < H and 0 <= q < W]
        if reduce == "max":
            out[n, c, i, j] = max(vals)
            continue
        if divisor is not None:
            count = divisor
        elif count_include_pad:  # padding counts, the ceil-mode overhang does not
            count = (min(i * sh - ph + kh, H + ph) - (i * sh - ph)) * \
                    (min(j * sw - pw + kw, W + pw) - (j * sw - pw))
        else:
            count = len(vals)
        out[n, c, i, j] = sum(vals) / count
    return out


def adaptive_ref(x, out_size):
    N, C, H, W = x.shape
    Ho, Wo = out_size
    out = np.zeros((N, C, Ho, Wo))
    for i, j in itertools.product(range(Ho), range(Wo)):
        r0, r1 = (i * H) // Ho, -(-((i + 1) * H) // Ho)
        c0, c1 = (j * W) // Wo, -(-((j + 1) * W) // Wo)
        out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def _pads(padding):
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph, pw, pw)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---------------------------------------------------------------- conv2d

CONV2D = [
    # x shape, w shape, kwargs
    ((2, 3, 6, 5), (4, 3, 3, 3), {}),
    ((2, 3, 6, 5), (4, 3, 3, 3), {"padding": 1}),
    ((2, 3, 7, 6), (4, 3, 3, 2), {"stride": 2, "padding": (1, 0)}),
    ((1, 2, 7, 8), (3, 2, 2, 3), {"stride": (2, 1), "padding": (0, 2)}),
    ((2, 2, 8, 7), (3, 2, 3, 3), {"dilation": 2, "padding": 2}),
    ((1, 2, 9, 7), (2, 2, 3, 2), {"dilation": (2, 1), "stride": (1, 2), "padding": 1}),
    ((2, 4, 5, 5), (6, 2, 3, 3), {"groups": 2, "padding": 1}),
    ((1, 4, 6, 6), (4, 1, 3, 3), {"groups": 4, "stride": 2, "padding": 1}),  # depthwise
    ((2, 3, 5, 5), (2, 3, 1, 1), {"padding": 2}),  # padding wider than the kernel
    ((2, 3, 5, 4), (2, 3, 1, 1), {"stride": 2}),
    ((2, 4, 7, 5), (6, 2, 1, 1), {"stride": (3, 2), "groups": 2}),  # rows 6 and 7 unread
    ((2, 3, 4, 5), (2, 3, 1, 1), {"stride": (1, 2), "dilation": 2}),
    ((2, 3, 4, 5), (5, 3, 1, 1), {}),
    ((1, 1, 4, 4), (2, 1, 4, 4), {}),  # kernel as large as the input
    ((2, 1, 6, 6), (8, 1, 3, 3), {"padding": 1}),  # many more outputs than inputs
    ((2, 2, 7, 6), (3, 2, 4, 3), {"padding": "same", "dilation": (1, 2)}),
    ((2, 2, 7, 6), (3, 2, 4, 3), {"padding": "valid"}),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("xs, ws, kw", CONV2D, ids=lambda v: str(v))
def test_conv2d_matches_loops_and_finite_differences(check, xs, ws, kw, bias):
    stride, dilation = _pair(kw.get("stride", 1)), _pair(kw.get("dilation", 1))
    padding = kw.get("padding", 0)
    if padding == "same":
        pads = []
        for k, d in zip(ws[2:], dilation):
            pads += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
    else:
        pads = _pads(0 if padding == "valid" else padding)
    shapes = (xs, ws) + (((ws[0],),) if bias else ())

    def ours(x, w, b=None):
        return F.conv2d(x, w, b, **kw)

    def ref(x, w, b=None):
        return conv2d_ref(x, w, b, stride, tuple(pads), dilation, kw.get("groups", 1))

    check(ours, ref, *shapes)


@pytest.mark.parametrize("samples_per_chunk", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_in_chunks_of_samples(check, monkeypatch, samples_per_chunk, stride):
    # The column matrix is built a few samples at a time; force several uneven chunks.
    x_shape, w_shape = (3, 2, 5, 5), (3, 2, 3, 3)
    monkeypatch.setattr(conv_ops, "_chunk", lambda xp, n, sample_bytes: samples_per_chunk)
    check(lambda x, w: F.conv2d(x, w, stride=stride, padding=1),
          lambda x, w: conv2d_ref(x, w, None, (stride, stride), (1, 1, 1, 1)),
          x_shape, w_shape)


def test_conv2d_unbatched_input(check):
    check(lambda x, w: F.conv2d(x, w, padding=1),
          lambda x, w: conv2d_ref(x[None], w, pads=(1, 1, 1, 1))[0], (2, 4, 5), (3, 2, 3, 3))


def test_conv2d_hand_computed():
    x = engine.arange(16.0).reshape(1, 1, 4, 4)
    w = engine.ones(1, 1, 2, 2)
    out = F.conv2d(x, w, engine.tensor([1.0]), stride=2)
    assert out.tolist() == [[[[0 + 1 + 4 + 5 + 1.0, 2 + 3 + 6 + 7 + 1.0],
                              [8 + 9 + 12 + 13 + 1.0, 10 + 11 + 14 + 15 + 1.0]]]]


def test_conv2d_float32_stays_float32():
    x = engine.randn(2, 3, 8, 8, requires_grad=True)
    w = engine.randn(4, 3, 3, 3, requires_grad=True)
    b = engine.zeros(4, requires_grad=True)
    out = F.conv2d(x, w, b, padding=1)
    out.sum().backward()
    assert out.dtype == engine.float32
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (engine.float32,) * 3


def test_conv2d_gradient_accumulates_over_reuse():
    # The same weight used twice: both contributions arrive.
    x = engine.randn(1, 2, 5, 5, dtype=F64)
    w = engine.randn(2, 2, 3, 3, dtype=F64, requires_grad=True)
    assert engine.gradcheck(lambda w: F.conv2d(F.conv2d(x, w, padding=1), w), [w])


# ---------------------------------------------------------------- conv1d

CONV1D = [
    ((2, 3, 9), (4, 3, 3), {}),
    ((2, 3, 9), (4, 3, 3), {"padding": 2, "stride": 2}),
    ((1, 4, 10), (2, 2, 2), {"groups": 2, "dilation": 3, "padding": 1}),
    ((2, 2, 7), (3, 2, 4), {"padding": "same"}),
]


@pytest.mark.parametrize("xs, ws, kw", CONV1D, ids=lambda v: str(v))
def test_conv1d_matches_loops_and_finite_differences(check, xs, ws, kw):
    padding = kw.get("padding", 0)
    if padding == "same":
        total = kw.get("dilation", 1) * (ws[2] - 1)
        pads = (0, 0, total // 2, total - total // 2)
    else:
        pads = (0, 0, padding, padding)

    def ref(x, w, b):
        return conv2d_ref(x[:, :, None], w[:, :, None], b, (1, kw.get("stride", 1)), pads,
                          (1, kw.get("dilation", 1)), kw.get("groups", 1))[:, :, 0]

    check(lambda x, w, b: F.conv1d(x, w, b, **kw), ref, xs, ws, (ws[0],))


def test_conv1d_unbatched_input(check):
    check(lambda x, w: F.conv1d(x, w), lambda x, w: conv2d_ref(x[None, :, None], w[:, :, None])
          [0, :, 0], (3, 6), (2, 3, 2))


# ---------------------------------------------------------------- pooling

MAX_POOL = [
    (2, None, 0, 1, False),
    (3, 1, 1, 1, False),   # overlapping windows: gradients add
    ((2, 3), (1, 2), (1, 1), 1, False),
    (2, 2, 0, 2, False),
    (3, 2, 1, 1, True),
    (2, 3, 0, 1, True),
]


@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode", MAX_POOL, ids=str)
def test_max_pool2d_matches_loops_and_finite_differences(check, kernel, stride, padding,
                                                         dilation, ceil_mode):
    k = _pair(kernel)
    s = k if stride is None else _pair(stride)
    check(lambda x: F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode),
          lambda x: pool_ref(x, k, s, _pair(padding), "max", _pair(dilation), ceil_mode),
          (2, 2, 7, 8))


def test_max_pool2d_ties_send_the_gradient_to_the_first_maximum():
    x = engine.ones(1, 1, 2, 4, dtype=F64, requires_grad=True)
    F.max_pool2d(x, 2).sum().backward()
    assert x.grad.tolist() == [[[[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]]
    # Overlapping windows with one shared winner: it collects both gradients.
    y = engine.tensor([[[[0.0, 5.0, 0.0]]]], dtype=F64, requires_grad=True)
    F.max_pool2d(y, (1, 2), stride=1).sum().backward()
    assert y.grad.tolist() == [[[[0.0, 2.0, 0.0]]]]


def test_max_pool2d_propagates_nan():
    x = engine.tensor([[[[1.0, float("nan")], [3.0, 2.0]]]], dtype=F64, requires_grad=True)
    out = F.max_pool2d(x, 2)
    assert np.isnan(out.item())
    out.sum().backward()
    assert x.grad.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


@pytest.mark.parametrize("stride", [2, 1], ids=["disjoint", "overlapping"])
def test_max_pool2d_sends_an_infinite_gradient_to_the_winner_alone(stride):
    # Only the window's maximum takes its gradient; the others get exactly 0, even when the
    # gradient is inf or NaN (a product with a 0/1 mask would give them NaN).
    x = engine.tensor([[[[1.0, 4.0, 2.0], [3.0, 0.0, 5.0]]]], dtype=F64, requires_grad=True)
    out = F.max_pool2d(x, 2, stride=stride)
    g = [[[[float("inf")]]]] if stride == 2 else [[[[float("inf"), float("nan")]]]]
    out.backward(engine.tensor(g, dtype=F64))
    got = x.grad.tolist()[0][0]
    if stride == 2:  # one window over columns 0-1: 4.0 wins
        assert got == [[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]]
    else:  # windows over columns 0-1 (4.0 wins) and 1-2 (5.0 wins)
        assert got[0][:1] + got[0][2:] + got[1][:2] == [0.0, 0.0, 0.0, 0.0]
        assert got[0][1] == float("inf") and np.isnan(got[1][2])


def test_max_pool2d_pads_with_minus_infinity():
    x = -engine.ones(1, 1, 2, 2)
    assert F.max_pool2d(x, 2, stride=1, padding=1).flatten().tolist() == [-1.0] * 9


AVG_POOL = [
    (2, None, 0, False, True, None),
    (3, 2, 1, False, True, None),
    (3, 2, 1, False, False, None),
    ((2, 3), (1, 2), (1, 1), True, True, None),
    (3, 2, 1, True, False, None),
    (2, 1, 1, False, True, 3),
]


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, include_pad, divisor", AVG_POOL,
                         ids=str)
def test_avg_pool2d_matches_loops_and_finite_differences(check, kernel, stride, padding,
                                                         ceil_mode, include_pad, divisor):
    k = _pair(kernel)
    s = k if stride is None else _pair(stride)
    check(lambda x: F.avg_pool2d(x, kernel, stride, padding, ceil_mode, include_pad, divisor),
          lambda x: pool_ref(x, k, s, _pair(padding), "avg", ceil_mode=ceil_mode,
                             count_include_pad=include_pad, divisor=divisor),
          (2, 2, 7, 8))


@pytest.mark.parametrize("shape, size", [
    ((2, 3, 6, 4), 1), ((2, 3, 6, 4), (3, 2)), ((2, 2, 7, 5), (3, 4)), ((1, 2, 3, 3), 5),
    ((1, 2, 5, 6), (None, 4)),
], ids=str)
def test_adaptive_avg_pool2d_matches_loops_and_finite_differences(check, shape, size):
    out_size = (size, size) if isinstance(size, int) else size
    out_size = tuple(n if o is None else o for o, n in zip(out_size, shape[2:]))
    check(lambda x: F.adaptive_avg_pool2d(x, size), lambda x: adaptive_ref(x, out_size), shape)


def test_pooling_accepts_unbatched_input(check):
    check(lambda x: F.max_pool2d(x, 2), lambda x: pool_ref(x[None], (2, 2), (2, 2), (0, 0),
                                                           "max")[0], (3, 4, 6))
    check(lambda x: F.avg_pool2d(x, 2), lambda x: pool_ref(x[None], (2, 2), (2, 2), (0, 0),
                                                           "avg")[0], (3, 4, 6))
    check(lambda x: F.adaptive_avg_pool2d(x, 2), lambda x: adaptive_ref(x[None], (2, 2))[0],
          (3, 4, 6))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, error, words", [
    (lambda: F.conv2d(engine.ones(3, 4), engine.ones(2, 3, 1, 1)), RuntimeError,
     ["3-D", "4-D", "2-D", "(3, 4)"]),
    (lambda: F.conv2d(engine.ones(1, 3, 5, 5), engine.ones(2, 3, 3)), RuntimeError,
     ["4-D weight", "(2, 3, 3)"]),
    (lambda: F.conv2d(engine.ones(1, 5, 5, 5), engine.ones(2, 3, 3, 3)), RuntimeError,
     ["5 channels", "expects 3"]),
    (lambda: F.conv2d(engine.ones(1, 4, 5, 5), engine.ones(3, 2, 3, 3), groups=2), ValueError,
     ["groups=2", "output channels"]),
    (lambda: F.conv2d(engine.ones(1, 3, 5, 5), engine.ones(2, 1, 3, 3), groups=2), ValueError,
     ["groups=2", "input channels"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 5, 5), padding=0),
     RuntimeError, ["kernel size (5, 5)", "padded input size (4, 4)"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3, 3), dilation=2),
     RuntimeError, ["(5, 5) with dilation", "(4, 4)"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3, 3), stride=0), ValueError,
     ["stride must be positive", "(0, 0)"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3, 3), padding=-1),
     ValueError, ["padding must be non-negative"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3, 3), stride=2,
                      padding="same"), ValueError, ["'same'", "strided"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3, 3), engine.ones(3)),
     RuntimeError, ["bias of shape (3,)", "expected (2,)"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3, 3, dtype=F64)), TypeError,
     ["float32", "float64"]),
    (lambda: F.conv2d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3, 3), stride=(1, 2, 3)),
     TypeError, ["stride", "2 ints"]),
    (lambda: F.conv1d(engine.ones(1, 3, 4, 4), engine.ones(2, 3, 3)), RuntimeError,
     ["2-D", "3-D", "4-D input"]),
    (lambda: F.conv1d(engine.ones(1, 3, 2), engine.ones(2, 3, 3)), RuntimeError,
     ["kernel size (3,)", "padded input size (2,)"]),
    (lambda: F.max_pool2d(engine.ones(4, 4), 2), RuntimeError, ["3-D", "4-D", "2-D"]),
    (lambda: F.max_pool2d(engine.ones(1, 1, 2, 2), 3), RuntimeError,
     ["kernel size (3, 3)", "padded input size (2, 2)"]),
    (lambda: F.max_pool2d(engine.ones(1, 1, 4, 4), 2, padding=2), ValueError,
     ["at most half"]),
    (lambda: F.avg_pool2d(engine.ones(1, 1, 4, 4), 2, stride=0), ValueError,
     ["stride must be positive"]),
    (lambda: F.avg_pool2d(engine.ones(1, 1, 4, 4), 2, divisor_override=0), ValueError,
     ["divisor_override"]),
    (lambda: F.adaptive_avg_pool2d(engine.ones(1, 1, 4, 4), (2, 0)), ValueError,
     ["output_size must be positive"]),
    (lambda: F.adaptive_avg_pool2d(engine.ones(1, 1, 4, 4), (1, 2, 3)), TypeError,
     ["pair"]),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_input_raises_a_clear_error(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# ---------------------------------------------------------------- PyTorch, when installed

def test_matches_pytorch_at_model_sizes():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    cases = [  # lenet and resnet layers, float32
        ((16, 1, 28, 28), (6, 1, 5, 5), {"padding": 2}),
        ((16, 6, 14, 14), (16, 6, 5, 5), {}),
        ((8, 16, 16, 16), (16, 16, 3, 3), {"padding": 1}),
        ((8, 16, 16, 16), (32, 16, 3, 3), {"padding": 1, "stride": 2}),
        ((8, 16, 16, 16), (32, 16, 1, 1), {"stride": 2}),
        ((4, 8, 9, 9), (8, 2, 3, 3), {"padding": 2, "dilation": 2, "groups": 4}),
    ]
    for xs, ws, kw in cases:
        x, w, b = (rng.standard_normal(s).astype(np.float32) for s in (xs, ws, ws[:1]))
        ours = [engine.tensor(a, requires_grad=True) for a in (x, w, b)]
        theirs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
        out, ref = F.conv2d(*ours, **kw), torch.nn.functional.conv2d(*theirs, **kw)
        g = rng.standard_normal(ref.shape).astype(np.float32)
        out.backward(engine.tensor(g))
        ref.backward(torch.tensor(g))
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-4, atol=1e-4)
        for a, t in zip(ours, theirs):
            np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-4, atol=2e-3)
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    pools = [
        (lambda f, t: f.max_pool2d(t, 3, 2, 1, ceil_mode=True)),
        (lambda f, t: f.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False)),
        (lambda f, t: f.adaptive_avg_pool2d(t, (4, 5))),
    ]
    for pool in pools:
        ours, theirs = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        out, ref = pool(F, ours), pool(torch.nn.functional, theirs)
        (out * out).sum().backward()
        (ref * ref).sum().backward()
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-5,
                                   atol=1e-6)
