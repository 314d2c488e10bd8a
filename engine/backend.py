"""The one place that chooses the array library: numpy on the CPU, CuPy on a GPU, and the
test-only strict device (`dptrain.engine.strict_array`) that proves the seam without a GPU.

Everything else asks `get_array_module(array)` for the module that owns an array, so op code
never imports numpy for arrays that may live on a GPU. CuPy's import is guarded: the whole
package imports and runs on a machine without it.
"""

from __future__ import annotations

import os

import numpy

from dptrain.engine.strict_array import STRICT, STRICT_SPECIAL, StrictArray

_CUPY_MISSING = ""
try:  # pragma: no cover - exercised only where CuPy and a GPU exist
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no GPU is visible to CuPy")
except ImportError:
    cupy = None
    _CUPY_MISSING = ("CuPy is not installed: install the extra matching the CUDA toolkit, "
                     "pip install 'dptrain[cuda12]' or 'dptrain[cuda13]'")
except Exception as e:  # CuPy without a usable driver, or no GPU
    cupy = None
    _CUPY_MISSING = f"no GPU is visible ({type(e).__name__}: {e})"

__all__ = [
    "Device",
    "cupy_available",
    "gpu_count",
    "get_array_module",
    "get_device",
    "manual_seed",
    "generator",
    "get_rng_state",
    "set_rng_state",
    "FLOAT_DTYPES",
    "SUPPORTED_DTYPES",
    "check_dtype",
    "special",
    "cpu_kernels",
    "CPU_KERNELS_ENV",
    "scatter_add",
    "to_device",
    "check_same_device",
    "as_array",
    "to_host",
    "copy_from_host",
    "cuda_device_for",
    "use_device",
    "synchronize",
    "device_generator",
    "Event",
    "CopyStream",
    "record_event",
    "wait_event",
    "pinned_empty",
    "data_pointer",
    "stream_pointer",
    "nccl",
]

FLOAT_DTYPES = frozenset(numpy.dtype(t) for t in ("float16", "float32", "float64"))
SUPPORTED_DTYPES = FLOAT_DTYPES | frozenset(
    numpy.dtype(t)
    for t in ("int8", "int16", "int32", "int64", "uint8", "bool")
)


def cupy_available() -> bool:
    """True when CuPy imported and sees at least one GPU."""
    return cupy is not None


def gpu_count() -> int:
    """How many GPUs CuPy sees (0 without CuPy): ranks pick ``cuda:{rank % gpu_count()}``."""
    return 0 if cupy is None else cupy.cuda.runtime.getDeviceCount()


def cuda_device_for(local_rank: int, count: int | None = None) -> Device:
    """The GPU of the rank with index `local_rank` among its node's ranks: ``cuda:{local_rank %
    count}``, `count` being the GPUs visible (by default as CuPy sees them).

    Raises:
        RuntimeError: without CuPy (naming the extra to install) or without a visible GPU.
    """
    if count is None:
        Device("cuda").xp  # noqa: B018  (raises the install / no-GPU message)
        count = gpu_count()
    if count < 1:
        raise RuntimeError("device cuda requested but no GPU is visible")
    return Device(f"cuda:{local_rank % count}")


def get_array_module(*arrays):
    """Return `cupy` if any argument is a CuPy array, the strict module for strict arrays, else
    `numpy` (Chainer's switch)."""
    for a in arrays:
        if isinstance(a, StrictArray):
            return STRICT
        if cupy is not None and isinstance(a, cupy.ndarray):  # pragma: no cover
            return cupy
    return numpy


def check_dtype(dtype) -> numpy.dtype:
    """Return `dtype` as a numpy dtype, or raise TypeError if tensors cannot hold it."""
    try:
        dt = numpy.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"unsupported dtype {dtype!r}: {e}") from None
    if dt not in SUPPORTED_DTYPES:
        names = ", ".join(sorted(str(d) for d in SUPPORTED_DTYPES))
        raise TypeError(f"unsupported dtype {dt}: tensors hold one of {names}")
    return dt


def special(xp):
    """The special-function module (erf, expit) matching array module `xp`."""
    if xp is numpy:
        import scipy.special

        return scipy.special
    if xp is STRICT:
        return STRICT_SPECIAL
    import cupyx.scipy.special  # pragma: no cover

    return cupyx.scipy.special  # pragma: no cover


_KERNEL_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
CPU_KERNELS_ENV = "DPTRAIN_CPU_KERNELS"
"""The switch between the compiled CPU kernels (1, the default) and the numpy path (0)."""


