"""How `DistributedDataParallel` reduces gradient buckets that live on a device: three paths,
one chosen per job (the job spec's ``allreduce``), each a comm hook, so the wrapper does not
change with the path.

* ``nccl`` (`NcclAllreduce`): NCCL's all-reduce through ``cupy.cuda.nccl`` on the device
  buffers, queued on the compute stream; it needs every rank to have a GPU of its own (NCCL
  refuses two ranks on one GPU). Rank 0 makes the communicator's unique id and MPI broadcasts
  it, as Horovod and ChainerMN do.
* ``cuda_aware`` (`CudaAwareAllreduce`): MPI reads and writes the device buffers itself, once
  the stream has finished the kernels that write them (an unsynchronised call reads whatever
  the buffer held before).
* ``host`` (`PinnedStagingAllreduce`): each bucket is copied on a stream of its own into a
  pinned host buffer (allocated once per bucket and reused), all-reduced there and copied back.
  Buckets go through in order, so the copy of one overlaps the reduction of the one before it.

Each path also broadcasts (``broadcast_(comm, array, root)``): DDP's parameters at wrapping and
its buffers before every forward go to the other ranks the way its gradients do, NCCL's
``bcast``, MPI on the device buffer after a stream sync, or a reused pinned buffer.

``auto`` picks ``nccl`` where every rank can use it, else ``cuda_aware`` where MPI is
CUDA-aware on every rank (`dptrain.worker.comm.cuda_aware_mpi`), else ``host`` (the ``mpich``
wheel's case). Every path sums buckets that DDP has already divided by the world size, so the
sum is the mean gradient.

On the strict device (CI has no GPU) streams and events complete at once and the pinned buffers
are ordinary host arrays, so the ``host`` and ``cuda_aware`` paths run their ordering code there;
the ``nccl`` path runs with a test double of ``cupy.cuda.nccl`` (the GPU boundary).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy

from dptrain.engine import backend
from dptrain.engine.backend import Device, Event
from dptrain.worker.comm import Communicator, Request, cuda_aware_mpi
from dptrain.worker.comm_hooks import _check_world, _Pipeline
from dptrain.worker.spec_rules import ALLREDUCE_PATHS

__all__ = ["ALLREDUCE_PATHS", "RankFacts", "pick_allreduce", "choose_allreduce",
           "device_allreduce_hook", "PinnedStagingAllreduce", "CudaAwareAllreduce",
           "NcclAllreduce"]


@dataclass(frozen=True)
class RankFacts:
    """What one rank knows about its paths (`pick_allreduce` decides from every rank's).

    Attributes:
        nccl: CuPy's NCCL bindings are usable here (a GPU device and ``cupy.cuda.nccl``).
        local_ranks: the ranks on this rank's node.
        gpus: the GPUs visible on it.
        cuda_aware: the MPI library reads device memory.
    """

    nccl: bool
    local_ranks: int
    gpus: int
    cuda_aware: bool


def pick_allreduce(requested: str, facts: Sequence[RankFacts]) -> str:
    """The path for `requested` (one of `ALLREDUCE_PATHS`), given every rank's facts.

    Returns:
        ``host``, ``cuda_aware`` or ``nccl``. A requested ``host`` or ``cuda_aware`` is taken
        as it is (a CUDA-aware library that cannot be asked is the user's to declare).

    Raises:
        ValueError: an unknown path.
        RuntimeError: ``nccl`` requested where some rank cannot use it (naming it and why).
    """
    if requested not in ALLREDUCE_PATHS:
        raise ValueError(f"allreduce must be one of {', '.join(ALLREDUCE_PATHS)}, got "
                         f"{requested!r}")
    own_gpu = [f.nccl and f.local_ranks <= f.gpus for f in facts]
    if requested == "nccl":
        for rank, (f, ok) in enumerate(zip(facts, own_gpu, strict=True)):
            if not ok:
                why = ("CuPy's NCCL (cupy.cuda.nccl) or a GPU is missing" if not f.nccl else
                       f"its node runs {f.local_ranks} ranks on {f.gpus} GPUs")
                raise RuntimeError(f"allreduce 'nccl' needs NCCL and a GPU of its own on every "
                                   f"rank; rank {rank}: {why}; use 'auto' or 'host'")
        return "nccl"
    if requested != "auto":
        return requested
    if all(own_gpu):
        return "nccl"
    if all(f.cuda_aware for f in facts):
        return "cuda_aware"
    return "host"


def choose_allreduce(requested: str, comm: Communicator, device: Device | str) -> str:
    """`pick_allreduce` for `device`'s buckets with the facts of every rank of `comm`.

    Collective: every rank calls it (it splits `comm` by node and gathers the facts).
    """
    device = Device(device)
    if requested not in ALLREDUCE_PATHS:  # before the collectives: the same error everywhere
        pick_allreduce(requested, [])
    local = comm.split_shared()
    on_gpu = device.type == "cuda"
    facts = RankFacts(nccl=on_gpu and backend.nccl() is not None, local_ranks=local.size,
                      gpus=backend.gpu_count(), cuda_aware=cuda_aware_mpi())
    return pick_allreduce(requested, comm.allgather_object(facts))


def device_allreduce_hook(path: str, comm: Communicator, device: Device | str):
    """The comm hook of `path` (``host``, ``cuda_aware`` or ``nccl``) for buckets on `device`.

    Collective for ``nccl`` (the unique id is broadcast).
    """
    if path == "nccl":
        return NcclAllreduce(comm, device)
    if path == "cuda_aware":
        return CudaAwareAllreduce(comm)
    if path == "host":
        return PinnedStagingAllreduce(comm, device)
    raise ValueError(f"no all-reduce path {path!r}: choose host, cuda_aware or nccl")


class _EventRequest:
    """A stage that is done when the work queued before `event` is."""

    __slots__ = ("_event",)

    def __init__(self, event: Event):
        self._event = event

    def test(self) -> bool:
        return self._event.query()

    def wait(self) -> None:
        self._event.synchronize()


_Stages = Generator[Any, None, None]


class PinnedStagingAllreduce:
    """Stage each bucket through a pinned host buffer on a copy stream, pipelined in bucket
    order (the ``host`` path).

    Args:
        comm: the DDP wrapper's communicator (``ddp.comm``).
        device: the device of the buckets.

    Attributes:
        pinned_buffers: how many host buffers it has allocated (one per bucket and one per
            size and dtype broadcast, ever).
    """

    def __init__(self, comm: Communicator, device: Device | str):
        self._world = comm
        self.device = Device(device)
        self._stream = backend.CopyStream(self.device)
        self._pinned: dict[tuple, numpy.ndarray] = {}
        self._pipeline = _Pipeline()

    @property
    def pinned_buffers(self) -> int:
        """How many pinned host buffers it holds."""
        return len(self._pinned)

    def _host_buffer(self, array, key: tuple):
        host = self._pinned.get(key)
        if host is None:
            host = self._pinned[key] = backend.pinned_empty(array.size, array.dtype,
                                                            self.device)
        return host

    def __call__(self, comm: Communicator, bucket) -> Any:
        _check_world("PinnedStagingAllreduce", self._world, comm)
        # Keyed by the bucket's memory: DDP's buckets live as long as it does.
        host = self._host_buffer(bucket, (backend.data_pointer(bucket), bucket.size,
                                          bucket.dtype.str))
        return self._pipeline.start(self._stages(comm, bucket, host))

    def broadcast_(self, comm: Communicator, array, root: int = 0) -> None:
        """Overwrite `array` (on the device) with `root`'s, through its pinned buffer: only
        `root` copies it out; every rank copies the result back, queued before the compute
        stream's next kernels."""
        _check_world("PinnedStagingAllreduce", self._world, comm)
        # Keyed by size and dtype: a broadcast of fresh arrays of one shape reuses one buffer.
        host = self._host_buffer(array, ("broadcast", array.size, array.dtype.str))
        if comm.rank == root:
            self._stream.wait(backend.record_event(self.device))
            self._stream.to_host(array, host).synchronize()
        comm.staged_bytes += array.nbytes
        comm.broadcast_(host, root=root)
        backend.wait_event(self.device, self._stream.to_device(host, array))

    def _stages(self, comm: Communicator, bucket, host: numpy.ndarray) -> _Stages:
        # Queued now, when DDP starts the bucket: the copy waits for the kernels that wrote the
        # gradients, on the copy stream, while earlier buckets are still being reduced.
        self._stream.wait(backend.record_event(self.device))
        yield _EventRequest(self._stream.to_host(bucket, host))
        comm.staged_bytes += bucket.nbytes
        yield comm.iallreduce_(host, op="sum")
        # The compute stream waits for the copy back; the host need not.
        backend.wait_event(self.device, self._stream.to_device(host, bucket))


class CudaAwareAllreduce:
    """Hand the device bucket to MPI itself, once the stream has finished writing it (the
    ``cuda_aware`` path; MPI must read device memory).

    Args:
        comm: the DDP wrapper's communicator (``ddp.comm``).
    """

    def __init__(self, comm: Communicator):
        self._world = comm
        self._device_mpi = Communicator(comm, cuda_aware=True)  # the same MPI communicator

    def __call__(self, comm: Communicator, bucket) -> Request:
        _check_world("CudaAwareAllreduce", self._world, comm)
        return self._device_mpi.iallreduce_(bucket, op="sum")  # synchronises the stream first

    def broadcast_(self, comm: Communicator, array, root: int = 0) -> None:
        """Overwrite `array` with `root`'s: MPI's ``Bcast`` on the device buffer, once the
        stream has finished writing it."""
        _check_world("CudaAwareAllreduce", self._world, comm)
        self._device_mpi.broadcast_(array, root=root)  # synchronises the stream first


#: numpy dtype name -> the ``cupy.cuda.nccl`` constant naming it (``ncclDataType_t``).
_NCCL_DTYPES = {"int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32",
                "uint32": "NCCL_UINT32", "int64": "NCCL_INT64", "uint64": "NCCL_UINT64",
                "float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}


class _Queued:
    """An NCCL call needs no waiting on the host: later kernels on the stream see its result."""

    __slots__ = ()

    def test(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class NcclAllreduce:
    """NCCL's in-place all-reduce sum of each bucket, on the compute stream (the ``nccl``
    path). Building it is collective: rank 0's unique id is broadcast over MPI and every rank
    joins the NCCL communicator with it.

    Args:
        comm: the DDP wrapper's communicator (``ddp.comm``).
        device: the device of the buckets (the current GPU of this rank).
        nccl: the NCCL bindings; None for ``cupy.cuda.nccl`` (tests pass a double).

    Raises:
        RuntimeError: without CuPy's NCCL.
    """

    def __init__(self, comm: Communicator, device: Device | str, nccl: Any = None):
        nccl = backend.nccl() if nccl is None else nccl
        if nccl is None:
            raise RuntimeError("allreduce 'nccl' needs CuPy's NCCL (cupy.cuda.nccl) and a GPU; "
                               "use allreduce 'auto' or 'host'")
        self._world, self._nccl, self.device = comm, nccl, Device(device)
        unique_id = comm.broadcast_object(nccl.get_unique_id() if comm.rank == 0 else None)
        self._comm = nccl.NcclCommunicator(comm.size, unique_id, comm.rank)

    def _dtype(self, array, what: str) -> int:
        name = _NCCL_DTYPES.get(array.dtype.name)
        if name is None:
            raise TypeError(f"NcclAllreduce cannot {what} dtype {array.dtype}; NCCL takes "
                            f"{', '.join(_NCCL_DTYPES)}")
        return getattr(self._nccl, name)

    def __call__(self, comm: Communicator, bucket) -> _Queued:
        _check_world("NcclAllreduce", self._world, comm)
        dtype = self._dtype(bucket, "reduce")
        pointer = backend.data_pointer(bucket)
        self._comm.allReduce(pointer, pointer, bucket.size, dtype, self._nccl.NCCL_SUM,
                             backend.stream_pointer(self.device))
        return _Queued()

    def broadcast_(self, comm: Communicator, array, root: int = 0) -> None:
        """Overwrite `array` with `root`'s: NCCL's in-place ``bcast``, queued on the compute
        stream (its next kernels see the result; the host does not wait)."""
        _check_world("NcclAllreduce", self._world, comm)
        dtype = self._dtype(array, "broadcast")
        self._comm.bcast(backend.data_pointer(array), array.size, dtype, root,
                         backend.stream_pointer(self.device))
