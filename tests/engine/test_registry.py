"""One declaration per op: every op is exported exactly where its `export` line says, a new op
is one declaration away from being a free function, a method and an in-place variant, and the
op modules sit below the functional layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from import_scan import imported_modules

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import FUNCTION, FUNCTIONAL, METHOD, PROPERTY, Exports, export
from dptrain.engine.tensor import Tensor

OPS_DIR = Path(engine.ops.__file__).parent


def _declared(target: str) -> dict:
    return {e.name: e.fn for e in export.entries if target in e.targets}


def test_free_functions_are_exactly_the_declared_ones():
    declared = _declared(FUNCTION)
    assert set(engine.ops.__all__) == {"Op", "apply", *declared}
    assert set(declared) <= set(engine.__all__)
    for name, fn in declared.items():
        assert getattr(engine.ops, name) is fn, name
        assert getattr(engine, name) is fn, name


def test_functional_is_exactly_the_declared_functions():
    declared = _declared(FUNCTIONAL)
    assert set(F.__all__) == set(declared)
    for name, fn in declared.items():
        assert getattr(F, name) is fn, name


def test_tensor_methods_operators_and_inplace_variants_are_bound_as_declared():
    for e in export.entries:
        if METHOD in e.targets:
            assert vars(Tensor)[e.name] is e.fn, e.name
        if PROPERTY in e.targets:
            assert vars(Tensor)[e.name].fget is e.fn, e.name
        for op in e.operators:
            assert vars(Tensor)[op] is e.fn, op
        if e.inplace is not None:
            # PyTorch's convention: the in-place form of `add` is `add_`, and it is that function
            assert e.inplace.__name__ == e.name + "_", e.name
            assert vars(Tensor)[e.name + "_"] is e.inplace, e.name


def test_every_op_bound_to_tensor_is_declared():
    # Nothing reaches Tensor from engine.ops except through a declaration.
    declared = export.tensor_attributes()
    for attr, value in vars(Tensor).items():
        fn = value.fget if isinstance(value, property) else value
        if getattr(fn, "__module__", "").startswith("dptrain.engine.ops"):
            assert attr in declared, f"Tensor.{attr} is bound but not declared"


def test_the_declared_surface_by_example():
    # A few of each kind, spelled out by hand, as a user reaches them.
    x = engine.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert engine.add(x, 1).tolist() == x.add(1).tolist() == (x + 1).tolist() == [[2, -1], [4, 5]]
    assert (2 - x).tolist() == [[1, 4], [-1, -2]]
    assert x.T.tolist() == [[1, 3], [-2, 4]]
    assert x.where(x > 0, 0.0).tolist() == [[1, 0], [3, 4]]
    assert engine.clip(x, max=2.0).tolist() == x.clip(max=2.0).tolist() == [[1, -2], [2, 2]]
    assert F.relu(x).tolist() == [[1, 0], [3, 4]]
    y = x.clone()
    assert y.mul_(2) is y and y.tolist() == [[2, -4], [6, 8]]


def test_a_new_op_is_one_declaration():
    # A toy op declared in a registry of its own, bound to a subclass: nothing leaks into the
    # engine's namespaces, and the steps are the ones engine.ops takes.
    exports = Exports()
    _cube = Op("cube", lambda xp, x: x * x * x, (lambda xp, g, ans, x: 3 * g * x * x,))

    def cube_(x: Tensor) -> Tensor:
        x.data **= 3
        return x

    @exports(FUNCTION, METHOD, FUNCTIONAL, operators=("__invert__",), inplace=cube_)
    def cube(x: Tensor) -> Tensor:
        return apply(_cube, x)

    class ToyTensor(Tensor):
        __slots__ = ()

    exports.bind(ToyTensor)
    assert exports.functions(FUNCTION) == exports.functions(FUNCTIONAL) == {"cube": cube}

    x = ToyTensor(np.array([2.0, -1.0]), requires_grad=True)
    assert x.cube().tolist() == (~x).tolist() == cube(x).tolist() == [8.0, -1.0]
    x.cube().sum().backward()
    assert x.grad.tolist() == [12.0, 3.0]  # 3 x^2
    y = ToyTensor(np.array([3.0]))
    assert y.cube_() is y and y.tolist() == [27.0]

    assert not hasattr(Tensor, "cube") and not hasattr(Tensor, "cube_")
    assert "cube" not in engine.ops.__all__ and not hasattr(F, "cube")


def test_a_name_is_bound_once():
    exports = Exports()
    exports(FUNCTION, METHOD)(lambda x: x)
    with pytest.raises(ValueError, match=r"engine\.<lambda> is already exported by"):
        exports(FUNCTION)(lambda x: x)
    exports(FUNCTIONAL)(lambda x: x)  # another place: no clash


@pytest.mark.parametrize("args, kwargs, message", [
    (("methd",), {}, "each target must be one of"),
    ((FUNCTION, FUNCTION), {}, "each target may be given once"),
    ((), {"operators": ("add",)}, "operators must be dunder method names"),
    ((), {}, "give at least one target"),
], ids=["unknown_target", "twice", "operator_name", "nothing"])
def test_a_bad_declaration_is_refused(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Exports()(*args, **kwargs)


@pytest.mark.parametrize("path", sorted(OPS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_op_modules_import_nothing_above_them(path):
    # engine.functional, nn, optim and models are built on the ops; an op importing them (even
    # inside a function) is an import cycle.
    above = tuple(f"dptrain.engine.{m}" for m in ("functional", "nn", "optim", "models"))
    wrong = sorted(name for _, name in imported_modules(path.read_text())
                   if name.startswith(above))
    assert not wrong, f"{path.name} imports {wrong}"
