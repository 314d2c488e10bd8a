"""Fused CPU kernels, compiled with numba: the elementwise and per-row work that numpy runs as
many separate passes (each a trip through memory, each float32 exp a scalar call), done in one
loop per element or per row; and a direct 3x3 convolution for layers with few output channels.

The only importer of numba. Ops reach this module through `backend.cpu_kernels()`, which
imports it on the first CPU call and returns None when ``DPTRAIN_CPU_KERNELS=0`` (the numpy
path, which every op keeps: the tests run both and compare them). Nothing here is called for
CuPy or strict-device arrays.

How they are compiled, and why:

- ``cache=True``: the machine code is kept beside this file (or in numba's user cache when the
  package directory is read-only), so a process after the first loads it instead of
  compiling; where no cache directory can be written at all they compile in memory.
- ``nogil=True``, one thread: ranks are the parallelism (``parallel=False``).
- ``error_model="numpy"``: a division by zero gives inf or NaN as numpy's does, instead of a
  ZeroDivisionError check that also keeps the loop from vectorising.
- ``fastmath`` only ``contract`` (fused multiply-adds) and, for sums, ``reassoc`` (the order
  of additions, so a sum vectorises): neither changes what inf and NaN do, so every op keeps
  its IEEE behaviour (``nnan``/``ninf``/``afn`` are never set).
- Inputs are C-contiguous float32 or float64 arrays, viewed flat or as rows, so each kernel
  has at most two compiled signatures; any other input takes the numpy path.
"""

from __future__ import annotations

import numpy
from numba import njit

_ELEMENTWISE = {"contract"}
_SUMS = {"contract", "reassoc"}


def _jit(fastmath, **options):
    """numba's `njit` with the options above; compiled in memory where no cache directory can
    be written (numba raises at decoration when it finds none: neither beside this file nor
    in the user's cache directory)."""
    def wrap(fn):
        settings = dict(nogil=True, error_model="numpy", fastmath=fastmath, **options)
        try:
            return njit(cache=True, **settings)(fn)
        except RuntimeError:
            return njit(cache=False, **settings)(fn)
    return wrap


# ---------------------------------------------------------------- exp for float32

_LOG2E = numpy.float32(1.4426950408889634)
_LN2_HI = numpy.float32(0.693359375)  # ln 2 in two parts: n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = numpy.float32(-2.12194440e-4)
_ROUND = numpy.float32(12582912.0)  # 1.5 * 2^23: adding it rounds to an integer, in its bits
_EXP_MAX = numpy.float32(88.72283)  # exp overflows float32 above this
_EXP_MIN = numpy.float32(-87.33654)  # and is subnormal below it


@_jit(_ELEMENTWISE, inline="always")
def _exp_f32(a):
    """exp(a) in float32 within 1 ulp (Cephes' polynomial on a ln 2 reduced range), written
    with arithmetic and bit moves only so that a loop around it vectorises: numpy's and libm's
    exp are calls per element. Overflows to inf and keeps NaN; results that would be
    subnormal (a < -87.3) are flushed to 0, which the callers only ever add to 1 or scale
    to below float32's smallest normal."""
    c = min(max(a, _EXP_MIN), _EXP_MAX)
    k = c * _LOG2E + _ROUND
    n = k - _ROUND
    r = c - n * _LN2_HI
    r = r - n * _LN2_LO
    p = numpy.float32(1.9875691500e-4)
    p = p * r + numpy.float32(1.3981999507e-3)
    p = p * r + numpy.float32(8.3334519073e-3)
    p = p * r + numpy.float32(4.1665795894e-2)
    p = p * r + numpy.float32(1.6666665459e-1)
    p = p * r + numpy.float32(5.0000001201e-1)
    p = p * r * r + r + numpy.float32(1.0)
    # 2^n from n's bits in k (the low mantissa bits hold n + 2^22), as two factors laid in
    # the exponent field: n runs to 128 just below overflow, past one factor's range
    n_int = numpy.float32(k).view(numpy.int32) - numpy.int32(0x4B400000)
    half = n_int >> numpy.int32(1)
    s1 = numpy.int32((half + numpy.int32(127)) << numpy.int32(23)).view(numpy.float32)
    s2 = numpy.int32((n_int - half + numpy.int32(127)) << numpy.int32(23)).view(numpy.float32)
    v = p * s1 * s2
    if a > _EXP_MAX:
        v = numpy.float32(numpy.inf)
    if a < _EXP_MIN:
        v = numpy.float32(0.0)
    if a != a:
        v = a
    return v


