"""Fixtures and helpers of the end-to-end tests with a coordinator served in the test's process
(``test_e2e.py``, ``test_stopping_jobs.py``): a state directory that must be left without
worker or child processes, a served coordinator on two slots, its client."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from jobkit import descendants, kill_all, processes_with_env

from dptrain.coordinator.api.records import Event
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.launchers.mpiexec import read_run_record
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster

RUNNER_OPTIONS = {"heartbeat_timeout": 60.0, "kill_grace": 5.0, "poll_interval": 0.1}


def _leftovers(state_dir: Path) -> list[int]:
    pids = []
    for record_file in (state_dir / "jobs").glob("*/run.json"):
        pids += processes_with_env(json.loads(record_file.read_text())["run_id"])
    return pids


@pytest.fixture
def state_dir(state_dir: Path):
    """The coordinator's state directory; afterwards no worker or child may be left."""
    yield state_dir
    leftovers, children = _leftovers(state_dir), descendants(os.getpid())
    kill_all(leftovers + children)
    assert not leftovers, f"worker processes were left running: {leftovers}"
    assert not children, f"child processes were left running: {children}"


@pytest.fixture
def server(serve_coordinator, state_dir: Path):
    return serve_coordinator(stop_grace=1.0, cluster=Cluster.local(2),
                             runner=RunnerSettings(state_dir, **RUNNER_OPTIONS))


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token) as c:
        yield c


def watch_all(client: Client, job_id: str) -> list[Event]:
    return [item for item in client.watch_job(job_id) if isinstance(item, Event)]


def run_record(state_dir: Path, job_id: str) -> dict:
    return read_run_record(state_dir / "jobs" / job_id / "run.json")
