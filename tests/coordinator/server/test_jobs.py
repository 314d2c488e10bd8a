"""The RPC logic as plain functions, without a server: coordinator.jobs and
coordinator.checkpoints over a MemoryStore and a BlobStore in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import os
import time

import blake3
import pytest
from fresh_imports import modules_loaded_by, within

from dptrain.coordinator.api.checkpoint_upload import CheckpointUpload, FileEntry
from dptrain.coordinator.api.errors import (
    ChecksumMismatch,
    StateConflict,
    ValidationError,
)
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.api.records import Event, EventKind, Job, JobState
from dptrain.coordinator.server import checkpoint_store as checkpoints
from dptrain.coordinator.server import jobs
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.jobs import ListRequest, ServiceState, SubmitRequest
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.store import MemoryStore
from dptrain.worker.spec import JobSpec

SPEC = {"name": "tiny", "model": {"name": "mlp"}, "dataset": {"name": "digits"},
        "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 8, "max_steps": 5,
        "workers": 2, "checkpoint": {"keep": 2}}


@pytest.fixture
def state(tmp_path):
    s = ServiceState(store=MemoryStore(), blobs=BlobStore(tmp_path / "blobs"),
                     cluster=Cluster.local(4), data_roots=(tmp_path / "data",))
    yield s
    s.store.close()


def test_the_logic_modules_never_import_grpc():
    loaded = modules_loaded_by("import dptrain.coordinator.server.jobs, "
                               "dptrain.coordinator.server.metrics, "
                               "dptrain.coordinator.server.checkpoint_store")
    assert within(loaded, "grpc") == []


# ---------------------------------------------------------------- jobs

def test_submit_fills_defaults_and_uses_the_server_default_restarts(state):
    job = jobs.submit_job(SubmitRequest(SPEC, priority=2), state, now=100.0)
    assert (job.state, job.workers, job.priority, job.max_restarts, job.submitted_at) == (
        JobState.QUEUED, 2, 2, 3, 100.0)
    assert job.spec == JobSpec.from_dict(SPEC).to_dict()
    with pytest.raises(ValidationError, match="max_restarts: must be in 0..100"):
        jobs.submit_job(SubmitRequest(SPEC, max_restarts=101), state)


def test_spec_errors_list_every_broken_rule(state):
    bad = {**SPEC, "batch_size": 0, "optimizer": {"name": "adam", "lr": -1.0}}
    with pytest.raises(jobs.SpecInvalid) as info:
        jobs.submit_job(SubmitRequest(bad), state)
    assert info.value.field in ("optimizer.lr", "batch_size")
    assert "optimizer.lr: must be a finite number >= 0, got -1.0" in str(info.value)
    assert "batch_size: must be >= 1, got 0" in str(info.value)
    assert isinstance(info.value, ValidationError)  # hence INVALID_ARGUMENT


@pytest.mark.parametrize("dataset, args, ok", [
    ("npz", {"path": "{root}/a.npz"}, True),
    ("npy", {"path": "{root}"}, True),
    ("npz", {"path": "{root}-evil/a.npz"}, False),
    ("npz", {"path": "{root}/../a.npz"}, False),
    ("npz", {"path": "a.npz"}, False),
    ("idx", {"images": "{root}/i", "labels": "{root}/l"}, True),
    ("idx", {"images": "{root}/i", "labels": "/etc/shadow"}, False),
    ("text", {"path": "/etc/shadow"}, False),
    ("npz", {"path": 3}, False),
    # The array's name inside an .npz: its loader does not declare it a path.
    ("npz", {"path": "{root}/a.npz", "x_key": "/not/a/path"}, True),
    ("synthetic", {"task": "/etc/shadow"}, True),  # a loader that reads no files
])
def test_data_paths_are_the_arguments_the_loader_declares(tmp_path, dataset, args, ok):
    root = tmp_path / "data"
    spec = JobSpec.from_dict({**SPEC, "dataset": {"name": "digits"}})
    spec.dataset.name = dataset  # past the spec's own checks: this tests the roots alone
    spec.dataset.args = {k: val.format(root=root) if isinstance(val, str) else val
                         for k, val in args.items()}
    if ok:
        jobs.check_data_paths(spec, [root])
    else:
        with pytest.raises(ValidationError) as info:
            jobs.check_data_paths(spec, [root])
        assert info.value.field.startswith("dataset.args.")


def test_no_data_roots_means_no_data_files(tmp_path):
    spec = JobSpec.from_dict({**SPEC, "dataset": {"name": "npz", "args": {"path": "/d/a.npz"}}})
    with pytest.raises(ValidationError, match="--data-root"):
        jobs.check_data_paths(spec, [])


def test_list_pages_are_capped(state):
    for i in range(3):
        jobs.submit_job(SubmitRequest({**SPEC, "name": f"j{i}"}), state, now=float(i))
    page, token = jobs.list_jobs(ListRequest(page_size=2), state)
    assert [j.name for j in page] == ["j2", "j1"] and token
    with pytest.raises(ValidationError, match="page_size"):
        jobs.list_jobs(ListRequest(page_size=-1), state)


def test_cancel_moves_any_active_state_and_calls_the_runner_after(state):
    calls = []

    class Runner:
        def wake(self):
            pass

        def cancel(self, job_id):
            calls.append((job_id, state.store.get_job(job_id).state))
            raise RuntimeError("the runner's trouble is not the caller's")

    job = jobs.submit_job(SubmitRequest(SPEC), state)
    state.runner = Runner()
    state.store.transition(job.id, JobState.QUEUED, JobState.RUNNING)
    # Running: CANCELLING until the runner has seen the workers exit (and stored their final
    # checkpoint); a second cancel meanwhile changes nothing and asks the runner again.
    assert jobs.cancel_job(job.id, state).state is JobState.CANCELLING
    assert jobs.cancel_job(job.id, state).state is JobState.CANCELLING
    assert calls == [(job.id, JobState.CANCELLING)]
    queued = jobs.submit_job(SubmitRequest(SPEC), state)
    assert jobs.cancel_job(queued.id, state).state is JobState.CANCELLED  # nothing to stop
    assert calls[-1] == (queued.id, JobState.CANCELLED)
    state.runner = None  # a server that only queues: no workers to wait for
    unsupervised = jobs.submit_job(SubmitRequest(SPEC), state)
    state.store.transition(unsupervised.id, JobState.QUEUED, JobState.RUNNING)
    assert jobs.cancel_job(unsupervised.id, state).state is JobState.CANCELLED


def test_watch_yields_job_then_events_and_ends_after_the_final_state(state):
    job = jobs.submit_job(SubmitRequest(SPEC), state)
    state.store.transition(job.id, JobState.QUEUED, JobState.RUNNING)
    state.store.transition(job.id, JobState.RUNNING, JobState.FAILED, error="boom")
    items = list(jobs.watch_job(job.id, 1, state))
    assert isinstance(items[0], Job) and items[0].state is JobState.FAILED
    assert [(e.seq, e.payload["state"]) for e in items[1:]] == [(2, "RUNNING"), (3, "FAILED")]
    assert all(isinstance(e, Event) for e in items[1:])


class _FinishingStore(MemoryStore):
    """A real MemoryStore whose job ends right after a watcher found no new events: the order
    in which a busy server can interleave the runner's final transition with a watch."""

    def __init__(self) -> None:
        super().__init__()
        self.finish: str | None = None  # the job to end after its next empty read

    def events(self, job_id, after_seq=0, limit=1000):
        found = super().events(job_id, after_seq, limit)
        if not found and job_id == self.finish:
            self.finish = None
            self.transition(job_id, JobState.RUNNING, JobState.SUCCEEDED, exit_code=0)
        return found


