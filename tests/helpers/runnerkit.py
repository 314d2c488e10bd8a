"""Fixtures and helpers of the job runner's tests (``test_runner*.py``): a state directory that
must be left without processes, a real SQLite store, runners to start, and cancelling, waiting
and reading a job's events as the server would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobkit import descendants, kill_all, processes_with_env, wait_for

from dptrain.coordinator.api.errors import StateConflict
from dptrain.coordinator.api.records import EventKind, JobState, new_job
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher
from dptrain.coordinator.server.runner import JobRunner, RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.store import SqliteStore

S = JobState


@pytest.fixture
def state_dir(tmp_path: Path):
    """A state directory; afterwards, no process of any job in it may be left."""
    state = tmp_path / "state"
    state.mkdir()
    yield state
    leftovers = []
    for record_file in (state / "jobs").glob("*/run.json"):
        leftovers += processes_with_env(json.loads(record_file.read_text())["run_id"])
    children = descendants(os.getpid())
    kill_all(leftovers + children)
    assert not leftovers, f"processes of the test's jobs were left running: {leftovers}"
    assert not children, f"child processes were left running: {children}"


@pytest.fixture
def store(state_dir: Path):
    with SqliteStore(state_dir / "coordinator.db") as s:
        yield s


@pytest.fixture
def make_runner(state_dir: Path, store: SqliteStore):
    """``make_runner(slots=2, mpiexec=None, **settings) -> started JobRunner`` (``mpiexec``: a
    fake one for the `MpiexecLauncher`); all are stopped at the end."""
    runners: list[JobRunner] = []

    def make(slots: int = 2, start: bool = True, mpiexec: str | None = None,
             **settings) -> JobRunner:
        settings.setdefault("launcher", MpiexecLauncher(mpiexec=mpiexec))
        settings.setdefault("heartbeat_timeout", None)
        settings.setdefault("kill_grace", 3.0)
        settings.setdefault("poll_interval", 0.05)
        runner = JobRunner(store, BlobStore(state_dir / "blobs"), Cluster.local(slots), None,
                           RunnerSettings(state_dir, **settings))
        runners.append(runner)
        if start:
            runner.start()
        return runner

    yield make
    for runner in runners:
        runner.stop()


def submit(store: SqliteStore, runner: JobRunner, job_spec: dict, **options) -> str:
    job = store.create_job(new_job(job_spec["name"], job_spec, **options))
    runner.wake()
    return job.id


def wait_state(store: SqliteStore, job_id: str, *states: JobState, timeout: float = 90):
    return wait_for(lambda: (job := store.get_job(job_id)).state in states and job,
                    timeout, what=f"job {job_id} to be {'/'.join(s.value for s in states)}")


def cancel(store: SqliteStore, runner: JobRunner, job_id: str):
    """Cancel as the server does (`jobs.cancel_job`): the store first (a running job becomes
    CANCELLING, a pending one CANCELLED), then the runner."""
    job = store.get_job(job_id)
    while not job.state.terminal and job.state is not S.CANCELLING:
        target = S.CANCELLING if job.state is S.RUNNING else S.CANCELLED
        try:
            job = store.transition(job_id, job.state, target, error="cancelled by a user")
        except StateConflict:  # it moved meanwhile (e.g. it started): look again
            job = store.get_job(job_id)
    runner.cancel(job_id)
    return job


def states_of(store: SqliteStore, job_id: str) -> list[str]:
    return [e.payload["state"] for e in store.events(job_id) if e.kind is EventKind.STATE]


def log_lines(store: SqliteStore, job_id: str) -> list[str]:
    return [e.payload["line"] for e in store.events(job_id) if e.kind is EventKind.LOG]


def runner_process(state_dir: Path, mpiexec: str, slots: int) -> subprocess.Popen:
    """A coordinator's runner in a child process (and session) of its own, launching through
    the stand-in `mpiexec`, for the test to kill -9."""
    code = (f"import time\nfrom dptrain.coordinator.server.blobs import BlobStore\n"
            f"from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher\n"
            f"from dptrain.coordinator.server.runner import JobRunner, RunnerSettings\n"
            f"from dptrain.coordinator.server.scheduler import Cluster\n"
            f"from dptrain.coordinator.server.store import "
            f"SqliteStore\nstore = SqliteStore({str(state_dir / 'coordinator.db')!r})\n"
            f"JobRunner(store, BlobStore({str(state_dir / 'blobs')!r}), Cluster.local({slots}), "
            f"None, RunnerSettings("
            f"{str(state_dir)!r}, launcher=MpiexecLauncher(mpiexec={mpiexec!r}), "
            f"heartbeat_timeout=None, poll_interval=0.05)).start()\n"
            f"time.sleep(600)\n")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
