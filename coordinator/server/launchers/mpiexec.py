"""`MpiexecLauncher`: a job's ranks as one local ``mpiexec`` (MPICH's Hydra), on this machine or
on a hostfile's hosts (``-hosts node1:4,node2:2``, started over ssh or ``launcher_exec``).

The command line is a pure function of the launcher's settings and the attempt
(`MpiexecLauncher.command`), tested by comparing strings (Horovod's pattern); it is built by
`dptrain.worker.mpiexec_command`, which ``dptrain run`` uses too.

One attempt is one ``mpiexec`` process started in a new session. Hydra puts its proxy and every
rank in sessions of their own, so the ``mpiexec`` process group holds only ``mpiexec``; the
launcher therefore signals ``mpiexec`` (which forwards SIGTERM to every rank and, when it is
killed, has its proxies kill the ranks) and finds stragglers on this host by a marker in their
environment, ``DPTRAIN_RUN_ID``, which Hydra passes on to every rank. ``run.json`` keeps
``mpiexec``'s pid (= its process group id), its start time and the machine's boot id, so that
a restarted coordinator finds the attempt again (`MpiexecLauncher.recover`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from dptrain.coordinator.server.job_files import (
    JobPaths,
    read_run_record,
    write_run_record,
)
from dptrain.coordinator.server.launchers.base import (
    RUN_ID_ENV,
    Launcher,
    LaunchError,
    Placement,
    RunHandle,
    SharedPath,
    WorkerLaunch,
)
from dptrain.coordinator.server.launchers.preflight import preflight_commands, run_preflight
from dptrain.coordinator.server.private_files import PRIVATE_UMASK
from dptrain.worker.mpiexec_command import LaunchSettings, mpiexec_command

__all__ = [
    "MpiexecLauncher", "boot_id", "process_start_ticks", "marked_processes", "signal_marked",
    "signal_recorded", "run_alive", "kill_group",
]

_STRAGGLER_GRACE_S = 2.0  # after mpiexec exits, for its proxy and ranks to finish writing


@dataclass(frozen=True)
class MpiexecLauncher(Launcher):
    """Starts each attempt as one ``mpiexec`` running ``python -m mpi4py -m dptrain.worker`` on
    every rank, checkpointing to the job's directory, without a progress bar; beyond this
    machine, after a preflight of the placement's hosts (`preflight`).

    Attributes:
        python: the interpreter the ranks run (default: the coordinator's).
        mpiexec: the ``mpiexec`` to run (default: the one beside `python`).
        mpiexec_args: extra ``mpiexec`` arguments, e.g. ``("-iface", "ib0")``.
        launcher_exec: the remote shell that reaches the other hosts (Hydra's
            ``-launcher-exec``; None: ssh). The preflight uses it too.
        blas_threads: BLAS threads per rank (None: leave the environment's setting).
        bind_to: Hydra's ``-bind-to`` for the ranks; None (the default) leaves them unpinned,
            because Hydra pins each job to the first cores of a host without knowing of the
            other jobs the coordinator runs there.
    """

    python: str = sys.executable
    mpiexec: str | None = None
    mpiexec_args: tuple[str, ...] = ()
    launcher_exec: str | None = None
    blas_threads: int | None = 1
    bind_to: str | None = None

    def command(self, launch: WorkerLaunch) -> list[str]:
        """The command line of one attempt (``-hosts`` beyond this machine).

        Args:
            launch: the attempt.

        Returns:
            The argument list (secrets never appear in it: they travel in the environment).
        """
        paths = launch.paths
        return mpiexec_command(LaunchSettings(
            job=str(paths.spec), workers=launch.workers, checkpoint_dir=str(paths.checkpoints),
            resume=launch.resume,
            hosts=launch.placement, launcher_exec=self.launcher_exec,
            blas_threads=self.blas_threads, bind_to=self.bind_to, progress=False,
            python=self.python, mpiexec=self.mpiexec, mpiexec_args=tuple(self.mpiexec_args)))

    def start(self, launch: WorkerLaunch, output: IO[bytes]) -> RunHandle:
        """Start ``mpiexec`` in a session of its own, output appended to `output`."""
        paths = launch.paths
        command = self.command(launch)
        record = {**launch.record(), "pgid": None, "pid_start_ticks": None,
                  "boot_id": boot_id(), "coordinator_pid": os.getpid(), "command": command}
        try:
            write_run_record(paths.run, record)  # before Popen: a crash now leaves a marker
        except OSError as e:
            raise LaunchError(f"{e.filename}: {e.strerror or e}") from None
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, env=dict(launch.env),
                                    cwd=paths.root, start_new_session=True,
                                    umask=PRIVATE_UMASK)
        except OSError as e:
            raise LaunchError(f"{command[0]}: {e.strerror or e}") from None
        write_run_record(paths.run, {**record, "pgid": proc.pid,
                                     "pid_start_ticks": process_start_ticks(proc.pid)})
        return _MpiexecRun(proc, launch.run_id)

    def preflight(self, placement: Placement, paths: JobPaths,
                  shared: Sequence[SharedPath] = ()) -> None:
        """Reach every other host of `placement` through the remote shell Hydra would use,
        and check the interpreter, dptrain's version, the job's directory and the `shared`
        paths there (`dptrain.coordinator.server.launchers.preflight`).

        Raises:
            LaunchError: one line naming the first host that failed and why.
        """
        run_preflight(preflight_commands(placement, python=self.python,
                                         paths=[paths.root, *shared],
                                         launcher_exec=self.launcher_exec))

    def recover(self, paths: JobPaths) -> RunHandle | None:
        """The recorded attempt's processes on this machine, if any still runs."""
        record = read_run_record(paths.run) or {}
        return _RecordedRun(record) if record and run_alive(record) else None


class _MpiexecRun(RunHandle):
    """An attempt this coordinator started: its ``mpiexec`` child and the run marker."""

    def __init__(self, proc: subprocess.Popen, run_id: str):
        self.proc, self.run_id = proc, run_id
        self.description = f"mpiexec pid {proc.pid}"

    def poll(self) -> int | None:
        code = self.proc.poll()
        return None if code is None else 128 - code if code < 0 else code

    def terminate(self) -> None:
        kill_group(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        kill_group(self.proc.pid, signal.SIGKILL)
        signal_marked(self.run_id, signal.SIGKILL)

    def reap(self) -> None:
        # mpiexec has exited, but Hydra's proxy and the ranks (in sessions of their own,
        # holding the log file too) may still be writing their last lines, the final metrics
        # among them: let them finish for a moment, then end any straggler.
        deadline = time.monotonic() + _STRAGGLER_GRACE_S
        while marked_processes(self.run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_marked(self.run_id, signal.SIGKILL)


class _RecordedRun(RunHandle):
    """An attempt a previous coordinator started, known by its ``run.json``."""

    def __init__(self, record: Mapping[str, Any]):
        self.record = dict(record)
        self.description = f"mpiexec pid {record.get('pgid')} (recovered)"

    def poll(self) -> int | None:
        return None if run_alive(self.record) else -1

    def terminate(self) -> None:
        signal_recorded(self.record, signal.SIGTERM)

    def kill(self) -> None:
        signal_marked(str(self.record.get("run_id", "")), signal.SIGKILL)


# ---------------------------------------------------------------- finding processes again

def boot_id() -> str | None:
    """This boot of the machine (Linux), so a record from before a reboot is known stale."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot; Linux), or None if it is gone.

    With the pid, it identifies a process across pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _proc_pids() -> Iterator[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def marked_processes(run_id: str) -> list[int]:
    """The pids of this machine's processes whose environment carries ``DPTRAIN_RUN_ID=run_id``
    (``mpiexec``, Hydra's proxy and every rank of the attempt). Linux only; [] elsewhere."""
    marker = f"{RUN_ID_ENV}={run_id}".encode()
    found = []
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:  # gone, or not ours
            continue
    return found


def signal_marked(run_id: str, sig: int) -> int:
    """Send `sig` to every process of an attempt on this machine.

    Returns:
        How many processes were signalled.
    """
    sent = 0
    for pid in marked_processes(run_id):
        try:
            os.kill(pid, sig)
            sent += 1
        except OSError:
            pass
    return sent


def run_alive(record: Mapping[str, Any]) -> bool:
    """Whether any process of the recorded attempt still runs on this machine.

    A record from another boot describes nothing alive. Otherwise the marked processes are
    looked for; where ``/proc`` is missing, ``mpiexec``'s process group is probed instead.
    """
    if record.get("boot_id") and record.get("boot_id") != boot_id():
        return False
    if os.path.isdir("/proc"):
        return bool(marked_processes(str(record.get("run_id", ""))))
    try:  # pragma: no cover - systems without /proc
        os.killpg(int(record["pgid"]), 0)
        return True
    except (OSError, KeyError, ValueError):  # pragma: no cover
        return False


def signal_recorded(record: Mapping[str, Any], sig: int) -> None:
    """Signal a recorded attempt: its ``mpiexec`` when that still runs (it forwards SIGTERM to
    every rank), else every marked process of the attempt on this machine."""
    pgid = record.get("pgid")
    if isinstance(pgid, int) and process_start_ticks(pgid) == record.get("pid_start_ticks"):
        kill_group(pgid, sig)
    else:
        signal_marked(str(record.get("run_id", "")), sig)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a process group; False when it is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except OSError:
        return False
