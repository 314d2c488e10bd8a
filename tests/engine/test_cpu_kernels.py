"""The compiled CPU kernels against the numpy path each op keeps (``DPTRAIN_CPU_KERNELS=0``):
the same values within the op's float32 bar (or float64 rounding), the same gradients, the
same inf and NaN; and numba loaded only where an op runs on the CPU."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fresh_imports import modules_loaded_by, within

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn

F32, F64 = engine.float32, engine.float64


def both_ways(monkeypatch, fn):
    """``(kernels, numpy_path)``: `fn()` with the compiled kernels, then with
    ``DPTRAIN_CPU_KERNELS=0``."""
    monkeypatch.delenv("DPTRAIN_CPU_KERNELS", raising=False)
    kernels = fn()
    monkeypatch.setenv("DPTRAIN_CPU_KERNELS", "0")
    numpy_path = fn()
    monkeypatch.delenv("DPTRAIN_CPU_KERNELS")
    return kernels, numpy_path


def _gelu_value_and_grad(x: np.ndarray, dtype, grad: bool = True):
    t = engine.tensor(x, dtype=dtype, requires_grad=grad)
    y = F.gelu(t)
    if not grad:
        return y.numpy(), None
    y.sum().backward()
    return y.numpy(), t.grad.numpy()


SPECIAL = [np.inf, -np.inf, np.nan, -1e30, 1e30, -100.0, 100.0, -20.0, 20.0, -13.5, 13.5,
           -10.0, 0.0, -0.0, 1e-40, -1e-40, 1e-30, 88.0, -88.0, 87.5, -87.5]


def test_gelu_float32_kernel_agrees_with_the_numpy_path_and_float64(monkeypatch):
    x64 = np.concatenate([np.linspace(-15, 15, 300_001), SPECIAL])
    x = x64.astype(np.float32)
    (yk, gk), (yn, gn) = both_ways(monkeypatch, lambda: _gelu_value_and_grad(x, F32))
    # the same inf and NaN where they come out, and the sign of every zero
    for a, b in ((yk, yn), (gk, gn)):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(a[np.isinf(a)], b[np.isinf(b)])
    np.testing.assert_array_equal(np.signbit(yk[yk == 0]), np.signbit(yn[yn == 0]))
    # each within the numpy path's bar of a float64 reference: 3.1 ulp of max(|gelu|, 1)
    # for the value, and the float64 rule for the slope
    x_ref = engine.tensor(x.astype(np.float64), requires_grad=True)
    y_ref = F.gelu(x_ref)
    y_ref.sum().backward()
    ok = np.isfinite(y_ref.numpy())
    ulp = np.finfo(np.float32).eps * np.maximum(np.abs(y_ref.numpy()), 1)
    for y in (yk, yn):
        assert np.max(np.abs(y[ok] - y_ref.numpy()[ok]) / ulp[ok]) <= 3.1
    finite = np.isfinite(x_ref.grad.numpy())
    for g in (gk, gn):
        np.testing.assert_allclose(g[finite], x_ref.grad.numpy()[finite], rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(x[np.isnan(gk)], x[np.isnan(gn)])


def test_gelu_kernel_values_do_not_depend_on_the_gradient(monkeypatch):
    x = np.random.default_rng(0).standard_normal((3, 70_000)).astype(np.float32) * 4
    with_grad, _ = _gelu_value_and_grad(x, F32)
    without, _ = _gelu_value_and_grad(x, F32, grad=False)
    np.testing.assert_array_equal(with_grad, without)


def _ff_value_and_grads(x, w, b, dtype, fused: bool):
    from dptrain.engine.ops.linalg import gelu_linear

    ts = [engine.tensor(a, dtype=dtype, requires_grad=True) for a in (x, w, b)]
    y = gelu_linear(*ts) if fused else F.linear(F.gelu(ts[0]), ts[1], ts[2])
    (y * engine.tensor(np.linspace(-1, 1, y.shape[-1]), dtype=dtype)).sum().backward()
    return [y.numpy()] + [t.grad.numpy() for t in ts]


def test_gelu_linear_in_float32_agrees_with_gelu_then_linear_and_float64(monkeypatch):
    # The fused op computes the GELU again in backward: in float32, on both paths, it must
    # give what the two ops give, and both must stay near the float64 result.
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((4, 33, 96)) * 3, rng.standard_normal((40, 96)), \
        rng.standard_normal(40)
    ref = _ff_value_and_grads(x, w, b, F64, fused=False)
    for fused in (True, False):
        for got in both_ways(monkeypatch, lambda f=fused: _ff_value_and_grads(x, w, b, F32, f)):
            for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
                np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-4 * np.abs(r).max(),
                                           err_msg=f"{name}, fused={fused}")
    fused, composed = (both_ways(monkeypatch, lambda f=f: _ff_value_and_grads(x, w, b, F32, f))
                       for f in (True, False))
    for kf, kc in zip(fused, composed):  # the same arithmetic in the same order
        for a, c in zip(kf, kc):
            np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(c).max())


def test_gelu_of_a_transposed_float32_input_takes_the_numpy_path(monkeypatch):
    a = np.random.default_rng(1).standard_normal((64, 80)).astype(np.float32)

    def run():
        t = engine.tensor(a, requires_grad=True)
        y = F.gelu(t.transpose(0, 1))
        y.sum().backward()
        return y.numpy(), t.grad.numpy()

    (yk, gk), (yn, gn) = both_ways(monkeypatch, run)
    np.testing.assert_array_equal(yk, yn)
    np.testing.assert_array_equal(gk, gn)


def test_exp_kernel_against_numpy_across_float32s_range():
    from numba import njit

    from dptrain.engine.cpu_kernels import _exp_f32

    @njit
    def exp_all(a, out):
        for i in range(a.size):
            out[i] = _exp_f32(a[i])

    a = np.concatenate([np.linspace(-87.3, 88.72, 1_000_003, dtype=np.float32),
                        np.array([89.0, 1e30, np.inf, -87.4, -1e30, -np.inf, np.nan, 0.0],
                                 dtype=np.float32)])
    out = np.empty_like(a)
    exp_all(a, out)
    with np.errstate(over="ignore"):
        ref = np.exp(a.astype(np.float64))
    normal = (ref >= np.finfo(np.float32).tiny) & (ref <= np.finfo(np.float32).max)
    ulp = np.spacing(ref[normal].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out[normal] - ref[normal]) / ulp) <= 1.0
    np.testing.assert_array_equal(out[-8:], [np.inf, np.inf, np.inf, 0, 0, 0, np.nan, 1])


def _layer_norm_all(x: np.ndarray, w: np.ndarray, b: np.ndarray, g: np.ndarray, dtype):
    xs, ws, bs = (engine.tensor(a, dtype=dtype, requires_grad=True) for a in (x, w, b))
    y = F.layer_norm(xs, w.shape, ws, bs, eps=1e-5)
    y.backward(engine.tensor(g, dtype=dtype))
    return [y.numpy(), xs.grad.numpy(), ws.grad.numpy(), bs.grad.numpy()]


def _layer_norm_reference(x, w, b, g, eps=1e-5):
    """Forward and gradients in float64 by the textbook formulas."""
    axes = tuple(range(x.ndim - w.ndim, x.ndim))
    n = math.prod(w.shape)
    mean = x.mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    gx = g * w
    dx = rstd / n * (n * gx - gx.sum(axis=axes, keepdims=True)
                     - xhat * (gx * xhat).sum(axis=axes, keepdims=True))
    lead = tuple(range(x.ndim - w.ndim))
    return [xhat * w + b, dx, (g * xhat).sum(axis=lead), g.sum(axis=lead)]


@pytest.mark.parametrize("dtype,shape,normalized", [
    (F32, (16, 128, 256), (256,)), (F64, (7, 5, 33), (33,)), (F64, (4, 3, 5), (3, 5)),
    (F32, (6, 40), (40,)),
], ids=str)
def test_layer_norm_kernels_agree_with_the_numpy_path_and_float64(monkeypatch, dtype, shape,
                                                                   normalized):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape) * 3 + 1.5
    w, b = rng.uniform(0.5, 2, normalized), rng.standard_normal(normalized)
    g = rng.standard_normal(shape)
    kernels, numpy_path = both_ways(monkeypatch, lambda: _layer_norm_all(x, w, b, g, dtype))
    reference = _layer_norm_reference(x, w, b, g)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == F32 else dict(rtol=1e-10, atol=1e-10)
    for name, k, n, r in zip(("y", "dx", "dw", "db"), kernels, numpy_path, reference):
        assert k.dtype == n.dtype == np.dtype(str(dtype)), name
        np.testing.assert_allclose(k, r, err_msg=name, **tol)
        np.testing.assert_allclose(n, r, err_msg=name, **tol)


def test_layer_norm_kernels_spread_inf_and_nan_to_their_row_as_the_numpy_path(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8))
    x[1, 2], x[2, 5] = np.inf, np.nan
    w, b, g = np.ones(8), np.zeros(8), rng.standard_normal((4, 8))
    with np.errstate(invalid="ignore"):
        kernels, numpy_path = both_ways(
            monkeypatch, lambda: _layer_norm_all(x, w, b, g, F32))
    for name, k, n in zip(("y", "dx", "dw", "db"), kernels, numpy_path):
        np.testing.assert_array_equal(np.isnan(k), np.isnan(n), err_msg=name)
    assert np.isnan(kernels[0][1:3]).all() and np.isfinite(kernels[0][[0, 3]]).all()


@pytest.mark.parametrize("statement", [
    "import dptrain.coordinator.cli",
    "import dptrain.coordinator.server.server",
    "import dptrain.engine, dptrain.engine.functional, dptrain.engine.nn",
])
def test_numba_is_not_loaded_before_an_op_runs_on_the_cpu(statement):
    assert within(modules_loaded_by(statement), "numba", "dptrain.engine.cpu_kernels") == []


def test_numba_is_loaded_by_a_cpu_op_and_not_on_the_numpy_path():
    op = ("import dptrain.engine as e, dptrain.engine.functional as F\n"
          "F.layer_norm(e.ones(2, 4, requires_grad=True), 4, e.ones(4), e.zeros(4))")
    assert "numba" in modules_loaded_by(op)
    off = modules_loaded_by(f"import os\nos.environ['DPTRAIN_CPU_KERNELS'] = '0'\n{op}")
    assert within(off, "numba", "dptrain.engine.cpu_kernels") == []


def _batch_norm_all(x, w, b, g, dtype, training=True):
    xs, ws, bs = (engine.tensor(a, dtype=dtype, requires_grad=True) for a in (x, w, b))
    rm, rv = engine.zeros(x.shape[1], dtype=dtype), engine.ones(x.shape[1], dtype=dtype)
    y = F.batch_norm(xs, rm, rv, ws, bs, training=training, momentum=0.3, eps=1e-3)
    y.backward(engine.tensor(g, dtype=dtype))
    return [y.numpy(), xs.grad.numpy(), ws.grad.numpy(), bs.grad.numpy(), rm.numpy(), rv.numpy()]


def _batch_norm_reference(x, w, b, g, eps=1e-3, momentum=0.3):
    """Training-mode batch norm, its gradients and the running statistics, in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = x.size // x.shape[1]
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    db, dw = g.sum(axis=axes), (g * xhat).sum(axis=axes)
    dx = (w * rstd).reshape(shape) / m * (m * g - db.reshape(shape) - xhat * dw.reshape(shape))
    return [xhat * w.reshape(shape) + b.reshape(shape), dx, dw, db, momentum * mean,
            (1 - momentum) + momentum * var * m / (m - 1)]


