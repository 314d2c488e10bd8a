"""Tensor, the graph it records, and backward: one reverse topological pass.

Every op result that needs a gradient points at a `Node`: the op, its saved arrays, and edges to
its inputs' nodes (or to the leaf tensors themselves). `Tensor.backward` counts, for every vertex
of the graph below the root, how many consumers it has; a vertex's gradient is complete when all
of them have contributed, so each op's rule runs exactly once, in linear time, with no recursion.
Op definitions live in `engine.ops`; this module knows nothing about any particular op.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable

import numpy

from dptrain.engine.backend import FLOAT_DTYPES, get_array_module, get_device, scatter_add

__all__ = [
    "Tensor",
    "Node",
    "no_grad",
    "enable_grad",
    "set_grad_enabled",
    "is_grad_enabled",
    "queue_callback",
    "register_backward_pass_hook",
]


# ---------------------------------------------------------------- grad mode

class _GradMode(threading.local):
    enabled = True


_mode = _GradMode()


def is_grad_enabled() -> bool:
    """Whether ops currently record the graph."""
    return _mode.enabled


class no_grad:
    """``with engine.no_grad():`` or ``@engine.no_grad()``: ops record no graph."""

    _value = False

    def __enter__(self):
        self._prev = _mode.enabled
        _mode.enabled = self._value
        return self

    def __exit__(self, *exc) -> None:
        _mode.enabled = self._prev

    def __call__(self, fn):
        value = self._value

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(value):
                return fn(*args, **kwargs)

        return wrapper


class enable_grad(no_grad):
    """``with engine.enable_grad():`` records the graph again inside a ``no_grad`` block."""

    _value = True


class set_grad_enabled(no_grad):
    """Turn graph recording on or off: as a call, a context manager or a decorator."""

    def __init__(self, mode: bool):
        self._value = bool(mode)
        self._prev = _mode.enabled
        _mode.enabled = self._value

    def __enter__(self):
        return self

    def __call__(self, fn):
        _mode.enabled = self._prev  # used as a decorator: undo the switch made by __init__
        return super().__call__(fn)


# ---------------------------------------------------------------- the graph

NOT_SAVED = object()  # marks an input whose array an op's rules did not ask to keep


class _ArrayMeta:
    """Stands in for an input array that an op's gradient rule did not ask to keep."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(numpy.prod(self.shape))


class Node:
    """One recorded op application: what backward needs to run the op's gradient rule once."""

    __slots__ = ("op", "parents", "saved", "ans", "kwargs", "shapes", "dtypes", "versions",
                 "hooks", "released", "__weakref__")

    def __init__(self, op, parents, saved, ans, kwargs, shapes, dtypes, versions):
        self.op = op
        self.parents = parents      # per input: a Node, a leaf Tensor needing grad, or None
        self.saved = saved          # per input: the array if the rule needs it, else NOT_SAVED
        self.ans = ans              # the output array, if the rule needs it
        self.kwargs = kwargs
        self.shapes = shapes        # per input, for un-broadcasting and _ArrayMeta
        self.dtypes = dtypes
        self.versions = versions    # ((version box, value at save time), ...) of saved inputs
        self.hooks = None           # tensor hooks registered on the op's output
        self.released = False

    def name(self) -> str:
        return f"{self.op.name.title().replace('_', '')}Backward"

    def __repr__(self) -> str:
        return f"<{self.name()}>"


class RemovableHandle:
    """Returned by hook registration; ``remove()`` unregisters the hook."""

    __slots__ = ("_list", "_fn")

    def __init__(self, lst: list, fn):
        self._list, self._fn = lst, fn

    def remove(self) -> None:
        if self._fn in self._list:
            self._list.remove(self._fn)


# ---------------------------------------------------------------- Tensor

