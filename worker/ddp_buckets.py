"""The gradient buckets of `DistributedDataParallel` and the comm-hook contract.

A bucket is one flat, contiguous buffer per group of parameters of one dtype, filled in
reverse registration order and reduced as a whole by a comm hook (`CommHook`): the wrapper
(`dptrain.worker.ddp`) decides when, a hook (`allreduce_hook`, `dptrain.worker.comm_hooks`,
`dptrain.worker.comm_device`) decides how.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from dptrain.engine.backend import get_array_module
from dptrain.engine.tensor import Tensor
from dptrain.worker.comm import Communicator

__all__ = ["CommRequest", "CommHook", "allreduce_hook", "GradientBucket", "assign_buckets"]


class CommRequest(Protocol):
    """What a comm hook returns: `Request`-like, with ``wait()`` and ``test() -> bool``."""

    def wait(self) -> None: ...

    def test(self) -> bool: ...


#: ``hook(comm, bucket_array) -> request``: reduce one flat bucket in place, non-blocking.
#: The bucket holds this rank's gradients already divided by the world size; when the request's
#: ``wait()`` returns, it must hold the sum over ranks (that is, the mean gradient).
CommHook = Callable[[Communicator, Any], CommRequest]


def allreduce_hook(comm: Communicator, bucket: Any) -> CommRequest:
    """The default comm hook: a non-blocking in-place all-reduce sum of the pre-divided bucket.

    Args:
        comm: the job's communicator.
        bucket: a flat, contiguous gradient array.

    Returns:
        The request of the ``Iallreduce``.
    """
    return comm.iallreduce_(bucket, op="sum")


class GradientBucket:
    """One flat, contiguous gradient buffer shared by a group of parameters of one dtype.

    Args:
        index: the bucket's position in the launch order.
        names: the dotted names of its parameters.
        params: the parameters, in the order their slots are laid out.
    """

    __slots__ = ("index", "names", "params", "buffer", "views", "filled", "pending", "request",
                 "spent")

    def __init__(self, index: int, names: list[str], params: list[Tensor]):
        xp = get_array_module(params[0].data)
        self.index = index
        self.names = names
        self.params = params
        self.buffer = xp.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
        self.views = self._slots(self.buffer)
        self.filled = [False] * len(params)
        self.pending = len(params)
        self.request: CommRequest | None = None
        #: Backward's fresh CPU gradients of the last pass, copied into the bucket: held until
        #: the next forward through the wrapper that records a graph, as one process holds its
        #: ``.grad`` until ``zero_grad()`` just before its forward, so that the allocator keeps
        #: their memory for the next step instead of giving it back to the system for
        #: backward to fault in again (docs/benchmarks.md). Not held into the forward: that
        #: would add the gradients' size to the step's peak.
        self.spent: list = [None] * len(params)

    @property
    def nbytes(self) -> int:
        """The size of the buffer in bytes."""
        return int(self.buffer.nbytes)

    def move_to(self, buffer: Any) -> None:
        """Make `buffer` (flat, of this bucket's size and dtype) the bucket: the contents are
        copied into it, and gradients that were views of the old buffer become views of it."""
        buffer[...] = self.buffer
        old_views, self.buffer, self.views = self.views, buffer, self._slots(buffer)
        for p, old, view in zip(self.params, old_views, self.views):
            if p.grad is not None and p.grad.data is old:
                p.grad = Tensor(view)

    def _slots(self, buffer: Any) -> list:
        """The parameters' views of `buffer`, in slot order, each of its parameter's shape."""
        views, offset = [], 0
        for p in self.params:
            n = p.numel()
            views.append(buffer[offset:offset + n].reshape(p.shape))
            offset += n
        return views

    def reset(self) -> None:
        """Forget the last pass: every slot empty, no request."""
        self.filled = [False] * len(self.params)
        self.pending = len(self.params)
        self.request = None


def assign_buckets(named: list[tuple[str, Tensor]], cap_bytes: int,
                   first_cap_bytes: int | None = None) -> list[GradientBucket]:
    """Group parameters, in reverse registration order, into buckets of at most `cap_bytes`
    (a larger parameter gets a bucket of its own), one open bucket per array type and dtype.
    The first bucket of each kind holds at most `first_cap_bytes` (default `cap_bytes`), so
    that its all-reduce starts early in backward, as PyTorch's 1 MB first bucket does."""
    first_cap = cap_bytes if first_cap_bytes is None else min(first_cap_bytes, cap_bytes)
    open_groups: dict[tuple, tuple[list[tuple[str, Tensor]], int]] = {}  # key: (group, cap)
    groups: list[list[tuple[str, Tensor]]] = []
    sizes: dict[int, int] = {}
    for name, p in reversed(named):
        key = (get_array_module(p.data).__name__, p.dtype.str)
        group, cap = open_groups.get(key, (None, first_cap))
        nbytes = p.numel() * p.dtype.itemsize
        if group is None or (group and sizes[id(group)] + nbytes > cap):
            cap = first_cap if group is None else cap_bytes
            group = []
            open_groups[key] = (group, cap)
            groups.append(group)
            sizes[id(group)] = 0
        group.append((name, p))
        sizes[id(group)] += nbytes
    return [GradientBucket(i, [n for n, _ in g], [p for _, p in g]) for i, g in enumerate(groups)]