@pytest.mark.parametrize("dtype,shape", [
    (F32, (16, 8, 12, 12)), (F64, (5, 3, 7, 4)), (F32, (6, 4, 9)), (F64, (3, 2, 2, 3, 4)),
], ids=str)
def test_batch_norm_kernels_agree_with_the_numpy_path_and_float64(monkeypatch, dtype, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape) * 2 + 0.5
    w, b = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])
    g = rng.standard_normal(shape)
    kernels, numpy_path = both_ways(monkeypatch, lambda: _batch_norm_all(x, w, b, g, dtype))
    reference = _batch_norm_reference(x, w, b, g)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == F32 else dict(rtol=1e-10, atol=1e-11)
    for name, k, n, r in zip(("y", "dx", "dw", "db", "running mean", "running var"),
                             kernels, numpy_path, reference):
        assert k.dtype == n.dtype == np.dtype(str(dtype)), name
        np.testing.assert_allclose(k, r, err_msg=name, **tol)
        np.testing.assert_allclose(n, r, err_msg=name, **tol)


def test_batch_norm_kernels_spread_inf_and_nan_to_their_channel_as_the_numpy_path(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 5, 5))
    x[1, 0, 2, 2], x[3, 2, 0, 1] = np.inf, np.nan
    g = rng.standard_normal(x.shape)
    with np.errstate(invalid="ignore"):
        kernels, numpy_path = both_ways(
            monkeypatch, lambda: _batch_norm_all(x, np.ones(3), np.zeros(3), g, F32))
    for name, k, n in zip(("y", "dx", "dw", "db", "running mean", "running var"),
                          kernels, numpy_path):
        np.testing.assert_array_equal(np.isnan(k), np.isnan(n), err_msg=name)
    assert np.isnan(kernels[0][:, [0, 2]]).all() and np.isfinite(kernels[0][:, 1]).all()


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_relu_kernels_give_the_numpy_paths_values_and_products_bit_for_bit(monkeypatch,
                                                                           dtype):
    rng = np.random.default_rng(6)
    a = rng.standard_normal(40_000)
    a[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300]
    g = rng.standard_normal(a.shape)
    g[6:12] = [np.inf, -np.inf, np.nan, np.inf, np.nan, -np.inf]
    a[6:12] = [-1.0, -2.0, -3.0, 1.0, 2.0, 0.0]

    def run():
        x = engine.tensor(a, dtype=dtype, requires_grad=True)
        y = F.relu(x)
        y.backward(engine.tensor(g, dtype=dtype))
        return y.numpy(), x.grad.numpy()

    with np.errstate(invalid="ignore"):  # numpy warns of inf * 0; the kernel does not
        (yk, gk), (yn, gn) = both_ways(monkeypatch, run)
    for k, n in ((yk, yn), (gk, gn)):
        np.testing.assert_array_equal(k, n)
        np.testing.assert_array_equal(np.signbit(k), np.signbit(n))
    assert not np.signbit(yk[1]) and np.isnan(yk[4]) and yk[3] == 0  # -0.0, NaN, -inf
    assert np.isnan(gk[[6, 7, 8, 10, 11]]).all()  # inf * 0 and NaN * anything
    assert gk[9] == np.inf and not np.isnan(gk[:6]).any()


