"""dptrain: data-parallel training on its own autodiff engine, MPI workers and a gRPC coordinator.

This directory is the root of the ``dptrain`` import package (``pyproject.toml`` maps it):
``dptrain.engine`` is ``engine/``, ``dptrain.worker`` is ``worker/``, ``dptrain.coordinator`` is
``coordinator/`` and ``dptrain.protos`` is ``protos/``.

``import dptrain`` gives the engine's PyTorch-shaped surface — ``dptrain.tensor``, ``dptrain.nn``,
``dptrain.optim``, ``dptrain.functional``, ``dptrain.models``, ``dptrain.Tensor``, ... — loaded on
first use, so that importing only the client (``dptrain.coordinator.client``) never loads the
engine.

Example:
    >>> import dptrain
    >>> from dptrain import nn
    >>> model = nn.Linear(3, 1)
    >>> loss = model(dptrain.ones(2, 3)).sum()
    >>> loss.backward()
    >>> tuple(model.weight.grad.shape)
    (1, 3)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = frozenset({"engine", "worker", "coordinator", "protos"})


def __getattr__(name: str) -> Any:
    """``dptrain.X``: a subpackage, or the engine's public name ``X`` (imported on first use)."""
    if not __package__ or name.startswith("__"):  # not imported as the package (a tool's look)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__package__}.{name}")
    engine = importlib.import_module(f"{__package__}.engine")
    try:
        value = getattr(engine, name)
    except AttributeError:
        try:  # an engine subpackage not loaded yet: dptrain.models
            value = importlib.import_module(f"{__package__}.engine.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    engine = importlib.import_module(f"{__name__}.engine")
    return sorted(set(globals()) | _SUBPACKAGES | set(engine.__all__))