def test_watch_yields_the_final_state_that_lands_between_its_reads(tmp_path):
    store = _FinishingStore()
    state = ServiceState(store=store, blobs=BlobStore(tmp_path / "blobs"),
                         cluster=Cluster.local(4), data_roots=())
    job = jobs.submit_job(SubmitRequest(SPEC), state)
    store.transition(job.id, JobState.QUEUED, JobState.RUNNING)
    store.finish = job.id
    items = list(jobs.watch_job(job.id, 2, state, poll_s=0.01))
    assert [(e.seq, e.payload["state"]) for e in items[1:]] == [(3, "SUCCEEDED")]
    store.close()


def test_watch_stops_when_the_client_leaves(state):
    job = jobs.submit_job(SubmitRequest(SPEC), state)
    active = iter([True, False])
    items = list(jobs.watch_job(job.id, 0, state, is_active=lambda: next(active), poll_s=0.01))
    assert len(items) == 2  # the job and its QUEUED event; then the client was gone


def test_progress_updates_the_summary_and_needs_a_running_job(state):
    job = jobs.submit_job(SubmitRequest(SPEC), state)
    items = [(EventKind.METRICS, {"step": 1, "loss": 2.0}), (EventKind.LOG, {"line": "x\ny"})]
    with pytest.raises(StateConflict):
        jobs.report_progress(job.id, items, state)
    state.store.transition(job.id, JobState.QUEUED, JobState.RUNNING, now=10.0)
    assert jobs.report_progress(job.id, items, state, now=20.0) == 4
    jobs.report_progress(job.id, [(EventKind.METRICS, {"step": 2, "val_loss": 1.5})], state)
    stored = state.store.get_job(job.id)
    assert stored.metrics == {"loss": 2.0, "val_loss": 1.5} and stored.last_step == 2
    assert state.store.events(job.id, 3)[0].payload == {"line": "x y"}  # one line
    assert jobs.report_progress(job.id, [], state, now=30.0) == 0  # a heartbeat
    assert state.store.get_job(job.id).heartbeat_at == 30.0
    long_line = [(EventKind.LOG, {"line": "z" * 10_000})]
    jobs.report_progress(job.id, long_line, state)
    assert len(state.store.events(job.id)[-1].payload["line"]) == 4096
    with pytest.raises(ValidationError, match="events.metrics.step"):
        jobs.report_progress(job.id, [(EventKind.METRICS, {"loss": 1.0})], state)