# ---------------------------------------------------------------- GELU

@_jit(_ELEMENTWISE)
def gelu_f32(x, out, slope, r):
    """``out = x Phi(x)`` over flat float32 arrays, with Phi(x) = 1 / (1 + exp(x r(x^2))) (r the
    fitted polynomial of `engine.ops.elementwise`, highest power first, 7 coefficients); when
    `slope` has x's size, also gelu'(x) = Phi(x) + x pdf(x) there. One pass over x where the
    numpy path makes 18 (two of them exps)."""
    r0, r1, r2, r3 = numpy.float32(r[0]), numpy.float32(r[1]), numpy.float32(r[2]), \
        numpy.float32(r[3])
    r4, r5, r6 = numpy.float32(r[4]), numpy.float32(r[5]), numpy.float32(r[6])
    inv_sqrt_2pi = numpy.float32(0.3989422804014327)
    one = numpy.float32(1.0)
    if slope.size == x.size:
        for i in range(x.size):
            xi = x[i]
            aa = xi * xi
            w = ((((((aa * r0 + r1) * aa + r2) * aa + r3) * aa + r4) * aa + r5) * aa + r6)
            phi = one / (one + _exp_f32(w * xi))
            slope[i] = phi + xi * _exp_f32(aa * numpy.float32(-0.5)) * inv_sqrt_2pi
            out[i] = xi * phi
    else:
        for i in range(x.size):
            xi = x[i]
            aa = xi * xi
            w = ((((((aa * r0 + r1) * aa + r2) * aa + r3) * aa + r4) * aa + r5) * aa + r6)
            out[i] = xi * (one / (one + _exp_f32(w * xi)))


# ---------------------------------------------------------------- layer norm

@_jit(_SUMS)
def layer_norm_rows(x, eps, xhat, rstd):
    """Per row of a 2-D array: ``rstd = 1 / sqrt(var + eps)`` (the biased variance, from the
    row's deviations: two passes over a row in cache, as the numpy path's) and ``xhat = (x -
    mean) rstd``."""
    rows, n = x.shape
    zero, one = x.dtype.type(0.0), x.dtype.type(1.0)
    nf, epsf = x.dtype.type(n), x.dtype.type(eps)
    for i in range(rows):
        total = zero
        for j in range(n):
            total += x[i, j]
        mean = total / nf
        sq = zero
        for j in range(n):
            d = x[i, j] - mean
            xhat[i, j] = d
            sq += d * d
        s = one / numpy.sqrt(sq / nf + epsf)
        rstd[i] = s
        for j in range(n):
            xhat[i, j] *= s


@_jit(_ELEMENTWISE)
def layer_norm_affine(xhat, weight, bias, out):
    """``out = xhat * weight + bias`` per row of a 2-D array (weight and bias one row each)."""
    rows, n = xhat.shape
    for i in range(rows):
        for j in range(n):
            out[i, j] = xhat[i, j] * weight[j] + bias[j]


@_jit(_SUMS)
def layer_norm_backward(g, xhat, rstd, weight, dx, dw, db):
    """The layer norm rule per row of 2-D arrays, gx = g * weight:
    ``dx = rstd (gx - mean(gx) - xhat mean(gx xhat))``, and the column sums ``dw += sum(g
    xhat)``, ``db += sum(g)`` (dw and db start at zero). Two passes over each row."""
    rows, n = g.shape
    zero, nf = g.dtype.type(0.0), g.dtype.type(n)
    for i in range(rows):
        dot = zero
        total = zero
        for j in range(n):
            gx = g[i, j] * weight[j]
            total += gx
            dot += gx * xhat[i, j]
            dw[j] += g[i, j] * xhat[i, j]
            db[j] += g[i, j]
        s = rstd[i]
        a = dot * (s / -nf)
        c = total * (s / nf)
        for j in range(n):
            dx[i, j] = xhat[i, j] * a + g[i, j] * weight[j] * s - c