def cpu_kernels(*arrays, dtypes=_KERNEL_DTYPES):
    """The compiled CPU kernels (`dptrain.engine.cpu_kernels`) when `arrays` can go through
    them: plain numpy arrays (not CuPy's, not the strict device's), C-contiguous, all of one
    dtype among `dtypes` (the kernels' signatures). Imported on the first such call, so that
    nothing imports numba before an op runs on the CPU. None otherwise, and whenever the
    environment sets ``DPTRAIN_CPU_KERNELS=0`` (read on each call, so a test can run an op
    both ways in one process): the caller then takes the numpy path every op keeps.

    Args:
        arrays: the arrays the caller would hand to a kernel.
        dtypes: the dtypes its kernel is compiled for.

    Returns:
        The kernels module, or None.

    Raises:
        RuntimeError: the variable holds anything but 0 or 1 (not a ValueError, which an op
            reports as a fault of its inputs).
    """
    switch = os.environ.get(CPU_KERNELS_ENV, "1")
    if switch != "1":
        if switch == "0":
            return None
        raise RuntimeError(f"{CPU_KERNELS_ENV} must be 1 (the compiled CPU kernels, the "
                           f"default) or 0 (the numpy path), got {switch!r}")
    if not arrays:
        return None
    dtype = arrays[0].dtype
    if dtype not in dtypes or any(type(a) is not numpy.ndarray or a.dtype != dtype
                                  or not a.flags.c_contiguous for a in arrays):
        return None
    from dptrain.engine import cpu_kernels as kernels

    return kernels


def sum_matrix(xp, a, axis: int):
    """The sum of a 2-D array over `axis` (0: one value per column, 1: one per row), as a
    product with a vector of ones for float32 and float64: BLAS reads `a` once at full vector
    speed, where numpy's reduction over rows runs 2-3x longer ((2048, 256) float32: 0.045
    against 0.146 ms over rows, 0.048 against 0.082 over columns), with errors of the same
    order (both accumulate in `a`'s dtype).

    Args:
        xp: the array module of `a`.
        a: a 2-D array.
        axis: 0 or 1.

    Returns:
        A 1-D array of ``a.shape[1 - axis]`` sums.
    """
    if a.dtype not in (numpy.float32, numpy.float64):
        return a.sum(axis=axis)
    ones = xp.ones(a.shape[axis], dtype=a.dtype)
    return ones @ a if axis == 0 else a @ ones


def scatter_add(xp, acc, index, values) -> None:
    """``acc[index] += values`` with repeated indices accumulated (numpy's ``add.at``)."""
    if xp is numpy:
        rows = _row_index(acc, index, values)
        if rows is None:
            numpy.add.at(acc, index, values)
        else:
            _scatter_add_rows(acc, rows, values)
    elif xp is STRICT:
        numpy.add.at(acc.view(numpy.ndarray), _host_index(index), values.view(numpy.ndarray))
    else:  # pragma: no cover
        import cupyx

        cupyx.scatter_add(acc, index, values)


def _row_index(acc, index, values):
    """The integer array of `index` when it picks whole rows of a matrix (an embedding's
    gradient: ``acc[idx] += values``, values of shape ``idx.shape + acc.shape[1:]``), else
    None."""
    if isinstance(index, tuple):
        if len(index) != 1:
            return None
        index = index[0]
    if (not isinstance(index, numpy.ndarray) or index.dtype.kind not in "iu" or acc.ndim < 2
            or values.shape != index.shape + acc.shape[1:]):
        return None
    return index


def _scatter_add_rows(acc, index, values) -> None:
    """``numpy.add.at(acc, index, values)`` for whole rows, as a sort and one segmented sum:
    add.at adds row by row through a slow generic loop (5.5 against 3.0 ms for 2048 rows of
    256 into 256)."""
    flat = index.reshape(-1)
    if flat.size == 0:
        return
    if flat.dtype.kind == "i" and flat.min() < 0:  # -1 and n-1 are the same row
        flat = numpy.where(flat < 0, flat + acc.shape[0], flat)
    order = numpy.argsort(flat, kind="stable")  # stable: each row sums in add.at's order
    picked = flat[order]
    starts = numpy.flatnonzero(numpy.concatenate(([True], picked[1:] != picked[:-1])))
    rows = values.reshape((flat.size,) + acc.shape[1:])[order]
    acc[picked[starts]] += numpy.add.reduceat(rows, starts, axis=0)


