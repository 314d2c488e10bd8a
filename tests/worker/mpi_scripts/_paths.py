"""The all-reduce paths the DDP scripts run on: ``cpu`` (host buckets, MPI's all-reduce:
``allreduce="mpi"``),
``shared_memory`` (host buckets in an MPI-3 shared window, the `SharedMemoryAllreduce` comm
hook) and, on the strict device that stands in for a GPU, ``host`` (pinned staging),
``cuda_aware`` (MPI reads the device buffers) and ``nccl`` (through the test double of
``cupy.cuda.nccl``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "helpers"))
import nccl_double  # noqa: E402 - the shared test helpers' folder, put on the path above

from dptrain.worker import DistributedDataParallel
from dptrain.worker.comm_device import NcclAllreduce
from dptrain.worker.train import rank_device

PATHS = ("cpu", "shared_memory", "host", "cuda_aware", "nccl")
#: The paths whose buckets live in host memory.
HOST_PATHS = ("cpu", "shared_memory")


def device_for(path: str, comm, device: str = "strict") -> str:
    """The device the `path` run trains on: the CPU for ``cpu``, else `device`; ``cuda`` is
    this rank's GPU as a job with ``device: cuda`` gets it (collective)."""
    if path in HOST_PATHS:
        return "cpu"
    return str(rank_device("cuda", comm)) if device == "cuda" else device


def wrap(model, comm, path: str, **kwargs) -> DistributedDataParallel:
    """`model` (already on its device) wrapped to reduce its buckets by `path`."""
    if path == "shared_memory":  # the hook registered at construction: buckets in the window
        return DistributedDataParallel(model, comm=comm, allreduce="shared_memory", **kwargs)
    on_strict = next(model.parameters()).device == "strict"
    if path != "nccl" or not on_strict:
        return DistributedDataParallel(model, comm=comm, allreduce="mpi" if path == "cpu"
                                       else path, **kwargs)
    # The strict device has no NCCL, so auto would not pick it: the double goes in by hand,
    # and the parameters are broadcast again through it (wrapping staged them through host).
    ddp = DistributedDataParallel(model, comm=comm, allreduce="host", **kwargs)
    if comm.size > 1:
        ddp.register_comm_hook(NcclAllreduce(comm, "strict", nccl=nccl_double))
        ddp.broadcast_parameters()
    return ddp


def path_report(ddp, comm) -> dict:
    """What the test checks about the path taken."""
    hook = ddp._comm_hook
    return {"allreduce": ddp.allreduce, "hook": type(hook).__name__,
            "staged_bytes": comm.staged_bytes,
            "pinned_buffers": getattr(hook, "pinned_buffers", None),
            "nccl_calls": [list(c) for c in nccl_double.calls]}
