"""The devices the engine tests run on: ``cpu``, the strict device that proves the array-library
seam without a GPU, and ``cuda`` where CuPy sees a GPU (elsewhere it skips with a reason that
``DPTRAIN_REQUIRE_ALL=1`` allows: CI has no GPU).

    @pytest.mark.parametrize("device", DEVICES)
    def test_something(device): ...
"""

from __future__ import annotations

import numpy as np
import pytest

from dptrain import engine
from dptrain.engine import backend

__all__ = ["DEVICES", "on"]

DEVICES = [
    "cpu",
    "strict",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not backend.cupy_available(), reason="needs a GPU: CuPy with a visible GPU")),
]


def on(device: str, *values):
    """`values` (numpy arrays or Tensors) as tensors on `device`, keeping dtype and requires_grad;
    one tensor for one value."""
    out = []
    for v in values:
        if isinstance(v, engine.Tensor):
            t = v.detach().to(device).requires_grad_(v.requires_grad)
        else:
            t = engine.tensor(np.asarray(v), device=device)
        out.append(t)
    return out[0] if len(out) == 1 else out
