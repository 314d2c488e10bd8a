"""How the runner launches a job's workers: settings, paths, the command line and environment,
the run record, and finding a run's processes again.

Everything here is plain functions and small classes, so the command line is tested by
comparing strings (Horovod's pattern) and the process bookkeeping without starting a job.

One attempt of a job is one ``mpiexec`` process started in a new session. MPICH's Hydra puts
its proxy and every rank in sessions of their own, so the ``mpiexec`` process group holds only
``mpiexec``; the runner therefore signals ``mpiexec`` (which forwards SIGTERM to every rank and,
when it is killed, has its proxies kill the ranks) and finds stragglers on this host by a
marker in their environment, ``DPTRAIN_RUN_ID``, which Hydra passes on to every rank.

Files of a job, under ``STATE/jobs/ID/``:

==================  ===========================================================================
``spec.json``       the job spec every rank reads
``checkpoints/``    the worker's ``--checkpoint-dir`` (``step-NNNNNNNN/`` directories)
``worker.log``      every attempt's output, appended, each attempt after a ``====`` header
``run.json``        the current attempt: ``mpiexec``'s pid (= its process group id), its start
                    time, the machine's boot id, the coordinator's pid, the run marker
``hostfile``        the placement as an MPICH hostfile (multi-host clusters only)
==================  ===========================================================================
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from dptrain.coordinator.api import worker_env
from dptrain.coordinator.server.private_files import open_private
from dptrain.coordinator.server.scheduler import Cluster, Launch
from dptrain.worker.mpiexec_command import LaunchSettings, mpiexec_command

__all__ = [
    "RunnerSettings", "JobPaths", "worker_command", "worker_environment", "needs_hostfile",
    "RUN_ID_ENV", "new_run_id", "lock_state_dir", "write_run_record", "read_run_record", "boot_id",
    "process_start_ticks", "marked_processes", "signal_marked", "signal_recorded", "run_alive",
    "kill_group", "failure_message", "write_atomic",
]

#: The environment variable that marks every process of one attempt (not a secret).
RUN_ID_ENV = "DPTRAIN_RUN_ID"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class RunnerSettings:
    """How the runner launches and supervises worker groups.

    Attributes:
        state_dir: the coordinator's state directory (jobs go to ``state_dir/jobs/ID``).
        heartbeat_timeout: seconds without training progress (the workers heartbeat only
            while steps advance) after which a running job counts as failed (its group is
            killed and the restart policy applies); None: never. Passed to the workers
            (``DPTRAIN_HEARTBEAT_TIMEOUT``); it must exceed the longest step, evaluation or
            checkpoint upload.
        startup_grace: seconds a new attempt may take to report its start (imports, data
            loading and fetching the checkpoint come first); at least `heartbeat_timeout`.
        kill_grace: seconds between SIGTERM (workers checkpoint and exit) and SIGKILL.
        python: the interpreter the ranks run (default: the coordinator's).
        mpiexec: the launcher (default: the ``mpiexec`` beside `python`).
        mpiexec_args: extra ``mpiexec`` arguments, e.g. ``("-launcher", "ssh")``.
        blas_threads: BLAS threads per rank (None: leave the environment's setting).
        bind_to: Hydra's ``-bind-to`` for the ranks; None (the default) leaves them unpinned,
            because Hydra pins each job to the first cores of a host without knowing of the
            other jobs the coordinator runs there.
        tls_ca: the CA certificate workers use to verify the coordinator (``DPTRAIN_TLS_CA``).
        extra_env: more variables for every rank.
        log_rate: log lines per second per job streamed as ``log`` events (the log file
            keeps every line).
        log_burst: lines that may be streamed at once before `log_rate` applies.
        error_lines: how many of the last log lines a failed job's error keeps.
        poll_interval: seconds between reads of a running job's log.
    """

    state_dir: Path
    heartbeat_timeout: float | None = 60.0
    startup_grace: float = 120.0
    kill_grace: float = 10.0
    python: str = sys.executable
    mpiexec: str | None = None
    mpiexec_args: tuple[str, ...] = ()
    blas_threads: int | None = 1
    bind_to: str | None = None
    tls_ca: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_rate: float = 50.0
    log_burst: int = 500
    error_lines: int = 20
    poll_interval: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.heartbeat_timeout is not None and self.heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout: must be > 0 seconds or None, got "
                             f"{self.heartbeat_timeout!r}")
        if self.kill_grace < 0:
            raise ValueError(f"kill_grace: must be >= 0 seconds, got {self.kill_grace!r}")

    @classmethod
    def from_object(cls, settings: Any, **overrides: Any) -> RunnerSettings:
        """Settings from another settings object, e.g. the server's ``ServerSettings``.

        Every attribute (or key) with a field's name is taken, then the entries of its
        ``runner_options`` mapping (how ``dptrain serve`` passes ``--heartbeat-timeout``),
        then `overrides`.

        Args:
            settings: a `RunnerSettings`, a mapping, or any object with a ``state_dir``.
            overrides: field values to set.

        Returns:
            The settings.

        Raises:
            ValueError: an option that is not a field, or a bad value.
        """
        if isinstance(settings, RunnerSettings) and not overrides:
            return settings
        get = settings.get if isinstance(settings, Mapping) else (
            lambda name, default: getattr(settings, name, default))
        names = {f.name for f in fields(cls)}
        values = {name: get(name, None) for name in names}
        values = {k: v for k, v in values.items() if v is not None}
        options = dict(get("runner_options", None) or {})
        options.update(overrides)
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"runner options: unknown {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(names))})")
        return cls(**{**values, **options})

    @property
    def jobs_dir(self) -> Path:
        """Where the job directories are."""
        return self.state_dir / "jobs"


@dataclass(frozen=True)
class JobPaths:
    """The files of one job (see the module docstring)."""

    root: Path

    @classmethod
    def of(cls, settings: RunnerSettings, job_id: str) -> JobPaths:
        """The paths of `job_id` under the settings' state directory."""
        return cls(settings.jobs_dir / job_id)

    @property
    def spec(self) -> Path:
        """The job spec the ranks read."""
        return self.root / "spec.json"

    @property
    def checkpoints(self) -> Path:
        """The worker's checkpoint directory."""
        return self.root / "checkpoints"

    @property
    def log(self) -> Path:
        """Every attempt's output."""
        return self.root / "worker.log"

    @property
    def run(self) -> Path:
        """The current attempt's record."""
        return self.root / "run.json"

    @property
    def hostfile(self) -> Path:
        """The placement's hostfile."""
        return self.root / "hostfile"


def needs_hostfile(cluster: Cluster) -> bool:
    """False for a one-host cluster that is this machine (``localhost``): ``mpiexec`` then
    starts every rank here without one."""
    return not (len(cluster.hosts) == 1 and cluster.hosts[0].name in _LOCAL_HOSTS)


def worker_command(launch: Launch, paths: JobPaths, settings: RunnerSettings, *,
                   resume: bool, hostfile: bool) -> list[str]:
    """The command line of one attempt: ``mpiexec`` running ``python -m dptrain.worker`` on every
    rank of the placement, checkpointing to the job's directory, without a progress bar.

    Args:
        launch: the scheduler's decision (its ranks and hosts).
        paths: the job's files.
        settings: interpreter, launcher and BLAS threads.
        resume: pass ``--resume`` (every attempt after the first).
        hostfile: pass ``-f paths.hostfile`` (see `needs_hostfile`).

    Returns:
        The argument list (secrets never appear in it: they travel in the environment).
    """
    return mpiexec_command(LaunchSettings(
        job=str(paths.spec), num_procs=launch.ranks, checkpoint_dir=str(paths.checkpoints),
        resume=resume, hostfile=str(paths.hostfile) if hostfile else None,
        blas_threads=settings.blas_threads, bind_to=settings.bind_to, progress=False,
        python=settings.python, mpiexec=settings.mpiexec,
        mpiexec_args=tuple(settings.mpiexec_args)))


def worker_environment(base: Mapping[str, str], *, job_id: str, token: str, run_id: str,
                       server_address: str | None, tls_ca: str | None = None,
                       heartbeat_timeout: float | None = None,
                       extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one attempt's ``mpiexec`` (Hydra passes it on to every rank).

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


def new_run_id(job_id: str, attempt: int) -> str:
    """A fresh marker for one attempt: ``ID.ATTEMPT.RANDOM``."""
    return f"{job_id}.{attempt}.{secrets.token_hex(4)}"


# ---------------------------------------------------------------- the run record

def lock_state_dir(state_dir: Path) -> IO[str]:
    """Take ``state_dir/runner.lock`` (an exclusive ``flock``, released when the file is
    closed or the process dies, even by kill -9) and write our pid into it.

    Returns:
        The open lock file: keep it open while running, close it to release the lock.

    Raises:
        RuntimeError: another process holds it.
    """
    path = Path(state_dir) / "runner.lock"
    lock_file = os.fdopen(open_private(path, os.O_RDWR | os.O_APPEND), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise RuntimeError(f"{state_dir}: another coordinator is using this state directory "
                           f"(it holds {path})") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def write_atomic(path: Path, text: str) -> None:
    """Write a small file atomically (temporary file, fsync, rename).

    Args:
        path: the file.
        text: its content.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run_record(path: Path, record: Mapping[str, Any]) -> None:
    """Save the current attempt's record (``run.json``) atomically."""
    write_atomic(path, json.dumps(dict(record), indent=1, sort_keys=True) + "\n")


def read_run_record(path: Path) -> dict[str, Any] | None:
    """The saved attempt record, or None when there is none (or it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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


def failure_message(lines: list[str], code: int, detail: str = "", note: str = "") -> str:
    """A failed attempt's error: one line saying what happened, then its last log lines.

    Args:
        lines: the attempt's last log lines.
        code: ``mpiexec``'s exit code.
        detail: why the runner ended the group, if it did (replaces the exit code line).
        note: appended to the first line, e.g. that the restarts are used up.

    Returns:
        The message; its first line names the likeliest cause (the last line mentioning an
        error or a failure, else the last line).
    """
    lines = [line for line in lines if line.strip()]
    if detail:
        summary = detail
    else:
        cause = next((line for line in reversed(lines) if "error" in line.lower()
                      or "failed" in line.lower()), lines[-1] if lines else "")
        summary = f"the worker group exited with code {code}" + (f": {cause}" if cause else "")
    return summary + note + ("\nlast log lines:\n" + "\n".join(lines) if lines else "")


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a process group; False when it is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except OSError:
        return False
