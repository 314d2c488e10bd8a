"""A test double of ``cupy.cuda.nccl``: the GPU boundary, which CI cannot run (no GPU, no NCCL).

It has what `dptrain.worker.comm_device.NcclAllreduce` uses: ``get_unique_id``, the dtype and
op constants with NCCL's values (``nccl.h``'s ``ncclDataType_t`` and ``ncclRedOp_t``), and a
``NcclCommunicator(ndev, commId, rank)`` whose ``allReduce(sendbuf, recvbuf, count, datatype,
op, stream)`` reduces the memory at those addresses over MPI and whose ``bcast(buff, count,
datatype, root, stream)`` broadcasts it. It reads the raw addresses as NCCL
does, so a wrong pointer, count, dtype or op gives wrong numbers, and it refuses to join a
communicator whose unique id differs between ranks. ``calls`` records every call.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from dptrain.worker.comm import Communicator

NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = range(6)
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_BFLOAT16 = 6, 7, 8, 9
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = range(5)

_DTYPES = {NCCL_INT8: np.int8, NCCL_UINT8: np.uint8, NCCL_INT32: np.int32,
           NCCL_UINT32: np.uint32, NCCL_INT64: np.int64, NCCL_UINT64: np.uint64,
           NCCL_FLOAT16: np.float16, NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
_OPS = {NCCL_SUM: "sum", NCCL_PROD: "prod", NCCL_MAX: "max", NCCL_MIN: "min"}

calls: list[tuple] = []


def get_unique_id() -> tuple:
    """A fresh 128-byte id, as NCCL's ``ncclGetUniqueId`` (cupy returns it as a tuple)."""
    calls.append(("get_unique_id",))
    return tuple(os.urandom(128))


class NcclCommunicator:
    """Rank `rank` of `ndev`, joined with `commId` (every rank must pass the same one)."""

    def __init__(self, ndev: int, commId: tuple, rank: int):  # noqa: N803 - cupy's names
        self._mpi = Communicator().dup()
        ids = self._mpi.allgather_object(commId)
        if len(set(ids)) != 1 or ndev != self._mpi.size or rank != self._mpi.rank:
            raise RuntimeError("ncclCommInitRank: ranks disagree on the unique id or the size")
        calls.append(("NcclCommunicator", ndev, rank, hash(commId)))

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int,  # noqa: N802
                  stream: int) -> None:
        calls.append(("allReduce", count, datatype, op, stream, sendbuf == recvbuf))
        total = self._mpi.allreduce_(_at(sendbuf, count, datatype).copy(), op=_OPS[op])
        _at(recvbuf, count, datatype)[...] = total

    def bcast(self, buff: int, count: int, datatype: int, root: int, stream: int) -> None:
        calls.append(("bcast", count, datatype, root, stream))
        self._mpi.broadcast_(_at(buff, count, datatype), root=root)


def _at(address: int, count: int, datatype: int) -> np.ndarray:
    """The `count` elements of NCCL type `datatype` at `address`, as NCCL reads them."""
    dtype = np.dtype(_DTYPES[datatype])
    memory = (ctypes.c_byte * (count * dtype.itemsize)).from_address(address)
    return np.ctypeslib.as_array(memory).view(dtype)