def _conv_all(x, w, g, padding, dtype):
    """A 3x3 convolution (stride 1) forward and both gradients."""
    xt, wt = (engine.tensor(a, dtype=dtype, requires_grad=True) for a in (x, w))
    out = F.conv2d(xt, wt, padding=padding)
    out.backward(engine.tensor(g, dtype=dtype))
    return [out.numpy(), xt.grad.numpy(), wt.grad.numpy()]


def _conv_reference(x, w, g, padding):
    """The same in float64, one shifted product per kernel tap: out = sum over taps of
    w[:, :, i, j] applied to the padded input shifted by (i, j); the input gradient scatters
    g back through the same shifts, the weight gradient contracts g with each shift."""
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = xp.shape[2] - 2, xp.shape[3] - 2
    out, dxp, dw = np.zeros(g.shape), np.zeros(xp.shape), np.zeros(w.shape)
    for i in range(3):
        for j in range(3):
            window = xp[:, :, i:i + ho, j:j + wo]
            out += np.einsum("nchw,oc->nohw", window, w[:, :, i, j])
            dxp[:, :, i:i + ho, j:j + wo] += np.einsum("nohw,oc->nchw", g, w[:, :, i, j])
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", g, window)
    return [out, dxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]], dw]


@pytest.mark.parametrize("dtype,xs,out_channels,padding", [
    (F32, (5, 16, 32, 32), 16, (1, 1)),  # resnet's first stage
    (F32, (3, 3, 9, 7), 5, (1, 1)),  # an odd channel count: the last pass computes it twice
    (F64, (2, 4, 6, 5), 3, (2, 0)),  # padding wider than the kernel's reach, and none
    (F64, (2, 2, 1, 1), 2, (1, 1)),  # a single pixel
], ids=str)
def test_conv3x3_kernel_agrees_with_the_numpy_path_and_float64(monkeypatch, dtype, xs,
                                                               out_channels, padding):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(xs), rng.standard_normal((out_channels, xs[1], 3, 3))
    g = rng.standard_normal((xs[0], out_channels, xs[2] + 2 * padding[0] - 2,
                             xs[3] + 2 * padding[1] - 2))
    kernels, numpy_path = both_ways(monkeypatch, lambda: _conv_all(x, w, g, padding, dtype))
    reference = _conv_reference(x, w, g, padding)
    # float32: sums of up to 9 * 16 * 5 * 32 * 32 products of unit-size terms
    tol = dict(rtol=1e-4, atol=2e-4 * np.sqrt(xs[0] * 32 * 32) if dtype == F32 else 1e-11)
    for name, k, n, r in zip(("y", "dx", "dw"), kernels, numpy_path, reference):
        assert k.dtype == n.dtype == np.dtype(str(dtype)), name
        np.testing.assert_allclose(k, r, err_msg=name, **tol)
        np.testing.assert_allclose(n, r, err_msg=name, **tol)


