"""Module, the base of every layer and model (the containers are in `engine.nn.containers`).

A Module keeps what it owns in three ordered dicts, filled by `__setattr__`: `_parameters`
(Parameters), `_buffers` (Tensors that are state but not learnable) and `_modules` (child
Modules). Every traversal (`named_parameters`, `state_dict`, `train`, `to`, ...) is a walk over
those dicts, so names come out in registration order with PyTorch's dotted keys
(``"encoder.layers.1.bias"``).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Iterator, Mapping

from dptrain.engine.backend import Device, check_dtype, to_device
from dptrain.engine.nn.parameter import Parameter
from dptrain.engine.tensor import RemovableHandle, Tensor

__all__ = ["Module"]


class _IncompatibleKeys(namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])):
    """What `Module.load_state_dict` returns: the keys it did not find and did not expect."""

    __slots__ = ()

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return super().__repr__()

    __str__ = __repr__


def _addindent(text: str, spaces: int) -> str:
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    return lines[0] + "\n" + "\n".join(" " * spaces + line for line in lines[1:])


def _move_array(arr, device: Device | None, dtype):
    """`arr` on `device` and, if it is floating point, cast to `dtype` (None: unchanged)."""
    if device is not None:
        arr = to_device(arr, device)
    if dtype is not None and arr.dtype.kind == "f" and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def _parse_to_args(args, kwargs) -> tuple[Device | None, object]:
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"to() got unexpected keyword arguments {sorted(kwargs)}")
    for a in args:
        if isinstance(a, Tensor):
            device, dtype = a.device, a.dtype
        elif isinstance(a, Device):
            device = a
        elif isinstance(a, str):
            try:
                device = Device(a)
            except ValueError:
                dtype = a
        else:
            dtype = a
    if dtype is not None:
        dtype = check_dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"Module.to only accepts floating point dtypes, got {dtype}")
    return (Device(device) if device is not None else None), dtype


class Module:
    """Base class of every layer and model: subclass it, assign layers and Parameters as
    attributes in ``__init__``, and define ``forward``.

    Example:
        >>> from dptrain.engine import nn
        >>> class MLP(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.fc2(self.fc1(x).relu())
        >>> [name for name, _ in MLP().named_parameters()]
        ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    """

    training: bool

    def __init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "training", True)
        set_(self, "_parameters", OrderedDict())
        set_(self, "_buffers", OrderedDict())
        set_(self, "_non_persistent_buffers_set", set())
        set_(self, "_modules", OrderedDict())
        set_(self, "_forward_pre_hooks", [])
        set_(self, "_forward_hooks", [])

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            f'Module [{type(self).__name__}] is missing the required "forward" function')

    def __call__(self, *args, **kwargs):
        for hook in list(self._forward_pre_hooks):
            result = hook(self, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
        out = self.forward(*args, **kwargs)
        for hook in list(self._forward_hooks):
            result = hook(self, args, out)
            if result is not None:
                out = result
        return out

    def register_forward_pre_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(module, args)`` before every forward; a returned value (a tuple, or a
        single value that is wrapped in one) replaces the positional arguments.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        self._forward_pre_hooks.append(hook)
        return RemovableHandle(self._forward_pre_hooks, hook)

    def register_forward_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(module, args, output)`` after every forward; a returned value replaces
        the output.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        self._forward_hooks.append(hook)
        return RemovableHandle(self._forward_hooks, hook)

    # ----------------------------------------------------------- registration
    def _check_name(self, name, kind: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{kind} name should be a string, got {type(name).__name__}")
        if not name:
            raise KeyError(f'{kind} name can\'t be empty string ""')
        if "." in name:
            raise KeyError(f'{kind} name can\'t contain ".", got: {name}')

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register `param` (or None, a declared but absent parameter) under `name`.

        Args:
            name: the attribute name; must not contain ".".
            param: a Parameter, or None.
        """
        if "_parameters" not in self.__dict__:
            raise AttributeError("cannot assign parameter before Module.__init__() call")
        self._check_name(name, "parameter")
        if hasattr(self, name) and name not in self._parameters:
            raise KeyError(f"attribute '{name}' already exists")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"cannot assign '{type(param).__name__}' object to parameter '{name}' "
                "(engine.nn.Parameter or None required)")
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Register a Tensor that is module state but not a parameter (running statistics,
        masks). Persistent buffers are part of `state_dict`.

        Args:
            name: the attribute name; must not contain ".".
            tensor: a Tensor, or None.
            persistent: whether `state_dict` includes it.
        """
        if "_buffers" not in self.__dict__:
            raise AttributeError("cannot assign buffer before Module.__init__() call")
        self._check_name(name, "buffer")
        if hasattr(self, name) and name not in self._buffers:
            raise KeyError(f"attribute '{name}' already exists")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(
                f"cannot assign '{type(tensor).__name__}' object to buffer '{name}' "
                "(engine.Tensor or None required)")
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register a child module under `name` (``self.name = module`` does the same).

        Args:
            name: the attribute name; must not contain ".".
            module: a Module, or None.
        """
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._check_name(name, "module")
        if hasattr(self, name) and name not in self._modules:
            raise KeyError(f"attribute '{name}' already exists")
        self._modules[name] = module

    register_module = add_module

    def __setattr__(self, name: str, value) -> None:
        d = self.__dict__
        params, buffers, modules = d.get("_parameters"), d.get("_buffers"), d.get("_modules")

        def remove_from(*containers):
            for c in containers:
                if name in c:
                    c.discard(name) if isinstance(c, set) else c.__delitem__(name)

        if isinstance(value, Parameter):
            if params is None:
                raise AttributeError("cannot assign parameters before Module.__init__() call")
            remove_from(d, buffers, modules, self._non_persistent_buffers_set)
            self.register_parameter(name, value)
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as parameter '{name}' "
                    "(engine.nn.Parameter or None expected)")
            params[name] = None
        elif isinstance(value, Module):
            if modules is None:
                raise AttributeError("cannot assign module before Module.__init__() call")
            remove_from(d, params, buffers, self._non_persistent_buffers_set)
            modules[name] = value
        elif modules is not None and name in modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as child module '{name}' "
                    "(engine.nn.Module or None expected)")
            modules[name] = None
        elif buffers is not None and name in buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as buffer '{name}' "
                    "(engine.Tensor or None expected)")
            buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # Called only when normal lookup fails: look in the registries.
        d = self.__dict__
        for registry in ("_parameters", "_buffers", "_modules"):
            entries = d.get(registry)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._buffers:
            del self._buffers[name]
            self._non_persistent_buffers_set.discard(name)
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers)
                      | set(self._modules))

    # ----------------------------------------------------------- traversal
    def named_modules(self, memo: set | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """Yield ``(name, module)`` for this module (named `prefix`) and every descendant,
        depth first in registration order; a module reachable twice is yielded once.

        Args:
            memo: modules already yielded (internal to the recursion).
            prefix: the name given to this module.
            remove_duplicate: skip modules already yielded.
        """
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        for name, module in self._modules.items():
            if module is None:
                continue
            sub = prefix + ("." if prefix else "") + name
            yield from module.named_modules(memo, sub, remove_duplicate)

    def modules(self) -> Iterator[Module]:
        """Yield this module and every descendant (each once)."""
        for _, module in self.named_modules():
            yield module

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """Yield ``(name, module)`` for each direct child (each once)."""
        seen = set()
        for name, module in self._modules.items():
            if module is not None and module not in seen:
                seen.add(module)
                yield name, module

    def children(self) -> Iterator[Module]:
        """Yield each direct child module (each once)."""
        for _, module in self.named_children():
            yield module

    def _named_members(self, registry: str, prefix: str, recurse: bool,
                       remove_duplicate: bool) -> Iterator[tuple[str, Tensor]]:
        modules = (self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
                   if recurse else [(prefix, self)])
        seen = set()
        for module_prefix, module in modules:
            for name, value in getattr(module, registry).items():
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield module_prefix + ("." if module_prefix else "") + name, value

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """Yield ``(dotted name, parameter)``; a parameter shared by several modules is
        yielded once, under the first name that reaches it.

        Args:
            prefix: prepended to every name.
            recurse: include the parameters of descendants.
            remove_duplicate: yield shared parameters once.
        """
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Yield every parameter once (what an optimizer takes).

        Args:
            recurse: include the parameters of descendants.
        """
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(dotted name, buffer)`` for persistent and non-persistent buffers.

        Args:
            prefix: prepended to every name.
            recurse: include the buffers of descendants.
            remove_duplicate: yield shared buffers once.
        """
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        """Yield every buffer once.

        Args:
            recurse: include the buffers of descendants.
        """
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # ----------------------------------------------------------- state
    def state_dict(self, destination: OrderedDict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> OrderedDict:
        """The module's state as ``{dotted name: tensor}``: every parameter and persistent
        buffer, under each path that reaches it (as PyTorch, shared entries are repeated).

        Args:
            destination: a dict to fill (a new OrderedDict by default).
            prefix: prepended to every key.
            keep_vars: give the Parameters and buffers themselves instead of detached Tensors
                sharing their arrays.

        Returns:
            The ordered dict.
        """
        if destination is None:
            destination = OrderedDict()
        for name, p in self._parameters.items():
            if p is not None:
                destination[prefix + name] = p if keep_vars else p.detach()
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = b if keep_vars else b.detach()
        for name, module in self._modules.items():
            if module is not None:
                module.state_dict(destination, prefix + name + ".", keep_vars)
        return destination

    def load_state_dict(self, state_dict: Mapping, strict: bool = True) -> _IncompatibleKeys:
        """Copy the values of `state_dict` into this module's parameters and buffers, in place
        (their arrays, dtypes and devices are kept; version counters are bumped).

        The load is all or nothing: when it raises, nothing has been copied.

        Args:
            state_dict: ``{dotted name: Tensor or array}``, as `state_dict` returns.
            strict: raise if a key is missing or unexpected. A shape mismatch raises always.

        Returns:
            A named tuple ``(missing_keys, unexpected_keys)``.

        Raises:
            RuntimeError: listing every missing key, unexpected key and shape mismatch at once.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors, copies = [], []
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            array = value.data if isinstance(value, Tensor) else value
            if not (hasattr(array, "shape") and hasattr(array, "dtype")):
                errors.append(f'While copying the parameter named "{key}", expected a Tensor '
                              f"or an array from checkpoint but received {type(value)}")
            elif tuple(array.shape) != tuple(target.shape):
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(array.shape)} "
                    f"from checkpoint, the shape in current model is {tuple(target.shape)}.")
            else:
                copies.append((target, array))
        if strict:
            if unexpected:
                errors.insert(0, "Unexpected key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in unexpected) + ". ")
            if missing:
                errors.insert(0, "Missing key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in missing) + ". ")
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                               + "\n\t".join(errors))
        for target, array in copies:
            target.data[...] = to_device(array, target.device)  # checkpoints cross devices
            target._version[0] += 1
        return _IncompatibleKeys(missing, unexpected)

    # ----------------------------------------------------------- modes and conversions
    def train(self, mode: bool = True) -> Module:
        """Set training mode (Dropout active, ...) on this module and every descendant.

        Args:
            mode: True for training, False for evaluation.

        Returns:
            self.
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        """Set evaluation mode; ``train(False)``. Returns self."""
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Set `requires_grad` on every parameter. Returns self."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset every parameter's gradient.

        Args:
            set_to_none: drop the gradients (``p.grad = None``) instead of zeroing them in
                place.
        """
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.data[...] = 0
                p.grad._version[0] += 1

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Call ``fn(module)`` on every descendant, children first, then on self (e.g. custom
        initialisation). Returns self."""
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    def to(self, *args, **kwargs) -> Module:
        """Move and/or cast parameters, their gradients and buffers, in place: each keeps its
        identity (an optimizer built before still holds it) and gets a new array. Only floating
        point arrays are cast.

        Args:
            *args: a device (``'cpu'``, ``'cuda:0'``, a Device), a floating dtype
                (``engine.float64``), or a Tensor whose device and dtype to take.
            **kwargs: ``device=`` and/or ``dtype=``.

        Returns:
            self.
        """
        device, dtype = _parse_to_args(args, dict(kwargs))
        seen = set()
        for t in itertools.chain(self.parameters(), self.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            t.data = _move_array(t.data, device, dtype)
            if t.grad is not None:
                t.grad.data = _move_array(t.grad.data, device, dtype)
        return self

    def float(self) -> Module:
        """Cast floating point parameters and buffers to float32. Returns self."""
        return self.to(dtype="float32")

    def double(self) -> Module:
        """Cast floating point parameters and buffers to float64. Returns self."""
        return self.to(dtype="float64")

    def half(self) -> Module:
        """Cast floating point parameters and buffers to float16. Returns self."""
        return self.to(dtype="float16")

    def cpu(self) -> Module:
        """Move parameters and buffers to host memory. Returns self."""
        return self.to(device="cpu")

    def cuda(self, device: int | None = None) -> Module:
        """Move parameters and buffers to a GPU (needs CuPy). Returns self."""
        return self.to(device="cuda" if device is None else f"cuda:{device}")

    # ----------------------------------------------------------- repr
    def extra_repr(self) -> str:
        """The module's own settings, shown inside the parentheses of its repr."""
        return ""

    def _get_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = [f"({name}): " + _addindent(repr(module), 2)
                       for name, module in self._modules.items()]
        lines = extra_lines + child_lines
        body = ""
        if len(extra_lines) == 1 and not child_lines:
            body = extra_lines[0]
        elif lines:
            body = "\n  " + "\n  ".join(lines) + "\n"
        return f"{self._get_name()}({body})"
