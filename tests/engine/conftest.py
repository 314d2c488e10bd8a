"""Shared helpers for the engine tests, handed out as fixtures (conftest is not importable).

``check(fn_engine, fn_numpy, *shapes)`` is the one-line op test, after tinygrad's
``helper_test_op``: it draws seeded float64 inputs, compares the engine's forward with a numpy
reference written in the test, and gradchecks the engine function against central differences.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from devices import DEVICES

from dptrain import engine


def _inputs(*shapes, low: float = -2.0, high: float = 2.0, positive: bool = False,
            seed: int = 0) -> list[np.ndarray]:
    """Seeded float64 arrays of `shapes`, uniform on [low, high); on [0.5, high) when
    `positive`, away from the poles and kinks of log, sqrt, 1/x and x**y."""
    if positive:
        low = max(low, 0.5)
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.uniform(low, high, size=s), dtype=np.float64) for s in shapes]


def _leaf(array, device: str = "cpu") -> engine.Tensor:
    """A float64 leaf on `device` that requires grad, holding a copy of `array`."""
    return engine.tensor(np.array(array, dtype=np.float64), dtype=engine.float64,
                         device=device, requires_grad=True)


def _check(fn_engine, fn_numpy, *shapes, low: float = -2.0, high: float = 2.0,
           positive: bool = False, atol: float = 1e-10, rtol: float = 1e-7, grad: bool = True,
           grad_atol: float = 1e-6, grad_rtol: float = 1e-4, seed: int = 0,
           device: str = "cpu") -> engine.Tensor:
    """Compare ``fn_engine(*tensors)`` with ``fn_numpy(*arrays)`` on random inputs of `shapes`
    (shape, dtype float64 and values) on `device`, then gradcheck `fn_engine`. Returns the
    engine output."""
    arrays = _inputs(*shapes, low=low, high=high, positive=positive, seed=seed)
    tensors = [_leaf(a, device) for a in arrays]
    out = fn_engine(*tensors)
    expected = np.asarray(fn_numpy(*[a.copy() for a in arrays]))
    assert isinstance(out, engine.Tensor)
    assert out.device == device, f"the result left {device} for {out.device}"
    assert out.shape == expected.shape, f"shape {out.shape}, expected {expected.shape}"
    assert out.dtype == engine.float64
    np.testing.assert_allclose(np.asarray(out.numpy()), expected, atol=atol, rtol=rtol)
    if grad:
        assert engine.gradcheck(fn_engine, tensors, atol=grad_atol, rtol=grad_rtol)
    return out


@pytest.fixture(scope="session", params=DEVICES)
def check(request):
    """`_check` on each device: forward against a numpy reference, backward against finite
    differences."""
    return functools.partial(_check, device=request.param)


@pytest.fixture(scope="session")
def leaf():
    """`_leaf`: a float64 leaf tensor that requires grad."""
    return _leaf



@pytest.fixture(scope="session")
def raises_msg():
    """``raises_msg(exc, *fragments)``: pytest.raises for `exc` whose message contains every
    fragment, in any order (the op's name, both shapes, ...)."""

    def raises(exc, *fragments):
        lookaheads = "".join(f"(?=.*{re.escape(f)})" for f in fragments)
        return pytest.raises(exc, match="(?s)" + lookaheads)

    return raises
