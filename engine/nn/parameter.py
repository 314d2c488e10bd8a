"""Parameter: a Tensor that a Module registers as one of its learnable weights."""

from __future__ import annotations

import numpy

from dptrain.engine.dtypes import default_float
from dptrain.engine.tensor import Tensor

__all__ = ["Parameter"]


class Parameter(Tensor):
    """A leaf Tensor that, assigned as a Module attribute, joins the module's `parameters()`.

    Args:
        data: a Tensor (its array and version counter are shared, as ``torch.nn.Parameter``
            shares storage) or a backend array (numpy or CuPy, wrapped as-is). None gives an
            empty float tensor.
        requires_grad: whether the parameter collects gradients (default True).

    Example:
        >>> import numpy
        >>> from dptrain.engine.nn import Parameter
        >>> p = Parameter(numpy.ones(2, dtype=numpy.float32))
        >>> p.requires_grad
        True
    """

    __slots__ = ()

    def __init__(self, data=None, requires_grad: bool = True):
        if data is None:
            data = numpy.empty((0,), dtype=default_float)
        if isinstance(data, Tensor):
            super().__init__(data.data, requires_grad=requires_grad, _version=data._version)
        elif hasattr(data, "shape") and hasattr(data, "dtype"):
            super().__init__(data, requires_grad=requires_grad)
        else:
            raise TypeError(
                f"Parameter expects a Tensor or an array, got {type(data).__name__}; build one "
                "with engine.tensor(...) first")

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()
