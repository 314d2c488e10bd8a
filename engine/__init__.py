"""dptrain's reverse-mode autodiff engine on numpy (and CuPy), with a PyTorch-shaped API.

Example:
    >>> from dptrain import engine
    >>> from dptrain.engine import nn, functional as F
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = engine.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = engine.randn(16, 4), engine.randint(0, 3, (16,))
    >>> loss = F.cross_entropy(model(x), y)
    >>> opt.zero_grad(); loss.backward(); opt.step()
"""

from dptrain.engine import functional, nn, optim  # noqa: E402
from dptrain.engine.backend import Device, cupy_available, get_rng_state, manual_seed, set_rng_state
from dptrain.engine.backend import Device as device
from dptrain.engine.dtypes import (
    bool_ as bool,  # noqa: A001  (torch.bool)
)
from dptrain.engine.dtypes import (
    double,
    float,  # noqa: A001
    float16,
    float32,
    float64,
    half,
    int8,
    int16,
    int32,
    int64,
    long,
    uint8,
)
from dptrain.engine.factories import (
    arange,
    empty,
    eye,
    from_numpy,
    full,
    full_like,
    linspace,
    ones,
    ones_like,
    rand,
    rand_like,
    randint,
    randn,
    randn_like,
    randperm,
    tensor,
    zeros,
    zeros_like,
)
from dptrain.engine.gradcheck import gradcheck
from dptrain.engine.ops import *  # noqa: F403  (operators, methods and torch-style free functions)
from dptrain.engine.ops import __all__ as _ops_all
from dptrain.engine.serialization import load, load_metadata, save
from dptrain.engine.tensor import (
    Tensor,
    enable_grad,
    is_grad_enabled,
    no_grad,
    queue_callback,
    register_backward_pass_hook,
    set_grad_enabled,
)

__all__ = [
    "Tensor", "Device", "device", "cupy_available", "manual_seed", "get_rng_state",
    "set_rng_state", "no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled",
    "queue_callback", "register_backward_pass_hook", "tensor", "zeros", "ones", "full", "empty",
    "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randn", "rand", "randint",
    "randperm", "arange", "linspace", "eye", "from_numpy", "gradcheck", "functional", "nn",
    "optim", "save", "load", "load_metadata",
    "float16", "float32", "float64", "half", "float", "double", "int8", "int16", "int32",
    "int64", "long", "uint8", "bool", *_ops_all,
]
