"""A real worker process (MPI's singleton world, no mpiexec) against a real coordinator on
loopback: its reporter streams progress and uploads every checkpoint, and a second launch with
``--resume`` and an empty checkpoint directory fetches the latest one from the coordinator and
continues from it. The runner is simulated as in test_service.py (`_launch`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from repo import REPO

from dptrain.coordinator.api.records import EventKind, JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.worker.environment import worker_environment

pytestmark = [pytest.mark.e2e, pytest.mark.mpi]
SPEC = {
    "name": "resume", "model": {"name": "mlp", "args": {"in_features": 8, "hidden": [16],
                                                       "num_classes": 3}},
    "dataset": {"name": "synthetic", "args": {"n": 256, "features": 8, "classes": 3}},
    "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 16, "max_steps": 6,
    "workers": 1, "checkpoint": {"every_steps": 2, "keep": 2},
}


def _run_worker(job_file: Path, checkpoint_dir: Path, env: dict[str, str], *flags: str):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "dptrain.worker", str(job_file),
         "--checkpoint-dir", str(checkpoint_dir),
         "--no-progress", *flags], cwd=REPO, env=environ, capture_output=True, text=True,
        timeout=120)


@pytest.fixture
def server(serve_coordinator):
    return serve_coordinator(cluster=Cluster.local(2))


def test_worker_reports_uploads_and_resumes_from_the_coordinator(server, tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({**SPEC, "max_steps": 4}))
    with Client(server.address, token=server.token) as client:
        job = client.submit_job(SPEC)
        token = new_token()  # what the runner does at launch
        server.store.transition(job.id, JobState.QUEUED, JobState.RUNNING,
                                token_hash=hash_token(token))
        first = _run_worker(job_file, tmp_path / "run1",
                            worker_environment(server.address, job.id, token))
        assert first.returncode == 0, first.stderr
        assert [c.step for c in client.list_checkpoints(job.id)] == [2, 4]
        events = server.store.events(job.id)
        steps = [e.payload["step"] for e in events if e.kind is EventKind.METRICS]
        assert steps[0] == 0 and 4 in steps  # the start, then the steps
        assert server.store.get_job(job.id).metrics["total_steps"] == 4

        # The runner relaunches with a fresh token; the new checkpoint directory is empty.
        server.store.transition(job.id, JobState.RUNNING, JobState.RESTARTING)
        token = new_token()
        server.store.transition(job.id, JobState.RESTARTING, JobState.RUNNING,
                                token_hash=hash_token(token))
        job_file.write_text(json.dumps(SPEC))  # max_steps 6: two more steps
        second = _run_worker(job_file, tmp_path / "run2",
                             worker_environment(server.address, job.id, token), "--resume")
        assert second.returncode == 0, second.stderr
        assert "resumed from" in second.stderr and "step-00000004" in second.stderr
        final = json.loads(second.stdout.strip().splitlines()[-1])
        assert final["status"] == "completed" and final["step"] == 6
        assert [c.step for c in client.list_checkpoints(job.id)] == [4, 6]
        assert server.store.get_job(job.id).last_step == 6


def test_a_run_resumed_at_its_final_step_uploads_the_checkpoint_it_ends_with(server, tmp_path):
    # Its final checkpoint was written while no coordinator was listening; the attempt that
    # resumes there writes nothing new, but must still hand the coordinator that checkpoint.
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(SPEC))
    alone = _run_worker(job_file, tmp_path / "ckpt", {})
    assert alone.returncode == 0, alone.stderr
    with Client(server.address, token=server.token) as client:
        job = client.submit_job(SPEC)
        token = new_token()
        server.store.transition(job.id, JobState.QUEUED, JobState.RUNNING,
                                token_hash=hash_token(token))
        again = _run_worker(job_file, tmp_path / "ckpt",
                            worker_environment(server.address, job.id, token), "--resume")
        assert again.returncode == 0, again.stderr
        assert "at step 6 " in again.stderr
        [stored] = client.list_checkpoints(job.id)
    local = json.loads((tmp_path / "ckpt" / "step-00000006" / "manifest.json").read_text())
    assert stored.step == 6 and stored.manifest["files"] == local["files"]
