"""Shape and indexing primitives: reshape, permute, expand, indexing, cat/stack, gather, pad.

`reshape` serves view, flatten, squeeze and unsqueeze; `getitem` serves split, chunk and
embedding. Indexing's gradient scatter-adds, so repeated indices accumulate.
"""

from __future__ import annotations

import builtins
import numbers

import numpy

from dptrain.engine.backend import as_array, scatter_add
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import FUNCTION, FUNCTIONAL, METHOD, PROPERTY, export
from dptrain.engine.tensor import IndexedGrad, Tensor

_reshape = Op("reshape", lambda xp, x, shape: x.reshape(shape),
              (lambda xp, g, ans, x, shape: g.reshape(x.shape),), save=False, view=True)
_permute = Op("permute", lambda xp, x, dims: x.transpose(dims),
              (lambda xp, g, ans, x, dims: g.transpose(numpy.argsort(dims)),),
              save=False, view=True)
_expand = Op("expand", lambda xp, x, shape: xp.broadcast_to(x, shape),
             (lambda xp, g, ans, x, shape: g,), save=False, view=True)
_flip = Op("flip", lambda xp, x, axis: xp.flip(x, axis),
           (lambda xp, g, ans, x, axis: xp.flip(g, axis),), save=False, view=True)
_clone = Op("clone", lambda xp, x: x.copy(), (lambda xp, g, ans, x: g,), save=False)


def _basic(key) -> bool:
    """True for keys made only of ints, slices, None and Ellipsis (numpy returns a view)."""
    return builtins.all(k is None or k is Ellipsis or isinstance(k, (slice, numbers.Integral))
                        for k in key)


def _getitem_vjp(xp, g, ans, x, key, basic):
    return IndexedGrad(x.shape, x.dtype, key, g, basic)


_getitem = Op("getitem", lambda xp, x, key, basic: x[key], (_getitem_vjp,), save=False,
              view=True)


def _cat_backward(xp, g, ans, *xs, axis):
    grads, start = [], 0
    for x in xs:
        n = x.shape[axis]
        grads.append(g[(slice(None),) * axis + (slice(start, start + n),)])
        start += n
    return grads


def _stack_backward(xp, g, ans, *xs, axis):
    return [g[(slice(None),) * axis + (i,)] for i in range(len(xs))]


_cat = Op("cat", lambda xp, *xs, axis: xp.concatenate(xs, axis=axis), backward=_cat_backward,
          save=False)
_stack = Op("stack", lambda xp, *xs, axis: xp.stack(xs, axis=axis), backward=_stack_backward,
            save=False)


def _gather_index(xp, index, axis):
    idx = list(xp.indices(index.shape, sparse=True))
    idx[axis] = index
    return tuple(idx)


def _gather_vjp(xp, g, ans, x, index, axis):
    out = xp.zeros(x.shape, dtype=g.dtype)
    scatter_add(xp, out, _gather_index(xp, index, axis), g)
    return out


_gather = Op("gather", lambda xp, x, index, axis: x[_gather_index(xp, index, axis)],
             (_gather_vjp, None), save=(1,))


def _pad_vjp(xp, g, ans, x, widths, value):
    return g[tuple(slice(lo, g.shape[i] - hi) for i, (lo, hi) in enumerate(widths))]


_pad = Op("pad", lambda xp, x, widths, value: xp.pad(x, widths, constant_values=value),
          (_pad_vjp,), save=False)


# ---------------------------------------------------------------- Python-facing wrappers

def _dim(d: int, ndim: int, name: str = "dim") -> int:
    if not -ndim <= d < ndim:
        raise IndexError(f"{name} out of range (expected to be in range of [{-ndim}, "
                         f"{ndim - 1}], but got {d})")
    return d % ndim


def _sizes(size) -> tuple:
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        return tuple(size[0])
    return tuple(size)