def _host_index(index):
    if isinstance(index, tuple):
        return tuple(_host_index(i) for i in index)
    return index.view(numpy.ndarray) if isinstance(index, StrictArray) else index


class Device:
    """Where a tensor's array lives: ``Device('cpu')``, ``Device('cuda:0')`` or the test-only
    ``Device('strict')`` (numpy underneath, refuses to mix with numpy as CuPy does)."""

    __slots__ = ("type", "index")

    def __init__(self, spec: str | Device = "cpu"):
        if isinstance(spec, Device):
            self.type, self.index = spec.type, spec.index
            return
        kind, _, idx = str(spec).partition(":")
        if kind not in ("cpu", "cuda", "strict"):
            raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'strict', got {spec!r}")
        if kind != "cuda" and idx:
            raise ValueError(f"device '{kind}' takes no index, got {spec!r}")
        if idx and not idx.isdigit():
            raise ValueError(f"device index must be a non-negative int, got {spec!r}")
        self.type = kind
        self.index = int(idx) if idx else (0 if kind == "cuda" else None)

    @property
    def xp(self):
        """The array module for this device."""
        if self.type == "cpu":
            return numpy
        if self.type == "strict":
            return STRICT
        if cupy is None:
            raise RuntimeError(f"device {self} requested but {_CUPY_MISSING}")
        return cupy  # pragma: no cover

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            other = Device(other)
        return isinstance(other, Device) and (self.type, self.index) == (other.type, other.index)

    def __hash__(self) -> int:
        return hash((self.type, self.index))

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"device(type='{self.type}'" + (
            "" if self.index is None else f", index={self.index}") + ")"


_CPU = Device("cpu")
_STRICT = Device("strict")


def get_device(array) -> Device:
    """The Device holding `array`."""
    if isinstance(array, StrictArray):
        return _STRICT
    if cupy is not None and isinstance(array, cupy.ndarray):  # pragma: no cover
        return Device(f"cuda:{array.device.id}")
    return _CPU


def _is_array(a) -> bool:
    return isinstance(a, numpy.ndarray) or (cupy is not None and isinstance(a, cupy.ndarray))


def as_array(value, like):
    """`value` as an array: arrays as they are (an op then checks their device), anything else
    (lists, scalars) made on `like`'s device. ``numpy.asarray`` would pull a device array to the
    host (CuPy raises, the strict device silently returns a host view)."""
    if _is_array(value):
        return value
    return get_array_module(like).asarray(value)


def check_same_device(op: str, arrays) -> None:
    """Raise RuntimeError naming `op` and both devices when `arrays` live on different devices
    (Python scalars and numpy scalars go anywhere)."""
    first = None
    for a in arrays:
        if _is_array(a):
            d = get_device(a)
            if first is None:
                first = d
            elif d != first:
                raise RuntimeError(f"{op}: expected all tensors on one device, got {first} and "
                                   f"{d}; move them with .to(device)")


def synchronize(device: Device | str) -> None:
    """Wait for the work queued on `device` (a no-op off the GPU): for timing, and before MPI
    reads device memory."""
    device = Device(device)
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        with device.xp.cuda.Device(device.index):
            device.xp.cuda.get_current_stream().synchronize()


def use_device(device: Device | str) -> None:
    """Make `device` the process's current GPU (``torch.cuda.set_device``): CuPy runs kernels
    and allocates on the current device. A no-op off the GPU."""
    device = Device(device)
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        cupy.cuda.Device(device.index).use()


def to_host(array) -> numpy.ndarray:
    """A host (numpy) copy of device `array`; a numpy array itself."""
    xp = get_array_module(array)
    return array if xp is numpy else xp.asnumpy(array)


def copy_from_host(array, host: numpy.ndarray) -> None:
    """Overwrite device `array` in place with the values of the same-shaped `host` array."""
    if isinstance(array, StrictArray):
        array.view(numpy.ndarray)[...] = host
    elif get_array_module(array) is numpy:
        array[...] = host
    else:  # pragma: no cover - needs a GPU
        array.set(host)


def to_device(array, device: Device | str):
    """`array` copied to `device` (the array itself when it is there already)."""
    device = Device(device)
    if get_device(array) == device:
        return array
    src = get_array_module(array)
    host = array if src is numpy else src.asnumpy(array)
    if device.type == "cuda":  # pragma: no cover
        with device.xp.cuda.Device(device.index):
            return device.xp.asarray(host)
    return device.xp.asarray(host)