# ---------------------------------------------------------------- checkpoints

HASHERS = {"blake3": blake3.blake3, "sha256": hashlib.sha256}  # the references


def _blob(data: bytes, algorithm="blake3") -> str:
    """The blob name of `data`, as the blob store's docstring defines it."""
    digest = HASHERS[algorithm](data).hexdigest()
    return digest if algorithm == "sha256" else f"{algorithm}:{digest}"


def _upload(job_id, step, files: dict[str, bytes],
            algorithm="blake3") -> tuple[CheckpointUpload, list]:
    entries = {name: {algorithm: HASHERS[algorithm](data).hexdigest(), "bytes": len(data)}
               for name, data in files.items()}
    manifest = json.dumps({"step": step, "files": entries}).encode()
    upload = CheckpointUpload(job_id, step, manifest, tuple(
        FileEntry(n, e["bytes"], e[algorithm], algorithm) for n, e in entries.items()))
    chunks = [(name, data[i:i + 3]) for name, data in files.items()
              for i in range(0, len(data), 3)]
    return upload, chunks


def _launched(state) -> Job:
    """A job its (simulated) runner launched: workers upload only while it is RUNNING."""
    job = jobs.submit_job(SubmitRequest(SPEC), state)
    return state.store.transition(job.id, JobState.QUEUED, JobState.RUNNING)


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])  # sha256: an older worker's
def test_receive_stores_blobs_then_the_record(state, algorithm):
    job = _launched(state)
    files = {"model.safetensors": b"model-bytes", "optimizer.safetensors": b"", "extra.bin": b"x"}
    upload, chunks = _upload(job.id, 5, files, algorithm)
    record = checkpoints.receive_checkpoint(upload, chunks, state, now=1.0)
    assert record.sha256 == hashlib.sha256(upload.manifest_json).hexdigest()
    assert record.size == len(upload.manifest_json) + 12
    assert checkpoints.record_blobs(record) == {
        "manifest.json": record.sha256, **{n: _blob(d, algorithm) for n, d in files.items()}}
    for name, blob in checkpoints.record_blobs(record).items():
        assert state.blobs.exists(blob), name
    assert state.metrics.checkpoint_bytes("stored") == record.size


