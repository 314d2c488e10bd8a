"""In-place updates for optimizers and initialisers (``add_``, ``mul_``, ``x[i] = v`` ...).

They change ``x.data`` directly and record no graph, so they refuse to run where autograd would
need the graph (on a tensor that requires grad, with grad mode on), and they bump the tensor's
version counter so a graph that saved the old values notices. The variants of out-of-place ops
(``add_`` of ``add``) are exported by their op's declaration (``inplace=add_``).
"""

from __future__ import annotations

from dptrain.engine.backend import get_array_module
from dptrain.engine.ops.convert import _move
from dptrain.engine.ops.registry import METHOD, export
from dptrain.engine.ops.shape import _index_key
from dptrain.engine.tensor import Tensor, _mode


def _check_inplace(name: str, t: Tensor, other=None) -> None:
    if _mode.enabled and (t.requires_grad or (isinstance(other, Tensor) and other.requires_grad)):
        who = "a leaf tensor that requires grad" if t.is_leaf else "a tensor in the graph"
        raise RuntimeError(
            f"{name}: in-place operation on {who} (or with an operand that requires grad) "
            "is not recorded by autograd; wrap it in `with engine.no_grad():` or use the "
            "out-of-place form")


def _raw(other):
    return other.data if isinstance(other, Tensor) else other


def _bump(t: Tensor) -> Tensor:
    t._version[0] += 1
    return t


def add_(self: Tensor, other, alpha=1) -> Tensor:
    """``self += alpha * other`` in place."""
    _check_inplace("add_", self, other)
    o = _raw(other)
    self.data += o if alpha == 1 else o * alpha
    return _bump(self)


def sub_(self: Tensor, other, alpha=1) -> Tensor:
    """``self -= alpha * other`` in place."""
    _check_inplace("sub_", self, other)
    o = _raw(other)
    self.data -= o if alpha == 1 else o * alpha
    return _bump(self)


def mul_(self: Tensor, other) -> Tensor:
    """``self *= other`` in place."""
    _check_inplace("mul_", self, other)
    self.data *= _raw(other)
    return _bump(self)


def div_(self: Tensor, other) -> Tensor:
    """``self /= other`` in place."""
    _check_inplace("div_", self, other)
    self.data /= _raw(other)
    return _bump(self)


def clamp_(self: Tensor, min=None, max=None) -> Tensor:  # noqa: A002
    """Clamp in place."""
    _check_inplace("clamp_", self)
    get_array_module(self.data).clip(self.data, min, max, out=self.data)
    return _bump(self)


@export(METHOD)
def zero_(self: Tensor) -> Tensor:
    """Set every element to zero in place."""
    _check_inplace("zero_", self)
    self.data[...] = 0
    return _bump(self)


@export(METHOD)
def fill_(self: Tensor, value) -> Tensor:
    """Set every element to `value` in place."""
    _check_inplace("fill_", self, value)
    self.data[...] = _raw(value)
    return _bump(self)


@export(METHOD)
def copy_(self: Tensor, src) -> Tensor:
    """Copy `src` (broadcast to self's shape, cast to self's dtype) into self in place."""
    _check_inplace("copy_", self, src)
    s = _raw(src)
    xp = get_array_module(self.data)
    if get_array_module(s) is not xp:  # from another device: moved, as torch's copy_ does
        s = _move(get_array_module(s), s, self.device, None)
    self.data[...] = s
    return _bump(self)


@export(operators=("__setitem__",))
def setitem(self: Tensor, key, value) -> None:
    """``self[key] = value`` in place (outside the graph)."""
    _check_inplace("__setitem__", self, value)
    self.data[_index_key(key)] = _raw(value)
    _bump(self)
