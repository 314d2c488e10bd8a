"""The environment the coordinator gives every worker process it launches: defined once, here.

The runner puts these variables into the environment of each job's ``mpiexec`` process (never
on its command line, where ``ps`` would show the token), through `worker_environment`; mpiexec
passes its environment on to every rank, and ``coordinator.worker_reporter`` reads them back
(`read_worker_environment`). ``worker.events`` knows only `COORDINATOR` (the switch that turns
the coordinator's reporter on), under the same name.

The worker token is made fresh for every launch of a job: the runner calls
``coordinator.model.new_token()``, stores ``hash_token(token)`` as the job's ``token_hash`` in the
same transition that moves the job to RUNNING, and hands the token itself only to the workers.
A relaunch therefore locks out the workers of the run before it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from worker.events import COORDINATOR_ENV

__all__ = [
    "COORDINATOR", "JOB_ID", "JOB_TOKEN", "TLS_CA", "STALL_TIMEOUT", "DEFAULT_STALL_TIMEOUT",
    "WorkerEnvironment", "worker_environment",
    "read_worker_environment",
]

COORDINATOR = COORDINATOR_ENV  # "DPTRAIN_COORDINATOR": the name worker.events switches on
"""``host:port`` of the coordinator's gRPC server, as the workers reach it."""

JOB_ID = "DPTRAIN_JOB_ID"
"""The id of the job the workers belong to."""

JOB_TOKEN = "DPTRAIN_JOB_TOKEN"
"""The job's worker token: valid for `WorkerService` calls about this job only."""

TLS_CA = "DPTRAIN_TLS_CA"
"""Path of the PEM certificate(s) to verify the coordinator's TLS certificate with; unset when
the coordinator listens without TLS."""

STALL_TIMEOUT = "DPTRAIN_STALL_TIMEOUT"
"""Optional: seconds without training progress after which rank 0 stops heartbeating (default
`DEFAULT_STALL_TIMEOUT`), so that a hung collective ends in a heartbeat timeout. Set it above
the longest step a job may take."""

DEFAULT_STALL_TIMEOUT = 300.0


@dataclass(frozen=True)
class WorkerEnvironment:
    """What a worker learns from its environment about the coordinator.

    Attributes:
        address: the coordinator's ``host:port``.
        job_id: the job's id.
        token: the job's worker token.
        tls_ca: the CA certificate path, or None for a plaintext connection.
    """

    address: str
    job_id: str
    token: str
    tls_ca: str | None = None


def worker_environment(address: str, job_id: str, token: str,
                       tls_ca: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables to set on every rank of a job's launch.

    Args:
        address: the coordinator's address as the workers' hosts reach it.
        job_id: the job.
        token: the worker token made for this launch (only its hash is stored).
        tls_ca: the certificate workers verify the server with; None without TLS.

    Returns:
        Name -> value, e.g. for ``worker.launch.LaunchSettings(env=...)``.
    """
    env = {COORDINATOR: address, JOB_ID: job_id, JOB_TOKEN: token}
    if tls_ca is not None:
        env[TLS_CA] = os.fspath(tls_ca)
    return env


def read_worker_environment(environ: Mapping[str, str] | None = None) -> WorkerEnvironment:
    """Read the coordinator's variables back (in a worker).

    Args:
        environ: the environment (default: ``os.environ``).

    Returns:
        The settings.

    Raises:
        KeyError: naming the first required variable that is missing or empty.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for name in (COORDINATOR, JOB_ID, JOB_TOKEN):
        if not environ.get(name):
            raise KeyError(f"{name} is not set: the coordinator sets it for the workers it "
                           f"launches")
        values[name] = environ[name]
    return WorkerEnvironment(values[COORDINATOR], values[JOB_ID], values[JOB_TOKEN],
                             environ.get(TLS_CA) or None)
