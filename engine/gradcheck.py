"""Check an op's analytic gradient against central finite differences."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy

from dptrain.engine.backend import get_array_module, to_device
from dptrain.engine.tensor import Tensor


class GradcheckError(AssertionError):
    """Analytic and numerical gradients disagree."""


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], eps: float = 1e-6,
              atol: float = 1e-5, rtol: float = 1e-3, raise_exception: bool = True) -> bool:
    """Compare backward's gradients of ``fn(*inputs)`` with central differences.

    Every input that requires grad is perturbed element by element. A random projection of a
    non-scalar output makes it scalar, so one backward checks the whole Jacobian product.

    Args:
        fn: maps the inputs to a Tensor.
        inputs: Tensors; use float64 ones that require grad for a meaningful check.
        eps: finite-difference step.
        atol, rtol: tolerance, ``|analytic - numeric| <= atol + rtol * |numeric|``.
        raise_exception: raise GradcheckError on mismatch (else return False).

    Returns:
        True when every gradient matches.

    Example:
        >>> from dptrain import engine
        >>> x = engine.randn(3, dtype=engine.float64, requires_grad=True)
        >>> engine.gradcheck(lambda t: (t * t).sum(), [x])
        True
    """
    inputs = list(inputs)
    wrt = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not wrt:
        raise ValueError("gradcheck: no input requires grad")
    for t in wrt:
        if not t.data.flags.c_contiguous:
            t.data = get_array_module(t.data).ascontiguousarray(t.data)
        if t.dtype != numpy.float64:
            raise ValueError(f"gradcheck: inputs should be float64 for a meaningful check, got "
                             f"{t.dtype}; pass tensors created with dtype=engine.float64")
    out = fn(*inputs)
    rng = numpy.random.default_rng(1234)
    proj = rng.standard_normal(out.shape)

    def scalar(o: Tensor) -> float:
        return float(numpy.sum(o.numpy().astype(numpy.float64) * proj))

    for t in wrt:
        t.grad = None
    (out * Tensor(to_device(proj.astype(out.dtype), out.device))).sum().backward()
    for i, t in enumerate(wrt):
        analytic = numpy.zeros(t.shape) if t.grad is None else t.grad.numpy()
        numeric = numpy.zeros(t.shape)
        flat = t.data.reshape(-1)  # a view: perturb in place
        for j in range(flat.size):
            orig = flat[j]
            flat[j] = orig + eps
            plus = scalar(fn(*inputs))
            flat[j] = orig - eps
            minus = scalar(fn(*inputs))
            flat[j] = orig
            numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
        bad = numpy.abs(analytic - numeric) > atol + rtol * numpy.abs(numeric)
        if bad.any():
            if not raise_exception:
                return False
            k = int(numpy.argmax(bad.reshape(-1)))
            raise GradcheckError(
                f"gradcheck: gradient of input {i} (shape {t.shape}) mismatches at flat index "
                f"{k}: analytic {analytic.reshape(-1)[k]!r} vs numeric {numeric.reshape(-1)[k]!r}"
                f"; max abs error {numpy.abs(analytic - numeric).max():.3g}")
    return True
