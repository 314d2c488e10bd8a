"""DistributedDataParallel: average gradients across ranks while backward is still running.

PyTorch's design (``torch/nn/parallel/distributed.py``), on the engine's hooks:

* At wrap time every rank describes its module (names, shapes, dtypes of parameters and
  buffers); all descriptions are gathered, so a difference raises the same clear error on every
  rank instead of hanging in a collective. Then rank 0's parameters and buffers are broadcast
  (on a GPU through the all-reduce path's own broadcast, so they never leave the device on
  the NCCL and CUDA-aware paths; the buffers before each forward through one flat buffer per
  device and dtype, allocated once).
* Gradients live in flat `GradientBucket`\\ s of about ``bucket_cap_mb`` each (the first one
  ``first_bucket_cap_mb``, if given, e.g. PyTorch's 1 MiB), one dtype per bucket, filled in
  *reverse* registration order (roughly the order backward produces them).
  A parameter's post-accumulate-grad hook copies its gradient, pre-divided by the world size,
  into its slot. When a bucket is full its non-blocking all-reduce starts. Buckets start
  strictly in index order, so every rank issues the same collectives in the same order even
  when its hooks fire in a different order.
* MPI moves a non-blocking collective along only while some MPI call runs, so every hook also
  ``test()``\\ s the oldest request in flight.
* `engine.queue_callback` runs `_finish_backward` when the pass ends: buckets that are not full
  (a parameter that got no gradient) start with the gradient the parameter already holds or
  zeros, all requests are waited for, and every ``param.grad`` becomes a view of its bucket slot,
  which now holds the mean over ranks (PyTorch's ``gradient_as_bucket_view=True``, always on
  here): no copy back. After ``zero_grad(set_to_none=False)`` backward accumulates straight
  into the views and the hook divides them in place; after ``zero_grad()`` the division
  copies backward's fresh array into the bucket in the same pass (one pass, where zeroing
  the views would cost three: docs/benchmarks.md), as PyTorch copies; the fresh arrays are
  kept until the next forward that records a graph, where one process's ``zero_grad()`` frees
  its ``.grad``, so that the allocator hands their memory out again instead of giving it back
  to the system for the next backward to fault in anew (`GradientBucket.spent`).
* A forward through the wrapper that records a graph (with sync on) arms the wrapper for the
  next backward, and `engine.register_backward_pass_hook` queues `_finish_backward` at the start
  of that pass. So a rank whose loss does not depend on the model, whose backward fires no
  parameter hook, still all-reduces zeros for every bucket instead of leaving the other ranks
  waiting for it forever (PyTorch's ``prepare_for_backward`` in ``forward``).

The reduction itself is a plug-in (`register_comm_hook`), so compression or another algorithm
never touches this module: `dptrain.worker.comm_hooks` has shared-memory, hierarchical and
16-bit ones (a hook may allocate the buckets itself: `SharedMemoryAllreduce`, the default
for CPU buckets of ranks on one node, puts them in shared memory, so the gradients' copy into
the bucket already lands where every rank of the node reads it; `close` gives it back). Buckets
on a GPU get the hook of their all-reduce path (NCCL, CUDA-aware MPI or pinned host staging,
`dptrain.worker.comm_device`). The ``allreduce`` argument chooses at wrapping.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy

from dptrain.engine.backend import get_array_module, get_device
from dptrain.engine.nn.module import Module
from dptrain.engine.tensor import (
    Tensor,
    is_grad_enabled,
    queue_callback,
    register_backward_pass_hook,
)
from dptrain.worker.comm import Communicator
from dptrain.worker.comm_device import choose_allreduce, device_allreduce_hook
from dptrain.worker.comm_hooks import shared_memory_allreduce
from dptrain.worker.ddp_buckets import (
    CommHook,
    GradientBucket,
    allreduce_hook,
    assign_buckets,
)
from dptrain.worker.spec_rules import ALLREDUCE_CHOICES, CPU_ALLREDUCE, MPI_ALLREDUCE, SHARED_MEMORY

__all__ = ["DistributedDataParallel", "GradientBucket", "allreduce_hook", "CommHook"]


def _describe(module: Module, settings: dict) -> list[tuple]:
    entries = [("setting", key, value) for key, value in settings.items()]
    entries += [("parameter", name, tuple(p.shape), str(p.dtype), bool(p.requires_grad))
                for name, p in module.named_parameters()]
    entries += [("buffer", name, tuple(b.shape), str(b.dtype))
                for name, b in module.named_buffers()]
    return entries


def _format_entry(entry: tuple | None) -> str:
    if entry is None:
        return "nothing"
    if entry[0] == "setting":
        return f"the DistributedDataParallel setting {entry[1]}={entry[2]!r}"
    text = f"{entry[0]} {entry[1]!r} of shape {entry[2]} and dtype {entry[3]}"
    if entry[0] == "parameter" and not entry[4]:
        text += " (requires_grad=False)"
    return text


def _mismatch_message(descriptions: list[list[tuple]]) -> str | None:
    """None when every rank described the same module, else an error naming, for every rank
    that differs from rank 0, the first entry where it does."""
    reference = descriptions[0]
    differences: dict[tuple[int, str], list[int]] = {}
    for rank, desc in enumerate(descriptions[1:], start=1):
        if desc == reference:
            continue
        i = next((i for i, (a, b) in enumerate(zip(reference, desc)) if a != b),
                 min(len(reference), len(desc)))
        theirs = _format_entry(desc[i] if i < len(desc) else None)
        differences.setdefault((i, theirs), []).append(rank)
    if not differences:
        return None
    lines = []
    for (i, theirs), ranks in sorted(differences.items()):
        ours = _format_entry(reference[i] if i < len(reference) else None)
        who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        lines.append(f"{who} ha{'ve' if len(ranks) > 1 else 's'} {theirs} at entry {i}, where "
                     f"rank 0 has {ours}")
    return ("DistributedDataParallel: the module is not the same on every rank: "
            + "; ".join(lines) + ". Every rank must build the same model (and pass the same "
            "DistributedDataParallel settings) before wrapping it.")


class _FlatGroups:
    """Tensors broadcast together: one flat buffer per device and dtype, allocated once and
    reused, so the buffers' broadcast before every forward allocates nothing."""

    def __init__(self, tensors: list[Tensor]):
        groups: dict[tuple, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((str(get_device(t.data)), t.dtype.str), []).append(t)
        self.groups = [(group, get_array_module(group[0].data).empty(
            sum(t.numel() for t in group), dtype=group[0].dtype)) for group in groups.values()]

    def broadcast(self, comm: Communicator, broadcast_device: Callable | None) -> None:
        """Overwrite the tensors in place with rank 0's values: one broadcast per group, a
        device group's through `broadcast_device` (``(comm, array, root)``) when given."""
        for group, flat in self.groups:
            if comm.rank == 0:
                self._copy(group, flat, out=True)
            if broadcast_device is not None and get_device(flat).type != "cpu":
                broadcast_device(comm, flat, 0)
            else:
                comm.broadcast_(flat)
            if comm.rank != 0:
                self._copy(group, flat, out=False)

    @staticmethod
    def _copy(group: list[Tensor], flat: Any, out: bool) -> None:
        offset = 0
        for t in group:
            n = t.numel()
            if out:
                flat[offset:offset + n] = t.data.reshape(-1)
            else:
                t.data[...] = flat[offset:offset + n].reshape(t.shape)
                t._version[0] += 1
            offset += n


class DistributedDataParallel:
    """Wrap a module so that ``loss.backward()`` leaves every rank holding the gradient averaged
    over all ranks, overlapping the all-reduce with the rest of backward.

    Each rank runs the wrapped module on its own shard of every global batch; with equal shards
    and a loss that is a mean over samples, N ranks then train the same model as one process on
    the whole batch.

    Args:
        module: the model; every rank must build the same one (checked here).
        comm: the ranks to average over (default: MPI's world).
        bucket_cap_mb: the size of a gradient bucket in MiB; smaller buckets start
            communicating earlier, larger ones make fewer, more efficient collectives.
        first_bucket_cap_mb: the size of the first bucket in MiB (at most `bucket_cap_mb`),
            or None for `bucket_cap_mb`. PyTorch's 1 MiB starts the last layers' all-reduce
            early, which pays where the network moves data while the cores compute; on a
            machine whose cores all compute (2 ranks on 2 cores) there is nothing to overlap
            and it only adds a collective (measured here: no difference beyond the noise).
        broadcast_buffers: broadcast rank 0's buffers before every forward that records a
            graph (not in `no_sync` and not under ``engine.no_grad()``, so evaluation may run
            a different number of batches on each rank).
        find_unused_parameters: with True, one small extra all-reduce per step finds the
            parameters that no rank used, and their ``.grad`` stays None on every rank (as in
            a single process). With False (the default), such a parameter gets a zero
            gradient on every rank. Either way a parameter unused on some ranks never hangs the
            job and gets the mean over ranks, counting zeros where it was unused, even on a rank
            whose loss does not depend on the model at all.
        allreduce: how the buckets are reduced. On a GPU: ``auto`` (NCCL when every rank has
            a GPU of its own, else CUDA-aware MPI where the library is, else ``host``),
            ``host`` (staged through pinned host memory), ``cuda_aware`` or ``nccl``. On the
            CPU: ``auto`` sums them in an MPI-3 shared window (`comm_hooks.
            SharedMemoryAllreduce`, registered here) when every rank is on one node and
            ``/dev/shm`` has room for them (else MPI's all-reduce, with a warning where room
            was short), ``shared_memory`` insists on the window (an error across nodes),
            ``mpi`` keeps MPI's all-reduce. `allreduce` then holds the path taken. The window
            is the faster on one node (docs/benchmarks.md: the MLP's 2-rank step at 92% of
            two independent processes against 83%); `close` frees it.

    Example:
        >>> import dptrain.engine as engine, dptrain.engine.functional as F
        >>> from dptrain.engine import nn
        >>> from dptrain.worker import DistributedDataParallel
        >>> model = DistributedDataParallel(nn.Linear(4, 2))
        >>> x, y = engine.randn(8, 4), engine.randn(8, 2)
        >>> F.mse_loss(model(x), y).backward()  # .grad is now the mean over ranks
        >>> model.module.weight.grad.shape
        (2, 4)
    """

    def __init__(self, module: Module, comm: Communicator | None = None,
                 bucket_cap_mb: float = 25, broadcast_buffers: bool = True,
                 find_unused_parameters: bool = False,
                 first_bucket_cap_mb: float | None = None, allreduce: str = "auto"):
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel wraps an engine.nn.Module, got "
                            f"{type(module).__name__}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
        if first_bucket_cap_mb is not None and not first_bucket_cap_mb > 0:
            raise ValueError(f"first_bucket_cap_mb must be positive, got "
                             f"{first_bucket_cap_mb!r}")
        if allreduce not in ALLREDUCE_CHOICES:
            raise ValueError(f"allreduce must be one of {', '.join(ALLREDUCE_CHOICES)}, got "
                             f"{allreduce!r}")
        self.module = module
        self.comm = Communicator() if comm is None else comm
        self.broadcast_buffers = bool(broadcast_buffers)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.bucket_cap_mb = bucket_cap_mb
        settings = {"bucket_cap_mb": bucket_cap_mb, "first_bucket_cap_mb": first_bucket_cap_mb,
                    "find_unused_parameters": self.find_unused_parameters,
                    "broadcast_buffers": self.broadcast_buffers, "allreduce": allreduce,
                    "devices": sorted({get_device(p.data).type for p in module.parameters()})}
        error = _mismatch_message(self.comm.allgather_object(_describe(module, settings)))
        if error is not None:
            raise RuntimeError(error)
        self._buffers = [b for _, b in module.named_buffers()]
        trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._buckets = assign_buckets(
            trained, int(bucket_cap_mb * 1024 * 1024),
            None if first_bucket_cap_mb is None else int(first_bucket_cap_mb * 1024 * 1024))
        self._scale = 1.0 / self.comm.size
        self._comm_hook: CommHook = allreduce_hook
        self._own_hook = None  # the hook chosen here by `allreduce`, which the wrapper closes
        #: The path the buckets take: ``host``, ``cuda_aware`` or ``nccl`` on a GPU,
        #: ``shared_memory`` or ``mpi`` on the CPU; None on one rank (nothing to reduce).
        self.allreduce: str | None = None
        device = next((d for d in (get_device(b.buffer) for b in self._buckets)
                       if d.type != "cpu"), None)
        if device is not None and allreduce in CPU_ALLREDUCE:
            raise ValueError(f"allreduce {allreduce!r} reduces CPU gradients; these are on "
                             f"{device}: use 'auto', 'host', 'cuda_aware' or 'nccl'")
        if device is not None and self.comm.size > 1:  # the same on every rank (checked above)
            self.allreduce = choose_allreduce(allreduce, self.comm, device)
            self._comm_hook = device_allreduce_hook(self.allreduce, self.comm, device)
        self._buffer_groups = _FlatGroups(self._buffers)
        if self.comm.size > 1:  # through the path chosen above: a GPU's parameters stay there
            self.broadcast_parameters()
        self._sync = True
        self._armed = False     # a forward recorded a graph: the next backward reduces
        self._in_pass = False
        self._next_launch = 0   # buckets below this index have started their all-reduce
        self._next_done = 0     # buckets below this index have completed it
        self._hook_handles = []
        for bucket in self._buckets:
            for slot, p in enumerate(bucket.params):
                self._hook_handles.append(p.register_post_accumulate_grad_hook(
                    self._make_hook(bucket, slot)))
        # Held weakly: the engine's list of pass hooks must not keep a dropped wrapper alive.
        this = weakref.ref(self)

        def on_backward_pass() -> None:
            ddp = this()
            if ddp is not None and ddp._armed and ddp._sync:
                ddp._start_pass()

        weakref.finalize(self, register_backward_pass_hook(on_backward_pass).remove)
        # A communicator without shared windows (a test's stand-in) reduces through its own.
        if (device is None and self.comm.size > 1 and allreduce != MPI_ALLREDUCE
                and hasattr(self.comm, "split_shared")):
            # Collective, as the checks above: every rank gets here or none does.
            hook = shared_memory_allreduce(self.comm, sum(b.nbytes for b in self._buckets),
                                           required=allreduce == SHARED_MEMORY)
            if hook is not None:
                self.register_comm_hook(hook)
                self.allreduce = SHARED_MEMORY
                self._own_hook = hook
        if device is None and self.comm.size > 1 and self.allreduce is None:
            self.allreduce = MPI_ALLREDUCE

    # ----------------------------------------------------------- the module's face
    def __call__(self, *args, **kwargs):
        """Run the module's forward (after broadcasting rank 0's buffers, if enabled)."""
        if self._in_pass:
            raise RuntimeError(
                "DistributedDataParallel: the previous backward pass ended before its gradient "
                "all-reduce finished (an exception during backward?), so the ranks are no "
                "longer in step; restart the job from a checkpoint")
        if self._sync and is_grad_enabled():
            self._armed = True
            for bucket in self._buckets:  # as zero_grad() frees .grad before a forward
                bucket.spent = [None] * len(bucket.params)
            if self.broadcast_buffers and self._buffers and self.comm.size > 1:
                self._buffer_groups.broadcast(self.comm, self._device_broadcast())
        return self.module(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """Same as calling the wrapper."""
        return self(*args, **kwargs)

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: anything else the module has.
        if name == "module" or "module" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["module"], name)

    def __repr__(self) -> str:
        return f"DistributedDataParallel(\n  (module): {self.module!r}\n)"

    def parameters(self, recurse: bool = True) -> Iterator[Tensor]:
        """The module's parameters (see `engine.nn.Module.parameters`)."""
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs) -> Iterator[tuple[str, Tensor]]:
        """The module's named parameters, without a ``module.`` prefix."""
        return self.module.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        """The module's state dict, with the module's own keys (no ``module.`` prefix)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load into the module (see `engine.nn.Module.load_state_dict`)."""
        return self.module.load_state_dict(state_dict, strict)

    def train(self, mode: bool = True) -> DistributedDataParallel:
        """Set the module's training mode. Returns the wrapper."""
        self.module.train(mode)
        return self

    def eval(self) -> DistributedDataParallel:
        """Set the module's evaluation mode. Returns the wrapper."""
        self.module.eval()
        return self

    # ----------------------------------------------------------- synchronisation control
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside this block backward communicates nothing: gradients accumulate locally.
        The first backward after the block all-reduces the accumulated totals.

        Example::

            with ddp.no_sync():
                (loss_fn(ddp(x1), y1) / 2).backward()   # local accumulation only
            (loss_fn(ddp(x2), y2) / 2).backward()       # all-reduces the sum of both
        """
        previous = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = previous

    def _device_broadcast(self) -> Callable | None:
        # The device paths' hooks broadcast as they reduce; a hook without it (compression,
        # hierarchical) leaves broadcasts to the communicator.
        return getattr(self._comm_hook, "broadcast_", None)

    def broadcast_parameters(self) -> None:
        """Overwrite every rank's parameters and buffers with rank 0's (as at wrapping),
        through the comm hook's broadcast where it has one (the GPU paths': NCCL's ``bcast``,
        CUDA-aware MPI, pinned staging), else the communicator's. Collective; e.g. after rank
        0 alone has loaded a checkpoint, or after `register_comm_hook`."""
        if self.comm.size > 1:
            params = [p for _, p in self.module.named_parameters()]
            _FlatGroups(params + self._buffers).broadcast(self.comm, self._device_broadcast())

    def register_comm_hook(self, hook: CommHook) -> None:
        """Replace how a bucket is reduced (PyTorch's ``register_comm_hook``): compression or
        another algorithm plugs in here (`dptrain.worker.comm_hooks`: `SharedMemoryAllreduce`,
        `HierarchicalAllreduce`, `CompressedAllreduce`). See `CommHook` for the contract.

        Args:
            hook: ``hook(comm, bucket_array) -> request`` with ``wait()`` and ``test()``. A
                hook with a ``broadcast_(comm, array, root)`` method (the GPU paths') also
                carries the broadcasts of device parameters and buffers. A hook with an
                ``allocate_bucket(size, dtype) -> array`` method (`SharedMemoryAllreduce`'s
                shared memory) gets every CPU bucket moved into an array it allocates, here,
                collectively and in bucket order, with the gradients they hold.
        """
        if self._in_pass:
            raise RuntimeError("register_comm_hook cannot be called during a backward pass")
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        if self._own_hook is not None:  # the default's windows: given back, not left behind
            self.close()
        allocate = getattr(hook, "allocate_bucket", None)
        if allocate is not None and self.comm.size > 1:
            self._move_cpu_buckets(allocate)
        self._comm_hook = hook

    def _move_cpu_buckets(self, allocate: Callable[[int, Any], Any]) -> None:
        """Move every CPU bucket, with the gradients that view it, into
        ``allocate(size, dtype)``, in bucket order."""
        for bucket in self._buckets:
            if get_device(bucket.buffer).type == "cpu":
                bucket.move_to(allocate(bucket.buffer.size, bucket.buffer.dtype))

    def close(self) -> None:
        """Give back what the comm hook holds outside this process (the shared windows of
        `SharedMemoryAllreduce`, in ``/dev/shm``): the buckets and the gradients that are
        views of them move to private memory first, and the wrapper goes on with MPI's
        all-reduce. Collective: every rank closes at the same point, as ``MPI_Win_free``
        requires. Also the end of a ``with`` block over the wrapper. Idempotent. (A wrapper
        garbage-collected with its model instead, at different points on different ranks,
        leaves its windows to the next `SharedMemoryAllreduce` built on the same ranks, which
        frees them once no gradient on any rank is a view of them.)
        """
        if self._in_pass:
            raise RuntimeError("DistributedDataParallel.close cannot be called during a "
                               "backward pass")
        hook = self._comm_hook
        if hook is allreduce_hook or not callable(getattr(hook, "close", None)):
            return
        if getattr(hook, "allocate_bucket", None) is not None:
            self._move_cpu_buckets(numpy.empty)
        self._comm_hook, self._own_hook = allreduce_hook, None
        if self.allreduce == SHARED_MEMORY:
            self.allreduce = MPI_ALLREDUCE
        hook.close()

    def __enter__(self) -> DistributedDataParallel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def bucket_assignment(self) -> list[list[str]]:
        """The parameter names of each gradient bucket, in the order buckets are reduced."""
        return [list(b.names) for b in self._buckets]

    # ----------------------------------------------------------- the hooks
    def _make_hook(self, bucket: GradientBucket, slot: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if self._sync:
                self._grad_ready(bucket, slot, param)
        return hook

    def _start_pass(self) -> None:
        """Take part in this backward pass: reduce when it ends, whatever it reached."""
        if not self._in_pass:
            self._in_pass = True
            queue_callback(self._finish_backward)

    def _grad_ready(self, bucket: GradientBucket, slot: int, param: Tensor) -> None:
        self._start_pass()  # the module may have been called directly, not through the wrapper
        if bucket.filled[slot]:
            return
        bucket.filled[slot] = True
        bucket.pending -= 1
        if self.comm.size == 1:  # nothing to exchange: gradients stay where they are
            return
        view = bucket.views[slot]
        xp = get_array_module(view)
        if param.dtype != view.dtype or get_array_module(param.data) is not xp:
            raise RuntimeError(
                f"DistributedDataParallel: parameter {bucket.names[slot]!r} changed dtype or "
                "device after wrapping; move or cast the module first, then wrap it")
        grad = param.grad.data
        xp.multiply(grad, self._scale, out=view)
        if grad is not view and xp is numpy:  # a GPU's memory pool keeps its blocks itself
            bucket.spent[slot] = grad
        self._launch_ready()
        self._drive_progress()

    def _launch_ready(self) -> None:
        """Start every full bucket whose predecessors have all started (index order)."""
        buckets = self._buckets
        while self._next_launch < len(buckets) and buckets[self._next_launch].pending == 0:
            bucket = buckets[self._next_launch]
            bucket.request = self._comm_hook(self.comm, bucket.buffer)
            self._next_launch += 1

    def _drive_progress(self) -> None:
        """Let MPI move the requests in flight along (it progresses only inside MPI calls)."""
        buckets = self._buckets
        while self._next_done < self._next_launch and buckets[self._next_done].request.test():
            self._next_done += 1

    def _fill_missing(self, bucket: GradientBucket) -> None:
        """Fill the slots whose hook did not fire in this pass: the gradient the parameter
        already holds (accumulated under `no_sync`), else zeros."""
        for slot, p in enumerate(bucket.params):
            if bucket.filled[slot]:
                continue
            view = bucket.views[slot]
            if p.grad is None:
                view.fill(0)
            else:
                get_array_module(view).multiply(p.grad.data, self._scale, out=view)
            bucket.filled[slot] = True
        bucket.pending = 0

    def _finish_backward(self) -> None:
        """End of the backward pass: start what is left, wait for everything, and make every
        ``param.grad`` the mean over ranks."""
        try:
            buckets = self._buckets
            used = None
            if self.find_unused_parameters:  # before _fill_missing marks every slot filled
                used = [b.filled[s] or p.grad is not None
                        for b in buckets for s, p in enumerate(b.params)]
            if self.comm.size > 1:
                for bucket in buckets[self._next_launch:]:
                    self._fill_missing(bucket)
                self._launch_ready()
                if used is not None:  # after every bucket: the same collective order on all ranks
                    counts = numpy.asarray(used, dtype=numpy.int32)
                    self.comm.allreduce_(counts, op="sum")
                    used = (counts > 0).tolist()
                for bucket in buckets:
                    bucket.request.wait()
            k = 0
            for bucket in buckets:
                for slot, p in enumerate(bucket.params):
                    k += 1
                    if not p.requires_grad or (used is not None and not used[k - 1]):
                        continue
                    view = bucket.views[slot]
                    if self.comm.size > 1:
                        if p.grad is None or p.grad.data is not view:
                            p.grad = Tensor(view)
                    elif p.grad is None:
                        view.fill(0)
                        p.grad = Tensor(view)
        finally:
            for bucket in self._buckets:
                bucket.reset()
            self._next_launch = self._next_done = 0
            self._in_pass = self._armed = False
