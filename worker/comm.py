"""Communicator: every MPI call of dptrain, in one module (the only one that imports mpi4py).

Methods are named after what they do to their argument: ``allreduce_`` and ``broadcast_`` work
in place on a contiguous array through mpi4py's buffer interface (``Allreduce(MPI.IN_PLACE,
buf)``, ``Bcast``), never through the pickling lower-case calls, which copy an array several
times. Python objects (small: names, shapes, metrics) go through ``allgather_object`` and
``broadcast_object``, which do pickle.

mpi4py is imported on first use, so importing `worker` does not initialise MPI. Without
``mpiexec`` mpi4py initialises a singleton world of size 1, and everything works there too.

Device (CuPy) arrays are staged through host memory (copied to the host, reduced, copied back)
unless the communicator is told that MPI is CUDA-aware (`cuda_aware_mpi` asks the library), as
ChainerMN does. DDP's gradient buckets take one of three faster paths
(`dptrain.worker.comm_device`).

Example:
    >>> import numpy as np
    >>> from dptrain.worker.comm import Communicator
    >>> comm = Communicator()
    >>> grad = np.ones(3, dtype=np.float32)
    >>> comm.allreduce_(grad, op="mean")  # every rank now holds the mean over ranks
    array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy

from dptrain.engine.backend import (
    copy_from_host,
    get_array_module,
    get_device,
    synchronize,
    to_host,
)

__all__ = ["Communicator", "Request", "SharedArrays", "REDUCE_OPS", "cuda_aware_mpi",
           "cuda_aware_from"]

#: The reduction names `Communicator.allreduce_` accepts ('mean' is a sum divided by the size).
REDUCE_OPS = ("sum", "mean", "max", "min", "prod")

#: How `Request.wait` waits: it polls ``Test`` in a busy loop for up to `SPIN_S` seconds (the
#: partner ranks are usually ready: a 7.5 MB all-reduce then takes ~1.3 ms here, 3x less than
#: with sleeps between polls), then sleeps `POLL_INTERVAL_S` between polls, so that a rank
#: waiting for a late partner leaves the core to the others. ``MPI_Wait`` spins with
#: ``sched_yield`` for as long as it takes, which made the 2-rank DDP step of
#: bench/ddp_vs_torch.py 20-30% slower on a 2-core machine.
SPIN_S = 1e-3
POLL_INTERVAL_S = 20e-6

_MPI = None


def _mpi():
    """The mpi4py.MPI module, imported (and MPI initialised) on first use."""
    global _MPI
    if _MPI is None:
        from mpi4py import MPI

        _MPI = MPI
    return _MPI


def _mpi_op(op: str):
    if op not in REDUCE_OPS:
        raise ValueError(f"unsupported reduction op {op!r}; choose one of {', '.join(REDUCE_OPS)}")
    MPI = _mpi()
    return {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN,
            "prod": MPI.PROD}[op]


#: Where the library cannot be asked: (its name in ``MPI_Get_library_version``, the environment
#: switch that turns its CUDA support on, the values meaning on), most specific name first.
_CUDA_SWITCHES = (
    ("MVAPICH", "MV2_USE_CUDA", ("1",)),
    ("CRAY MPICH", "MPICH_GPU_SUPPORT_ENABLED", ("1",)),
    ("Open MPI", "OMPI_MCA_opal_cuda_support", ("1", "true")),
)


def cuda_aware_from(query: int | None, library_version: str, environ: Mapping[str, str]) -> bool:
    """Whether MPI reads and writes GPU memory itself, from what `cuda_aware_mpi` found.

    Args:
        query: what ``MPIX_Query_cuda_support`` returned (MPICH >= 4, Open MPI >= 2, MVAPICH2
            >= 2.3.4: built with CUDA *and* enabled at run time), or None where the library
            has no such call (mpi4py answers -1 for "unknown": also None's case).
        library_version: ``MPI_Get_library_version``'s text.
        environ: the environment, for the switches of libraries that cannot be asked.

    Returns:
        The query's answer where there is one, else whether the library's switch is on; False
        for an unknown library. MPICH's ``MPIR_CVAR_ENABLE_GPU=0`` turns its support off.
    """
    if "MPICH" in library_version and environ.get("MPIR_CVAR_ENABLE_GPU", "").strip() == "0":
        return False
    if query is not None and query >= 0:
        return bool(query)
    for library, switch, on in _CUDA_SWITCHES:
        if library.lower() in library_version.lower():
            return environ.get(switch, "").strip().lower() in on
    return False


def _query_cuda_support() -> int | None:
    """``MPIX_Query_cuda_support()`` of the MPI library in this process: through mpi4py where
    it exposes it, else called in the loaded ``libmpi`` itself; None where neither has it."""
    query = getattr(_mpi(), "Query_cuda_support", None)
    if query is not None:  # pragma: no cover - mpi4py builds against a CUDA-aware library
        return int(query())
    try:
        with open("/proc/self/maps") as maps:
            libraries = sorted({line.split()[-1] for line in maps
                                if "/libmpi" in line and ".so" in line})
    except OSError:  # pragma: no cover - systems without /proc
        return None
    for path in libraries:
        function = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if function is not None:
            function.restype = ctypes.c_int
            return int(function())
    return None  # pragma: no cover - an MPI library without the call


def cuda_aware_mpi() -> bool:
    """Whether this MPI library reads and writes GPU memory itself (CUDA-aware), asked as
    Horovod and mpi4py do: the library's ``MPIX_Query_cuda_support`` where it has one, else
    its environment switch (`cuda_aware_from`). False for the ``mpich`` wheel, which is built
    without CUDA: device buffers are then staged through host memory."""
    return cuda_aware_from(_query_cuda_support(), _mpi().Get_library_version(), os.environ)


def _check_buffer(array, what: str, reduce_op: str | None = None) -> None:
    """Raise a clear error for an array MPI cannot work on in place."""
    if not (hasattr(array, "shape") and hasattr(array, "dtype") and hasattr(array, "flags")):
        raise TypeError(f"{what} needs a numpy or CuPy array, got {type(array).__name__}; pass "
                        "tensor.data for an engine Tensor")
    if not array.flags.c_contiguous:
        raise ValueError(
            f"{what} needs a C-contiguous array because MPI works on the buffer in place; got "
            f"a non-contiguous array of shape {tuple(array.shape)} (strides "
            f"{tuple(array.strides)}): reduce numpy.ascontiguousarray(a) and copy it back")
    if not array.flags.writeable:
        raise ValueError(f"{what} writes its result into the array, which is read-only")
    if reduce_op is not None:
        kind = array.dtype.kind
        if kind not in "iufc":
            raise TypeError(f"{what} cannot reduce arrays of dtype {array.dtype}; cast them to a "
                            "numeric dtype (e.g. bool to uint8) first")
        if reduce_op == "mean" and kind not in "fc":
            raise TypeError(f"{what}(op='mean') needs a floating point array, got "
                            f"{array.dtype}; use op='sum' and divide yourself")


class Request:
    """A non-blocking collective in flight, returned by `Communicator.iallreduce_`.

    The result is in the array only once `wait` has returned or `test` has returned True.
    MPI makes progress only while some MPI call runs, so call `test` now and then (data
    parallel training does it from its gradient hooks) to move the transfer along.
    """

    __slots__ = ("_request", "_finish", "_done")

    def __init__(self, request, finish: Callable[[], None] | None = None):
        self._request = request
        self._finish = finish
        self._done = False

    @property
    def done(self) -> bool:
        """Whether the collective has completed and its result is in the array."""
        return self._done

    def test(self) -> bool:
        """Drive the collective's progress without blocking.

        Returns:
            True when it has completed (the result is then in the array).
        """
        if not self._done and self._request.Test():
            self._complete()
        return self._done

    def wait(self) -> None:
        """Block until the collective has completed and its result is in the array.

        It polls with ``Test``, busily for up to `SPIN_S` seconds and then with short sleeps
        in between (see `SPIN_S`), instead of calling ``MPI_Wait``, whose busy loop keeps the
        core from the other ranks when they share it.
        """
        if self._done:
            return
        test = self._request.Test
        spin_until = time.perf_counter() + SPIN_S
        while not test():
            if time.perf_counter() > spin_until:
                time.sleep(POLL_INTERVAL_S)
        self._complete()

    def _complete(self) -> None:
        self._done = True
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()


class SharedArrays:
    """One array per rank in memory that every rank of a node maps (an MPI-3 shared window,
    ``MPI_Win_allocate_shared``), returned by `Communicator.allocate_shared`.

    Rank r of the communicator reads and writes ``segments[q]`` as plain numpy arrays, its own
    (`local`) as well as the others'. Between a rank's writes and another rank's reads of the
    same bytes there must be a `sync` on both sides around a collective that orders them (a
    barrier): MPI's memory model for shared windows ("unified"). The window stays allocated
    until `free` (collective) or the end of the process; allocate once and reuse.
    """

    __slots__ = ("_window", "segments", "local", "__weakref__")

    def __init__(self, window, segments: list[numpy.ndarray], rank: int):
        self._window = window
        #: Every rank's array, by rank.
        self.segments = segments
        #: This rank's array (``segments[rank]``).
        self.local = segments[rank]

    def sync(self) -> None:
        """Make this rank's writes visible to the others and theirs to it (``MPI_Win_sync``,
        a memory barrier): call it before and after the barrier that orders them."""
        self._window.Sync()

    def drop_arrays(self) -> list[weakref.ref]:
        """Let go of this object's arrays (`segments`, `local`), keeping the window: weak
        references to them, so that a caller can tell when no view of the memory is left
        (a numpy view holds its segment as its ``base``) and `free` is safe."""
        refs = [weakref.ref(segment) for segment in self.segments]
        self.segments, self.local = [], None
        return refs

    @property
    def freed(self) -> bool:
        """Whether `free` has run."""
        return self._window is None

    def free(self) -> None:
        """Give the memory back (``MPI_Win_free``): collective, every rank of the window
        frees it at the same point. Any array over the window (`segments`, `local` and views
        of them) must no longer be used: its memory is unmapped. Idempotent."""
        if self._window is None:
            return
        window, self._window = self._window, None
        self.segments, self.local = [], None
        _open_windows.pop(id(self), None)
        window.Unlock_all()
        window.Free()


#: The windows not yet freed, in the order they were allocated: freed before MPI ends, since
#: MPICH's OFI netmod cannot close its fabric while a window's memory is registered with it
#: (``MPI_Finalize`` fails with "fabricclose failed ... Device or resource busy").
_open_windows: dict[int, SharedArrays] = {}


def _free_open_windows() -> None:
    """Free every window still open, in allocation order. Collective: only where every rank
    ends MPI together (`Communicator.finalize`, or the interpreter's exit, which comes before
    mpi4py's own ``MPI_Finalize``). Arrays over them must not be used afterwards."""
    if _open_windows and not _mpi().Is_finalized():
        for shared in list(_open_windows.values()):
            shared.free()


class Communicator:
    """The processes of a data-parallel job and the collectives they run together.

    Every rank must call the collectives (`allreduce_`, `iallreduce_`, `ireduce_`,
    `broadcast_`, `ibroadcast_`, `ialltoall`, `iallgather`, `barrier`, `ibarrier`,
    `allgather_object`, `broadcast_object`, `split`, `split_shared`, `dup`, `free`,
    `allocate_shared`) in the same order,
    as MPI requires.

    Args:
        comm: an mpi4py intracommunicator (or a Communicator, whose one is shared); None for
            ``MPI.COMM_WORLD`` (a singleton world of size 1 when the process was not started
            by ``mpiexec``).
        cuda_aware: whether MPI can read and write GPU memory directly; when False (the
            default) CuPy arrays are staged through host memory.
    """

    def __init__(self, comm: Any = None, cuda_aware: bool = False):
        if isinstance(comm, Communicator):
            comm = comm.mpi_comm
        self._comm = _mpi().COMM_WORLD if comm is None else comm
        self._rank = self._comm.Get_rank()
        self._size = self._comm.Get_size()
        self.cuda_aware = bool(cuda_aware)
        self.staged_bytes = 0  # device memory copied through the host, for diagnostics and tests

    def _stage(self, array):
        """A host copy of device `array` for MPI (which is not CUDA-aware here)."""
        self.staged_bytes += array.nbytes
        return to_host(array)

    @property
    def rank(self) -> int:
        """This process's index in ``0 .. size-1``."""
        return self._rank

    @property
    def size(self) -> int:
        """The number of processes."""
        return self._size

    @property
    def mpi_comm(self) -> Any:
        """The underlying mpi4py communicator."""
        return self._comm

    def __repr__(self) -> str:
        return f"Communicator(rank={self._rank}, size={self._size})"

    # ----------------------------------------------------------- arrays
    def allreduce_(self, array, op: str = "sum"):
        """Reduce `array` element-wise over all ranks, in place (``Allreduce`` with
        ``MPI.IN_PLACE``): afterwards every rank holds the result.

        Args:
            array: a C-contiguous, writeable numpy (or CuPy) array of the same shape and dtype
                on every rank.
            op: 'sum', 'mean' (floating point only), 'max', 'min' or 'prod'.

        Returns:
            `array`, now holding the result.
        """
        mpi_op = _mpi_op(op)
        _check_buffer(array, "allreduce_", reduce_op=op)
        xp = get_array_module(array)
        if xp is numpy or self.cuda_aware:
            synchronize(get_device(array))  # MPI reads device memory after its kernels
            self._comm.Allreduce(_mpi().IN_PLACE, array, op=mpi_op)
        else:  # stage through host memory (MPI cannot read device memory)
            host = self._stage(array)
            self._comm.Allreduce(_mpi().IN_PLACE, host, op=mpi_op)
            copy_from_host(array, host)
        if op == "mean" and self._size > 1:
            xp.divide(array, self._size, out=array)
        return array

    def iallreduce_(self, array, op: str = "sum") -> Request:
        """Start `allreduce_` without blocking (``Iallreduce``).

        Do not read or write `array` until the returned request's `wait` has returned (or its
        `test` has returned True). Every rank must start its non-blocking collectives in the
        same order.

        Args:
            array: as for `allreduce_`.
            op: as for `allreduce_`.

        Returns:
            A `Request` with ``wait()`` and ``test()``.
        """
        mpi_op = _mpi_op(op)
        _check_buffer(array, "iallreduce_", reduce_op=op)
        size = self._size
        mean = op == "mean" and size > 1
        xp = get_array_module(array)
        if xp is numpy or self.cuda_aware:
            synchronize(get_device(array))  # MPI reads device memory after its kernels
            request = self._comm.Iallreduce(_mpi().IN_PLACE, array, op=mpi_op)

            def finish() -> None:
                if mean:
                    xp.divide(array, size, out=array)
        else:  # stage through host memory; DDP starts one request per bucket, so one bucket's
            # copy overlaps the reduction of those started before it
            host = self._stage(array)
            request = self._comm.Iallreduce(_mpi().IN_PLACE, host, op=mpi_op)

            def finish() -> None:
                copy_from_host(array, host)
                if mean:
                    xp.divide(array, size, out=array)
        return Request(request, finish)

    def broadcast_(self, array, root: int = 0):
        """Overwrite `array` on every rank with its value on `root`, in place (``Bcast``).

        Args:
            array: a C-contiguous, writeable array of the same shape and dtype on every rank.
            root: the rank whose values everyone receives.

        Returns:
            `array`.
        """
        self._check_root(root)
        _check_buffer(array, "broadcast_")
        xp = get_array_module(array)
        if xp is numpy or self.cuda_aware:
            synchronize(get_device(array))  # MPI reads device memory after its kernels
            self._comm.Bcast(array, root=root)
        else:  # stage through host memory
            host = self._stage(array)
            self._comm.Bcast(host, root=root)
            copy_from_host(array, host)
        return array

    def ireduce_(self, array, root: int = 0, op: str = "sum") -> Request:
        """Start reducing `array` over all ranks onto `root`, in place there (``Ireduce``).

        Only `root`'s array holds the result once the request completes; the others are left
        unchanged. Arrays must be numpy arrays (no staging of GPU memory here).

        Args:
            array: as for `allreduce_`.
            root: the rank that receives the result.
            op: 'sum', 'max', 'min' or 'prod'.

        Returns:
            A `Request`.
        """
        self._check_root(root)
        if op == "mean":
            raise ValueError("ireduce_ takes op 'sum', 'max', 'min' or 'prod', not 'mean'")
        mpi_op = _mpi_op(op)
        _check_buffer(array, "ireduce_", reduce_op=op)
        if self._rank == root:
            return Request(self._comm.Ireduce(_mpi().IN_PLACE, array, op=mpi_op, root=root))
        return Request(self._comm.Ireduce(array, None, op=mpi_op, root=root))

    def ibroadcast_(self, array, root: int = 0) -> Request:
        """Start `broadcast_` without blocking (``Ibcast``).

        Args:
            array: as for `broadcast_` (a numpy array).
            root: the rank whose values everyone receives.

        Returns:
            A `Request`.
        """
        self._check_root(root)
        _check_buffer(array, "ibroadcast_")
        return Request(self._comm.Ibcast(array, root=root))

    def ialltoall(self, send, recv) -> Request:
        """Start an all-to-all exchange (``Ialltoall``): block r of `send` goes to rank r, and
        block r of `recv` comes from rank r.

        Args:
            send: a C-contiguous numpy array of ``size`` equal blocks.
            recv: a writeable array of the same size and dtype.

        Returns:
            A `Request`.
        """
        _check_buffer(recv, "ialltoall")
        return Request(self._comm.Ialltoall(send, recv))

    def iallgather(self, send, recv) -> Request:
        """Start gathering every rank's `send` into `recv` on every rank (``Iallgather``):
        block r of `recv` is rank r's `send`.

        Args:
            send: a C-contiguous numpy array, the same size on every rank.
            recv: a writeable array of ``size`` times as many elements, of the same dtype.

        Returns:
            A `Request`.
        """
        _check_buffer(recv, "iallgather")
        return Request(self._comm.Iallgather(send, recv))

    def allocate_shared(self, count: int, dtype) -> SharedArrays:
        """Allocate `count` elements of `dtype` per rank in memory every rank maps
        (``MPI_Win_allocate_shared``; each rank's array starts on a page of its own).

        Collective; every rank passes the same `count` and `dtype`, and all ranks must share
        memory (one node: a communicator from `split_shared`, or one whose ranks all run on
        one host).

        Args:
            count: elements per rank.
            dtype: a numpy dtype.

        Returns:
            `SharedArrays`, zero-filled, with every rank's array.
        """
        MPI = _mpi()
        dtype = numpy.dtype(dtype)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # a rank's pages are its own (first touch)
        try:
            window = MPI.Win.Allocate_shared(max(count, 1) * dtype.itemsize, dtype.itemsize,
                                             info=info, comm=self._comm)
        finally:
            info.Free()
        window.Lock_all(MPI.MODE_NOCHECK)  # the passive epoch `SharedArrays.sync` needs
        segments = []
        for q in range(self._size):
            memory, _ = window.Shared_query(q)
            segments.append(numpy.frombuffer(memory, dtype=dtype, count=count))
        segments[self._rank].fill(0)
        window.Sync()
        self._comm.Barrier()
        shared = SharedArrays(window, segments, self._rank)
        if not _open_windows:
            atexit.register(_free_open_windows)  # after mpi4py's: runs before its Finalize
        _open_windows[id(shared)] = shared
        return shared

    # ----------------------------------------------------------- sub-communicators
    def split_shared(self) -> Communicator:
        """The ranks of this communicator that share memory with this one: its node
        (``Split_type(COMM_TYPE_SHARED)``), ranked in this communicator's order."""
        return Communicator(self._comm.Split_type(_mpi().COMM_TYPE_SHARED, key=self._rank))

    def split(self, color: int | None, key: int = 0) -> Communicator | None:
        """Partition the ranks by `color` (``Split``): a Communicator of the ranks that passed
        the same color, ordered by `key`; None for a rank that passed color None.

        Every rank must call it (collective).
        """
        MPI = _mpi()
        new = self._comm.Split(MPI.UNDEFINED if color is None else int(color), key)
        return None if new == MPI.COMM_NULL else Communicator(new)

    def dup(self) -> Communicator:
        """A communicator of the same ranks whose collectives never match ours (``Dup``): a
        separate channel for a second stream of collectives. Every rank must call it."""
        return Communicator(self._comm.Dup(), cuda_aware=self.cuda_aware)

    def free(self) -> None:
        """Release a communicator made by `split`, `split_shared` or `dup` (``MPI_Comm_free``;
        collective, every member calls it). MPI has a few thousand of them per process, so a
        short-lived user of them gives them back. Idempotent; never for the world."""
        MPI = _mpi()
        if self._comm == MPI.COMM_NULL:
            return
        if self._comm in (MPI.COMM_WORLD, MPI.COMM_SELF):
            raise ValueError("the world communicator is not freed; only those made from it")
        self._comm.Free()

    # ----------------------------------------------------------- objects and control
    def barrier(self) -> None:
        """Block until every rank has called `barrier`."""
        self._comm.Barrier()

    def ibarrier(self) -> Request:
        """Start a barrier without blocking (``Ibarrier``).

        Returns:
            A `Request`; its ``wait()`` returns once every rank has called `ibarrier`.
        """
        return Request(self._comm.Ibarrier())

    def allgather_object(self, obj: Any) -> list:
        """Gather a picklable object from every rank onto every rank.

        Args:
            obj: this rank's object.

        Returns:
            A list of ``size`` objects, the one from rank r at index r.
        """
        return self._comm.allgather(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Send a picklable object from `root` to every rank.

        Args:
            obj: the object on `root`; ignored on the other ranks.
            root: the sending rank.

        Returns:
            `root`'s object, on every rank.
        """
        self._check_root(root)
        return self._comm.bcast(obj, root=root)

    def finalize(self) -> None:
        """End MPI on this rank (``MPI_Finalize``; every rank must call it): the way out when
        every rank agreed how the job ends. Under ``python -m mpi4py`` a non-zero exit after
        it is a plain exit code, not an ``MPI_Abort`` that could cut off the other ranks'
        last output. Idempotent."""
        MPI = _mpi()
        if not MPI.Is_finalized():
            _free_open_windows()
            MPI.Finalize()

    def abort(self, code: int = 1) -> NoReturn:
        """End every process of the job at once with exit code `code` (``MPI_Abort``): the
        way out when one rank fails while the others may be blocked in a collective.

        Args:
            code: the exit status the launcher reports.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        self._comm.Abort(int(code))
        # MPICH's MPI_Abort can return before the launcher has acted on it: never go on.
        os._exit(int(code))

    def _check_root(self, root: int) -> None:
        if not isinstance(root, int) or not 0 <= root < self._size:
            raise ValueError(f"root must be a rank in 0..{self._size - 1}, got {root!r}")