# ---------------------------------------------------------------- batch norm
# Arrays are (N, C, S): the samples, the channels, and each channel's plane flattened.

@_jit(_SUMS)
def channel_mean_var(x, mean, var):
    """Per channel of x (N, C, S): the mean and the biased variance from the deviations (two
    passes over x, as the numpy path's two, without its x-sized temporary)."""
    n, c, s = x.shape
    zero, m = x.dtype.type(0.0), x.dtype.type(n * s)
    mean[:] = zero
    var[:] = zero
    for i in range(n):
        for k in range(c):
            total = zero
            for j in range(s):
                total += x[i, k, j]
            mean[k] += total
    for k in range(c):
        mean[k] /= m
    for i in range(n):
        for k in range(c):
            mu = mean[k]
            sq = zero
            for j in range(s):
                d = x[i, k, j] - mu
                sq += d * d
            var[k] += sq
    for k in range(c):
        var[k] /= m


@_jit(_ELEMENTWISE)
def channel_affine(x, scale, shift, out):
    """``out = x * scale + shift`` with one scale and shift per channel of x (N, C, S)."""
    n, c, s = x.shape
    for i in range(n):
        for k in range(c):
            a, b = scale[k], shift[k]
            for j in range(s):
                out[i, k, j] = x[i, k, j] * a + b


@_jit(_SUMS)
def channel_sums(g, x, total, dot):
    """Per channel of (N, C, S) arrays: ``total = sum(g)`` and ``dot = sum(g * x)``, one pass."""
    n, c, s = g.shape
    zero = g.dtype.type(0.0)
    total[:] = zero
    dot[:] = zero
    for i in range(n):
        for k in range(c):
            t = zero
            d = zero
            for j in range(s):
                t += g[i, k, j]
                d += g[i, k, j] * x[i, k, j]
            total[k] += t
            dot[k] += d


@_jit(_ELEMENTWISE)
def channel_combine(g, x, a, b, c, out):
    """``out = g * a + x * b + c`` with one a, b, c per channel of (N, C, S) arrays: batch
    norm's input gradient in one pass."""
    n, ch, s = g.shape
    for i in range(n):
        for k in range(ch):
            ak, bk, ck = a[k], b[k], c[k]
            for j in range(s):
                out[i, k, j] = g[i, k, j] * ak + x[i, k, j] * bk + ck


# ---------------------------------------------------------------- relu

@_jit(_ELEMENTWISE)
def relu(x, out):
    """``out = max(x, 0)`` over flat arrays as numpy's maximum against 0 gives it: NaN stays
    NaN, -0.0 and -inf become +0.0."""
    zero = x.dtype.type(0.0)
    for i in range(x.size):
        v = x[i]
        out[i] = v if (v > zero or v != v) else zero


@_jit(_ELEMENTWISE)
def relu_grad(g, ans, out):
    """``out = g * (ans > 0)`` over flat arrays: the same product as numpy's (so an inf or
    NaN gradient where ans <= 0 still gives NaN), without the boolean array between."""
    zero, one = g.dtype.type(0.0), g.dtype.type(1.0)
    for i in range(g.size):
        out[i] = g[i] * (one if ans[i] > 0 else zero)


# ---------------------------------------------------------------- attention's softmax

