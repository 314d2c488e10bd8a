"""The environment the coordinator gives every worker process it launches: defined once, here.

The runner puts these variables into the environment of each job's ``mpiexec`` process (never
on its command line, where ``ps`` would show the token), through `worker_environment`; mpiexec
passes its environment on to every rank, and the coordinator's reporter plug-in
(``coordinator/client/worker_reporter.py``) reads them back (`read_worker_environment`);
``worker.events`` switches the plug-in on when `COORDINATOR` is set. The names live in the
worker, which both sides may import (the coordinator imports the worker, never the reverse),
in a module that imports nothing heavy.

The worker token is made fresh for every launch of a job: the runner calls
``coordinator.api.records.new_token()``, stores ``hash_token(token)`` as the job's
``token_hash`` in the same transition that moves the job to RUNNING, and hands the token itself
only to the workers.
A relaunch therefore locks out the workers of the run before it.

One more name lives here because both ``dptrain run`` and the coordinator read it, never a
worker: `MPIEXEC`, the MPI launcher to start ranks with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MPIEXEC", "COORDINATOR", "JOB_ID", "JOB_TOKEN", "TLS_CA", "HEARTBEAT_TIMEOUT",
    "SLURM_NTASKS", "PMI_SIZE", "WorkerEnvironment", "worker_environment",
    "read_worker_environment", "world_size_error", "CHECKPOINT_DIR", "RESUME", "ALLOWED_MODULES",
]

MPIEXEC = "DPTRAIN_MPIEXEC"
"""The MPI launcher ``dptrain run`` and the coordinator start ranks with, e.g. a cluster's own
``/opt/intel/mpi/bin/mpiexec`` (with mpi4py built against that MPI); unset: the ``mpiexec`` of
the ``mpich`` wheel beside the interpreter. Read by ``worker.mpiexec_command.default_mpiexec``;
it must take Hydra's options (MPICH, Intel MPI, MVAPICH)."""

COORDINATOR = "DPTRAIN_COORDINATOR"
"""``host:port`` of the coordinator's gRPC server, as the workers reach it."""

JOB_ID = "DPTRAIN_JOB_ID"
"""The id of the job the workers belong to."""

JOB_TOKEN = "DPTRAIN_JOB_TOKEN"
"""The job's worker token: valid for `WorkerService` calls about this job only."""

TLS_CA = "DPTRAIN_TLS_CA"
"""Path of the PEM certificate(s) to verify the coordinator's TLS certificate with; unset when
the coordinator listens without TLS."""

ALLOWED_MODULES = "DPTRAIN_ALLOWED_MODULES"
"""The installed module prefixes the coordinator allows jobs to name, comma-separated (empty:
none), set on every rank it launches; the ranks check the job's references against them again
before importing (``worker.module_policy``). Unset (``dptrain run``): no rule applies."""

HEARTBEAT_TIMEOUT = "DPTRAIN_HEARTBEAT_TIMEOUT"
"""The coordinator's heartbeat timeout in seconds (``--heartbeat-timeout``): how long training
may make no progress before the coordinator ends the job. Rank 0's reporter derives how often it
tells the coordinator of progress from it; unset when the coordinator has none."""

SLURM_NTASKS = "SLURM_NTASKS"
"""Set by Slurm (``srun``, ``sbatch``): how many tasks it started. Under ``srun --mpi=pmi2``
every task is one rank of one MPI world of that size; a mismatch means each task runs alone
(`world_size_error`)."""

PMI_SIZE = "PMI_SIZE"
"""Set by the process manager that gave this rank its MPI world (Slurm's PMI-2 plugin, Hydra's
``mpiexec``): the world's size. Absent for a singleton."""


CHECKPOINT_DIR = "DPTRAIN_CHECKPOINT_DIR"
"""Where an own training script's checkpoints go when it runs without a job file (``dptrain
run train.py --checkpoint-dir D`` sets it); unset: ``ctx.save_checkpoint`` writes nothing."""

RESUME = "DPTRAIN_RESUME"
"""``1``: an own training script resumes from the newest intact checkpoint in
`CHECKPOINT_DIR` (``dptrain run train.py --checkpoint-dir D --resume``)."""


