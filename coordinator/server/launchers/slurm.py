"""`SlurmLauncher`: each attempt of a job as one Slurm batch job (``sbatch``), its ranks started
inside the allocation by ``srun --mpi=pmi2``.

The batch script is a pure function of the launcher's settings and the attempt
(`SlurmLauncher.script`), tested by comparing strings (Horovod's pattern). The ranks run as
``python -m mpi4py -m dptrain.worker``, so that an uncaught exception on any rank aborts the
whole job, and ``srun --kill-on-bad-exit=1`` ends the step when one rank dies (a killed rank
leaves the others waiting in a collective otherwise). ``srun --mpi=pmi2`` wires the ranks to
Slurm's PMI-2 server, which the ``mpich`` wheel speaks; ``--mpi=none`` would start every rank as
a world of its own (the workers refuse to run so: `dptrain.worker.environment.SLURM_NTASKS`),
and the wheel has no PMIx. ``srun`` rather than the venv's ``mpiexec`` inside the allocation:
Slurm then starts, signals and accounts for the ranks themselves (``scancel`` reaches them
directly), and Hydra would only add a proxy between the two (``bench/slurm_launch.py``
measures both).

Secrets. The worker token is in the attempt's environment, never in the script or on a command
line: ``sbatch --export=ALL`` hands the submitting environment to the job, and slurmctld keeps it
in its state directory (readable by the Slurm user only); ``scontrol show job`` does not show it.

States come from ``scontrol show job -o`` (``JobState=``, and the exit code from
``ExitCode=CODE:SIGNAL``); once Slurm has forgotten a finished job (after ``MinJobAge``), from
``sacct`` where accounting is enabled (without slurmdbd it fails: "accounting storage is
disabled"). Terminate is ``scancel --signal=TERM`` (the job's steps, i.e. every rank: each
checkpoints and exits); kill is ``scancel --signal=KILL --full`` and then ``scancel``. The Slurm job
id goes into the attempt's ``run.json``, and the job's name carries the attempt's marker
(``dptrain-RUN_ID``), so that a coordinator restarted after a kill -9 finds the job again, even
when it died between ``sbatch`` and writing the id (`SlurmLauncher.recover`).
"""

from __future__ import annotations

import logging
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from dptrain.coordinator.server.job_files import JobPaths, read_run_record, write_run_record
from dptrain.coordinator.server.launchers.base import (
    Launcher,
    LaunchError,
    RunHandle,
    WorkerLaunch,
)
from dptrain.coordinator.server.private_files import write_private
from dptrain.worker.mpiexec_command import BLAS_THREAD_VARIABLES

__all__ = ["SlurmLauncher", "slurm_minutes", "SlurmJobState", "parse_scontrol", "job_state",
           "partition_cpus", "SCRIPT_NAME"]

log = logging.getLogger("dptrain.coordinator.launchers.slurm")

#: The batch script's file name in the job's directory.
SCRIPT_NAME = "job.sbatch"

#: Slurm job states in which the job is over (its base state, ``scontrol``'s ``JobState``).
_FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                       "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "FORGOTTEN"})
#: Slurm job states in which the job's tasks have not started yet (queued, or its nodes are
#: being readied): the runner's heartbeat clock waits (`RunHandle.started`).
_WAITING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                      "RESV_DEL_HOLD"})
#: A finished job that Slurm no longer knows (no accounting): its exit code is unknown, -1.
_FORGOTTEN = "FORGOTTEN"
_QUERY_EVERY_S = 1.0  # a running job's state is asked of slurmctld at most this often
_SILENT_AFTER_KILL_S = 60.0  # then a killed job that Slurm says nothing of counts as gone