def test_conv3x3_kernel_spreads_inf_and_nan_as_the_numpy_path(monkeypatch):
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    x[0, 1, 2, 3], x[1, 0, 5, 0], w[2, 1, 0, 0] = np.nan, np.inf, 0.0
    g = rng.standard_normal((2, 4, 6, 6))
    with np.errstate(invalid="ignore"):
        kernels, numpy_path = both_ways(monkeypatch, lambda: _conv_all(x, w, g, (1, 1), F32))
    for name, k, n in zip(("y", "dx", "dw"), kernels, numpy_path):
        np.testing.assert_array_equal(np.isnan(k), np.isnan(n), err_msg=name)
        np.testing.assert_array_equal(np.isinf(k), np.isinf(n), err_msg=name)
    # the NaN reaches the 3x3 outputs around it in every channel, and no other output
    assert np.isnan(kernels[0][0, :, 1:4, 2:5]).all() and np.isnan(kernels[0][0]).sum() == 36


def _attention_all(q, k, v, g, causal):
    ts = [engine.tensor(a, dtype=F32, requires_grad=True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*ts, is_causal=causal)
    out.backward(engine.tensor(g, dtype=F32))
    return [out.numpy()] + [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_float32_kernels_agree_with_the_numpy_path_and_float64(monkeypatch, causal):
    # 70 queries: causal blocks of 32, 32 and 6 rows against 32, 64 and 70 keys
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 3, 70, 8)) for _ in range(3))
    g = rng.standard_normal((2, 3, 70, 8))
    kernels, numpy_path = both_ways(monkeypatch, lambda: _attention_all(q, k, v, g, causal))
    ts = [engine.tensor(a, dtype=F64, requires_grad=True) for a in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ts, is_causal=causal)
    ref.backward(engine.tensor(g, dtype=F64))
    reference = [ref.numpy()] + [t.grad.numpy() for t in ts]
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), kernels, numpy_path, reference):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(b, r, rtol=1e-4, atol=1e-5, err_msg=name)


