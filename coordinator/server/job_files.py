"""A job's files under the coordinator's state directory, and the small-file helpers the runner
and the launchers write them with.

Files of a job, under ``STATE/jobs/ID/``:

==================  ===========================================================================
``spec.json``       the job spec every rank reads
``checkpoints/``    the worker's ``--checkpoint-dir`` (``step-NNNNNNNN/`` directories)
``worker.log``      every attempt's output, appended, each attempt after a ``====`` header
``run.json``        the current attempt: its number and marker, and what its launcher needs to
                    find it again after a coordinator restart (for ``mpiexec``: its pid, start
                    time and the machine's boot id; for kubernetes: the MPIJob's name and
                    namespace)
==================  ===========================================================================

``STATE/runner.lock`` keeps two coordinators off one state directory.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dptrain.coordinator.server.private_files import open_private, write_private

__all__ = ["JobPaths", "write_run_record", "read_run_record", "lock_state_dir"]


@dataclass(frozen=True)
class JobPaths:
    """The files of one job (see the module docstring)."""

    root: Path

    @classmethod
    def of(cls, jobs_dir: Path, job_id: str) -> JobPaths:
        """The paths of `job_id` under `jobs_dir` (``STATE/jobs``)."""
        return cls(Path(jobs_dir) / job_id)

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


def write_run_record(path: Path, record: Mapping[str, Any]) -> None:
    """Save the current attempt's record (``run.json``) atomically."""
    write_private(path, json.dumps(dict(record), indent=1, sort_keys=True) + "\n")


def read_run_record(path: Path) -> dict[str, Any] | None:
    """The saved attempt record, or None when there is none (or it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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