# One generator for every random op of the process, as torch.manual_seed gives. Each device
# has its own, seeded from the same seed (PyTorch's CPU and CUDA generators, likewise). A
# device's generator is counter-based: draw n on it comes from a Philox generator keyed by
# (seed, n), so its whole state is two integers. cuRAND cannot report how far a generator has
# advanced, so this is what lets a checkpoint hold a GPU's state and a resumed run draw the
# masks an uninterrupted one draws. The strict device runs the same scheme on numpy's Philox,
# apart from the host's PCG64, so its draws differ from the CPU's as a GPU's do, and a test
# can tell which generator a draw came from.
_generator = numpy.random.Generator(numpy.random.PCG64(0))
_seed = 0
_device_draws: dict[str, int] = {}  # str(device) -> draws made on it since the seed


def manual_seed(seed: int) -> None:
    """Seed the generators that every random op of the process draws from: the host's, the
    strict device's and, with CuPy, every GPU's."""
    global _generator, _seed
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _generator = numpy.random.Generator(numpy.random.PCG64(seed))
    _seed = seed
    _device_draws.clear()


def generator() -> numpy.random.Generator:
    """The process-wide host random generator (its `bit_generator.state` is checkpointable)."""
    return _generator


def _next_draw_key(device: Device) -> int:
    """The 64-bit Philox key of the next draw on `device`: (seed, draw number) hashed."""
    name = str(device)
    n = _device_draws.get(name, 0)
    _device_draws[name] = n + 1
    return int(numpy.random.SeedSequence([_seed, n]).generate_state(1, numpy.uint64)[0])


class _StrictGenerator:
    """The strict device's generator: numpy's Generator API, its arrays strict."""

    def __getattr__(self, name: str):
        def draw(*args, **kwargs):
            rng = numpy.random.Generator(numpy.random.Philox(key=_next_draw_key(_STRICT)))
            out = getattr(rng, name)(*args, **kwargs)
            return out.view(StrictArray) if isinstance(out, numpy.ndarray) else out
        return draw


_cupy_states: dict[int, object] = {}  # GPU index -> its cuRAND Philox generator


