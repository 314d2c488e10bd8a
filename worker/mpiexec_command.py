"""The ``mpiexec`` command line: a pure function from launch settings to the argument list
(Horovod's ``mpi_run`` pattern), so that it is tested by comparing strings and shared by
``dptrain run`` and the coordinator's ``mpiexec`` launcher
(`dptrain.coordinator.server.launchers.mpiexec`).

MPICH's Hydra ``mpiexec`` syntax (MPICH, Intel MPI, MVAPICH, the ``mpich`` wheel): ``-n N``
ranks, ``-hosts node1:4,node2:2`` where they run (a placement from `dptrain.worker.hostfile`),
``-launcher-exec CMD`` for the remote shell that starts Hydra's proxy on another host (default
ssh), ``-bind-to core`` to pin each rank to a core, and ``-genv NAME VALUE`` for an environment
variable set on every rank. Hydra hands the rest of its own environment to every rank on every
host, ``HYDRA_*``, ``MPIR_CVAR_*`` and ``FI_*`` variables included.

Ranks run ``python -m mpi4py -m dptrain.worker``: mpi4py calls ``MPI_Abort`` when a rank ends
by an uncaught exception, which is what ends a job spanning hosts (measured: with two hosts,
Hydra leaves the other ranks blocked when one rank raises; MPI_Abort ends them in under a
second).

The launcher is the ``mpiexec`` beside the interpreter (the ``mpich`` wheel's) unless
``DPTRAIN_MPIEXEC`` names another, such as a cluster's own MPI (`default_mpiexec`).

Two defaults matter for speed. Each rank gets one BLAS thread: with more threads than cores
per rank, data-parallel ranks fight over the cores and throughput halves. And each rank is
pinned to its own core: measured on the 2-core VMs here, 2 unpinned ranks trained at 0.6x the
throughput of one rank, pinned ones at 1.3-1.4x (the kernel kept moving the busy-polling ranks
onto the same core). With more ranks than cores, pinning stacks ranks on cores and is slower
than leaving it off (``bind_to=None``; ``dptrain run`` does so itself).

Example:
    >>> mpiexec_command(LaunchSettings("job.yaml", 2, python="/v/bin/python",
    ...                                mpiexec="/v/bin/mpiexec"))  # doctest: +NORMALIZE_WHITESPACE
    ['/v/bin/mpiexec', '-n', '2', '-bind-to', 'core', '-genv', 'OMP_NUM_THREADS', '1',
     '-genv', 'OPENBLAS_NUM_THREADS', '1', '-genv', 'MKL_NUM_THREADS', '1', '/v/bin/python',
     '-m', 'mpi4py', '-m', 'dptrain.worker', 'job.yaml']
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from dptrain.worker.environment import CHECKPOINT_DIR, MPIEXEC, RESUME
from dptrain.worker.hostfile import Placement, hosts_argument, is_local

__all__ = ["LaunchSettings", "mpiexec_command", "default_mpiexec", "BLAS_THREAD_VARIABLES"]

#: The variables that set the BLAS/OpenMP thread count of the libraries numpy may use.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_mpiexec(python: str, environ: Mapping[str, str] | None = None) -> str:
    """The launcher to use: ``$DPTRAIN_MPIEXEC`` (a cluster's own MPI), else the ``mpiexec``
    beside `python` (the virtual environment's, from the mpich wheel).

    Args:
        python: the interpreter path.
        environ: the environment (default: ``os.environ``).

    Returns:
        The path (or name, looked up on ``PATH``) of ``mpiexec``.
    """
    chosen = (os.environ if environ is None else environ).get(MPIEXEC)
    return chosen or os.path.join(os.path.dirname(python), "mpiexec")


@dataclass(frozen=True)
class LaunchSettings:
    """What to launch and how.

    Attributes:
        job: the job file every rank reads, or your own training script (``*.py``), which
            every rank runs as ``python SCRIPT ARGS`` (checkpoint directory and resume passed
            in the environment, ``worker.environment.CHECKPOINT_DIR`` and ``RESUME``).
        workers: the number of ranks, >= 1 (the spec's ``workers``; Hydra's ``-n``).
        checkpoint_dir: passed to the worker as ``--checkpoint-dir`` (None: omitted).
        resume: pass ``--resume``.
        hosts: ``(host, slots)`` pairs to run on (`dptrain.worker.hostfile`); None, or only
            this machine's names, runs every rank here.
        launcher_exec: the remote shell Hydra starts its proxies on other hosts with
            (``-launcher-exec``; called like ssh: ``CMD -x HOST "command"``); None: ssh.
        bind_to: Hydra's ``-bind-to`` unit pinning each rank (``core``, ``hwthread``,
            ``socket`` ...); None leaves ranks unpinned (for more ranks than cores).
        blas_threads: BLAS/OpenMP threads per rank, set through `BLAS_THREAD_VARIABLES`;
            None leaves the environment's setting alone.
        env: further environment variables for every rank (e.g. the coordinator's address),
            in sorted order after the BLAS ones.
        progress: False passes ``--no-progress``.
        python: the interpreter the ranks run (default: this one).
        mpiexec: the launcher (default: `default_mpiexec`).
        mpiexec_args: extra arguments for ``mpiexec``, placed before the program.
        script_args: the arguments of a training script (`job` ``*.py``).
    """

    job: str
    workers: int
    checkpoint_dir: str | None = None
    resume: bool = False
    hosts: Placement | None = None
    launcher_exec: str | None = None
    bind_to: str | None = "core"
    blas_threads: int | None = 1
    env: Mapping[str, str] = field(default_factory=dict)
    progress: bool = True
    python: str = sys.executable
    mpiexec: str | None = None
    mpiexec_args: tuple[str, ...] = ()
    script_args: tuple[str, ...] = ()


def mpiexec_command(settings: LaunchSettings) -> list[str]:
    """The command line that runs a job's worker entry point on ``workers`` ranks.

    Args:
        settings: what to launch.

    Returns:
        The argument list for `subprocess` (no shell involved).

    Raises:
        ValueError: ``workers`` or ``blas_threads`` below 1.
    """
    s = settings
    if isinstance(s.workers, bool) or not isinstance(s.workers, int) or s.workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {s.workers!r}")
    if s.blas_threads is not None and s.blas_threads < 1:
        raise ValueError(f"blas_threads must be >= 1 (or None), got {s.blas_threads!r}")
    cmd = [s.mpiexec or default_mpiexec(s.python), "-n", str(s.workers)]
    if s.hosts and not is_local(s.hosts):
        cmd += ["-hosts", hosts_argument(s.hosts)]
    if s.launcher_exec:
        cmd += ["-launcher-exec", s.launcher_exec]
    if s.bind_to:
        cmd += ["-bind-to", s.bind_to]
    if s.blas_threads is not None:
        for name in BLAS_THREAD_VARIABLES:
            cmd += ["-genv", name, str(s.blas_threads)]
    env = dict(s.env)
    script = os.fspath(s.job).endswith(".py")
    if script and s.checkpoint_dir is not None:
        env[CHECKPOINT_DIR] = os.fspath(s.checkpoint_dir)
    if script and s.resume:
        env[RESUME] = "1"
    for name in sorted(env):
        cmd += ["-genv", name, str(env[name])]
    if script:  # as `python train.py ARGS` on every rank (under mpi4py's runner, as the worker)
        return [*cmd, *s.mpiexec_args, s.python, "-m", "mpi4py", os.fspath(s.job),
                *s.script_args]
    cmd += [*s.mpiexec_args, s.python, "-m", "mpi4py", "-m", "dptrain.worker",
            os.fspath(s.job)]
    if s.checkpoint_dir is not None:
        cmd += ["--checkpoint-dir", os.fspath(s.checkpoint_dir)]
    if s.resume:
        cmd.append("--resume")
    if not s.progress:
        cmd.append("--no-progress")
    return cmd
