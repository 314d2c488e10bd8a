"""The model registry: jobs name a model (``"resnet"``) or a user's constructor
(``"mypackage.models:build"``) and its arguments; `get_model` builds it.

Argument errors are caught before anything is built: the arguments are bound to the
constructor's signature, and a failure names the model, every argument it accepts (with its
default) and the arguments that came.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import keyword
from collections.abc import Callable
from typing import Any

from dptrain.engine.nn.module import Module

__all__ = ["register_model", "get_model", "get_constructor", "list_models", "model_signature",
           "parse_reference", "import_reference"]

_REGISTRY: dict[str, Callable[..., Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., Module]], Callable[..., Module]]:
    """Decorator: make a constructor (a Module class or a function returning a Module)
    available to `get_model` under `name`.

    Args:
        name: the registry key; must not contain ``":"`` (that form names a user's function).

    Returns:
        The decorator, which returns the constructor unchanged.

    Example:
        >>> from dptrain.engine import nn
        >>> from dptrain.engine.models import register_model, get_model
        >>> @register_model("tiny_mlp_example")
        ... def tiny(width: int = 4) -> nn.Module:
        ...     return nn.Linear(2, width)
        >>> get_model("tiny_mlp_example", width=3).out_features
        3
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_model: the name must be a non-empty string without ':', "
                         f"got {name!r}")

    def decorate(fn: Callable[..., Module]) -> Callable[..., Module]:
        if not callable(fn):
            raise TypeError(f"register_model({name!r}): expected a callable, got "
                            f"{type(fn).__name__}")
        if _REGISTRY.get(name, fn) is not fn:
            raise ValueError(f"register_model: a different model is already registered as "
                             f"{name!r}")
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def _dotted(text: str) -> bool:
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in text.split("."))


def parse_reference(name: str, what: str = "model") -> tuple[str, str]:
    """Split a user's constructor ``"package.module:function"`` into its module and attribute,
    checking its syntax only: nothing is imported.

    Importing runs the module's code, so whoever only validates a job (the coordinator, the
    CLI) checks the reference with this and leaves importing it to the workers.

    Args:
        name: the reference; either side may be dotted (``pkg.mod:Class.build``).
        what: what it names, for the message (``model``, ``loss``, ``data set``).

    Returns:
        ``(module, attribute)``.

    Raises:
        ValueError: `name` is not dotted identifiers on both sides of one ``":"``.

    Example:
        >>> parse_reference("mypackage.models:build")
        ('mypackage.models', 'build')
    """
    module, sep, attr = name.partition(":")
    if not sep or not _dotted(module) or not _dotted(attr):
        raise ValueError(f"{what} {name!r}: a user's {what} is named "
                         "'package.module:function' (dotted Python identifiers)")
    return module, attr


def import_reference(name: str, what: str = "model") -> Callable[..., Any]:
    """Import the callable a ``"package.module:function"`` reference names.

    Only the processes that run a job's code call this (the workers): importing runs the
    module's code.

    Args:
        name: the reference (`parse_reference`'s syntax).
        what: what it names, for the messages (``model``, ``loss``, ``data set``).

    Returns:
        The callable.

    Raises:
        ValueError: bad syntax, a module that cannot be imported (or fails while importing),
            or a missing attribute.
        TypeError: the attribute is not callable.
    """
    module_name, attr = parse_reference(name, what)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {name!r}: cannot import module {module_name!r}: {e}") \
            from None
    except (Exception, SystemExit) as e:  # the module's own code failed, or exited
        raise ValueError(f"{what} {name!r}: importing module {module_name!r} failed: "
                         f"{type(e).__name__}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"{what} {name!r}: module {module_name!r} has no attribute "
                             f"{attr!r}")
    if not callable(fn):
        raise TypeError(f"{what} {name!r}: {attr!r} is a {type(fn).__name__}, not a "
                        "callable")
    return fn


def _resolve(name: str) -> Callable[..., Module]:
    if not isinstance(name, str):
        raise TypeError(f"the model name must be a string, got {type(name).__name__}")
    if ":" in name:
        return import_reference(name, "model")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; registered models: "
                         f"{', '.join(list_models())}; or name your own constructor as "
                         "'package.module:function'")
    return _REGISTRY[name]


def get_constructor(name: str) -> Callable[..., Module]:
    """The constructor `get_model` would call for `name`, without calling it (to check a
    job's arguments before building anything).

    Args:
        name: a registered name or ``"package.module:function"``.

    Returns:
        The constructor (a Module class or a function).

    Raises:
        ValueError: unknown name or unimportable constructor.
        TypeError: `name` names something that is not callable.
    """
    return _resolve(name)


def model_signature(name: str) -> str:
    """The arguments model `name` accepts, with defaults, e.g. ``"depth=8, width=16"``.

    Args:
        name: a registered name or ``"package.module:function"``.

    Returns:
        The argument list as one line of text.
    """
    return _describe(_signature(_resolve(name)))


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none
        return None


def _describe(sig: inspect.Signature | None) -> str:
    if sig is None:
        return "(unknown: the constructor has no inspectable signature)"
    parts = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.kind is p.VAR_POSITIONAL:
            continue
        else:
            parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(parts) or "(none)"


def get_model(name: str, **args) -> Module:
    """Build the model registered as `name` (or the function named ``"package.module:fn"``)
    with keyword arguments `args`.

    Args:
        name: a name from `list_models()` or ``"package.module:function"``.
        **args: the constructor's keyword arguments.

    Returns:
        The new Module.

    Raises:
        ValueError: unknown name, unimportable constructor, or an argument value the
            constructor rejects (the message names the model and its accepted arguments).
        TypeError: unknown or missing arguments, or a constructor that returns no Module.

    Example:
        >>> from dptrain.engine.models import get_model
        >>> model = get_model("mlp", in_features=4, hidden=(8,), num_classes=3)
        >>> [n for n, _ in model.named_parameters()]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    fn = _resolve(name)
    sig = _signature(fn)
    got = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "no arguments"
    try:
        if sig is not None:
            sig.bind(**args)
    except TypeError as e:
        raise TypeError(f"model {name!r}: {e}; it accepts: {_describe(sig)}; got: {got}") \
            from None
    try:
        model = fn(**args)
    except (ValueError, TypeError) as e:
        raise type(e)(f"model {name!r}: {e} (it accepts: {_describe(sig)}; got: {got})") from e
    if not isinstance(model, Module):
        raise TypeError(f"model {name!r}: the constructor returned a {type(model).__name__}, "
                        "not an engine.nn.Module")
    return model

