"""End to end, what a job's files on disk can do to it: a shipped code archive damaged on the
coordinator's disk, a checkpoint write that hits a full disk. A real coordinator on loopback and
real ``mpiexec`` workers, as in test_e2e.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from jobkit import descendants, kill_all

from dptrain.coordinator.api.records import JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.worker.code_archive import pack_directory

pytestmark = [pytest.mark.timeout(240), pytest.mark.e2e, pytest.mark.mpi]
RUNNER_OPTIONS = {"heartbeat_timeout": 60.0, "kill_grace": 5.0, "poll_interval": 0.1}
CUSTOM = Path(__file__).resolve().parents[2] / "examples" / "custom"


@pytest.fixture
def server(serve_coordinator, state_dir: Path):
    server = serve_coordinator(stop_grace=1.0, cluster=Cluster.local(2),
                               runner=RunnerSettings(state_dir, **RUNNER_OPTIONS))
    yield server
    kill_all(descendants(os.getpid()))


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token) as c:
        yield c


def finished(client: Client, job_id: str):
    for _ in client.watch_job(job_id):  # ends when the job does
        pass
    return client.get_job(job_id)


def test_a_code_archive_damaged_on_the_coordinators_disk_fails_the_job_at_once(
        server, client, tmp_path):
    data = pack_directory(CUSTOM).data
    digest = client.upload_code(data)
    blob = server.blobs.get(digest)
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    job = client.submit_job({"name": "own-loop", "workers": 2, "code": f"sha256:{digest}",
                             "entrypoint": "train.py --epochs 1"}, max_restarts=3)
    done = finished(client, job.id)
    # The worker's hash is the one check of the bytes; the job fails once, not once per
    # restart, and the reason names the archive.
    assert done.state is JobState.FAILED and done.restarts == 0
    assert f"DATA_LOSS: the code archive sha256:{digest} arrived hashing to sha256 " in done.error
    assert "code:" in done.error, done.error
