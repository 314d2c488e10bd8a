"""The seam between the runner and whatever starts a job's ranks: `Launcher` and `RunHandle`.

The runner's state machine (queued -> running -> restarting -> done, heartbeats, restarts from
the latest checkpoint, recovery after a coordinator restart) speaks only to these two
interfaces. A launcher gets one attempt as a `WorkerLaunch` — the placement (hosts x slots),
the job's files, the environment of every rank, whether to resume — and returns a `RunHandle`
that the runner polls for the exit code and asks to terminate (the workers checkpoint and exit)
or to kill. An attempt may be accepted before its ranks run (a batch queue, pods waiting for
nodes): the handle says so (`RunHandle.started`), and the runner starts its heartbeat clock
only once they run, so a queued attempt is never taken for a hung one. Before an attempt,
`Launcher.preflight` may check that the placement's hosts can run the job at all: its failure
fails the job at once, without counting a restart, since trying again would fail the same way.
After a coordinator restart, `Launcher.recover` finds what a previous coordinator left running
of an attempt, from the attempt's record (``run.json``).

A launcher appends the attempt's output to the file it is given (the runner streams the job's
log from there) and keeps whatever identifies the attempt for `recover` in the run record,
beside the runner's fields (`WorkerLaunch.record`).
"""

from __future__ import annotations

import abc
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from dptrain.coordinator.server.job_files import JobPaths
from dptrain.coordinator.server.scheduler import Placement
from dptrain.worker import environment as worker_env
from dptrain.worker.hostfile import hosts_argument

__all__ = ["Placement", "WorkerLaunch", "RunHandle", "Launcher", "LaunchError", "SharedPath",
           "placement_text", "attempt_environment", "new_run_id", "RUN_ID_ENV"]

#: The environment variable that marks every process of one attempt (not a secret).
RUN_ID_ENV = "DPTRAIN_RUN_ID"


class LaunchError(OSError):
    """The workers could not be started (the message says why)."""


@dataclass(frozen=True)
class SharedPath:
    """A file or directory every rank reads, which must be at the same path on every host.

    Attributes:
        path: the path.
        why: what it is and why it must be there, for the preflight's failure line
            ``no PATH there (WHY)``.
    """

    path: str
    why: str = "it must be on a file system every host shares"


def placement_text(placement: Placement) -> str:
    """A placement for people: ``node1:4,node2:2`` (Hydra's ``-hosts`` form)."""
    return hosts_argument(placement)


def new_run_id(job_id: str, attempt: int) -> str:
    """A fresh marker for one attempt: ``ID.ATTEMPT.RANDOM``."""
    return f"{job_id}.{attempt}.{secrets.token_hex(4)}"


