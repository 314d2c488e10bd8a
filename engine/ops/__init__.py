"""All primitives, the torch-style free functions, and the Tensor methods built from them.

The ops live by family: `elementwise`, `reduce`, `shape`, `linalg`, `activation`, `conv`,
`pool`, `norm`, `attention`, `convert` (dtype and device) and `inplace` (updates that record no
graph). Each primitive is defined once (`core.Op`), and each public callable declares once,
next to its definition, how it is exported (`registry.export`). This module imports the
families, then builds from those declarations its free functions and ``__all__`` (re-exported
as ``engine.*``) and the Tensor method table; `engine.functional` takes its share of the same
declarations.

To add an op: its `Op` and wrapper in the family module, the wrapper under one
``@export(FUNCTION, METHOD, ...)`` line, and a line in the family's test (`tests/engine`).
"""

from __future__ import annotations

# Imported for their declarations: each family registers its exports as it loads.
from dptrain.engine.ops import (  # noqa: F401
    activation,
    attention,
    conv,
    convert,
    elementwise,
    inplace,
    linalg,
    norm,
    pool,
    reduce,
    shape,
)
from dptrain.engine.ops.core import Op, apply
from dptrain.engine.ops.registry import FUNCTION, export
from dptrain.engine.tensor import Tensor

export.bind(Tensor)
_functions = export.functions(FUNCTION)
globals().update(_functions)
__all__ = ["Op", "apply", *_functions]