@dataclass(frozen=True)
class SlurmJobState:
    """What Slurm says of one job.

    Attributes:
        state: its base state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``CANCELLED`` ...).
        exit_code: for a finished job, the batch script's exit code (128 + N when a signal N
            ended it); None while it runs.
    """

    state: str
    exit_code: int | None

    @property
    def finished(self) -> bool:
        """Whether the job is over."""
        return self.state in _FINISHED

    @property
    def waiting(self) -> bool:
        """Whether the job waits for its tasks to start (e.g. ``PENDING`` in the queue)."""
        return self.state in _WAITING


def _exit_code(text: str) -> int:
    """Slurm's ``CODE:SIGNAL`` as one exit code, 128 + SIGNAL when a signal ended the script."""
    code, _, sig = text.partition(":")
    return 128 + int(sig) if sig.isdigit() and int(sig) else int(code or 0)


def parse_scontrol(text: str) -> SlurmJobState | None:
    """One job's state from ``scontrol show job -o ID`` (``Key=Value`` fields on one line).

    Args:
        text: the command's output.

    Returns:
        The state, or None when the output names none.
    """
    fields = dict(word.split("=", 1) for word in text.split() if "=" in word)
    state = fields.get("JobState")
    if not state:
        return None
    return SlurmJobState(state, _exit_code(fields.get("ExitCode", "0:0"))
                         if state in _FINISHED else None)


def slurm_minutes(seconds: float) -> int:
    """Slurm's ``--time`` (minutes) for an attempt the runner stops within `seconds`: rounded
    up, plus a minute, so Slurm's limit never cuts the coordinator's graceful stop short.

    >>> slurm_minutes(60), slurm_minutes(61.5)
    (2, 3)
    """
    return math.ceil(seconds / 60) + 1