class _CupyGenerator:  # pragma: no cover - needs a GPU
    """A GPU's generator under numpy's Generator names, drawing on that GPU."""

    _NAMES = {"random": "random_sample", "integers": "randint"}

    def __init__(self, index: int):
        self._index = index

    def __getattr__(self, name: str):
        def draw(*args, **kwargs):
            with cupy.cuda.Device(self._index):
                state = _cupy_states.get(self._index)
                if state is None:
                    state = _cupy_states[self._index] = cupy.random.RandomState(
                        method=cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
                # Re-keying Philox is a host-side call: no state to set up on the device.
                state.seed(_next_draw_key(Device(f"cuda:{self._index}")))
                return getattr(state, self._NAMES.get(name, name))(*args, **kwargs)
        return draw


def device_generator(device: Device | str | None = None):
    """The generator that draws on `device` (numpy's ``Generator`` methods: ``standard_normal``,
    ``random``, ``integers``, ``permutation``, ``uniform``, ``normal``), its arrays on the
    device: the host generator for the CPU (None), the device's own elsewhere."""
    device = _CPU if device is None else Device(device)
    if device.type == "cpu":
        return _generator
    if device.type == "strict":
        return _StrictGenerator()
    device.xp  # noqa: B018  (raises the install / no-GPU message)
    return _CupyGenerator(device.index)  # pragma: no cover - needs a GPU


def get_rng_state() -> dict:
    """The state of every generator as a JSON-serialisable dict (for exact checkpoint/resume):
    the host generator's `bit_generator.state`, and under ``devices`` the seed and the number
    of draws made on each device."""
    return {**_generator.bit_generator.state,
            "devices": {"seed": _seed, "draws": dict(_device_draws)}}


def set_rng_state(state: dict) -> None:
    """Restore a state returned by `get_rng_state`. A state without ``devices`` (written
    before device generators were checkpointed) restores the host's and leaves the devices'
    as they are."""
    global _seed
    host = {k: v for k, v in state.items() if k != "devices"}
    _generator.bit_generator.state = host
    devices = state.get("devices")
    if devices is not None:
        _seed = int(devices["seed"])
        _device_draws.clear()
        _device_draws.update({str(k): int(v) for k, v in devices["draws"].items()})


# ---------------------------------------------------------------- streams and pinned memory
# What the GPU all-reduce paths need: a copy stream, events and page-locked host buffers. On a
# GPU they are CUDA's; elsewhere work is done when it is queued, so an event is complete at
# once and a "pinned" buffer is an ordinary host array, and the strict device runs the same
# ordering code as a GPU does.

class Event:
    """A point in a device's queue of work: `query` whether the work before it is done,
    `synchronize` to wait for it."""

    __slots__ = ("_event",)

    def __init__(self, event=None):
        self._event = event

    def query(self) -> bool:
        """True when the work queued before the event has completed."""
        return self._event is None or self._event.done

    def synchronize(self) -> None:
        """Block the host until the work queued before the event has completed."""
        if self._event is not None:  # pragma: no cover - needs a GPU
            self._event.synchronize()


def record_event(device: Device | str) -> Event:
    """An event after the work queued so far on `device`'s current stream."""
    device = Device(device)
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        with cupy.cuda.Device(device.index):
            return Event(cupy.cuda.get_current_stream().record())
    return Event()


def wait_event(device: Device | str, event: Event) -> None:
    """Make the work queued next on `device`'s current stream wait for `event` (the host does
    not wait)."""
    device = Device(device)
    if device.type == "cuda" and event._event is not None:  # pragma: no cover - needs a GPU
        with cupy.cuda.Device(device.index):
            cupy.cuda.get_current_stream().wait_event(event._event)


class CopyStream:
    """A stream of its own for copies between `device` and pinned host memory, so that a copy
    overlaps the kernels of the compute stream and the host's MPI calls.

    Args:
        device: the device whose arrays it copies.
    """

    def __init__(self, device: Device | str):
        self.device = Device(device)
        self._stream = None
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU
            with cupy.cuda.Device(self.device.index):
                self._stream = cupy.cuda.Stream(non_blocking=True)

    def wait(self, event: Event) -> None:
        """Make the copies queued next wait for `event` (e.g. the kernels writing a buffer)."""
        if self._stream is not None and event._event is not None:  # pragma: no cover
            self._stream.wait_event(event._event)

    def to_host(self, src, dst: numpy.ndarray) -> Event:
        """Queue the copy of device array `src` into host array `dst` (pinned, for the copy to
        run asynchronously); the returned event completes when `dst` holds it."""
        if self._stream is None:
            numpy.copyto(dst, _host_view(src))
            return Event()
        # blocking=False (CuPy >= 13): queue it and return; the event says when it is done.
        src.get(stream=self._stream, out=dst, blocking=False)  # pragma: no cover - needs a GPU
        return Event(self._stream.record())  # pragma: no cover

    def to_device(self, src: numpy.ndarray, dst) -> Event:
        """Queue the copy of host array `src` into device array `dst`; the returned event
        completes when `dst` holds it."""
        if self._stream is None:
            copy_from_host(dst, src)
            return Event()
        dst.set(src, stream=self._stream)  # pragma: no cover - needs a GPU
        return Event(self._stream.record())  # pragma: no cover


def pinned_empty(size: int, dtype, device: Device | str) -> numpy.ndarray:
    """A host array of `size` elements for copies to and from `device`: page-locked memory on a
    GPU (copies from it run asynchronously), an ordinary array elsewhere. Pinning is slow:
    allocate once and reuse."""
    if Device(device).type == "cuda":  # pragma: no cover - needs a GPU
        import cupyx

        return cupyx.empty_pinned(size, dtype=dtype)
    return numpy.empty(size, dtype=dtype)


def _host_view(array) -> numpy.ndarray:
    return array.view(numpy.ndarray) if isinstance(array, StrictArray) else array


def data_pointer(array) -> int:
    """The address of `array`'s first element, in device memory for a device array (what
    NCCL's calls take)."""
    if cupy is not None and isinstance(array, cupy.ndarray):  # pragma: no cover - needs a GPU
        return array.data.ptr
    return _host_view(array).ctypes.data


def stream_pointer(device: Device | str) -> int:
    """The handle of `device`'s current stream (0, the default stream, off the GPU)."""
    device = Device(device)
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        with cupy.cuda.Device(device.index):
            return cupy.cuda.get_current_stream().ptr
    return 0


def nccl():
    """CuPy's NCCL bindings (``cupy.cuda.nccl``), or None without CuPy, a GPU or NCCL."""
    if cupy is None:
        return None
    try:  # pragma: no cover - needs a GPU
        from cupy.cuda import nccl as module
    except ImportError:  # pragma: no cover
        return None
    return module if getattr(module, "available", False) else None  # pragma: no cover
