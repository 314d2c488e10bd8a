"""Retention and deleting jobs: the newest ``checkpoint.keep`` checkpoints plus the marked ones,
``DeleteJob`` (records, directory, the blobs only that job used), age-based retirement, blob
garbage collection by reference — never under a download in flight — and crash leftovers.

The logic runs against a `ServiceState` over real files; the RPCs against a REAL server on a
loopback port with a real client (no runner: the tests move jobs through their states as the
runner would). Expected outcomes are worked out by hand from what each test stores.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import subprocess

import blake3
import grpc
import numpy as np
import pytest
from fresh_imports import modules_loaded_by, within
from jobkit import DPTRAIN, SLOW_SPEC, TINY_SPEC, wait_for

from dptrain.coordinator.api.checkpoint_upload import CheckpointUpload, FileEntry
from dptrain.coordinator.api.errors import JobNotFound, StateConflict
from dptrain.coordinator.api.records import JobState, hash_token, new_token
from dptrain.coordinator.cli import build_parser
from dptrain.coordinator.client.checkpoint_download import download_data
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.server import checkpoint_store as checkpoints
from dptrain.coordinator.server import jobs, retention
from dptrain.coordinator.server.blobs import BACKUP_LOCK, BlobStore
from dptrain.coordinator.server.code_store import open_code, receive_code
from dptrain.coordinator.server.jobs import ServiceState, SubmitRequest
from dptrain.coordinator.server.runner_settings import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import DB_FILE, ServerSettings, serve
from dptrain.coordinator.server.store import MemoryStore, SqliteStore
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.code_archive import pack_directory

SPEC = TINY_SPEC  # checkpoint.keep: 2
Q, R = JobState.QUEUED, JobState.RUNNING


def _blob(data: bytes) -> str:
    """The blob name of `data` (BLAKE3), as the blob store's docstring defines it."""
    return "blake3:" + blake3.blake3(data).hexdigest()


def _checkpoint(store, blobs, job_id, step, files: dict[str, bytes]):
    """Store a checkpoint of `files` as a worker's upload would (`store_checkpoint`)."""
    entries = {name: {"blake3": blake3.blake3(data).hexdigest(), "bytes": len(data)}
               for name, data in files.items()}
    manifest = json.dumps({"step": step, "files": entries}).encode()
    upload = CheckpointUpload(job_id, step, manifest, tuple(
        FileEntry(n, e["bytes"], e["blake3"], "blake3") for n, e in entries.items()))
    chunks = [(name, data[i:i + (1 << 20)]) for name, data in files.items()
              for i in range(0, len(data), 1 << 20)]
    return checkpoints.store_checkpoint(upload, chunks, store, blobs)[0]


@pytest.fixture
def state(tmp_path):
    s = ServiceState(store=MemoryStore(), blobs=BlobStore(tmp_path / "blobs"),
                     cluster=Cluster.local(4), jobs_dir=tmp_path / "jobs")
    yield s
    s.store.close()


def _running(state, spec=SPEC):
    job = jobs.submit_job(SubmitRequest(spec), state)
    return state.store.transition(job.id, Q, R)


def test_retention_and_deletion_never_import_grpc():
    loaded = modules_loaded_by("import dptrain.coordinator.server.retention")
    assert within(loaded, "grpc") == []


def test_retention_keeps_the_newest_and_the_marked_checkpoints(state):
    job = _running(state)  # checkpoint.keep: 2
    model = {step: f"model at {step}".encode() for step in range(1, 6)}
    _checkpoint(state.store, state.blobs, job.id, 1, {"model.safetensors": model[1]})
    assert checkpoints.keep_checkpoint(job.id, 1, True, state).keep is True
    for step in range(2, 6):
        _checkpoint(state.store, state.blobs, job.id, step, {"model.safetensors": model[step]})
    # By hand: keep 2 newest (4, 5) + marked 1; 2 and 3 pruned with their files.
    assert [(c.step, c.keep) for c in state.store.list_checkpoints(job.id)] == [
        (1, True), (4, False), (5, False)]
    assert [state.blobs.exists(_blob(model[s])) for s in range(1, 6)] == [
        True, False, False, True, True]
    checkpoints.keep_checkpoint(job.id, 1, False, state)
    _checkpoint(state.store, state.blobs, job.id, 6, {"model.safetensors": b"model at 6"})
    assert [c.step for c in state.store.list_checkpoints(job.id)] == [5, 6]
    assert not state.blobs.exists(_blob(model[1]))


