"""How each public op is exported, declared once, on the line that defines it.

Every public callable of the op modules carries one `export` declaration naming where it
appears:

    FUNCTION     ``engine.<name>`` and ``engine.ops.<name>`` (listed in their ``__all__``)
    METHOD       ``Tensor.<name>``
    PROPERTY     ``Tensor.<name>``, read-only (``x.T``)
    FUNCTIONAL   ``engine.functional.<name>``

plus, where it has them, the Tensor operators it implements (``operators=("__add__",)``) and
its in-place variant (``inplace=add_``, bound as ``Tensor.add_``). `engine.ops` builds its free
functions, its ``__all__`` and the Tensor method table from these declarations, and
`engine.functional` its own list, so adding an op is its `Op`, its wrapper under one `export`
line, and a test. A name taken twice in one place is refused when it is declared.

Example:
    >>> from dptrain.engine.ops.registry import Exports, FUNCTION, METHOD
    >>> exports = Exports()
    >>> @exports(FUNCTION, METHOD, operators=("__neg__",))
    ... def negate(x):
    ...     return -x
    >>> list(exports.functions(FUNCTION))
    ['negate']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

__all__ = ["FUNCTION", "METHOD", "PROPERTY", "FUNCTIONAL", "Export", "Exports", "export"]

FUNCTION = "function"
METHOD = "method"
PROPERTY = "property"
FUNCTIONAL = "functional"
TARGETS = (FUNCTION, METHOD, PROPERTY, FUNCTIONAL)

# Where each target puts the name: the namespaces whose names must not clash.
_PLACE = {FUNCTION: "engine", METHOD: "Tensor", PROPERTY: "Tensor",
          FUNCTIONAL: "engine.functional"}

Fn = TypeVar("Fn", bound=Callable)


class Export(NamedTuple):
    """One declaration: the callable `fn`, exported as `name` to `targets`, bound to the Tensor
    `operators` and with the in-place variant `inplace` (``Tensor.<name>_``), if any."""

    name: str
    fn: Callable
    targets: tuple[str, ...]
    operators: tuple[str, ...]
    inplace: Callable | None

    def bindings(self) -> list[tuple[str, str, object]]:
        """``(place, attribute, value)`` for every name this declaration binds."""
        out = [(_PLACE[t], self.name, property(self.fn) if t == PROPERTY else self.fn)
               for t in self.targets]
        out += [("Tensor", op, self.fn) for op in self.operators]
        if self.inplace is not None:
            out.append(("Tensor", self.name + "_", self.inplace))
        return out


class Exports:
    """A registry of `Export` declarations; calling it declares one (as a decorator).

    The engine's own registry is `export`; a fresh one builds a namespace without touching the
    engine's (tests declare toy ops that way).
    """

    def __init__(self) -> None:
        self.entries: list[Export] = []
        self._taken: dict[tuple[str, str], str] = {}

    def __call__(self, *targets: str, name: str | None = None, operators: tuple[str, ...] = (),
                 inplace: Callable | None = None) -> Callable[[Fn], Fn]:
        """Declare how the decorated callable is exported.

        Args:
            targets: any of FUNCTION, METHOD, PROPERTY and FUNCTIONAL.
            name: the public name; defaults to the callable's ``__name__``.
            operators: Tensor operator methods it implements, e.g. ``("__add__",)``.
            inplace: its in-place variant, bound as the method ``<name>_``.

        Returns:
            A decorator that registers the callable and returns it unchanged.
        """
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f"export: each target must be one of {TARGETS}, got {t!r}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"export: each target may be given once, got {targets}")
        for op in operators:
            if not (op.startswith("__") and op.endswith("__")):
                raise ValueError(f"export: operators must be dunder method names such as "
                                 f"'__add__', got {op!r}")
        if not (targets or operators or inplace):
            raise ValueError("export: give at least one target, operator or in-place variant")

        def declare(fn: Fn) -> Fn:
            entry = Export(name or fn.__name__, fn, tuple(targets), tuple(operators), inplace)
            for place, attr, _ in entry.bindings():
                if (place, attr) in self._taken:
                    raise ValueError(f"export: {place}.{attr} is already exported by "
                                     f"{self._taken[place, attr]}; each name is bound once")
            for place, attr, _ in entry.bindings():
                self._taken[place, attr] = f"{fn.__module__}.{fn.__qualname__}"
            self.entries.append(entry)
            return fn

        return declare

    def functions(self, target: str) -> dict[str, Callable]:
        """The callables exported to the module-level `target` (FUNCTION or FUNCTIONAL), by
        name, in declaration order."""
        return {e.name: e.fn for e in self.entries if target in e.targets}

    def tensor_attributes(self) -> dict[str, object]:
        """The Tensor method table: methods, properties, operators and in-place variants."""
        return {attr: value for e in self.entries
                for place, attr, value in e.bindings() if place == "Tensor"}

    def bind(self, cls: type) -> None:
        """Set every declared Tensor attribute on `cls`."""
        for attr, value in self.tensor_attributes().items():
            setattr(cls, attr, value)


export = Exports()