def test_attention_kernel_gives_nan_rows_and_infinite_scores_as_the_numpy_path(monkeypatch):
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 40, 4)) for _ in range(3))
    q[0, 0, 5, 1] = np.nan  # one query's scores all NaN
    k[0, 1, 3, 0] = np.inf  # a key whose scores are +-inf (NaN after the shift) or NaN
    g = rng.standard_normal((1, 2, 40, 4))
    with np.errstate(invalid="ignore"):
        kernels, numpy_path = both_ways(monkeypatch, lambda: _attention_all(q, k, v, g, True))
    for name, a, b in zip(("out", "dq", "dk", "dv"), kernels, numpy_path):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    assert np.isnan(kernels[0][0, 0, 5]).all() and not np.isnan(kernels[0][0, 0, :5]).any()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv (util-linux) to run as an unprivileged user "
                           "for whom the install and the home directory are read-only")
def test_a_read_only_install_compiles_the_kernels_in_memory():
    # as `nobody`, neither the package's __pycache__ nor a home cache can be written: numba
    # refuses cache=True there, and the kernels compile without a cache instead
    code = ("import sys, numpy as np, dptrain.engine as e, dptrain.engine.functional as F\n"
            "y = F.gelu(e.tensor(np.linspace(-6, 6, 101, dtype=np.float32), "
            "requires_grad=True))\n"
            "assert 'dptrain.engine.cpu_kernels' in sys.modules\n"
            "print(','.join(str(v) for v in y.numpy().view(np.int32)))\n")
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code], capture_output=True, text=True, cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    bits = [int(v) for v in result.stdout.split(",")]
    mine = F.gelu(engine.tensor(np.linspace(-6, 6, 101, dtype=np.float32), requires_grad=True))
    assert bits == mine.numpy().view(np.int32).tolist()