@export(FUNCTION, METHOD)
def reshape(x: Tensor, *shape) -> Tensor:
    """The same data in a new shape (one dim may be -1)."""
    shape = _sizes(shape)
    n = x.data.size
    known = 1
    for s in shape:
        if s != -1:
            known *= s
    if shape.count(-1) > 1 or (-1 not in shape and known != n) or (
            -1 in shape and (known == 0 or n % known)):
        raise RuntimeError(f"reshape: shape {shape} is invalid for input of shape {x.shape} "
                           f"({n} elements)")
    return apply(_reshape, x, shape=shape)


view = export(METHOD, name="view")(reshape)


@export(FUNCTION, METHOD)
def flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Merge dims `start_dim`..`end_dim` into one."""
    if x.ndim == 0:
        return reshape(x, 1)
    s, e = _dim(start_dim, x.ndim), _dim(end_dim, x.ndim)
    return reshape(x, x.shape[:s] + (-1,) + x.shape[e + 1:])


@export(FUNCTION, METHOD)
def unsqueeze(x: Tensor, dim: int) -> Tensor:
    """Insert a size-1 dim at `dim`."""
    d = _dim(dim, x.ndim + 1)
    return apply(_reshape, x, shape=x.shape[:d] + (1,) + x.shape[d:])


@export(FUNCTION, METHOD)
def squeeze(x: Tensor, dim=None) -> Tensor:
    """Remove size-1 dims (only `dim` when given; other sizes are left alone, as in torch)."""
    if dim is None:
        dims = [i for i, s in enumerate(x.shape) if s == 1]
    else:
        dims = [_dim(d, builtins.max(x.ndim, 1)) for d in ((dim,) if isinstance(dim, int)
                                                          else dim)]
        dims = [d for d in dims if x.ndim and x.shape[d] == 1]
    return apply(_reshape, x, shape=tuple(s for i, s in enumerate(x.shape) if i not in dims))


@export(FUNCTION, METHOD)
def permute(x: Tensor, *dims) -> Tensor:
    """Reorder dims."""
    dims = tuple(_dim(d, x.ndim) for d in _sizes(dims))
    if sorted(dims) != list(range(x.ndim)):
        raise RuntimeError(f"permute: dims {dims} are not a permutation of the {x.ndim} dims "
                           f"of a tensor of shape {x.shape}")
    return apply(_permute, x, dims=dims)


@export(FUNCTION, METHOD)
def transpose(x: Tensor, dim0: int, dim1: int) -> Tensor:
    """Swap two dims."""
    dims = list(range(x.ndim))
    a, b = _dim(dim0, x.ndim), _dim(dim1, x.ndim)
    dims[a], dims[b] = dims[b], dims[a]
    return apply(_permute, x, dims=tuple(dims))


@export(FUNCTION, METHOD)
def t(x: Tensor) -> Tensor:
    """Transpose a tensor of at most 2 dims."""
    if x.ndim > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, got {x.ndim}")
    return x if x.ndim < 2 else transpose(x, 0, 1)


@export(FUNCTION, METHOD)
def expand(x: Tensor, *sizes) -> Tensor:
    """Broadcast to `sizes` without copying (-1 keeps a dim)."""
    sizes = _sizes(sizes)
    lead = len(sizes) - x.ndim
    if lead < 0:
        raise RuntimeError(f"expand: the number of sizes {sizes} must be at least the number "
                           f"of dims of the tensor, shape {x.shape}")
    shape = tuple(x.shape[i - lead] if s == -1 and i >= lead else s
                  for i, s in enumerate(sizes))
    for i, s in enumerate(x.shape):
        if s != 1 and s != shape[lead + i]:
            raise RuntimeError(f"expand: the size {s} of dim {i} of a tensor of shape "
                               f"{x.shape} must match {shape[lead + i]} or be 1")
    return apply(_expand, x, shape=shape)


@export(METHOD)
def expand_as(x: Tensor, other: Tensor) -> Tensor:
    """Broadcast to `other`'s shape without copying."""
    return expand(x, other.shape)


