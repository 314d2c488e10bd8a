"""The strict device: numpy underneath, but arrays that refuse to mix with numpy, as CuPy's do.

CI has no GPU, so the array-library seam is proven on this test-only device
(``Device("strict")``). Its arrays are `StrictArray`, a numpy.ndarray subclass whose
``__array_function__`` refuses every ``numpy.<function>`` call, whose ``__array_ufunc__``
refuses a plain numpy array among the operands (CuPy raises TypeError for both), and whose
``__array__`` refuses implicit conversion. Code on the device path must therefore take its
functions from the array module the backend hands out (`STRICT`, which wraps numpy's and keeps
results strict) — exactly the discipline CuPy needs. A numpy-only call (``numpy.add.at``,
``scipy.special.erf`` ...) then fails in CI instead of on a user's GPU.

A subclass was chosen over a wrapper object because ndarray's methods, operators, indexing and
views come for free (a wrapper re-implements all of them). Its one blind spot:
``numpy.asarray(strict)`` returns a plain view without asking ``__array__``; such an array then
fails at the next operation with a strict one, and the device tests assert every result is
still on the strict device, so the escape is caught there.

Only `dptrain.engine.backend` imports this module.
"""

from __future__ import annotations

import numpy
import scipy.special

__all__ = ["StrictArray", "STRICT", "STRICT_SPECIAL"]


def _refused(what: str) -> TypeError:
    return TypeError(f"{what} on a strict-device array: take functions from the backend's array "
                     f"module (get_array_module) and move data with Tensor.to, as CuPy requires")


class StrictArray(numpy.ndarray):
    """An array of the strict device (create it through `STRICT`, never directly)."""

    def __array__(self, dtype=None, copy=None):
        raise _refused("implicit conversion to a numpy array")

    def __array_function__(self, func, types, args, kwargs):
        raise _refused(f"numpy.{func.__name__}")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if method == "at":
            raise _refused(f"numpy.{ufunc.__name__}.at (scatter: use backend.scatter_add)")
        _refuse_host(f"numpy.{ufunc.__name__}", inputs)
        if out is not None:
            _refuse_host(f"numpy.{ufunc.__name__}", out)
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        return _wrap(getattr(ufunc, method)(*(_unwrap(a) for a in inputs), **kwargs))

    def __getitem__(self, key):
        return _wrap(super().__getitem__(key))  # an element is a 0-d array, as in CuPy

    def __repr__(self) -> str:
        return f"strict({self.view(numpy.ndarray)!r})"

    __str__ = __repr__


def _is_host(a) -> bool:
    return isinstance(a, numpy.ndarray) and not isinstance(a, StrictArray)


def _refuse_host(what: str, values) -> None:
    for v in values:
        if _is_host(v) or (isinstance(v, (list, tuple)) and any(_is_host(x) for x in v)):
            raise TypeError(f"{what}: a numpy (host) array mixed with strict-device arrays; "
                            f"move it with Tensor.to or the array module's asarray")


def _unwrap(a):
    if isinstance(a, StrictArray):
        return a.view(numpy.ndarray)
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(x) for x in a)
    return a


def _wrap(a):
    # CuPy returns 0-d arrays where numpy returns scalars; so does the strict device.
    if isinstance(a, numpy.ndarray):
        return a.view(StrictArray)
    if isinstance(a, numpy.generic):
        return numpy.asarray(a).view(StrictArray)
    if isinstance(a, (list, tuple)):
        if hasattr(a, "_fields"):  # a named tuple (numpy.linalg.qr's QRResult)
            return type(a)(*(_wrap(x) for x in a))
        return type(a)(_wrap(x) for x in a)
    return a


# Functions that take host data by design (CuPy's asarray/array copy host arrays to the GPU).
_FROM_HOST = frozenset({"asarray", "array", "ascontiguousarray", "asanyarray"})


class _StrictFunction:
    """A numpy function or ufunc whose arguments must be strict and whose results stay so."""

    __slots__ = ("_fn", "_name", "_from_host")

    def __init__(self, fn, name: str):
        self._fn, self._name = fn, name
        self._from_host = name.rpartition(".")[2] in _FROM_HOST

    def __call__(self, *args, **kwargs):
        if not self._from_host:
            _refuse_host(self._name, args)
            _refuse_host(self._name, kwargs.values())
        return _wrap(self._fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    def __getattr__(self, method: str):
        if method == "at":
            raise _refused(f"{self._name}.at (scatter: use backend.scatter_add)")
        return _StrictFunction(getattr(self._fn, method), f"{self._name}.{method}")


class _StrictModule:
    """numpy (or one of its submodules) as the strict device's array module."""

    def __init__(self, module, name: str):
        self._module, self.__name__ = module, name

    def __getattr__(self, name: str):
        if name == "random":
            raise _refused("numpy.random (draw from backend.generator, then move)")
        value = getattr(self._module, name)
        if name == "ndarray":
            value = StrictArray
        elif isinstance(value, type(numpy)):
            value = _StrictModule(value, f"{self.__name__}.{name}")
        elif callable(value) and not isinstance(value, type):
            value = _StrictFunction(value, f"{self.__name__}.{name}")
        setattr(self, name, value)  # resolve each name once
        return value

    @staticmethod
    def asnumpy(a) -> numpy.ndarray:
        """A host copy of strict array `a` (CuPy's ``asnumpy``)."""
        return numpy.array(_unwrap(a))


STRICT = _StrictModule(numpy, "strict")
STRICT_SPECIAL = _StrictModule(scipy.special, "strict.special")
