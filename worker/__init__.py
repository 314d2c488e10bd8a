"""dptrain worker: data-parallel training over MPI (gradient all-reduce across processes)."""

from dptrain.worker.comm import Communicator
from dptrain.worker.ddp import DistributedDataParallel
from dptrain.worker.sampler import DistributedSampler
from dptrain.worker.spec import JobSpec, JobSpecError, load_spec
from dptrain.worker.train import TrainResult, run_job

__all__ = ["Communicator", "DistributedDataParallel", "DistributedSampler",
           "JobSpec", "JobSpecError", "load_spec", "run_job", "TrainResult"]