@_jit(_SUMS)
def attention_softmax_f32(scores, rows_per_block, first_query, scale):
    """In place over float32 rows of a block of attention scores (…, rows_per_block, keys)
    viewed 2-D: scale, then for a causal block (``first_query >= 0``) set the keys past each
    row's query (row r of a block is query first_query + r % rows_per_block) to -inf, then a
    stable softmax: -inf entries get 0, a row with no finite entry all zeros, a row with a
    NaN or a +inf score all NaN (as the numpy path's max, shift and exp give)."""
    rows, keys = scores.shape
    scale = numpy.float32(scale)  # as numpy scales a float32 array by a Python float
    zero, one = numpy.float32(0.0), numpy.float32(1.0)
    ninf, nan = numpy.float32(-numpy.inf), numpy.float32(numpy.nan)
    for r in range(rows):
        seen = keys
        if first_query >= 0:
            seen = min(keys, first_query + r % rows_per_block + 1)
        top = ninf
        has_nan = False
        for j in range(seen):
            v = scores[r, j] * scale
            scores[r, j] = v
            has_nan |= v != v
            top = max(top, v)
        if has_nan:
            for j in range(keys):
                scores[r, j] = nan
            continue
        if top == ninf:
            top = zero
        total = zero
        for j in range(seen):
            e = _exp_f32(scores[r, j] - top)
            scores[r, j] = e
            total += e
        if total == zero:
            total = one
        inv = one / total
        for j in range(seen):
            scores[r, j] *= inv
        for j in range(seen, keys):  # exp(-inf) * inv: 0, or NaN in a NaN row
            scores[r, j] = zero * inv


@_jit(_SUMS)
def softmax_rule_f32(dw, w, scale):
    """In place over float32 rows: ``dw = w * (dw - sum(dw * w)) * scale``, the softmax's rule
    for attention's weights w."""
    rows, keys = dw.shape
    scale = numpy.float32(scale)
    for r in range(rows):
        dot = numpy.float32(0.0)
        for j in range(keys):
            dot += dw[r, j] * w[r, j]
        for j in range(keys):
            dw[r, j] = (dw[r, j] - dot) * w[r, j] * scale


# ---------------------------------------------------------------- 3x3 convolution
# Stride 1, no dilation, one group. Each sample's padded planes sit in one zeroed buffer with
# rows of `width` values, where the gap after a row is also the left padding of the next one;
# an output row is computed over that whole width (the last few values are dropped), so that
# the loop over a plane is one long run the compiler vectorises.

@_jit(_ELEMENTWISE, inline="always")
def _sample_buffer(x, left, ho, wo):
    """``(width, span, buf)``: the values per row of the padded planes (the input's row after
    its left padding, and at least the output's row plus the kernel's reach past it into the
    next row's left padding), the values a pass covers (ho rows), and a zeroed buffer for
    `_pad_sample` with room for the reach below the last row."""
    width = max(x.shape[3] + left, wo + 2 - left)
    return width, ho * width, numpy.zeros((x.shape[1], (ho + 3) * width + 2), x.dtype)


@_jit(_ELEMENTWISE, inline="always")
def _pad_sample(x, n, top, left, width, buf):
    """buf[c, (h + top) * width + q + left] = x[n, c, h, q]; the rest of buf stays zero."""
    c_in, h_in, w_in = x.shape[1], x.shape[2], x.shape[3]
    for c in range(c_in):
        for h in range(h_in):
            row = buf[c, (h + top) * width + left:(h + top) * width + left + w_in]
            src = x[n, c, h]
            for q in range(w_in):
                row[q] = src[q]