@pytest.mark.parametrize("mutate, error", [
    (lambda u, c: (u, list(reversed(c))), "chunk.name"),
    (lambda u, c: (u, c + [("model.safetensors", b"more")]), "chunk.name"),
    (lambda u, c: (u, [(n, d.upper()) for n, d in c]), ChecksumMismatch),
    (lambda u, c: (CheckpointUpload(u.job_id, 6, u.manifest_json, u.files), c), "header.step"),
    (lambda u, c: (CheckpointUpload(u.job_id, 5, u.manifest_json, u.files[:1]), c[:4]),
     "header.files"),
    (lambda u, c: (CheckpointUpload(u.job_id, 5, u.manifest_json, (FileEntry(
        "../x", 3, "a" * 64, "blake3"),) + u.files[1:]), c), "header.files[0].name"),
    (lambda u, c: (CheckpointUpload(u.job_id, 5, u.manifest_json, (FileEntry(
        "model.safetensors", 11, "A" * 64, "blake3"),) + u.files[1:]), c),
     "header.files[0].blake3"),
    (lambda u, c: (CheckpointUpload(u.job_id, 5, u.manifest_json, (FileEntry(
        u.files[0].name, u.files[0].size, hashlib.sha256(b"model-bytes").hexdigest(),
        "sha256"),) + u.files[1:]), c), "header.files[0]"),  # not the manifest's entry
    (lambda u, c: (CheckpointUpload(u.job_id, 5, b"{not json", u.files), c),
     "header.manifest_json"),
])
def test_receive_refuses_bad_uploads_and_records_nothing(state, mutate, error):
    job = _launched(state)
    upload, chunks = mutate(*_upload(job.id, 5, {"model.safetensors": b"model-bytes",
                                                 "optimizer.safetensors": b"opt"}))
    expected = error if isinstance(error, type) else ValidationError
    with pytest.raises(expected) as info:
        checkpoints.receive_checkpoint(upload, chunks, state)
    if isinstance(error, str):
        assert info.value.field == error
    assert state.store.list_checkpoints(job.id) == []


def test_retention_deletes_blobs_no_record_needs(state):
    job = _launched(state)  # keep: 2
    shared = b"unchanged optimizer state"
    for step in (1, 2, 3):
        upload, chunks = _upload(job.id, step, {"model.safetensors": b"m%d" % step,
                                                "optimizer.safetensors": shared})
        checkpoints.receive_checkpoint(upload, chunks, state)
    records = state.store.list_checkpoints(job.id)
    assert [r.step for r in records] == [2, 3]
    # The first checkpoint's blobs were too new to delete (the grace period); once old, a
    # pass deletes what no record refers to, and keeps what the others still share.
    old = time.time() - 3600
    for sha in state.blobs:
        os.utime(state.blobs.get(sha, verify=False), (old, old))
    before = set(state.blobs)
    upload, chunks = _upload(job.id, 4, {"model.safetensors": b"m4",
                                         "optimizer.safetensors": shared})
    checkpoints.receive_checkpoint(upload, chunks, state)
    assert [r.step for r in state.store.list_checkpoints(job.id)] == [3, 4]
    gone = before - set(state.blobs)
    assert gone == {_blob(b"m2"), records[0].sha256}
    assert state.blobs.exists(_blob(shared))
    assert checkpoints.referenced_blobs(state.store) <= set(state.blobs)


def test_intact_checkpoint_skips_damage_and_says_so(state):
    job = _launched(state)
    for step in (1, 2):
        upload, chunks = _upload(job.id, step, {"model.safetensors": b"model%d" % step})
        checkpoints.receive_checkpoint(upload, chunks, state)
    state.blobs.delete(_blob(b"model2"))
    assert checkpoints.intact_checkpoint(job.id, state).step == 1
    assert "step 2 is damaged" in state.store.events(job.id)[-1].payload["line"]
    header, stream = checkpoints.open_fetch(job.id, state)
    assert header.step == 1 and b"".join(d for _, d in stream) == b"model1"