@dataclass(frozen=True)
class WorkerEnvironment:
    """What a worker learns from its environment about the coordinator.

    Attributes:
        address: the coordinator's ``host:port``.
        job_id: the job's id.
        token: the job's worker token.
        tls_ca: the CA certificate path, or None for a plaintext connection.
        heartbeat_timeout: the coordinator's heartbeat timeout in seconds, or None.
    """

    address: str
    job_id: str
    token: str
    tls_ca: str | None = None
    heartbeat_timeout: float | None = None


def worker_environment(address: str, job_id: str, token: str,
                       tls_ca: str | os.PathLike | None = None,
                       heartbeat_timeout: float | None = None) -> dict[str, str]:
    """The variables to set on every rank of a job's launch.

    Args:
        address: the coordinator's address as the workers' hosts reach it.
        job_id: the job.
        token: the worker token made for this launch (only its hash is stored).
        tls_ca: the certificate workers verify the server with; None without TLS.
        heartbeat_timeout: the coordinator's heartbeat timeout; None: it has none.

    Returns:
        Name -> value, e.g. for ``worker.mpiexec_command.LaunchSettings(env=...)``.
    """
    env = {COORDINATOR: address, JOB_ID: job_id, JOB_TOKEN: token}
    if tls_ca is not None:
        env[TLS_CA] = os.fspath(tls_ca)
    if heartbeat_timeout is not None:
        env[HEARTBEAT_TIMEOUT] = repr(float(heartbeat_timeout))
    return env


def read_worker_environment(environ: Mapping[str, str] | None = None) -> WorkerEnvironment:
    """Read the coordinator's variables back (in a worker).

    Args:
        environ: the environment (default: ``os.environ``).

    Returns:
        The settings.

    Raises:
        KeyError: naming the first required variable that is missing or empty.
        ValueError: `HEARTBEAT_TIMEOUT` is not a number of seconds > 0.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for name in (COORDINATOR, JOB_ID, JOB_TOKEN):
        if not environ.get(name):
            raise KeyError(f"{name} is not set: the coordinator sets it for the workers it "
                           f"launches")
        values[name] = environ[name]
    timeout = environ.get(HEARTBEAT_TIMEOUT) or None
    if timeout is not None:
        try:
            timeout = float(timeout)
        except ValueError:
            timeout = None
        if timeout is None or not 0 < timeout < float("inf"):
            raise ValueError(f"{HEARTBEAT_TIMEOUT}: must be a number of seconds > 0, got "
                             f"{environ[HEARTBEAT_TIMEOUT]!r}")
    return WorkerEnvironment(values[COORDINATOR], values[JOB_ID], values[JOB_TOKEN],
                             environ.get(TLS_CA) or None, timeout)


def world_size_error(world_size: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Why this MPI world is not the one Slurm started, or None when it is (or no Slurm).

    ``srun --mpi=none``, or an MPI library that does not speak the PMI Slurm serves, starts
    every task as a world of one rank: each would train the whole job alone, silently. Ranks
    that another process manager started inside the allocation (Hydra's ``mpiexec``, which
    starts its proxy as one Slurm task and sets `PMI_SIZE` for its own world) are left alone:
    measured here, they see ``SLURM_NTASKS=1`` (the proxy's step) and ``PMI_SIZE=2``.

    Args:
        world_size: ``MPI_COMM_WORLD``'s size.
        environ: the environment (default: ``os.environ``).

    Returns:
        A one-line message naming `SLURM_NTASKS`, the sizes and the fix, or None.
    """
    environ = os.environ if environ is None else environ
    tasks = environ.get(SLURM_NTASKS, "")
    if not tasks.isdigit() or int(tasks) == world_size:
        return None
    if environ.get(PMI_SIZE, tasks) != tasks:  # another process manager's world
        return None
    return (f"{SLURM_NTASKS}: Slurm started {tasks} task(s) but the MPI world has "
            f"{world_size} rank(s), so the tasks do not see each other; start them with "
            f"'srun --mpi=pmi2' (the mpich wheel speaks PMI-2: not --mpi=none, not pmix)")
