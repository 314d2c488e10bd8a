"""dptrain worker: data-parallel training over MPI (gradient all-reduce across processes)."""

from worker.comm import Communicator
from worker.ddp import DistributedDataParallel
from worker.sampler import DistributedSampler

__all__ = ["Communicator", "DistributedDataParallel", "DistributedSampler"]
