"""How a primitive is defined and applied: its forward and its gradient rules side by side.

A primitive is ``Op(name, forward, vjps)``: ``forward(xp, *arrays, **kwargs)`` computes the
result with the array module `xp` (numpy or cupy); ``vjps[i](xp, g, ans, *arrays, **kwargs)``
returns the gradient for input ``i`` given the output's gradient ``g``. Each rule may return a
gradient of the *broadcast* shape: `engine.tensor.run_backward` sums it back to the input's shape
once, centrally. Inputs an op does not list in `save` reach its rules as shape/dtype-only
stand-ins, so the graph keeps only the arrays backward really needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy

from dptrain.engine.backend import check_same_device, get_array_module
from dptrain.engine.tensor import NOT_SAVED, Node, Tensor, _mode

__all__ = ["Op", "apply"]


class Op:
    """A differentiable primitive.

    Args:
        name: shown in errors and ``grad_fn``.
        forward: ``forward(xp, *arrays, **kwargs) -> array``.
        vjps: one rule per input (None for an input that gets no gradient: indices, masks), or
            None when `backward` is given instead.
        backward: for ops with a variable number of inputs, ``backward(xp, g, ans, *arrays,
            **kwargs)`` returning one gradient (or None) per input.
        save: which inputs the rules read: True (all), False (none) or a tuple of positions.
        save_ans: whether the rules read the output.
        view: the output may share memory with input 0 (reshape, transpose, basic indexing), so
            it shares input 0's version counter and in-place changes to either are detected.
        reuse_g: the op's one rule (the first; its other inputs, buffers or indices, get
            none) takes ``out=`` and may write its gradient there: backward passes ``out=g``
            when nothing else holds g, so an elementwise rule needs no new full-size array
            (what a checkpointed activation's backward would otherwise add to the peak).
    """

    __slots__ = ("name", "forward", "vjps", "backward", "save", "save_ans", "view", "reuse_g")

    def __init__(self, name: str, forward: Callable, vjps: Sequence[Callable | None] | None = None,
                 *, backward: Callable | None = None, save: bool | tuple = True,
                 save_ans: bool = False, view: bool = False, reuse_g: bool = False):
        if (vjps is None) == (backward is None):
            raise ValueError(f"op {name}: give exactly one of vjps and backward")
        if reuse_g and (vjps is None or vjps[0] is None
                        or any(r is not None for r in vjps[1:])):
            raise ValueError(f"op {name}: reuse_g needs exactly one rule, which alone reads g")
        self.name = name
        self.forward = forward
        self.vjps = tuple(vjps) if vjps is not None else None
        self.backward = backward
        self.save = save
        self.save_ans = save_ans
        self.view = view
        self.reuse_g = reuse_g

    def __call__(self, *args, **kwargs) -> Tensor:
        return apply(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Op({self.name})"


def apply(op: Op, *args, **kwargs) -> Tensor:
    """Run `op` on Tensors (or constants: Python scalars, raw arrays) and record the graph."""
    arrays = [a.data if isinstance(a, Tensor) else a for a in args]
    xp = get_array_module(*arrays)
    if xp is not numpy and len(arrays) > 1:  # all-numpy operands share the one host
        check_same_device(op.name, arrays)
    try:
        out = op.forward(xp, *arrays, **kwargs)
    except ValueError as e:  # numpy's broadcasting and shape errors: name the op and shapes
        shapes = ", ".join(str(getattr(a, "shape", ())) for a in arrays)
        raise RuntimeError(f"{op.name}: {e} (input shapes {shapes})") from None
    vjps = op.vjps
    parents = None
    if _mode.enabled:
        for i, a in enumerate(args):
            if isinstance(a, Tensor) and (a._rg or a._node is not None) and (
                    vjps is None or vjps[i] is not None):
                if parents is None:
                    parents = [None] * len(args)
                parents[i] = a._node if a._node is not None else a
    if parents is None:
        if op.view and isinstance(args[0], Tensor):
            return Tensor(out, _version=args[0]._version)
        return Tensor(out)
    save = op.save
    saved, versions = [], []
    for i, (a, arr) in enumerate(zip(args, arrays)):
        if save is True or (save is not False and i in save):
            saved.append(arr)
            if isinstance(a, Tensor):
                versions.append((a._version, a._version[0]))
        elif isinstance(a, Tensor) or hasattr(arr, "shape"):
            saved.append(NOT_SAVED)
        else:
            saved.append(arr)  # Python constants (scalars, None) cost nothing to keep
    box = args[0]._version if op.view and isinstance(args[0], Tensor) else [0]
    if op.save_ans:
        versions.append((box, box[0]))
    node = Node(op, parents, saved, out if op.save_ans else None, kwargs,
                [getattr(a, "shape", ()) for a in arrays],
                [getattr(a, "dtype", None) for a in arrays], versions)
    return Tensor(out, _node=node, _version=box)