def attempt_environment(base: Mapping[str, str], *, job_id: str, token: str, run_id: str,
                        server_address: str | None, tls_ca: str | os.PathLike | None = None,
                        heartbeat_timeout: float | None = None,
                        extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every rank of one attempt.

    The worker token travels here, never on the command line (where ``ps`` would show it).
    Every inherited ``DPTRAIN_*`` variable is dropped first, so the coordinator's own bearer
    token (``DPTRAIN_TOKEN``) never reaches a worker; the worker gets its job's token instead.

    Args:
        base: the coordinator's environment.
        job_id: the job.
        token: the attempt's worker token (its hash is in the store).
        run_id: the attempt's marker (`RUN_ID_ENV`).
        server_address: the coordinator's address for progress reports; None: the workers
            report to their console only.
        tls_ca: the CA certificate file to verify the coordinator with.
        heartbeat_timeout: the runner's heartbeat timeout, for the workers to heartbeat within.
        extra: more variables (they win over `base`).

    Returns:
        The environment.
    """
    env = {k: v for k, v in base.items() if not k.startswith("DPTRAIN_")}
    env.update(extra or {})
    env.update({RUN_ID_ENV: run_id, "PYTHONUNBUFFERED": "1"})
    if server_address:
        env.update(worker_env.worker_environment(server_address, job_id, token, tls_ca,
                                                 heartbeat_timeout))
    else:
        env.update({worker_env.JOB_ID: job_id, worker_env.JOB_TOKEN: token})
    return env


@dataclass(frozen=True)
class WorkerLaunch:
    """One attempt of one job, as the runner hands it to a launcher.

    Attributes:
        job_id: the job.
        attempt: 1 for the first attempt, then one more for each relaunch.
        run_id: the attempt's marker (secret-free; e.g. for finding its processes again).
        placement: where its ranks run.
        paths: the job's files (spec, checkpoint directory, log, run record).
        env: the environment every rank gets (the worker token is in it: never put it on a
            command line or in a file).
        resume: the ranks resume from the latest checkpoint in ``paths.checkpoints``.
        started_at: when the job started (wall clock), for the run record.
        stop_by: seconds after the launch by which the runner will have stopped the attempt:
            the job's time limit plus the grace its workers get to checkpoint (None: no
            limit). The runner enforces it whatever the launcher; a batch system may be
            given it as its own backstop (Slurm's ``--time``).
    """

    job_id: str
    attempt: int
    run_id: str
    placement: Placement
    paths: JobPaths
    env: Mapping[str, str]
    resume: bool
    started_at: float | None = None
    stop_by: float | None = None

    @property
    def workers(self) -> int:
        """How many ranks the attempt runs (the spec's ``workers``)."""
        return sum(n for _, n in self.placement)

    def record(self) -> dict[str, Any]:
        """The runner's fields of the attempt's run record (a launcher adds its own)."""
        return {"job_id": self.job_id, "attempt": self.attempt, "run_id": self.run_id,
                "started_at": self.started_at, "hosts": placement_text(self.placement)}


class RunHandle(abc.ABC):
    """One started (or recovered) attempt, as the runner supervises it."""

    #: How the attempt is known in the coordinator's log, e.g. ``mpiexec pid 123``.
    description: str = ""

    @abc.abstractmethod
    def poll(self) -> int | None:
        """None while the attempt runs; then its exit code (128 + N when killed by signal N).

        A recovered attempt, whose exit code no one can learn, reports -1 once it is gone.
        """

    @abc.abstractmethod
    def terminate(self) -> None:
        """Ask every rank to stop: each finishes its step, writes a checkpoint and exits."""

    @abc.abstractmethod
    def kill(self) -> None:
        """End every rank now."""

    def started(self) -> bool:
        """Whether the attempt's ranks run (or ran): False while it waits for resources, e.g.
        in a batch queue; once True, it stays True. The runner asks after each `poll`."""
        return True  # a launcher that starts the ranks itself, at once

    def reap(self) -> None:
        """After `poll` reported an exit: let the ranks write their last lines for a moment,
        then end any that are left. Returns when none is left."""
        return None  # a launcher whose attempts exit whole has nothing to do


class Launcher(abc.ABC):
    """Starts a job's ranks on a placement, and finds them again after a restart."""

    @abc.abstractmethod
    def start(self, launch: WorkerLaunch, output: IO[bytes]) -> RunHandle:
        """Start one attempt.

        Args:
            launch: what to start, where.
            output: the job's log, open for appending: every rank's output goes there.

        Returns:
            The attempt's handle.

        Raises:
            LaunchError: the workers cannot be started.
        """

    def preflight(self, placement: Placement, paths: JobPaths,
                  shared: Sequence[SharedPath] = ()) -> None:
        """Check, before an attempt starts, that the placement's hosts can run it (reachable,
        the software and the job's files there); called outside the runner's lock.

        Args:
            placement: where the attempt's ranks would run.
            paths: the job's files.
            shared: more paths the ranks read besides the job's directory (the job's data
                files, the CA certificate they verify the coordinator with).

        Raises:
            LaunchError: one line naming the host and the cause.
        """
        return None  # a launcher whose hosts need no checking

    @abc.abstractmethod
    def recover(self, paths: JobPaths) -> RunHandle | None:
        """The attempt a previous coordinator left behind for this job, if any of it still
        runs (found through ``paths.run``); None when nothing of it is left."""
