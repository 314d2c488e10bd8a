"""End to end, what a job's files on disk can do to it: a shipped code archive damaged on the
coordinator's disk, a checkpoint write that hits a full disk. A real coordinator on loopback and
real ``mpiexec`` workers, as in test_e2e.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from jobkit import SLOW_SPEC, descendants, kill_all, wait_for
from small_disk import small_disk

from dptrain.coordinator.api.records import JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.checkpoint_store import verify_record
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.worker.code_archive import pack_directory

pytestmark = [pytest.mark.timeout(240), pytest.mark.e2e, pytest.mark.mpi]
RUNNER_OPTIONS = {"heartbeat_timeout": 60.0, "kill_grace": 5.0, "poll_interval": 0.1}
CUSTOM = Path(__file__).resolve().parents[2] / "examples" / "custom"


def _serve(serve_coordinator, state_dir: Path):
    return serve_coordinator(stop_grace=1.0, cluster=Cluster.local(2),
                             runner=RunnerSettings(state_dir, **RUNNER_OPTIONS))


@pytest.fixture
def server(serve_coordinator, state_dir: Path):
    yield _serve(serve_coordinator, state_dir)
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
    spec = {"name": "own-loop", "workers": 2, "code": f"sha256:{digest}",
            "entrypoint": "train.py --epochs 1"}
    # Submission reads the archive's listing (what code the job may run), so the damage
    # comes after it: the job waits behind one holding both slots meanwhile.
    holder = client.submit_job(SLOW_SPEC)
    wait_for(lambda: client.get_job(holder.id).state is JobState.RUNNING, timeout=180,
             what="the job holding the slots to run")
    job = client.submit_job(spec, max_restarts=3)
    blob = server.blobs.get(digest)
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    # A new submission decides from the listing kept at upload (the archive is not read
    # there): it is queued, and meets the damage where its bytes are used, as the first.
    again = client.submit_job(spec, max_restarts=3)
    client.cancel_job(holder.id)
    for done in (finished(client, job.id), finished(client, again.id)):
        # The worker's hash is the one check of the bytes; the job fails once, not once per
        # restart, and the reason names the archive.
        assert done.state is JobState.FAILED and done.restarts == 0
        assert (f"DATA_LOSS: the code archive sha256:{digest} arrived hashing to sha256 "
                in done.error)
        assert "code:" in done.error, done.error


def test_a_full_disk_under_the_workers_checkpoints_fails_the_job_with_the_reason(
        server, client, state_dir, tmp_path):
    # The job directories (the workers' checkpoints) on a disk of their own, the blobs not:
    # 8 MiB hold two of this job's 3.6 MB checkpoints, and the third meets ENOSPC.
    with small_disk(state_dir / "jobs", size_mib=8):
        job = client.submit_job(SLOW_SPEC, max_restarts=3)
        done = finished(client, job.id)
        kill_all(descendants(os.getpid()))
    assert done.state is JobState.FAILED, done.error
    assert (done.exit_code, done.restarts) == (4, 0)  # EXIT_DISK_FULL: not restarted
    checkpoints = state_dir / "jobs" / job.id / "checkpoints"
    found = re.search(r"^dptrain worker: error: no space left to write the checkpoint of step "
                      rf"(\d+) under {re.escape(str(checkpoints))} \(No space left on device\); "
                      r"the checkpoints written before are intact: free space there, then "
                      r"resume$", done.error, re.MULTILINE)
    assert found, done.error
    failed_step = int(found.group(1))
    # What the workers uploaded before is stored and intact.
    records = server.store.list_checkpoints(job.id)
    assert records and all(r.step < failed_step for r in records)
    for record in records:
        verify_record(record, server.blobs)


def test_a_full_disk_under_the_blobs_fails_the_uploading_job_once(serve_coordinator, state_dir):
    # The blob store on a disk of its own, 2 MiB: the job's first checkpoint (3.6 MB) does not
    # fit, while its directory, the database and the log have room.
    state_dir.mkdir(mode=0o700)
    with small_disk(state_dir / "blobs", size_mib=2):
        server = _serve(serve_coordinator, state_dir)
        with Client(server.address, token=server.token) as client:
            job = client.submit_job(SLOW_SPEC, max_restarts=3)
            done = finished(client, job.id)
            kill_all(descendants(os.getpid()))
            # The coordinator goes on serving, and the job's files are where they were.
            assert [j.id for j in client.list_jobs()[0]] == [job.id]
            assert client.list_checkpoints(job.id) == []
        assert list((state_dir / "blobs" / "tmp").iterdir()) == []
    assert done.state is JobState.FAILED and done.restarts == 0, done.error
    # A worker's upload met the full disk; the coordinator failed the job and ended its
    # workers (not a restart into the same disk).
    assert re.fullmatch(r"the checkpoint of step 10 cannot be stored: coordinator disk full "
                        rf"under {re.escape(str(state_dir / 'blobs'))}: \d+ bytes needed; "
                        r"nothing was stored \(free space there, then retry\)", done.error), (
        done.error)
    assert (state_dir / "jobs" / job.id / "checkpoints" / "step-00000010" / "manifest.json"
            ).is_file()
