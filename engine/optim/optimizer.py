"""The optimizer base class: parameter groups, per-parameter state and its checkpoint layout.

Subclasses implement `step` on raw arrays (``p.data``), in place, with the array module that owns
each parameter, so no graph is recorded and no Tensor is created per update. An in-place change
bumps the parameter's version counter, so a backward that still needs the old values fails loudly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from numbers import Real
from typing import Any

import numpy

from dptrain.engine.backend import FLOAT_DTYPES, get_array_module, to_device
from dptrain.engine.tensor import Tensor, enable_grad

__all__ = ["Optimizer", "ParamsT", "check_nonnegative", "check_real", "apply_blockwise"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

# Elements per block when a large host array is updated block by block: small enough that the
# handful of arrays an update touches (and its temporaries) stay in the CPU cache across the
# update's passes, large enough that the per-block Python cost is negligible.
BLOCK = 1 << 16


def apply_blockwise(kernel: Callable[..., None], xp: Any, arrays: tuple, *args: Any) -> None:
    """Run ``kernel(xp, *arrays, *args)``, an elementwise in-place update, on the whole arrays
    or, for large contiguous host arrays, on one block of their elements at a time.

    Elementwise IEEE operations give the same bits either way; blocks only save memory traffic.
    Entries of `arrays` may be None (state the update does not use).
    """
    n = arrays[0].size
    if xp is not numpy or n <= BLOCK or not all(
            a is None or a.flags.c_contiguous for a in arrays):
        kernel(xp, *arrays, *args)
        return
    flat = [None if a is None else a.reshape(-1) for a in arrays]
    for i in range(0, n, BLOCK):
        kernel(xp, *[None if a is None else a[i:i + BLOCK] for a in flat], *args)


def check_real(name: str, value: Any) -> None:
    """Raise TypeError unless `value` is a real number (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise unless `value` is a real number >= 0 (NaN fails too)."""
    check_real(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


class Optimizer:
    """Base class of the optimizers: holds parameter groups and per-parameter state.

    Args:
        params: an iterable of Tensors, or of dicts each with a ``"params"`` entry (an iterable
            of Tensors) and per-group options that override `defaults`.
        defaults: the option values of groups that do not set them.

    Attributes:
        param_groups: list of dicts, each with ``"params"`` (a list of Tensors) and every option.
        state: per-parameter dict (keyed by the parameter Tensor) that `step` fills.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any]):
        self.defaults = dict(defaults)
        self._validate_group(self.defaults)
        self.state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or of dicts, got a Tensor; "
                            "wrap it in a list")
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered iterable (a list), not a set: the order "
                            "of parameters is what a state_dict records")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError for a bad option value; subclasses check theirs."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters, with options that override the defaults.

        Args:
            param_group: a dict with ``"params"`` (a Tensor or an iterable of Tensors) and any
                options; missing options take the optimizer's defaults.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if params is None:
            raise ValueError("a param group must have a 'params' entry")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("a param group's params must be an ordered iterable, not a set")
        params = list(params)
        seen = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but params[{i}] is a "
                                f"{type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"can't optimize a non-leaf Tensor (params[{i}])")
            if p.data.dtype not in FLOAT_DTYPES:
                raise TypeError(f"optimizer can only optimize floating point Tensors, but "
                                f"params[{i}] has dtype {p.dtype}")
            if id(p) in seen:
                raise ValueError(f"params[{i}] appears twice in the same param group")
            seen.add(id(p))
        others = {id(p) for g in self.param_groups for p in g["params"]}
        if not others.isdisjoint(seen):
            raise ValueError("some parameters appear in more than one parameter group")
        group = {**self.defaults, **param_group, "params": params}
        self._validate_group(group)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all optimized parameters.

        Args:
            set_to_none: set ``.grad`` to None (saves memory; the next backward allocates a
                fresh gradient) instead of filling the existing gradient with zeros in place.
        """
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if set_to_none:
                    p.grad = None
                elif getattr(g.data.flags, "writeable", True):
                    g.data.fill(0)
                    g._version[0] += 1
                else:  # a read-only array assigned by hand: replace it
                    p.grad = Tensor(get_array_module(g.data).zeros_like(g.data))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).

        Returns:
            The closure's loss, or None.
        """
        raise NotImplementedError

    @staticmethod
    def _run_closure(closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with enable_grad():
            return closure()

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state in PyTorch's layout.

        Returns:
            ``{"state": {index: {name: value}}, "param_groups": [{option: value, "params":
            [index, ...]}]}``, parameters numbered in the order of the groups. As in PyTorch
            the state Tensors are the optimizer's own, updated in place by later steps:
            serialize the dict at once, or ``copy.deepcopy`` it to keep a snapshot.
        """
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by `state_dict`, copying its arrays.

        The optimizer must hold the same number of groups and of parameters per group as the
        one that saved it. Floating point state is cast to each parameter's dtype and moved to
        its device; ``"step"`` counters stay as they are.

        Args:
            state_dict: a dict returned by `state_dict` (or read back from a checkpoint).
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' entries")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, but "
                             f"the optimizer has {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"loaded parameter group {i} has {len(saved['params'])} "
                                 f"parameters, but the optimizer's has {len(group['params'])}")
        params = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups), strict=True))
        new_groups = []
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            new = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            new["params"] = group["params"]
            self._validate_group(new)
            new_groups.append(new)
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for key, values in state_dict["state"].items():
            p = params.get(int(key))
            if p is None:
                raise ValueError(f"loaded state refers to parameter {key}, which no parameter "
                                 f"group lists")
            state[p] = {name: _cast_state(name, v, p) for name, v in values.items()}
        self.param_groups = new_groups
        self.state = state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines) + "\n)"


def _cast_state(name: str, value: Any, param: Tensor) -> Any:
    """A copy of one saved state value, on `param`'s device (and dtype, for float arrays)."""
    if name == "step":
        if isinstance(value, Tensor):
            value = value.item()
        elif hasattr(value, "item"):  # a numpy/cupy scalar or 0-d array
            value = value.item()
        if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
            raise ValueError(f"state 'step' must be a whole number, got {value}")
        return int(value)
    if isinstance(value, Tensor):
        value = value.data
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
        return value
    xp = get_array_module(param.data)
    value = to_device(value, param.device)  # a state saved on one device loads on another
    dtype = param.data.dtype if value.dtype in FLOAT_DTYPES else value.dtype
    return Tensor(xp.array(value, dtype=dtype, copy=True))
