"""Ranks that build different models (or pass different settings) get a clear error, all of
them, instead of a hang; the communicator stays usable afterwards.

Rank 1 builds a wider hidden layer, rank 2 an extra layer; then, with the same model
everywhere, rank 1 alone asks for another bucket size. Each rank prints what it caught.
"""

from __future__ import annotations

from _common import error_of, report

from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import DistributedDataParallel
from dptrain.worker.comm import Communicator

comm = Communicator()
r = comm.rank


def model(hidden: int = 8, extra: bool = False) -> nn.Module:
    engine.manual_seed(0)
    layers = [nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2)]
    if extra:
        layers.append(nn.Linear(2, 2))
    return nn.Sequential(*layers)


result = {
    "rank": r,
    "architecture": error_of(lambda: DistributedDataParallel(
        model(hidden=9 if r == 1 else 8, extra=r == 2), comm=comm)),
    "setting": error_of(lambda: DistributedDataParallel(
        model(), comm=comm, bucket_cap_mb=1 if r == 1 else 25)),
    "same": error_of(lambda: DistributedDataParallel(model(), comm=comm)),
}
report(comm, result)
