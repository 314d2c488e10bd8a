"""`RunnerSettings`: how the job runner supervises attempts, and the launcher that starts them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dptrain.coordinator.server.job_files import JobPaths
from dptrain.coordinator.server.launchers.base import Launcher
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher

__all__ = ["RunnerSettings"]


@dataclass(frozen=True)
class RunnerSettings:
    """How the runner launches and supervises worker groups.

    Attributes:
        state_dir: the coordinator's state directory (jobs go to ``state_dir/jobs/ID``).
        launcher: what starts each attempt's ranks (default: ``mpiexec`` on this machine,
            or on the cluster's hosts through a hostfile).
        heartbeat_timeout: seconds without training progress (the workers heartbeat only
            while steps advance) after which a running job counts as failed (its group is
            killed and the restart policy applies); None: never. Passed to the workers
            (``DPTRAIN_HEARTBEAT_TIMEOUT``); it must exceed the longest step, evaluation or
            checkpoint upload.
        startup_grace: seconds a new attempt may take to report its start (imports, data
            loading and fetching the checkpoint come first); at least `heartbeat_timeout`.
        kill_grace: seconds between asking the ranks to stop (they checkpoint and exit) and
            killing them.
        tls_ca: the CA certificate workers use to verify the coordinator (``DPTRAIN_TLS_CA``).
        extra_env: more variables for every rank.
        log_rate: log lines per second per job streamed as ``log`` events (the log file
            keeps every line).
        log_burst: lines that may be streamed at once before `log_rate` applies.
        error_lines: how many of the last log lines a failed job's error keeps.
        poll_interval: seconds between reads of a running job's log.

    Example::

        RunnerSettings("state", launcher=MpiexecLauncher(mpiexec_args=("-launcher", "ssh")),
                       heartbeat_timeout=300.0)
    """

    state_dir: Path
    launcher: Launcher = field(default_factory=MpiexecLauncher)
    heartbeat_timeout: float | None = 60.0
    startup_grace: float = 120.0
    kill_grace: float = 10.0
    tls_ca: str | Path | None = None
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

    @property
    def jobs_dir(self) -> Path:
        """Where the job directories are."""
        return self.state_dir / "jobs"

    def job_paths(self, job_id: str) -> JobPaths:
        """The files of `job_id` under the state directory."""
        return JobPaths.of(self.jobs_dir, job_id)
