"""The op modules sit below the functional layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import engine.ops

OPS_DIR = Path(engine.ops.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:  # `from engine import nn` too
            names.update([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
    return names


@pytest.mark.parametrize("path", sorted(OPS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_op_modules_import_nothing_above_them(path):
    # engine.functional, nn, optim and models are built on the ops; an op importing them (even
    # inside a function) is an import cycle.
    above = ("engine.functional", "engine.nn", "engine.optim", "engine.models")
    wrong = sorted(m for m in _imported_modules(path) if m.startswith(above))
    assert not wrong, f"{path.name} imports {wrong}"