KERNELS = ("gelu_f32", "layer_norm_rows", "layer_norm_affine", "layer_norm_backward",
           "channel_mean_var", "channel_affine", "channel_sums", "channel_combine", "relu",
           "relu_grad", "attention_softmax_f32", "softmax_rule_f32", "conv3x3",
           "conv3x3_weight_grad")


def _float32_graph():
    """A float32 training step through every op that has a kernel."""
    engine.manual_seed(0)
    x = engine.randn(2, 4, 4, 4, requires_grad=True)
    x = F.conv2d(x, engine.randn(4, 4, 3, 3, requires_grad=True), padding=1)
    h = F.relu(nn.BatchNorm2d(4)(x)).reshape(2, 4, 16)
    h = F.gelu(F.layer_norm(h, 16, engine.ones(16, requires_grad=True), engine.zeros(16)))
    q = h.reshape(2, 2, 4, 8)
    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()


@pytest.mark.parametrize("switch,expected", [(None, set(KERNELS)), ("0", set())],
                         ids=["default", "DPTRAIN_CPU_KERNELS=0"])
def test_each_op_runs_its_kernel_on_the_cpu_unless_switched_off(monkeypatch, switch, expected):
    # the real kernels, each wrapped to record that it ran
    import dptrain.engine.cpu_kernels as kernels

    ran = set()
    for name in KERNELS:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *args, _real=real, _name=name: (ran.add(_name), _real(*args))[1])
    if switch is not None:
        monkeypatch.setenv("DPTRAIN_CPU_KERNELS", switch)
    _float32_graph()
    assert ran == expected


@pytest.mark.parametrize("value", ["off", "false", "", " 0", "2"])
def test_a_switch_other_than_0_or_1_is_an_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("DPTRAIN_CPU_KERNELS", value)
    x = engine.from_numpy(np.ones((4, 8), np.float32))
    with pytest.raises(RuntimeError) as error:
        F.gelu(x)
    assert str(error.value) == ("DPTRAIN_CPU_KERNELS must be 1 (the compiled CPU kernels, the "
                                f"default) or 0 (the numpy path), got {value!r}")