def _run(command: Sequence[str], env: Mapping[str, str] | None = None,
         cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a Slurm command; a missing program is a `LaunchError` naming it."""
    try:
        return subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=cwd,
                              stdin=subprocess.DEVNULL, timeout=120)
    except FileNotFoundError:
        raise LaunchError(f"{command[0]}: not found: the Slurm client commands (sbatch, "
                          f"squeue, scontrol, scancel) must be on the coordinator's PATH"
                          ) from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{command[0]}: no answer within 120 s (is slurmctld up?)") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def job_state(job_id: int) -> SlurmJobState | None:
    """What Slurm says of a job: from ``scontrol``, else from ``sacct`` once scontrol has
    forgotten it; `_FORGOTTEN` (exit code -1) when neither knows it; None when slurmctld does
    not answer."""
    got = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if got.returncode == 0:
        return parse_scontrol(got.stdout)
    if "invalid job id" not in (got.stdout + got.stderr).lower():
        return None  # slurmctld busy or restarting: ask again later
    try:
        got = _run(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job_id}",
                    "--format=State,ExitCode"])
    except LaunchError:  # no sacct here: Slurm has forgotten the job all the same
        return SlurmJobState(_FORGOTTEN, -1)
    line = got.stdout.strip().splitlines()[:1] if got.returncode == 0 else []
    if not line or "|" not in line[0]:
        return SlurmJobState(_FORGOTTEN, -1)
    state, code = line[0].split("|", 1)
    state = state.split()[0]  # "CANCELLED by 0"
    return SlurmJobState(state, _exit_code(code) if state in _FINISHED else None)


def partition_cpus(partition: str | None = None) -> int:
    """How many CPUs a partition has (``sinfo``'s ``%C`` total), the default partition's
    when `partition` is None: the slots ``dptrain serve --launcher slurm`` schedules by default.

    Raises:
        LaunchError: ``sinfo`` fails or knows no such partition.
    """
    got = _run(["sinfo", "--noheader", "--format=%P %C"])
    if got.returncode != 0:
        raise LaunchError(f"sinfo: {_one_line(got.stderr) or 'failed'}")
    for line in got.stdout.splitlines():
        name, _, cpus = line.partition(" ")
        default = name.endswith("*")
        if (partition is None and default) or name.rstrip("*") == partition:
            return int(cpus.split("/")[-1])
    raise LaunchError(f"partition: Slurm has no {'default ' if partition is None else ''}"
                      f"partition{'' if partition is None else f' {partition!r}'} (sinfo)")


@dataclass(frozen=True)
class SlurmLauncher(Launcher):
    """Submits each attempt as one ``sbatch`` job running ``srun --mpi=pmi2 python -m mpi4py -m
    dptrain.worker`` on every rank, checkpointing to the job's directory.

    The job's directory and the virtual environment must be on a filesystem the compute nodes
    share with the coordinator (the same paths).

    Attributes:
        python: the interpreter the ranks run (default: the coordinator's).
        partition: ``--partition`` (None: Slurm's default partition).
        account: ``--account`` (None: the user's default account).
        sbatch_args: more ``#SBATCH`` options, e.g. ``("--time=02:00:00", "--qos=normal")``.
            Without a ``--time`` there, a job with a time limit gets ``--time`` of its
            `WorkerLaunch.stop_by` rounded up to minutes, plus one: Slurm's own limit, a
            backstop that never fires before the coordinator's graceful stop.
        blas_threads: BLAS threads per rank (None: leave the environment's setting).
    """

    python: str = sys.executable
    partition: str | None = None
    account: str | None = None
    sbatch_args: tuple[str, ...] = ()
    blas_threads: int | None = 1

    def script(self, launch: WorkerLaunch) -> str:
        """The batch script of one attempt.

        Args:
            launch: the attempt.

        Returns:
            The script's text (it holds no secret: those travel in the environment).

        Example::

            #!/bin/sh
            #SBATCH --job-name=dptrain-RUN_ID
            #SBATCH --ntasks=2
            #SBATCH --output=/state/jobs/ID/worker.log
            #SBATCH --open-mode=append
            #SBATCH --chdir=/state/jobs/ID
            umask 077
            export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
            exec srun --mpi=pmi2 --kill-on-bad-exit=1 /venv/bin/python -m mpi4py -m ...
        """
        paths, q = launch.paths, shlex.quote
        options = [f"--job-name=dptrain-{launch.run_id}", f"--ntasks={launch.workers}",
                   f"--output={paths.log}", "--open-mode=append", f"--chdir={paths.root}"]
        if self.partition:
            options.append(f"--partition={self.partition}")
        if self.account:
            options.append(f"--account={self.account}")
        options += self.sbatch_args
        if launch.stop_by is not None and not any(
                arg.startswith(("--time", "-t")) for arg in self.sbatch_args):
            options.append(f"--time={slurm_minutes(launch.stop_by)}")
        lines = ["#!/bin/sh", *(f"#SBATCH {q(option)}" for option in options),
                 "umask 077"]  # what the ranks write (checkpoints) is private, as with mpiexec
        if self.blas_threads is not None:
            lines.append("export " + " ".join(f"{name}={self.blas_threads}"
                                              for name in BLAS_THREAD_VARIABLES))
        worker = [self.python, "-m", "mpi4py", "-m", "dptrain.worker", str(paths.spec),
                  "--checkpoint-dir", str(paths.checkpoints)]
        if launch.resume:
            worker.append("--resume")
        worker.append("--no-progress")
        lines.append("exec srun --mpi=pmi2 --kill-on-bad-exit=1 " + shlex.join(worker))
        return "\n".join(lines) + "\n"

    def start(self, launch: WorkerLaunch, output: IO[bytes]) -> RunHandle:
        """Write the script into the job's directory and ``sbatch`` it; the ranks append
        their output to the job's log themselves (``--output``, ``--open-mode=append``)."""
        paths = launch.paths
        script = paths.root / SCRIPT_NAME
        record = {**launch.record(), "launcher": "slurm", "slurm_job_id": None}
        try:
            write_private(script, self.script(launch))
            write_run_record(paths.run, record)  # before sbatch: a crash now leaves a marker
        except OSError as e:
            raise LaunchError(f"{e.filename}: {e.strerror or e}") from None
        # --export=ALL on the command line beats a site's SBATCH_EXPORT: the worker token and
        # the coordinator's address reach the ranks only through the environment.
        got = _run(["sbatch", "--parsable", "--export=ALL", str(script)], env=launch.env,
                   cwd=str(paths.root))
        job_id = got.stdout.strip().split(";")[0]
        if got.returncode != 0 or not job_id.isdigit():
            said = [line.strip().removeprefix("sbatch: error: ").removeprefix("sbatch: ")
                    for line in (got.stderr or got.stdout).splitlines() if line.strip()]
            raise LaunchError(f"sbatch: {'; '.join(said) or 'failed'}")
        write_run_record(paths.run, {**record, "slurm_job_id": int(job_id)})
        return _SlurmRun(int(job_id))

    def recover(self, paths: JobPaths) -> RunHandle | None:
        """The recorded attempt's Slurm job, if it is still pending or running."""
        record = read_run_record(paths.run) or {}
        job_id = record.get("slurm_job_id")
        if not isinstance(job_id, int) and record.get("run_id"):
            job_id = _job_named(f"dptrain-{record['run_id']}")
        if not isinstance(job_id, int):
            return None
        state = job_state(job_id)
        if state is not None and state.finished:
            return None
        return _SlurmRun(job_id, recovered=True)


def _job_named(name: str) -> int | None:
    """The id of this user's pending or running job called `name`, if there is one."""
    got = _run(["squeue", "--noheader", "--me", f"--name={name}", "--format=%i"])
    ids = [int(word) for word in got.stdout.split() if word.isdigit()]
    return ids[0] if got.returncode == 0 and ids else None


class _SlurmRun(RunHandle):
    """One attempt's Slurm job, known by its id."""

    def __init__(self, job_id: int, recovered: bool = False):
        self.job_id = job_id
        self.description = f"slurm job {job_id}" + (" (recovered)" if recovered else "")
        self._asked_at = float("-inf")
        self._killed_at: float | None = None
        self._code: int | None = None
        self._started = False

    def started(self) -> bool:
        return self._started

    def poll(self) -> int | None:
        if self._code is not None or time.monotonic() - self._asked_at < _QUERY_EVERY_S:
            return self._code
        self._asked_at = time.monotonic()
        try:
            state = job_state(self.job_id)
        except LaunchError:  # scontrol missing or not answering: as if slurmctld were silent
            state = None
        if state is not None and not state.waiting:
            self._started = True
        if state is not None and state.finished:
            self._code = state.exit_code
        elif (state is None and self._killed_at is not None
              and time.monotonic() - self._killed_at > _SILENT_AFTER_KILL_S):
            # Slurm does not answer (slurmctld down, the configuration gone): after a kill,
            # waiting on would keep the coordinator from ever stopping.
            self._code = -1
        return self._code

    def terminate(self) -> None:
        # The TERM goes to the job's steps, i.e. to every rank (not to the batch shell, which
        # exec'd srun). A job still waiting in the queue has no steps: it is cancelled.
        if not _scancel(["--signal=TERM"], self.job_id):
            _scancel([], self.job_id)

    def kill(self) -> None:
        if self._killed_at is None:
            self._killed_at = time.monotonic()
        _scancel(["--signal=KILL", "--full"], self.job_id)
        _scancel([], self.job_id)


def _scancel(options: list[str], job_id: int) -> bool:
    """``scancel OPTIONS JOB``; whether it succeeded (a failure is logged, never raised: the
    runner escalates to a kill, and `poll` learns when the job is gone)."""
    try:
        got = _run(["scancel", *options, str(job_id)])
    except LaunchError as e:
        log.warning("slurm job %d: %s", job_id, e)
        return False
    if got.returncode != 0:
        log.info("slurm job %d: scancel %s: %s", job_id, " ".join(options),
                 _one_line(got.stderr))
    return got.returncode == 0