@export(FUNCTION, METHOD)
def broadcast_to(x: Tensor, shape) -> Tensor:
    """Broadcast to `shape` without copying."""
    return expand(x, tuple(shape))


@export(FUNCTION, METHOD)
def flip(x: Tensor, dims) -> Tensor:
    """Reverse the order of elements along `dims`."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return apply(_flip, x, axis=tuple(_dim(d, x.ndim) for d in dims))


@export(FUNCTION, METHOD)
def clone(x: Tensor) -> Tensor:
    """A copy of the data that stays in the graph."""
    return apply(_clone, x)


@export(PROPERTY, name="T")
def _reversed_dims(x: Tensor) -> Tensor:
    """``x.T``: the dims in reverse order."""
    return permute(x, tuple(reversed(range(x.ndim))))


@export(PROPERTY, name="mT")
def _matrix_transpose(x: Tensor) -> Tensor:
    """``x.mT``: the last two dims swapped."""
    return transpose(x, -2, -1)


@export(METHOD)
def contiguous(x: Tensor) -> Tensor:
    """The tensor itself: the backends work on strided arrays, so no copy is needed."""
    return x


def _index_key(key):
    """Turn Tensors in an indexing key into arrays; validate index dtypes."""
    if not isinstance(key, tuple):
        key = (key,)
    out = []
    for k in key:
        if isinstance(k, Tensor):
            k = k.data
        elif isinstance(k, list):
            k = numpy.asarray(k)
        if hasattr(k, "dtype") and getattr(k, "ndim", 0) >= 0 and not isinstance(
                k, numbers.Integral):
            if k.dtype.kind not in "iub":
                raise IndexError(f"tensors used as indices must be long, int or bool, "
                                 f"got {k.dtype}")
            if k.ndim == 0 and k.dtype.kind in "iu":
                k = int(k)
        out.append(k)
    return tuple(out)


@export(operators=("__getitem__",))
def getitem(x: Tensor, key) -> Tensor:
    """``x[key]``: ints, slices, None, Ellipsis, integer arrays and boolean masks."""
    key = _index_key(key)
    basic = _basic(key)
    try:
        return apply(_getitem, x, key=key, basic=basic)
    except IndexError as e:
        raise IndexError(f"index {_show_key(key)} is out of range for a tensor of shape "
                         f"{x.shape}: {e}") from None


def _show_key(key) -> str:
    return "[" + ", ".join("..." if k is Ellipsis else f"array{k.shape}"
                           if hasattr(k, "shape") and getattr(k, "ndim", 0) else repr(k)
                           for k in key) + "]"


def _same_rank_shapes(name, tensors, dim, skip_dim: bool):
    if not tensors:
        raise RuntimeError(f"{name}() expects a non-empty sequence of tensors")
    first = tensors[0].shape
    for t in tensors[1:]:
        a = [s for i, s in enumerate(first) if not (skip_dim and i == dim)]
        b = [s for i, s in enumerate(t.shape) if not (skip_dim and i == dim)]
        if len(t.shape) != len(first) or a != b:
            what = "except in dimension " + str(dim) if skip_dim else "in every dimension"
            raise RuntimeError(f"{name}(): tensors must have the same shape {what}; got "
                               f"{first} and {t.shape}")


@export(FUNCTION)
def cat(tensors, dim: int = 0) -> Tensor:
    """Join tensors along an existing dim."""
    tensors = list(tensors)
    if tensors:
        dim = _dim(dim, builtins.max(tensors[0].ndim, 1))
    _same_rank_shapes("cat", tensors, dim, skip_dim=True)
    return apply(_cat, *tensors, axis=dim)


concat = concatenate = export(FUNCTION, name="concat")(cat)


@export(FUNCTION)
def stack(tensors, dim: int = 0) -> Tensor:
    """Join same-shaped tensors along a new dim."""
    tensors = list(tensors)
    if tensors:
        dim = _dim(dim, tensors[0].ndim + 1)
    _same_rank_shapes("stack", tensors, dim, skip_dim=False)
    return apply(_stack, *tensors, axis=dim)


@export(FUNCTION, METHOD)
def split(x: Tensor, split_size_or_sections, dim: int = 0) -> tuple:
    """Pieces of `split_size` along `dim` (the last may be smaller), or of the given sizes."""
    d = _dim(dim, x.ndim)
    n = x.shape[d]
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise ValueError(f"split: split_size must be positive, got {split_size_or_sections}")
        sizes = [builtins.min(split_size_or_sections, n - i)
                 for i in range(0, n, split_size_or_sections)]
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:
            raise RuntimeError(f"split: sizes {sizes} must sum to {n}, the size of dim {d} of "
                               f"a tensor of shape {x.shape}")
    out, start = [], 0
    for s in sizes:
        out.append(getitem(x, (slice(None),) * d + (slice(start, start + s),)))
        start += s
    return tuple(out)


@export(FUNCTION, METHOD)
def chunk(x: Tensor, chunks: int, dim: int = 0) -> tuple:
    """Split into `chunks` pieces of ceil(n / chunks) along `dim` (the last may be smaller)."""
    if chunks <= 0:
        raise ValueError(f"chunk: chunks must be positive, got {chunks}")
    n = x.shape[_dim(dim, x.ndim)]
    return split(x, builtins.max(-(-n // chunks), 1), dim)


@export(FUNCTION, METHOD)
def gather(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``out[i][j] = x[i][index[i][j]]`` for dim=1 (and likewise for any dim)."""
    idx = index.data if isinstance(index, Tensor) else as_array(index, x.data)
    if idx.dtype.kind not in "iu":
        raise RuntimeError(f"gather(): index must be an integer tensor, got {idx.dtype}")
    if idx.ndim != x.ndim:
        raise RuntimeError(f"gather(): index has {idx.ndim} dims but the input has {x.ndim} "
                           f"(shapes {idx.shape} and {x.shape})")
    d = _dim(dim, x.ndim)
    for i, (n_idx, n_x) in enumerate(zip(idx.shape, x.shape)):
        if i != d and n_idx > n_x:
            raise RuntimeError(f"gather(): index of shape {idx.shape} is larger than the input "
                               f"of shape {x.shape} in dimension {i}")
    if idx.size and (idx.min() < 0 or idx.max() >= x.shape[d]):
        raise IndexError(f"gather(): index out of range for dim {d} of size {x.shape[d]} "
                         f"(index values from {int(idx.min())} to {int(idx.max())})")
    return apply(_gather, x, idx, axis=d)


