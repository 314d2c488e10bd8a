"""Convolution as a primitive: conv2d (conv1d is conv2d with height 1) on an im2col window view.

Forward: the padded input is viewed as its sliding windows with ``as_strided`` (no copy), a chunk
of samples at a time is copied into a contiguous column matrix, and one batched matmul per chunk
(a BLAS gemm per sample and group) multiplies it by the weight. Chunks of about `_CHUNK_BYTES`
stay in a core's L2 cache while the matmul reads them, which makes the copy and the product about
twice as fast as one big column matrix, and the columns never cost more memory than one chunk.

With stride 1 the windows are read from the flattened padded plane (plus one zero row): window
row (c, i, j) is one contiguous run starting at ``i*dh*Wp + j*dw``. Its ``Wp - Wo`` extra columns
per output row are computed and dropped, in exchange for a copy made of long runs instead of
short rows (faster overall even for 8x8 images).

On the CPU, a 3x3 convolution with stride 1 and one group is computed by compiled direct kernels
instead (`cpu_kernels.conv3x3`, `cpu_kernels.conv3x3_weight_grad`; `_direct` says where): no
column matrix, and sums that share each load of an input row among four output channels,
where the GEMM of a layer with 16 or 32 output channels is bound by its few rows and the
column copy comes on top. The input gradient of such a layer is itself such a convolution and
takes the same kernel. ``DPTRAIN_CPU_KERNELS=0`` keeps the columns.

Backward: the weight gradient recomputes the columns chunk by chunk (nothing the size of the
columns is kept from the forward: that would cost the columns of the whole batch, several times
the input) and contracts them with the output gradient, ``cols @ g^T``, one GEMM per chunk with
the chunk's samples in the contraction.
The input gradient takes whichever of two equivalent routes moves less memory: for stride 1, a
forward convolution of the output gradient with the flipped, channel-transposed kernel; or the
columns' gradient ``w^T @ g`` scatter-added into the padded input, which is split into its stride
phases so that each kernel position adds one contiguous run per (sample, channel). Either way the
Python loops run over chunks and kernel positions, never over output pixels.
"""

from __future__ import annotations

import numpy

from dptrain.engine.backend import cpu_kernels
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import FUNCTIONAL, export
from dptrain.engine.tensor import Tensor

# Bytes of column matrix per chunk: fits an L2 cache (1-2 MiB on current x86 cores).
_CHUNK_BYTES = 1 << 20


