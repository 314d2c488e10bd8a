"""A full disk under the coordinator's state directory, for real: the state directory lies on
a tmpfs of 8 MiB (`small_disk`, root only) that a test fills up. An upload that meets ENOSPC
is RESOURCE_EXHAUSTED naming the directory and the bytes needed, stores nothing and fails its
job with that reason; SQLite's SQLITE_FULL is RESOURCE_EXHAUSTED naming the database; the
coordinator goes on serving everything else, every checkpoint stored before is intact, and
once space is freed the same writes succeed.

The job runner is replaced by `EndingRunner`, a test double at the scheduler boundary that
records which jobs' workers the server asks it to end (no workers run here; a job is RUNNING
by `_launch`, what the runner does on launch; tests/coordinator/test_e2e_disk.py has real
ones).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3

import pytest
from jobkit import TINY_SPEC, linear_checkpoint
from small_disk import fill, small_disk

from dptrain.coordinator.api.records import JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.client.worker_client import WorkerClient
from dptrain.coordinator.server.checkpoint_store import verify_record
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.worker.checkpoint import MANIFEST, MODEL_FILE

SPEC = {**TINY_SPEC, "name": "own", "workers": 1}


class EndingRunner:
    """Test double for the job runner: records the jobs whose workers it is asked to end."""

    def __init__(self, store, blobs, cluster, address, settings):
        self.ended: list[str] = []

    def start(self):
        pass

    def stop(self):
        pass

    def wake(self):
        pass

    def cancel(self, job_id):
        self.ended.append(job_id)


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "disk", size_mib=8) as directory:
        yield directory


@pytest.fixture
def state_dir(disk):
    return disk / "state"


@pytest.fixture
def server(serve_coordinator):
    return serve_coordinator(runner_factory=EndingRunner, cluster=Cluster.local(4))


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token, timeout=30) as c:
        yield c


def _running_worker(server, client) -> tuple[str, WorkerClient]:
    """A job moved to RUNNING as the runner does, and a client with its worker token."""
    job = client.submit_job(SPEC)
    token = new_token()
    server.store.transition(job.id, JobState.QUEUED, JobState.RUNNING,
                            token_hash=hash_token(token), placement={"localhost": 1})
    return job.id, WorkerClient(server.address, job.id, token)


def test_an_upload_meeting_a_full_disk_fails_its_job_and_nothing_else(
        server, client, disk, state_dir, tmp_path):
    kept_id, kept_worker = _running_worker(server, client)
    kept = linear_checkpoint(tmp_path / "kept", 5, 16)
    kept_worker.upload_checkpoint(kept)
    blobs_before = set(server.blobs)
    filler = fill(disk, leave=256 << 10)

    job_id, worker = _running_worker(server, client)
    big = linear_checkpoint(tmp_path / "big", 10, 512)  # 3 MiB: model, Adam's two moments
    with pytest.raises(ClientError) as info:
        worker.upload_checkpoint(big)
    needed = sum(f.stat().st_size for f in big.iterdir())
    reason = (f"coordinator disk full under {state_dir / 'blobs'}: {needed} bytes needed; "
              "nothing was stored (free space there, then retry)")
    assert (info.value.code, info.value.details) == ("RESOURCE_EXHAUSTED", reason)
    # That job failed with the reason, its workers asked to end; not restarted.
    failed = client.get_job(job_id)
    assert failed.state is JobState.FAILED
    assert failed.error == f"the checkpoint of step 10 cannot be stored: {reason}"
    assert server.runner.ended == [job_id]
    # Nothing of the upload is left; what was stored before is intact.
    assert list((state_dir / "blobs" / "tmp").iterdir()) == []
    assert set(server.blobs) == blobs_before
    assert client.list_checkpoints(job_id) == []
    for record in server.store.list_checkpoints(kept_id):
        verify_record(record, server.blobs)
    # The coordinator goes on serving: reads, another job's download, its state.
    assert client.get_job(kept_id).state is JobState.RUNNING
    assert {j.id for j in client.list_jobs()[0]} == {kept_id, job_id}
    got = client.download_checkpoint(kept_id, dest=tmp_path / "kept.safetensors")
    assert got.path.read_bytes() == (kept / MODEL_FILE).read_bytes()

    filler.unlink()  # room again: the same bytes are stored for another job
    other_id, other = _running_worker(server, client)
    assert other.upload_checkpoint(big).step == 10
    got = client.download_checkpoint(other_id, dest=tmp_path / "big.safetensors")
    assert got.path.read_bytes() == (big / MODEL_FILE).read_bytes()
    assert client.download_checkpoint(other_id, file=MANIFEST, dest=tmp_path).path.read_bytes(
        ) == (big / MANIFEST).read_bytes()
    for worker_client in (kept_worker, worker, other):
        worker_client.close()


def test_a_database_write_on_a_full_disk_is_resource_exhausted_naming_it(
        server, client, disk, state_dir):
    first = client.submit_job(SPEC)
    filler = fill(disk)
    # SQLite reuses the room its files hold; writes go on until they need more of it.
    for _ in range(5000):
        try:
            client.submit_job(SPEC)
        except ClientError as e:
            error = e
            break
    else:
        pytest.fail("5000 submissions fitted on a full disk")
    assert (error.code, error.details) == (
        "RESOURCE_EXHAUSTED", f"coordinator disk full under {state_dir / 'coordinator.db'}; "
                              "nothing was stored (free space there, then retry)")
    assert client.get_job(first.id).state is JobState.QUEUED  # reads go on
    stored = server.store.count_by_state()[JobState.QUEUED]
    filler.unlink()
    assert client.submit_job(SPEC).state is JobState.QUEUED
    assert server.store.count_by_state()[JobState.QUEUED] == stored + 1
    with contextlib.closing(sqlite3.connect(state_dir / "coordinator.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_code_upload_on_a_full_disk_is_resource_exhausted_and_stores_nothing(
        server, client, disk, state_dir):
    archive = os.urandom(1 << 20)  # incompressible: it takes its size on the disk
    filler = fill(disk, leave=256 << 10)
    with pytest.raises(ClientError) as info:
        client.upload_code(archive)
    assert (info.value.code, info.value.details) == (
        "RESOURCE_EXHAUSTED", f"coordinator disk full under {state_dir / 'blobs'}: "
                              f"{len(archive)} bytes needed; nothing was stored (free space "
                              "there, then retry)")
    assert list(server.blobs) == [] and list((state_dir / "blobs" / "tmp").iterdir()) == []
    filler.unlink()
    with pytest.raises(ClientError, match="^INVALID_ARGUMENT: code: the archive is refused"):
        client.upload_code(archive)  # stored, then checked: not an archive (room again)