@export(FUNCTION, METHOD)
def masked_fill(x: Tensor, mask, value) -> Tensor:
    """`x` with `value` where `mask` is True."""
    from dptrain.engine.ops.elementwise import where

    m = mask.data if isinstance(mask, Tensor) else mask
    if getattr(m, "dtype", None) is None or m.dtype.kind != "b":
        raise RuntimeError(f"masked_fill: mask must be a bool tensor, got "
                           f"{getattr(m, 'dtype', type(m).__name__)}")
    return where(mask, value, x)


@export(FUNCTIONAL)
def pad(x: Tensor, pad: tuple, mode: str = "constant", value: float = 0.0) -> Tensor:
    """Pad the last ``len(pad) // 2`` dims: ``pad = (left, right, top, bottom, ...)``, last
    dim first, as ``torch.nn.functional.pad``. Only ``mode='constant'``."""
    if mode != "constant":
        raise NotImplementedError(f"pad: mode {mode!r} is not supported; use 'constant'")
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise ValueError(f"pad: expected an even number of padding sizes, at most 2 per dim of "
                         f"a tensor of shape {x.shape}; got {tuple(pad)}")
    if builtins.any(p < 0 for p in pad):
        raise ValueError(f"pad: negative padding is not supported, got {tuple(pad)}")
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return apply(_pad, x, widths=tuple(widths), value=value)