def test_intact_checkpoint_falls_back_past_corrupted_and_missing_files(state):
    job = _launched(state)
    for step in (1, 2, 3):
        upload, chunks = _upload(job.id, step, {"model.safetensors": b"model%d" % step,
                                                "optimizer.safetensors": b"opt%d" % step})
        checkpoints.receive_checkpoint(upload, chunks, state)
    records = {r.step: r for r in state.store.list_checkpoints(job.id)}
    assert sorted(records) == [2, 3]  # keep: 2
    _corrupt(state, _blob(b"opt3"))
    assert checkpoints.intact_checkpoint(job.id, state) == records[2]
    state.blobs.delete(records[2].sha256)  # its manifest.json
    assert checkpoints.intact_checkpoint(job.id, state) is None
    lines = [e.payload["line"] for e in state.store.events(job.id) if e.kind is EventKind.LOG]
    assert sum("step 3 is damaged" in line for line in lines) == 2
    assert sum("step 2 is damaged" in line for line in lines) == 1


def _corrupt(state, blob):
    path = state.blobs.get(blob, verify=False)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_download_streams_the_stored_bytes_with_the_manifests_digest(state, algorithm):
    job = _launched(state)
    model = os.urandom(3 * CHUNK_BYTES + 5)
    upload, _ = _upload(job.id, 1, {"model.safetensors": model}, algorithm)
    checkpoints.receive_checkpoint(upload, [("model.safetensors", model)], state)
    step, entry, end, chunks = checkpoints.open_download(job.id, 1, "", state)
    assert (step, entry.name, entry.size, end) == (1, "model.safetensors", len(model), len(model))
    assert (entry.algorithm, entry.digest) == (algorithm, HASHERS[algorithm](model).hexdigest())
    assert b"".join(chunks) == model
    _, manifest, _, chunks = checkpoints.open_download(job.id, 1, "manifest.json", state)
    assert (manifest.algorithm, manifest.digest) == (
        "sha256", hashlib.sha256(upload.manifest_json).hexdigest())
    assert b"".join(chunks) == upload.manifest_json
    # Damage on disk goes out as it is, unhashed: the receiver's check catches it
    # (tests/coordinator/client/test_client_download.py), hashing the bytes once, not twice.
    _corrupt(state, _blob(model, algorithm))
    _, entry, _, chunks = checkpoints.open_download(job.id, 1, "model.safetensors", state)
    received = b"".join(chunks)
    assert len(received) == len(model) and received != model
    assert HASHERS[algorithm](received).hexdigest() != entry.digest


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_retention_keep_must_be_a_positive_integer(state, keep):
    job = _launched(state)
    with pytest.raises(ValidationError) as info:
        checkpoints.prune_job_checkpoints(state.store, state.blobs, job.id, keep)
    assert info.value.field == "checkpoint.keep"


def test_retention_spares_files_another_job_still_uses(state):
    a, b = (_launched(state) for _ in range(2))
    shared = b"the same initial model"
    for job in (a, b):
        checkpoints.receive_checkpoint(*_upload(job.id, 1, {"model.safetensors": shared}), state)
    checkpoints.receive_checkpoint(*_upload(a.id, 2, {"model.safetensors": b"m2"}), state)
    removed = checkpoints.prune_job_checkpoints(state.store, state.blobs, a.id, 1)
    assert [r.step for r in removed] == [1]
    assert state.blobs.exists(_blob(shared))
    assert checkpoints.intact_checkpoint(b.id, state).step == 1


def test_garbage_collection_keeps_every_file_of_every_checkpoint(state):
    job = _launched(state)
    files = {"model.safetensors": b"weights", "optimizer.safetensors": b"moments"}
    upload, chunks = _upload(job.id, 7, files)
    checkpoints.receive_checkpoint(upload, chunks, state)
    orphan, _ = state.blobs.put(b"left by a crashed upload")
    old = time.time() - 7200
    for sha in state.blobs:
        os.utime(state.blobs.get(sha, verify=False), (old, old))
    live = {*(_blob(data) for data in files.values()), _blob(upload.manifest_json, "sha256")}
    assert checkpoints.referenced_blobs(state.store) == live
    assert state.blobs.collect_garbage(checkpoints.referenced_blobs(state.store)) == [orphan]
    assert set(state.blobs) == live
    header, stream = checkpoints.open_fetch(job.id, state)
    assert header.step == 7 and b"".join(d for _, d in stream) == b"weights" + b"moments"
