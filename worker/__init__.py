"""dptrain worker: data-parallel training over MPI (gradient all-reduce across processes)."""

from worker.comm import Communicator
from worker.ddp import DistributedDataParallel
from worker.sampler import DistributedSampler
from worker.spec import JobSpec, JobSpecError, load_spec
from worker.train import TrainResult, run_job

__all__ = ["Communicator", "DistributedDataParallel", "DistributedSampler",
           "JobSpec", "JobSpecError", "load_spec", "run_job", "TrainResult"]
