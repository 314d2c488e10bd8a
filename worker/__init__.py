"""dptrain worker: data-parallel training over MPI (gradient all-reduce across processes).

The public names load on first use, so the coordinator and the CLI can read a job spec
(`dptrain.worker.spec`) without loading the engine, MPI or the training loop.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Communicator": "comm", "DistributedDataParallel": "ddp", "DistributedSampler": "sampler",
    "JobSpec": "spec", "JobSpecError": "spec", "load_spec": "spec",
    "run_job": "train", "TrainResult": "train",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