class Tensor:
    """An n-dimensional array that records the ops applied to it, for reverse-mode autodiff.

    Build tensors with the factories (`engine.tensor`, `engine.zeros`, ...); ``Tensor(array)``
    wraps a backend array as-is. Operators and methods (``+``, ``@``, ``sum``, ``reshape``, ...)
    come from `engine.ops` and follow PyTorch's names and semantics.

    Example:
        >>> from dptrain import engine
        >>> x = engine.tensor([1.0, 2.0, 3.0], requires_grad=True)
        >>> (x * x).sum().backward()
        >>> x.grad.tolist()
        [2.0, 4.0, 6.0]
    """

    __slots__ = ("data", "_rg", "_grad", "_node", "_version", "_hooks", "_post_hooks",
                 "_retains_grad", "__weakref__")
    __array_priority__ = 1000  # numpy defers `ndarray + Tensor` to Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, _node: Node | None = None,
                 _version: list | None = None):
        if isinstance(data, numpy.generic):  # numpy reductions return scalars, not 0-d arrays
            data = numpy.asarray(data)
        self.data = data
        self._rg = False
        self._grad = None
        self._node = _node
        self._version = [0] if _version is None else _version  # shared with views
        self._hooks = None
        self._post_hooks = None
        self._retains_grad = False
        if requires_grad:
            self.requires_grad = True

    # ----------------------------------------------------------- attributes
    @property
    def requires_grad(self) -> bool:
        return self._rg or self._node is not None

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        if self._node is not None:
            raise RuntimeError(
                "requires_grad can only be changed on leaf tensors; use .detach() for a "
                "non-leaf tensor")
        if flag and self.data.dtype not in FLOAT_DTYPES:
            raise RuntimeError(
                f"only tensors of floating point dtype can require gradients, got {self.dtype}")
        self._rg = bool(flag)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Set `requires_grad` in place and return self."""
        self.requires_grad = requires_grad
        return self

    @property
    def grad(self) -> Tensor | None:
        """The accumulated gradient (a Tensor), or None. Assignable, e.g. ``p.grad = None``."""
        return self._grad

    @grad.setter
    def grad(self, value: Tensor | None) -> None:
        if value is not None:
            if not isinstance(value, Tensor):
                raise TypeError(f"grad must be a Tensor or None, got {type(value).__name__}")
            if value.shape != self.shape:
                raise RuntimeError(
                    f"assigned grad has shape {value.shape} but the tensor has shape {self.shape}")
        self._grad = value

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def grad_fn(self) -> Node | None:
        return self._node

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> numpy.dtype:
        return self.data.dtype

    @property
    def device(self):
        return get_device(self.data)

    @property
    def is_floating_point(self) -> bool:
        return self.data.dtype in FLOAT_DTYPES

    def size(self, dim: int | None = None):
        """The shape, or its length along `dim` (PyTorch's ``Tensor.size``)."""
        return self.data.shape if dim is None else self.data.shape[dim]

    def dim(self) -> int:
        return self.data.ndim

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        if self.data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.data.shape[0]

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self.data.size != 1:
            raise RuntimeError(
                f"a Tensor with {self.data.size} elements cannot be converted to a Python scalar")
        return self.data.reshape(()).item()

    def numpy(self) -> numpy.ndarray:
        """The data as a numpy array (copied to the host from a GPU). Shares memory on CPU."""
        xp = get_array_module(self.data)
        return self.data if xp is numpy else xp.asnumpy(self.data)

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """A tensor sharing this one's data (and version counter) outside the graph."""
        return Tensor(self.data, _version=self._version)

    def __repr__(self) -> str:
        body = numpy.array2string(self.numpy(), separator=", ", prefix="tensor(",
                                  precision=4, threshold=200)
        extra = ""
        if self.data.dtype not in (numpy.float32, numpy.int64, numpy.bool_):
            extra += f", dtype={self.dtype}"
        if self.device.type != "cpu":
            extra += f", device='{self.device}'"
        if self._node is not None:
            extra += f", grad_fn={self._node!r}"
        elif self._rg:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    def __bool__(self) -> bool:
        if self.data.size != 1:
            raise RuntimeError(
                f"the truth value of a tensor with {self.data.size} elements is ambiguous")
        return bool(self.data.reshape(()))

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self.data.dtype.kind not in "iu" or self.data.size != 1:
            raise TypeError("only integer tensors of a single element can be used as an index")
        return int(self.item())

    __hash__ = object.__hash__

    # ----------------------------------------------------------- hooks
    def register_hook(self, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
        """Call ``fn(grad)`` when this tensor's gradient is computed; a returned Tensor
        replaces the gradient. On a leaf it runs before the gradient is accumulated."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require grad")
        if self._node is None:
            if self._hooks is None:
                self._hooks = []
            lst = self._hooks
        else:
            if self._node.hooks is None:
                self._node.hooks = []
            lst = self._node.hooks
        lst.append(fn)
        return RemovableHandle(lst, fn)

    def register_post_accumulate_grad_hook(self, fn: Callable[[Tensor], None]
                                           ) -> RemovableHandle:
        """Call ``fn(tensor)`` on a leaf after its ``.grad`` has been accumulated in a backward
        pass (once per pass, when all contributions are in). Data-parallel training starts a
        gradient's all-reduce from here."""
        if self._node is not None:
            raise RuntimeError("post accumulate grad hooks can only be registered on leaf tensors")
        if not self._rg:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require grad")
        if self._post_hooks is None:
            self._post_hooks = []
        self._post_hooks.append(fn)
        return RemovableHandle(self._post_hooks, fn)

    def retain_grad(self) -> None:
        """Make a non-leaf tensor keep its ``.grad`` after backward."""
        if self._node is None:
            return
        if not self._retains_grad:
            import weakref

            ref = weakref.ref(self)

            def keep(g):
                t = ref()
                if t is not None:
                    t._grad = g if t._grad is None else Tensor(t._grad.data + g.data)

            self._retains_grad = True
            self.register_hook(keep)

    # ----------------------------------------------------------- backward
    def backward(self, gradient: Tensor | None = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` that requires grad.

        Args:
            gradient: d(loss)/d(self); may be omitted only for a one-element tensor.
            retain_graph: keep saved arrays so backward can run through this graph again.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() called on a tensor that does not require grad and has no grad_fn")
        xp = get_array_module(self.data)
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for scalar outputs; this tensor has "
                    f"shape {self.shape}, pass backward(gradient=...)")
            g = xp.ones(self.shape, dtype=self.dtype)
        else:
            g = gradient.data if isinstance(gradient, Tensor) else xp.asarray(gradient)
            if g.shape != self.shape:
                raise RuntimeError(
                    f"backward: gradient has shape {g.shape} but the tensor has shape "
                    f"{self.shape}")
            g = g.astype(self.dtype, copy=True)
        run_backward(self._node if self._node is not None else self, g, retain_graph)


_callbacks: list = []
_pass_hooks: list = []
_in_backward = threading.local()


def queue_callback(fn: Callable[[], None]) -> None:
    """Run ``fn()`` once the backward pass in progress has finished (PyTorch's
    ``Variable._execution_engine.queue_callback``). Call it from a hook."""
    if not getattr(_in_backward, "active", False):
        raise RuntimeError("queue_callback can only be called during a backward pass")
    _callbacks.append(fn)


def register_backward_pass_hook(fn: Callable[[], None]) -> RemovableHandle:
    """Call ``fn()`` at the start of every backward pass, before any gradient is computed.

    It may `queue_callback` work for the end of the pass. Unlike a tensor hook it runs even
    when the pass reaches none of the tensors its owner watches: a data-parallel rank whose
    loss does not depend on the model must still join the other ranks' gradient reduction.

    Args:
        fn: called with no arguments.

    Returns:
        A handle whose ``remove()`` unregisters `fn`.
    """
    _pass_hooks.append(fn)
    return RemovableHandle(_pass_hooks, fn)


class IndexedGrad:
    """A gradient that is zero except at ``[key]``: what indexing's rule returns. Backward adds
    it into one accumulation buffer in place, so taking T slices of a tensor costs the slices,
    not T full-size arrays."""

    __slots__ = ("shape", "dtype", "key", "values", "basic")

    def __init__(self, shape, dtype, key, values, basic: bool):
        self.shape, self.dtype, self.key, self.values, self.basic = (
            shape, dtype, key, values, basic)

    def add_into(self, xp, acc) -> None:
        """Add the values into the full-size array `acc` at ``[key]``, in place."""
        if self.basic:  # ints and slices: no element is addressed twice
            acc[self.key] += self.values
        else:  # integer arrays may repeat an index: every occurrence adds
            scatter_add(xp, acc, self.key, self.values)


def _unbroadcast(g, shape):
    """Sum a gradient back to the shape of the input that was broadcast to make it."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _run_hooks(hooks, g):
    for fn in list(hooks):
        out = fn(Tensor(g))
        if out is not None:
            g = out.data if isinstance(out, Tensor) else out
    return g


def run_backward(root, g, retain_graph: bool) -> None:
    """The reverse pass from `root` (a Node, or a leaf Tensor) seeded with gradient array `g`."""
    # 1. How many consumers each vertex has within this graph (iterative DFS, no recursion).
    pending = {}
    if type(root) is Node:
        stack = [root]
        seen = {root}
        while stack:
            node = stack.pop()
            if node.released:
                raise RuntimeError(
                    f"trying to backward through the graph a second time ({node.name()}): its "
                    "saved arrays were freed by the first backward; pass retain_graph=True to "
                    "the first backward if you need to backward twice")
            for p in node.parents:
                if p is not None:
                    pending[p] = pending.get(p, 0) + 1
                    if p not in seen and type(p) is Node:
                        seen.add(p)
                        stack.append(p)
    # 2. Walk in reverse topological order; a vertex runs when its last consumer has reported.
    grads = {root: g}
    ready = [root]
    owned = set()  # ids of gradient arrays handed to a leaf as its .grad (never shared twice)
    fresh = set()  # ids of accumulation buffers allocated by this pass, updated in place
    _in_backward.active = True
    try:
        for fn in list(_pass_hooks):
            fn()
        while ready:
            v = ready.pop()
            g = grads.pop(v)
            fresh.discard(id(g))  # a rule may pass g on to several inputs: never in place again
            if type(v) is not Node:
                _accumulate_leaf(v, g, owned)
                continue
            if v.hooks:
                g = _run_hooks(v.hooks, g)
            _check_versions(v)
            op, saved = v.op, v.saved
            xp = get_array_module(g)
            args = [a if a is not NOT_SAVED else _ArrayMeta(s, d)
                    for a, s, d in zip(saved, v.shapes, v.dtypes)]
            vjps = op.vjps
            if vjps is None:
                gis = op.backward(xp, g, v.ans, *args, **v.kwargs)
            if op.reuse_g and _unshared(g):
                gis = [vjps[0](xp, g, v.ans, *args, out=g, **v.kwargs)]
                vjps = None
            for i, p in enumerate(v.parents):
                if p is None:
                    continue
                gi = vjps[i](xp, g, v.ans, *args, **v.kwargs) if vjps else gis[i]
                _accumulate(xp, grads, fresh, p, gi, v.shapes[i], v.dtypes[i])
                n = pending[p] - 1
                pending[p] = n
                if n == 0:
                    ready.append(p)
            gi = gis = None  # the vertices they went to hold them alone (see _unshared)
            if not retain_graph:
                v.saved = v.ans = None
                v.released = True
        while _callbacks:
            _callbacks.pop(0)()
    finally:
        _in_backward.active = False
        _callbacks.clear()


def _unshared(g) -> bool:
    """Whether array `g`, held in one variable by its caller, may be overwritten: it owns its
    memory and that variable is its only reference (a view of it, another vertex's gradient,
    or a Tensor a hook kept would each hold one more)."""
    return (getattr(g, "base", 0) is None and getattr(g.flags, "writeable", False)
            and sys.getrefcount(g) == _SOLE_REFERENCE)


def _sole_reference_count() -> int:
    """What `_unshared` counts for an array only its caller's variable holds: measured once,
    in the same call shape, because the interpreter's own references differ by version."""
    def count(a):
        return sys.getrefcount(a)

    g = numpy.empty(1)
    return count(g)


_SOLE_REFERENCE = _sole_reference_count()


def _accumulate(xp, grads: dict, fresh: set, vertex, gi, shape, dtype) -> None:
    """Add `gi`, one rule's gradient for `vertex` (an input of `shape` and `dtype`), into
    ``grads[vertex]``: summed back over broadcast dims and cast to the input's dtype first.

    The first contribution is stored as it is; later ones are added in place into a buffer
    this pass allocated (its id is in `fresh`) or into the first contribution when nothing
    else holds it, never into an array a rule handed to several inputs (add passes g to both)
    or a hook kept."""
    acc = grads.get(vertex)
    if type(gi) is IndexedGrad:
        if acc is None or id(acc) not in fresh:  # a buffer of our own to add into
            acc = (xp.zeros(gi.shape, dtype=gi.dtype) if acc is None
                   else xp.array(acc, dtype=gi.dtype))
            fresh.add(id(acc))
            grads[vertex] = acc
        gi.add_into(xp, acc)
        return
    if gi.shape != shape:
        gi = _unbroadcast(gi, shape)
    if gi.dtype != dtype:
        gi = gi.astype(dtype)
    if acc is None:
        grads[vertex] = gi
    elif id(acc) in fresh:
        acc += gi  # a buffer this pass allocated: nobody else holds it
    else:
        # The first contribution becomes the buffer when nothing else holds it (a residual
        # block's input gets its convolution's input gradient, then the shortcut's): one
        # activation-sized array less to allocate. Shared (add hands g to both inputs) or
        # kept by a hook, it is left alone.
        del grads[vertex]  # now `acc` is its only holder, unless something else refers to it
        if acc.dtype == gi.dtype and _unshared(acc):
            acc += gi
        else:
            acc = acc + gi
        if not isinstance(acc, numpy.generic):  # numpy scalars are immutable
            fresh.add(id(acc))
        grads[vertex] = acc


def _check_versions(node: Node) -> None:
    for box, seen in node.versions:
        if box[0] != seen:
            raise RuntimeError(
                f"one of the arrays needed by {node.name()} has been modified by an in-place "
                f"operation (version {box[0]}, expected {seen}); compute it out of place, or "
                "modify it only after backward")


def _accumulate_leaf(t: Tensor, g, owned: set) -> None:
    if t._hooks:
        g = _run_hooks(t._hooks, g)
    if t._grad is None:
        # A rule may hand the same array to two inputs, or return a read-only view: copy
        # then, so that every .grad owns its memory and in-place updates stay local.
        if id(g) in owned or g.base is not None or not getattr(g.flags, "writeable", True):
            g = g.copy()
        owned.add(id(g))
        t._grad = Tensor(g)
    else:
        acc = t._grad.data
        if getattr(acc.flags, "writeable", True) and acc.shape == g.shape:
            acc += g
            t._grad._version[0] += 1
        else:
            t._grad = Tensor(acc + g)
    if t._post_hooks:
        for fn in list(t._post_hooks):
            fn(t)
