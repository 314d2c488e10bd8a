"""dptrain worker: data-parallel training over MPI (gradient all-reduce across processes).

The public names below are loaded on first use, as the root package does, so that importing a
light module of the worker (`dptrain.worker.environment`, `dptrain.worker.exit_codes`,
`dptrain.worker.checkpoint_manifest`, `dptrain.worker.spec`) loads neither the engine
nor mpi4py: the coordinator and rank 0's reporter import those.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Communicator", "DistributedDataParallel", "DistributedSampler",
           "JobSpec", "JobSpecError", "load_spec", "run_job", "TrainResult", "init", "Context"]

_HOMES = {
    "Communicator": "comm", "DistributedDataParallel": "ddp", "DistributedSampler": "sampler",
    "JobSpec": "spec", "JobSpecError": "spec", "load_spec": "spec",
    "run_job": "train", "TrainResult": "train", "init": "context", "Context": "context",
}


def __getattr__(name: str) -> Any:
    """``dptrain.worker.X`` for a public name ``X`` (its module imported on first use)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