@_jit(_ELEMENTWISE)
def conv3x3(x, w, top, left, out):
    """``out`` (N, O, Ho, Wo) = the cross-correlation of x (N, C, H, W), zero-padded by `top`
    and `left` (and by whatever the bottom and right need to give out's size), with w (O, C,
    3, 3). Four output channels and one kernel row a pass: each load of the input row's three
    shifts feeds twelve multiply-adds, and the twelve weights stay in registers (past the
    last channel, copies of it whose sums are not written)."""
    n_in, c_in = x.shape[0], x.shape[1]
    o_out, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    width, span, buf = _sample_buffer(x, left, ho, wo)
    acc = numpy.empty((4, span), x.dtype)
    zero = x.dtype.type(0.0)
    for n in range(n_in):
        _pad_sample(x, n, top, left, width, buf)
        for o in range(0, o_out, 4):
            o1, o2, o3 = min(o + 1, o_out - 1), min(o + 2, o_out - 1), min(o + 3, o_out - 1)
            a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
            acc[:] = zero
            for c in range(c_in):
                for ki in range(3):
                    r = buf[c, ki * width:ki * width + span + 2]
                    p0, p1, p2 = w[o, c, ki, 0], w[o, c, ki, 1], w[o, c, ki, 2]
                    q0, q1, q2 = w[o1, c, ki, 0], w[o1, c, ki, 1], w[o1, c, ki, 2]
                    s0, s1, s2 = w[o2, c, ki, 0], w[o2, c, ki, 1], w[o2, c, ki, 2]
                    t0, t1, t2 = w[o3, c, ki, 0], w[o3, c, ki, 1], w[o3, c, ki, 2]
                    for i in range(span):
                        x0, x1, x2 = r[i], r[i + 1], r[i + 2]
                        a0[i] += x0 * p0 + x1 * p1 + x2 * p2
                        a1[i] += x0 * q0 + x1 * q1 + x2 * q2
                        a2[i] += x0 * s0 + x1 * s1 + x2 * s2
                        a3[i] += x0 * t0 + x1 * t1 + x2 * t2
            for h in range(ho):
                for p in range(wo):
                    out[n, o, h, p] = a0[h * width + p]
                    out[n, o1, h, p] = a1[h * width + p]
                    out[n, o2, h, p] = a2[h * width + p]
                    out[n, o3, h, p] = a3[h * width + p]


@_jit(_SUMS)
def conv3x3_weight_grad(x, g, top, left, dw):
    """``dw`` (O, C, 3, 3) = the weight gradient of `conv3x3` for its output gradient g (N, O,
    Ho, Wo): per tap, the sum over samples and pixels of g times the padded input shifted by
    the tap. Four output channels and one kernel row a pass: twelve sums share each load of
    the input row (three shifts) and of the four gradient planes (widened to the buffer's rows
    with zeros, so the dropped columns add nothing)."""
    n_in, c_in = x.shape[0], x.shape[1]
    o_out, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    width, span, buf = _sample_buffer(x, left, ho, wo)
    gw = numpy.zeros((4, span), g.dtype)
    zero = x.dtype.type(0.0)
    dw[:] = zero
    for n in range(n_in):
        _pad_sample(x, n, top, left, width, buf)
        for o in range(0, o_out, 4):
            for k in range(4):  # past the last channel, a copy of it that is not written
                ok = min(o + k, o_out - 1)
                for h in range(ho):
                    for p in range(wo):
                        gw[k, h * width + p] = g[n, ok, h, p]
            g0, g1, g2, g3 = gw[0], gw[1], gw[2], gw[3]
            for c in range(c_in):
                for ki in range(3):
                    r = buf[c, ki * width:ki * width + span + 2]
                    s0 = s1 = s2 = t0 = t1 = t2 = u0 = u1 = u2 = v0 = v1 = v2 = zero
                    for i in range(span):
                        a, b, e, f = g0[i], g1[i], g2[i], g3[i]
                        x0, x1, x2 = r[i], r[i + 1], r[i + 2]
                        s0 += a * x0
                        s1 += a * x1
                        s2 += a * x2
                        t0 += b * x0
                        t1 += b * x1
                        t2 += b * x2
                        u0 += e * x0
                        u1 += e * x1
                        u2 += e * x2
                        v0 += f * x0
                        v1 += f * x1
                        v2 += f * x2
                    dw[o, c, ki, 0] += s0
                    dw[o, c, ki, 1] += s1
                    dw[o, c, ki, 2] += s2
                    if o + 1 < o_out:
                        dw[o + 1, c, ki, 0] += t0
                        dw[o + 1, c, ki, 1] += t1
                        dw[o + 1, c, ki, 2] += t2
                    if o + 2 < o_out:
                        dw[o + 2, c, ki, 0] += u0
                        dw[o + 2, c, ki, 1] += u1
                        dw[o + 2, c, ki, 2] += u2
                    if o + 3 < o_out:
                        dw[o + 3, c, ki, 0] += v0
                        dw[o + 3, c, ki, 1] += v1
                        dw[o + 3, c, ki, 2] += v2