def _chunk(xp, n: int, sample_bytes: int) -> int:
    """Samples per chunk. On a GPU the whole batch is one chunk (one large kernel is best)."""
    if xp is not numpy:  # a GPU, and the strict device that stands in for it
        return n
    return max(1, min(n, _CHUNK_BYTES // max(sample_bytes, 1)))


def _as_strided(xp, a, shape, strides):
    return xp.lib.stride_tricks.as_strided(a, shape, strides)


def _padded(xp, x, pads, extra_rows: int = 0):
    """`x` (N, C, H, W) zero-padded by ``pads = (top, bottom, left, right)`` (a negative pad
    crops), plus `extra_rows` zero rows at the bottom; always a fresh C-contiguous array."""
    N, C, H, W = x.shape
    pt, pb, pl, pr = pads
    out = xp.zeros((N, C, H + pt + pb + extra_rows, W + pl + pr), dtype=x.dtype)
    src = x[:, :, max(-pt, 0):H - max(-pb, 0), max(-pl, 0):W - max(-pr, 0)]
    out[:, :, max(pt, 0):max(pt, 0) + src.shape[2], max(pl, 0):max(pl, 0) + src.shape[3]] = src
    return out


def _unpadded(xp, gp, shape, pads):
    """The inverse of `_padded` for gradients: the part of `gp` that lies over the input."""
    N, C, H, W = shape
    pt, pb, pl, pr = pads
    body = gp[:, :, max(pt, 0):max(pt, 0) + H - max(-pt, 0) - max(-pb, 0),
              max(pl, 0):max(pl, 0) + W - max(-pl, 0) - max(-pr, 0)]
    if body.shape == tuple(shape):
        return body
    out = xp.zeros(shape, dtype=gp.dtype)
    out[:, :, max(-pt, 0):H - max(-pb, 0), max(-pl, 0):W - max(-pr, 0)] = body
    return out


def _out_size(n: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


class _Geometry:
    """The sizes of one convolution of x (N, C, H, W) by a (O, C/groups, kh, kw) kernel."""

    def __init__(self, x_shape, w_shape, stride, pads, dilation, groups):
        self.N, self.C, self.H, self.W = x_shape
        self.O, _, self.kh, self.kw = w_shape
        (self.sh, self.sw), (self.dh, self.dw), self.pads, self.G = stride, dilation, pads, groups
        self.Hp, self.Wp = self.H + pads[0] + pads[1], self.W + pads[2] + pads[3]
        self.Ho = _out_size(self.H, self.kh, self.sh, pads[0], pads[1], self.dh)
        self.Wo = _out_size(self.W, self.kw, self.sw, pads[2], pads[3], self.dw)
        self.K = self.C // groups * self.kh * self.kw  # rows of one group's column matrix
        # With stride 1 window rows are read as long runs (`windows`), at the price of row - Wo
        # extra outputs per row: still faster than copying rows of Wo, even for 8x8 images.
        self.wide = stride == (1, 1)
        if self.wide:
            # Rows of the padded plane share their zero columns: the gap after a row is also
            # the left padding of the next one, so a row needs W + max(left, right) columns.
            left, right = max(pads[2], 0), max(pads[3], 0)
            self.row = max(self.W - max(-pads[2], 0) - max(-pads[3], 0) + max(left, right),
                           self.Wo)
        else:
            self.row = self.Wo  # columns per output row
        self.L = self.Ho * self.row

    def chunks(self, xp, sample_bytes: int):
        """Yield ``(n0, n1)`` ranges of samples whose columns take about `_CHUNK_BYTES`."""
        step = _chunk(xp, self.N, sample_bytes)
        for n0 in range(0, self.N, step):
            yield n0, min(self.N, n0 + step)

    def windows(self, xp, xpad):
        """The windows of the padded input, (N, C, kh, kw, L) or (N, C, kh, kw, Ho, Wo): a
        strided view, no copy. Slice it by samples."""
        sN, sC, sH, sW = xpad.strides
        head = (self.N, self.C, self.kh, self.kw)
        if self.wide:
            return _as_strided(xp, xpad, head + (self.L,),
                               (sN, sC, self.dh * sH, self.dw * sW, sW))
        return _as_strided(xp, xpad, head + (self.Ho, self.Wo),
                           (sN, sC, self.dh * sH, self.dw * sW, self.sh * sH, self.sw * sW))

    def padded(self, xp, x):
        """The zero-padded input that `windows` reads."""
        if not self.wide:
            if any(self.pads) or not x.flags.c_contiguous:
                return _padded(xp, x, self.pads)
            return x
        pt, pb, pl, pr = self.pads
        src = x[:, :, max(-pt, 0):self.H - max(-pb, 0), max(-pl, 0):self.W - max(-pr, 0)]
        h, w = src.shape[2:]
        rows = max(pt, 0) + h + max(pb, 0)
        # Extra zero rows: the last window row runs up to (kw - 1) * dw past the plane.
        rows += -(-(self.kw - 1) * self.dw // self.row)
        out = xp.zeros((self.N, self.C, rows, self.row), dtype=x.dtype)
        out[:, :, max(pt, 0):max(pt, 0) + h, max(pl, 0):max(pl, 0) + w] = src
        return out


def _direct(geo) -> bool:
    """Whether the compiled direct kernels (`cpu_kernels.conv3x3` and its weight gradient)
    compute this convolution: 3x3, stride 1, no dilation, one group, no negative padding;
    except on small planes with many output channels, where the kernels' passes run over too
    few pixels and the GEMM has enough rows to run at BLAS speed. Measured, batch 64, columns
    -> kernel, forward / weight gradient: 16 -> 16 channels at 32x32 7.6 -> 4.5 / 8.3 -> 4.1
    ms, 32 -> 32 at 16x16 5.7 -> 4.4 / 6.1 -> 4.3 ms, 64 -> 64 at 8x8 5.4 -> 5.8 / 5.6 -> 5.9
    ms, 128 -> 128 at 8x8 19.3 -> 23.6 / 19.0 -> 23.3 ms."""
    return ((geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw, geo.G) == (3, 3, 1, 1, 1, 1, 1)
            and min(geo.pads) >= 0 and (geo.Ho * geo.Wo >= 256 or geo.O <= 32))


def _conv(xp, x, w, stride, pads, dilation, groups):
    """The convolution (cross-correlation) of arrays x (N, C, H, W) and w (O, C/groups, kh, kw)."""
    geo = _Geometry(x.shape, w.shape, stride, pads, dilation, groups)
    if _direct(geo):
        w = xp.ascontiguousarray(w)  # the input gradient's flipped kernel is a view
        kernels = cpu_kernels(x, w)
        if kernels is not None:
            out = numpy.empty((geo.N, geo.O, geo.Ho, geo.Wo), dtype=x.dtype)
            kernels.conv3x3(x, w, pads[0], pads[2], out)
            return out
    G, O, K, L = groups, geo.O, geo.K, geo.L
    wg = xp.ascontiguousarray(w).reshape(G, O // G, K)
    windows = geo.windows(xp, geo.padded(xp, x))
    out = xp.empty((geo.N, O, geo.Ho, geo.Wo), dtype=x.dtype)
    cols = prod = None
    for n0, n1 in geo.chunks(xp, G * K * L * x.itemsize):
        m = n1 - n0
        if cols is None:  # buffers for the largest chunk, reused by the others
            cols = xp.empty((m, G * K * L), dtype=x.dtype)
            prod = xp.empty((m, G, O // G, L), dtype=x.dtype)
        view = windows[n0:n1]
        xp.copyto(cols[:m].reshape(view.shape), view)
        xp.matmul(wg, cols[:m].reshape(m, G, K, L), out=prod[:m])
        out[n0:n1] = prod[:m].reshape(m, O, geo.Ho, geo.row)[..., :geo.Wo]
    return out


def _forward(xp, x, w, b, stride, pads, dilation, groups):
    out = _conv(xp, x, w, stride, pads, dilation, groups)
    if b is not None:
        out += b.reshape(-1, 1, 1)
    return out


def _dx(xp, g, ans, x, w, b, stride, pads, dilation, groups):
    geo = _Geometry(x.shape, w.shape, stride, pads, dilation, groups)
    if (geo.kh, geo.kw) == (1, 1) and not any(pads):
        return _dx_pointwise(xp, g, w, geo)
    # Both ways cost about their column matrix: (O, H, W + kernel extent) for the transposed
    # convolution, (C, Ho, Wp) written, read and added for the scatter (measured: a factor 3).
    if geo.wide and geo.O * geo.H * (geo.W + (geo.kw - 1) * geo.dw) <= 3 * geo.C * geo.L:
        return _dx_conv(xp, g, w, geo)
    return _dx_col2im(xp, g, w, geo)


def _dx_pointwise(xp, g, w, geo):
    """1x1 kernels without padding (a residual network's projection shortcut): each output
    pixel reads one input pixel, so the input gradient is ``w^T @ g`` laid on the strided
    grid, zero elsewhere. The general scatter's phase planes and padded copy cost 11 MiB
    for resnet's 16 -> 32 channel shortcut on a batch of 64, the top of its step's peak."""
    G, O, C, N, Ho, Wo, sh, sw = geo.G, geo.O, geo.C, geo.N, geo.Ho, geo.Wo, geo.sh, geo.sw
    wt = w.reshape(G, O // G, C // G).swapaxes(1, 2)  # (G, C/G, O/G)
    d = xp.matmul(wt, g.reshape(N, G, O // G, Ho * Wo)).reshape(N, C, Ho, Wo)
    if (Ho, Wo) == (geo.H, geo.W):  # stride 1
        return d
    dx = xp.zeros((N, C, geo.H, geo.W), dtype=d.dtype)
    dx[:, :, :(Ho - 1) * sh + 1:sh, :(Wo - 1) * sw + 1:sw] = d
    return dx


def _dx_conv(xp, g, w, geo):
    """Stride 1: the adjoint of a correlation is a correlation of the output gradient with the
    flipped kernel, input and output channels swapped within each group."""
    G, O, Cg, kh, kw = geo.G, geo.O, geo.C // geo.G, geo.kh, geo.kw
    wt = w.reshape(G, O // G, Cg, kh, kw).swapaxes(1, 2).reshape(G * Cg, O // G, kh, kw)
    eh, ew = (kh - 1) * geo.dh, (kw - 1) * geo.dw
    p = geo.pads
    back = (eh - p[0], eh - p[1], ew - p[2], ew - p[3])
    return _conv(xp, g, wt[:, :, ::-1, ::-1], (1, 1), back, (geo.dh, geo.dw), G)


def _dx_col2im(xp, g, w, geo):
    """The columns' gradient ``w^T @ g`` scatter-added into the padded input, one strided add
    per kernel position. The padded input is split into its stride phases (row ``a + sh*q`` of
    the input is row q of phase a): every kernel position then adds one contiguous run of
    ``Ho * Wq`` values into one phase plane, reading the output gradient widened to the phase
    planes' width Wq (zeros beyond Wo, which add nothing)."""
    G, O, C, K, kh, kw = geo.G, geo.O, geo.C, geo.K, geo.kh, geo.kw
    sh, sw, dh, dw, Ho, Wo, Hp, Wp = geo.sh, geo.sw, geo.dh, geo.dw, geo.Ho, geo.Wo, geo.Hp, geo.Wp
    Hq, Wq = -(-Hp // sh), -(-Wp // sw)
    L = Ho * Wq
    wt = xp.ascontiguousarray(w.reshape(G, O // G, K).swapaxes(1, 2))  # (G, K, O/G)
    dx = xp.empty((geo.N, C, geo.H, geo.W), dtype=g.dtype)
    gw = dcols = acc = gp = None
    # Chunks twice the usual size: fewer trips through the kh*kw loop (measured ~10% faster).
    for n0, n1 in geo.chunks(xp, G * K * L * g.itemsize // 2):
        m = n1 - n0
        if gw is None:
            gw = xp.zeros((m, O, Ho, Wq), dtype=g.dtype)
            dcols = xp.empty((m, G, K, L), dtype=g.dtype)
            acc = xp.empty((m, sh * sw, C, (Hq + 1) * Wq), dtype=g.dtype)
            gp = xp.empty((m, C, Hp, Wp), dtype=g.dtype) if (sh, sw) != (1, 1) else None
        gw[:m, :, :, :Wo] = g[n0:n1]
        xp.matmul(wt, gw[:m].reshape(m, G, O // G, L), out=dcols[:m])
        cols = dcols[:m].reshape(m, C, kh, kw, L)
        a = acc[:m]
        a.fill(0)
        for i in range(kh):
            q, ph = divmod(i * dh, sh)
            for j in range(kw):
                r, pw = divmod(j * dw, sw)
                start = q * Wq + r
                a[:, ph * sw + pw, :, start:start + L] += cols[:, :, i, j]
        planes = a[..., :Hq * Wq].reshape(m, sh, sw, C, Hq, Wq)
        if gp is None:
            img = planes[:, 0, 0]
        else:
            img = gp[:m]
            for ph in range(sh):
                for pw in range(sw):
                    img[:, :, ph::sh, pw::sw] = planes[:, ph, pw, :, :len(range(ph, Hp, sh)),
                                                       :len(range(pw, Wp, sw))]
        dx[n0:n1] = _unpadded(xp, img, (m, C, geo.H, geo.W), geo.pads)
    return dx


def _dw(xp, g, ans, x, w, b, stride, pads, dilation, groups):
    geo = _Geometry(x.shape, w.shape, stride, pads, dilation, groups)
    kernels = cpu_kernels(x, g) if _direct(geo) else None
    if kernels is not None:
        dw = numpy.empty(w.shape, dtype=x.dtype)
        kernels.conv3x3_weight_grad(x, g, pads[0], pads[2], dw)
        return dw
    G, O, K, L = groups, geo.O, geo.K, geo.L
    windows = geo.windows(xp, geo.padded(xp, x))
    dwt = xp.zeros((G, K, O // G), dtype=g.dtype)
    cols = gw = None
    # A chunk's columns are laid out (C, kh, kw, samples, L) and its output gradient (O,
    # samples, L): then the samples are part of one GEMM's contraction, instead of one product
    # per sample summed afterwards.
    for n0, n1 in geo.chunks(xp, G * K * L * x.itemsize):
        m = n1 - n0
        if cols is None:  # buffers for the first (largest) chunk, reused by the others
            cols = xp.empty(G * K * m * L, dtype=x.dtype)
            # zeros in the columns past Wo of every row, whatever the chunk's shape
            gw = xp.zeros(O * m * geo.Ho * geo.row, dtype=g.dtype)
        view = windows[n0:n1]
        c = cols[:G * K * m * L].reshape(view.shape[1:4] + (m,) + view.shape[4:])
        xp.copyto(c, view.transpose((1, 2, 3, 0) + tuple(range(4, view.ndim))))
        gm = gw[:O * m * geo.Ho * geo.row].reshape(O, m, geo.Ho, geo.row)
        gm[..., :geo.Wo] = g[n0:n1].transpose(1, 0, 2, 3)
        # cols @ g^T, not g @ cols^T: OpenBLAS runs this orientation about twice as fast.
        dwt += c.reshape(G, K, m * L) @ gm.reshape(G, O // G, m * L).swapaxes(-1, -2)
    return dwt.swapaxes(1, 2).reshape(w.shape)


def _db(xp, g, ans, x, w, b, stride, pads, dilation, groups):
    return g.sum(axis=(0, 2, 3))


_conv2d = Op("conv2d", _forward, (_dx, _dw, _db), save=(0, 1))


# ---------------------------------------------------------------- argument checking

def _tuple(name: str, fn: str, value, n: int) -> tuple:
    """An int or a length-`n` sequence of ints as an n-tuple."""
    if isinstance(value, (int, numpy.integer)) and not isinstance(value, bool):
        return (int(value),) * n
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        out = ()
    if len(out) != n:
        raise TypeError(f"{fn}: {name} must be an int or a tuple of {n} ints, got {value!r}")
    return out


def _positive(name: str, fn: str, value: tuple) -> tuple:
    if any(v <= 0 for v in value):
        raise ValueError(f"{fn}: {name} must be positive, got {value}")
    return value


def _conv_pads(fn: str, padding, kernel, dilation, stride) -> tuple:
    """(top, bottom, left, right) from an int, a tuple, 'valid' or 'same' (extra on the end,
    as PyTorch pads for an even kernel)."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * (2 * n)
        if padding != "same":
            raise ValueError(f"{fn}: padding must be 'valid', 'same', an int or a tuple of "
                             f"{n} ints, got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"{fn}: padding='same' is not supported for strided convolutions "
                             f"(stride {stride if n == 2 else stride[0]})")
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    p = _tuple("padding", fn, padding, n)
    if any(v < 0 for v in p):
        raise ValueError(f"{fn}: padding must be non-negative, got {padding!r}")
    return (p[0], p[0], p[1], p[1]) if n == 2 else (p[0], p[0])


def _check_conv(fn: str, x: Tensor, weight: Tensor, bias, groups, spatial: int) -> None:
    dims = "(N, C, H, W)" if spatial == 2 else "(N, C, L)"
    if x.ndim not in (spatial + 1, spatial + 2):
        raise RuntimeError(f"{fn}: expected a {spatial + 1}-D (unbatched) or {spatial + 2}-D "
                           f"(batched) input {dims}, got a {x.ndim}-D input of shape {x.shape}")
    if weight.ndim != spatial + 2:
        wdims = "(out_channels, in_channels/groups, kH, kW)" if spatial == 2 else \
            "(out_channels, in_channels/groups, kL)"
        raise RuntimeError(f"{fn}: expected a {spatial + 2}-D weight {wdims}, got shape "
                           f"{weight.shape}")
    if not isinstance(groups, (int, numpy.integer)) or isinstance(groups, bool) or groups <= 0:
        raise ValueError(f"{fn}: groups must be a positive int, got {groups!r}")
    c_in, out_c = x.shape[-spatial - 1], weight.shape[0]
    if out_c % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the output channels "
                         f"(weight of shape {weight.shape} has {out_c})")
    if c_in % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the input channels (input of shape "
                         f"{x.shape} has {c_in})")
    if weight.shape[1] * groups != c_in:
        raise RuntimeError(f"{fn}: input of shape {x.shape} has {c_in} channels, but a weight of "
                           f"shape {weight.shape} with groups={groups} expects "
                           f"{weight.shape[1] * groups} (weight.shape[1] * groups)")
    if bias is not None and tuple(bias.shape) != (out_c,):
        raise RuntimeError(f"{fn}: bias of shape {bias.shape} does not match weight of shape "
                           f"{weight.shape} (expected ({out_c},))")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{fn}: input ({x.dtype}) and {name} ({t.dtype}) must have the same "
                            "dtype")
    if x.dtype.kind != "f":
        raise TypeError(f"{fn}: expected a floating point input, got {x.dtype}")


def _check_window(fn: str, size: tuple, kernel: tuple, pads: tuple, dilation: tuple,
                  what: str = "kernel") -> None:
    padded = tuple(n + pads[2 * i] + pads[2 * i + 1] for i, n in enumerate(size))
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    if any(e > p for e, p in zip(extent, padded)):
        dil = "" if extent == tuple(kernel) else f" ({extent} with dilation {dilation})"
        raise RuntimeError(f"{fn}: {what} size {tuple(kernel)}{dil} is larger than the padded "
                           f"input size {padded} (input {tuple(size)}, padding {pads})")


# ---------------------------------------------------------------- public functions

@export(FUNCTIONAL)
def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """2-D convolution (cross-correlation, as in every deep learning library).

    Args:
        input: (N, C_in, H, W), or (C_in, H, W) for one sample.
        weight: (C_out, C_in / groups, kH, kW).
        bias: optional (C_out,).
        stride: int or (sH, sW), positive.
        padding: int or (pH, pW) zeros on both sides, or 'valid' (none) or 'same' (output as
            large as the input; stride 1 only).
        dilation: int or (dH, dW): spacing between kernel taps.
        groups: split the channels into this many independent convolutions.

    Returns:
        (N, C_out, H_out, W_out) with ``H_out = (H + 2 pH - dH (kH - 1) - 1) // sH + 1``
        (3-D for an unbatched input).

    Example:
        >>> import dptrain.engine as engine, dptrain.engine.functional as F
        >>> x = engine.ones(1, 1, 4, 4)
        >>> F.conv2d(x, engine.ones(2, 1, 3, 3), padding=1).shape
        (1, 2, 4, 4)
    """
    fn = "conv2d"
    _check_conv(fn, input, weight, bias, groups, 2)
    stride = _positive("stride", fn, _tuple("stride", fn, stride, 2))
    dilation = _positive("dilation", fn, _tuple("dilation", fn, dilation, 2))
    pads = _conv_pads(fn, padding, weight.shape[2:], dilation, stride)
    unbatched = input.ndim == 3
    x = input.unsqueeze(0) if unbatched else input
    _check_window(fn, x.shape[2:], weight.shape[2:], pads, dilation)
    out = apply(_conv2d, x, weight, bias, stride=stride, pads=pads, dilation=dilation,
                groups=int(groups))
    return out.squeeze(0) if unbatched else out


@export(FUNCTIONAL)
def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """1-D convolution: `conv2d` over a height-1 image.

    Args:
        input: (N, C_in, L), or (C_in, L) for one sample.
        weight: (C_out, C_in / groups, kL).
        bias: optional (C_out,).
        stride, padding, dilation: ints (or 1-tuples); padding may be 'valid' or 'same'.
        groups: split the channels into this many independent convolutions.

    Returns:
        (N, C_out, L_out) with ``L_out = (L + 2 padding - dilation (kL - 1) - 1) // stride + 1``.
    """
    fn = "conv1d"
    _check_conv(fn, input, weight, bias, groups, 1)
    stride = _positive("stride", fn, _tuple("stride", fn, stride, 1))
    dilation = _positive("dilation", fn, _tuple("dilation", fn, dilation, 1))
    pads = _conv_pads(fn, padding, weight.shape[2:], dilation, stride)
    unbatched = input.ndim == 2
    x = input.unsqueeze(0) if unbatched else input
    _check_window(fn, x.shape[2:], weight.shape[2:], pads, dilation)
    out = apply(_conv2d, x.unsqueeze(2), weight.unsqueeze(2), bias, stride=(1,) + stride,
                pads=(0, 0) + pads, dilation=(1,) + dilation, groups=int(groups))
    out = out.squeeze(2)
    return out.squeeze(0) if unbatched else out