def test_deleting_is_refused_until_the_job_is_over(state):
    job = _running(state)
    with pytest.raises(StateConflict, match=f"job {job.id!r} is RUNNING"):
        retention.delete_job(job.id, state)
    queued = jobs.submit_job(SubmitRequest(SPEC), state)
    with pytest.raises(StateConflict, match="is QUEUED"):
        retention.delete_job(queued.id, state)
    assert state.store.get_job(job.id).state is R
    with pytest.raises(JobNotFound):
        retention.delete_job("j-000000000000", state)


@pytest.mark.parametrize("final", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_deleting_a_finished_job_removes_what_only_it_used(state, tmp_path, final):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    archive = pack_directory(project).data
    code, _ = receive_code(hashlib.sha256(archive).hexdigest(), len(archive), [archive], state)
    spec = {**SPEC, "code": f"sha256:{code}"}
    doomed, other, sharer = (_running(state, spec if i != 1 else SPEC) for i in range(3))
    shared, own = b"the same initial model", b"weights only the deleted job has"
    for job in (doomed, other):
        _checkpoint(state.store, state.blobs, job.id, 1, {"model.safetensors": shared})
    record = _checkpoint(state.store, state.blobs, doomed.id, 2, {"model.safetensors": own})
    logs = state.jobs_dir / doomed.id
    logs.mkdir(parents=True)
    (logs / "worker.log").write_text("training\n")
    state.store.transition(doomed.id, R, final)
    assert retention.delete_job(doomed.id, state).id == doomed.id
    with pytest.raises(JobNotFound):
        state.store.get_job(doomed.id)
    assert not logs.exists()
    assert not state.blobs.exists(_blob(own)) and not state.blobs.exists(record.sha256)
    assert state.blobs.exists(_blob(shared))  # the other job's checkpoint still uses it
    assert state.blobs.exists(code)  # `sharer` still names the code archive
    state.store.transition(sharer.id, R, JobState.CANCELLED)
    retention.delete_job(sharer.id, state)
    assert not state.blobs.exists(code)  # now nobody does
    assert set(state.blobs) == checkpoints.referenced_blobs(state.store)
    assert checkpoints.intact_checkpoint(other.id, state).step == 1


def test_a_blob_stored_again_since_its_record_is_spared(state):
    """An upload of the same bytes may be about to record them: freeing skips the blob."""
    job = _running(state)
    record = _checkpoint(state.store, state.blobs, job.id, 1, {"model.safetensors": b"w"})
    state.store.transition(job.id, R, JobState.SUCCEEDED)
    path = state.blobs.get(_blob(b"w"))
    os.utime(path, (record.created_at + 5, record.created_at + 5))  # put again later
    retention.delete_job(job.id, state)
    assert state.blobs.exists(_blob(b"w")) and not state.blobs.exists(record.sha256)
    assert state.blobs.collect_garbage(checkpoints.referenced_blobs(state.store), min_age=0,
                                       now=record.created_at + 10) == [_blob(b"w")]


def test_retirement_deletes_only_jobs_finished_long_enough_ago(state):
    day = retention.DAY_S
    old, recent, running = (_running(state) for _ in range(3))
    state.store.transition(old.id, R, JobState.SUCCEEDED, now=1000 * day - 8 * day)
    state.store.transition(recent.id, R, JobState.FAILED, now=1000 * day - 6 * day)
    assert retention.retire_finished(7 * day, state, now=1000 * day) == [old.id]
    assert {j.id for j in state.store.all_jobs()} == {recent.id, running.id}


def test_a_leased_blob_goes_when_its_last_lease_ends(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    name, _ = blobs.put(b"being downloaded")
    first, second = blobs.lease([name]), blobs.lease([name])
    assert blobs.delete(name) is False and blobs.exists(name)
    first.release()
    first.release()  # twice: harmless
    assert blobs.exists(name)
    second.release()
    assert not blobs.exists(name)
    # Stored again while a deletion waits: the deletion is called off.
    name, _ = blobs.put(b"again")
    with blobs.lease([name]):
        blobs.delete(name)
        blobs.put(b"again")
    assert blobs.exists(name)
    # An upload's pin: deleting meanwhile is skipped, not deferred (it is about to be recorded).
    with blobs.lease([name], pin=True):
        assert blobs.delete(name) is False
    assert blobs.exists(name)


def test_fetches_lease_what_they_stream_until_closed_even_unstarted(state, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    archive = pack_directory(project).data
    code, _ = receive_code(hashlib.sha256(archive).hexdigest(), len(archive), [archive], state)
    job = _running(state, {**SPEC, "code": f"sha256:{code}"})
    record = _checkpoint(state.store, state.blobs, job.id, 1, {"model.safetensors": b"w"})
    names = {code, record.sha256, _blob(b"w")}
    _, chunks = checkpoints.open_fetch(job.id, state)
    *_, code_chunks = open_code(job.id, state)
    *_, download = checkpoints.open_download(job.id, 1, "", state)
    assert all(state.blobs.leased(name) for name in names)
    chunks.close()  # a receiver gone after the header: the stream never started
    code_chunks.close()
    assert [state.blobs.leased(name) for name in (code, record.sha256)] == [False, False]
    assert state.blobs.leased(_blob(b"w"))  # the download still streams it
    assert b"".join(download) == b"w"  # run to its end: released
    assert not any(state.blobs.leased(name) for name in names)


def test_no_blob_is_deleted_while_a_backup_holds_the_lock(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    name, _ = blobs.put(b"orphan")
    fd = os.open(tmp_path / "blobs" / BACKUP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert blobs.delete(name) is False and blobs.exists(name)
    finally:
        os.close(fd)
    assert blobs.collect_garbage(set(), min_age=0) == [name]


# ---------------------------------------------------------------- over gRPC


@pytest.fixture
def server(serve_coordinator):
    return serve_coordinator(cluster=Cluster.local(4))


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token, timeout=30) as c:
        yield c


def _finished_job_with(server, client, files: dict[str, bytes], steps=(1,)):
    job = client.submit_job(SPEC)
    server.store.transition(job.id, Q, R)
    for step in steps:
        _checkpoint(server.store, server.blobs, job.id, step, files)
    server.store.transition(job.id, R, JobState.SUCCEEDED)
    return job


def test_delete_job_rpc(server, client):
    job = client.submit_job(SPEC)
    with pytest.raises(ClientError) as info:
        client.delete_job(job.id)
    assert info.value.code == "FAILED_PRECONDITION" and "QUEUED" in str(info.value)
    client.cancel_job(job.id)
    assert client.delete_job(job.id).id == job.id
    for call in (client.get_job, client.list_checkpoints, client.delete_job):
        with pytest.raises(ClientError) as info:
            call(job.id)
        assert info.value.code == "NOT_FOUND"


def test_keep_checkpoint_rpc_and_cli(server, client, tmp_path):
    job = _finished_job_with(server, client, {"model.safetensors": b"w"}, steps=(1, 2, 3))
    assert [c.step for c in client.list_checkpoints(job.id)] == [2, 3]  # keep: 2
    assert client.keep_checkpoint(job.id, 2).keep is True
    with pytest.raises(ClientError) as info:
        client.keep_checkpoint(job.id, 1)
    assert info.value.code == "NOT_FOUND"
    env = {**os.environ, "DPTRAIN_ADDRESS": server.address, "DPTRAIN_TOKEN": server.token}
    run = subprocess.run([DPTRAIN, "checkpoints", job.id, "--unkeep", "2", "--keep", "3"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    header, *rows = [line.split() for line in run.stdout.splitlines()]
    assert header[-2:] == ["KEPT", "METRICS"]
    assert [(row[0], row[-2]) for row in rows] == [("2", "-"), ("3", "keep")]
    assert [c.keep for c in client.list_checkpoints(job.id)] == [False, True]
    run = subprocess.run([DPTRAIN, "delete", job.id], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 2 and "without --yes" in run.stderr
    run = subprocess.run([DPTRAIN, "delete", "--yes", job.id], env=env, capture_output=True,
                         text=True)
    assert (run.returncode, run.stdout) == (0, f"{job.id} deleted\n"), run.stderr
    assert server.store.all_jobs() == []


def test_a_download_in_flight_completes_and_its_blob_goes_after(server, client, tmp_path):
    # Larger than gRPC's flow-control windows, so the server is still sending when the job
    # is deleted.
    payload = np.random.default_rng(7).bytes(64 << 20)
    job = _finished_job_with(server, client, {"model.safetensors": payload})
    name = _blob(payload)
    stream = client._stream(client._download,
                            pb.DownloadCheckpointRequest(job_id=job.id, step=1))
    info = next(stream)
    first = next(stream)  # a slow reader: one chunk so far
    with Client(server.address, token=server.token, timeout=30) as other:
        other.delete_job(job.id)
        with pytest.raises(ClientError) as gone:
            other.get_job(job.id)
        assert gone.value.code == "NOT_FOUND"
    assert server.blobs.exists(name) and server.blobs.leased(name)
    assert info.info.file.blake3 == blake3.blake3(payload).hexdigest()
    got = b"".join(bytes(c) for c in download_data(itertools.chain([first], stream)))
    assert got == payload
    assert not server.blobs.exists(name)
    assert list(server.blobs) == []


def test_a_start_removes_what_a_deletion_cut_short_left(serve_coordinator, state_dir):
    """A kill between a deletion's records and its blobs leaves unreferenced blobs and the
    job's directory: here the records are deleted as step 1 would, with the server down."""
    server = serve_coordinator(cluster=Cluster.local(4))
    with Client(server.address, token=server.token, timeout=30) as client:
        job = _finished_job_with(server, client, {"model.safetensors": b"orphaned weights"})
        kept = _finished_job_with(server, client, {"model.safetensors": b"kept weights"})
    jobs_dir = state_dir / "jobs"
    for j in (job, kept):
        (jobs_dir / j.id).mkdir(parents=True)
    server.stop()
    with SqliteStore(state_dir / DB_FILE) as store:
        store.delete_job(job.id, [JobState.SUCCEEDED])
    assert BlobStore(state_dir / "blobs").exists(_blob(b"orphaned weights"))
    server = serve_coordinator(cluster=Cluster.local(4), port=server.port)
    assert not server.blobs.exists(_blob(b"orphaned weights"))
    assert server.blobs.exists(_blob(b"kept weights"))
    assert sorted(p.name for p in jobs_dir.iterdir()) == [kept.id]
    assert set(server.blobs) == checkpoints.referenced_blobs(server.store)


def test_retain_finished_deletes_old_jobs_at_start(serve_coordinator):
    server = serve_coordinator(cluster=Cluster.local(4))
    with Client(server.address, token=server.token, timeout=30) as client:
        old = _finished_job_with(server, client, {"model.safetensors": b"old"})
        fresh = client.submit_job(SPEC)
    server.stop()
    with SqliteStore(server.settings.state_dir / DB_FILE) as store:  # finished 3 days ago
        job = store.get_job(old.id)
        store.update_job(old.id, finished_at=job.finished_at - 3 * retention.DAY_S)
    server = serve_coordinator(cluster=Cluster.local(4), retain_finished_s=2 * retention.DAY_S)
    server.upkeep.stop()  # its first round ran at start: wait for it
    assert [j.id for j in server.store.all_jobs()] == [fresh.id]
    assert not server.blobs.exists(_blob(b"old"))


def test_only_admins_and_owners_delete_or_mark(server, client):
    """A job's own worker token may neither delete its job nor mark its checkpoints
    (PERMISSION_DENIED), nor may anyone without a valid token (UNAUTHENTICATED); other users
    are in the authorisation table (test_access.py)."""
    job = client.submit_job(SPEC)
    token = new_token()
    server.store.transition(job.id, Q, R, token_hash=hash_token(token))
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.CoordinatorStub(channel)
    calls = ((stub.DeleteJob, pb.DeleteJobRequest(job_id=job.id)),
             (stub.KeepCheckpoint, pb.KeepCheckpointRequest(job_id=job.id, step=1, keep=True)))
    for bearer, code in ((token, grpc.StatusCode.PERMISSION_DENIED),
                         ("not-a-token", grpc.StatusCode.UNAUTHENTICATED)):
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as info:
                method(request, metadata=[("authorization", f"Bearer {bearer}"),
                                          ("dptrain-job-id", job.id)])
            assert info.value.code() is code
    channel.close()
    assert client.get_job(job.id).state is R


@pytest.mark.parametrize("days, expected", [("7", 7.0), ("0.5", 0.5), ("0", None),
                                            ("-1", None), ("inf", None), ("week", None)])
def test_retain_finished_takes_a_positive_number_of_days(days, expected, capsys):
    parser = build_parser()
    if expected is None:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["serve", "--retain-finished", days])
        assert info.value.code == 2
        assert f"--retain-finished: must be a number of days > 0, got {days!r}" in (
            capsys.readouterr().err)
    else:
        assert parser.parse_args(["serve", "--retain-finished", days]).retain_finished == expected


@pytest.mark.mpi
def test_a_cancelled_job_is_deleted_once_its_workers_have_exited_and_frees_its_slots(
        serve_coordinator, state_dir):
    server = serve_coordinator(stop_grace=1.0, cluster=Cluster.local(2), runner=RunnerSettings(
        state_dir, heartbeat_timeout=60.0, kill_grace=5.0, poll_interval=0.1))
    with Client(server.address, token=server.token, timeout=30) as client:
        job = client.submit_job(SLOW_SPEC)
        wait_for(lambda: client.get_job(job.id).state is R, timeout=600, what="the job to run")
        client.cancel_job(job.id)
        with pytest.raises(ClientError) as info:  # CANCELLING: its workers are still stopping
            client.delete_job(job.id)
        assert info.value.code == "FAILED_PRECONDITION" and "CANCELLING" in info.value.details
        wait_for(lambda: client.get_job(job.id).state is JobState.CANCELLED, timeout=600,
                 what="the job to be cancelled")
        client.delete_job(job.id)
        with pytest.raises(ClientError) as info:
            client.get_job(job.id)
        assert info.value.code == "NOT_FOUND"
        after = client.submit_job(TINY_SPEC)  # needs both slots: the deleted job's are freed
        done = wait_for(lambda: (j := client.get_job(after.id)).state.terminal and j,
                        timeout=600, what="the next job to end")
    assert done.state is JobState.SUCCEEDED, done.error
    assert [j.id for j in server.store.all_jobs()] == [after.id]
    # (The upload the cancellation made is gone with the job; what the next job stored verifies.)
    for record in server.store.list_checkpoints(after.id):
        checkpoints.verify_record(record, server.blobs)


# ---------------------------------------------------------------- backups


def test_a_backup_of_a_running_server_restores_its_jobs_and_checkpoints(
        server, client, state_dir, tmp_path):
    payload = np.random.default_rng(3).bytes(3 << 20)
    job = _finished_job_with(server, client, {"model.safetensors": payload,
                                              "optimizer.safetensors": b"moments"})
    queued = client.submit_job(SPEC)
    dest = tmp_path / "backup"
    run = subprocess.run([DPTRAIN, "backup", "--state-dir", str(state_dir), str(dest)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"{dest}: 2 job(s), 3 file(s)")  # model, optimizer, manifest
    assert oct(dest.stat().st_mode & 0o777) == "0o700"
    again = subprocess.run([DPTRAIN, "backup", "--state-dir", str(state_dir), str(dest)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "must be a new or empty directory" in again.stderr
    client.delete_job(job.id)  # the running server goes on; the copy keeps what it had
    restored = serve(ServerSettings(dest, cluster=Cluster.local(4)))
    try:
        assert restored.token == server.token
        with Client(restored.address, token=server.token, timeout=30) as other:
            assert {j.id for j in other.list_jobs()[0]} == {job.id, queued.id}
            got = other.download_checkpoint(job.id, dest=tmp_path / "model.safetensors")
            assert got.step == 1
            assert (tmp_path / "model.safetensors").read_bytes() == payload
            other.download_checkpoint(job.id, file="optimizer.safetensors",
                                      dest=tmp_path / "optimizer.safetensors")
            assert (tmp_path / "optimizer.safetensors").read_bytes() == b"moments"
    finally:
        restored.stop(grace=0)
