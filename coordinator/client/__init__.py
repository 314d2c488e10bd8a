"""The coordinator's client side: the Python `Client`, the ``dptrain`` client commands, following
a job, and the worker's progress reporter over gRPC. Loads neither the store nor the engine.

``from dptrain.coordinator.client import Client, ClientError`` (loaded on first use, so the CLI
starts without grpc).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Client": "client", "ClientError": "client", "WorkerClient": "worker_client"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
