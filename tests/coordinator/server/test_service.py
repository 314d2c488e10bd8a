"""The coordinator's gRPC API end to end over a REAL server on a loopback port: jobs, watching,
validation, auth, checkpoints (real worker checkpoint directories), limits, health, reflection,
TLS and metrics.

No workers run here. The job runner is replaced by `RecordingRunner`, a test double at the
scheduler boundary that only records the server's calls; where a test needs a running job it
does what the runner does on launch: `_launch` moves the job to RUNNING with a fresh worker token.
The end-to-end tests with real mpiexec workers are in tests/coordinator/test_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import urllib.request
from pathlib import Path

import blake3
import grpc
import numpy as np
import pytest
import safetensors.numpy
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from dptrain import engine
from dptrain.coordinator.api import serde
from dptrain.coordinator.api.checkpoint_upload import read_checkpoint_directory
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.records import (
    EventKind,
    Job,
    JobState,
    hash_token,
    new_job,
    new_token,
)
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.client.worker_client import WorkerClient
from dptrain.coordinator.client.worker_reporter import fetch_resume_checkpoint
from dptrain.coordinator.server.job_messages import JobMessages
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import ServerConfigError, ServerSettings, serve
from dptrain.coordinator.server.store import MemoryStore
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.checkpoint import (
    MODEL_FILE,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from dptrain.worker.environment import worker_environment
from dptrain.worker.spec import JobSpec

SLOTS = 4
MAX_CHECKPOINT_BYTES = 1 << 20
SPEC = {
    "name": "tiny", "model": {"name": "mlp", "args": {"in_features": 4, "hidden": [8],
                                                     "num_classes": 3}},
    "dataset": {"name": "synthetic", "args": {"n": 64, "features": 4, "classes": 3}},
    "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 8, "max_steps": 20, "workers": 2,
    "checkpoint": {"every_steps": 5, "keep": 3},
}


class RecordingRunner:
    """Test double for the job runner: records what the server asks of it, launches nothing."""

    def __init__(self, store, blobs, cluster, address, settings):
        self.address, self.settings = address, settings
        self.calls: list[tuple] = []

    def start(self):
        self.calls.append(("start",))

    def stop(self):
        self.calls.append(("stop",))

    def wake(self):
        self.calls.append(("wake",))

    def cancel(self, job_id):
        self.calls.append(("cancel", job_id))


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def server(serve_coordinator, data_root):
    return serve_coordinator(runner_factory=RecordingRunner, cluster=Cluster.local(SLOTS),
                             data_roots=[data_root], metrics_port=0,
                             max_checkpoint_bytes=MAX_CHECKPOINT_BYTES)


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token, timeout=10) as c:
        yield c


def _launch(server, job_id) -> str:
    """What the runner does when it starts a job: RUNNING, with a fresh worker token."""
    token = new_token()
    server.store.transition(job_id, JobState.QUEUED, JobState.RUNNING,
                            token_hash=hash_token(token), placement={"localhost": 2})
    return token


def _running_job(server, client):
    """A job the (simulated) runner has launched, and a client holding its worker token."""
    job = client.submit_job(SPEC)
    token = _launch(server, job.id)
    worker = WorkerClient(server.address, job.id, token)
    worker.token = token
    return job, worker


def _checkpoint(root, step, *, width=8, seed=0):
    """A real worker checkpoint directory (worker.checkpoint.write_checkpoint)."""
    engine.manual_seed(seed)
    model = engine.nn.Sequential(engine.nn.Linear(4, width), engine.nn.ReLU(),
                                 engine.nn.Linear(width, 3))
    optimizer = engine.optim.Adam(model.parameters(), lr=0.01)
    loss = model(engine.randn(5, 4)).square().mean()
    loss.backward()
    optimizer.step()
    info = {"epoch": 0, "position": step, "metrics": {"loss": 0.5 + step},
            "rng": {"engine": [engine.get_rng_state()]}, "spec": SPEC, "scheduler": None}
    path = write_checkpoint(root, step, model.state_dict(), optimizer.state_dict(), info)
    return path, {k: v.numpy() for k, v in model.state_dict().items()}


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _blake3(path) -> str:
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def _blob_path(server, digest, algorithm="blake3") -> Path:
    """Where the blob store's docstring says the blob of this digest lies."""
    root = server.blobs.root if algorithm == "sha256" else server.blobs.root / algorithm
    return root / digest[:2] / digest[2:]


def _code(info) -> str:
    return info.value.code


# ---------------------------------------------------------------- jobs

def test_submit_queues_the_job_and_wakes_the_runner(server, client):
    job = client.submit_job(SPEC, priority=3, max_restarts=1, time_limit=60)
    assert job.id.startswith("j-") and job.state is JobState.QUEUED
    assert (job.name, job.workers, job.priority, job.max_restarts, job.time_limit) == (
        "tiny", 2, 3, 1, 60.0)
    assert job.spec["optimizer"]["betas"] == [0.9, 0.999]  # defaults filled in by the server
    assert server.runner.calls == [("start",), ("wake",)]
    assert client.get_job(job.id) == job
    stored = server.store.get_job(job.id)
    assert stored.state is JobState.QUEUED and stored.spec == job.spec


def test_every_reply_carries_the_spec_the_workers_validation_gives(client):
    # The servicer encodes each job's spec once (JobMessages): the replies after the first,
    # served from that cache, must carry the spec as JobSpec.to_dict() gives it.
    expected = {f"job{i}": JobSpec.from_dict({**SPEC, "name": f"job{i}"}).to_dict()
                for i in range(3)}
    submitted = [client.submit_job({**SPEC, "name": name}) for name in expected]
    assert [j.spec for j in submitted] == list(expected.values())
    for _ in range(2):
        for job in submitted:
            assert client.get_job(job.id).spec == expected[job.name]
        page, _ = client.list_jobs()
        assert {j.name: j.spec for j in page} == expected
    assert client.cancel_job(submitted[0].id).spec == expected["job0"]


def test_job_messages_forget_the_oldest_spec_and_encode_it_again():
    messages = JobMessages(MemoryStore(), capacity=2)
    jobs = [new_job(f"job{i}", JobSpec.from_dict({**SPEC, "name": f"job{i}"}).to_dict())
            for i in range(3)]
    for job in jobs:
        assert serde.job_from_proto(messages.message(job)).spec == job.spec
    assert messages.specs.keys() == [jobs[1].id, jobs[2].id]
    assert serde.job_from_proto(messages.message(jobs[0])).spec == jobs[0].spec
    assert messages.specs.keys() == [jobs[2].id, jobs[0].id]


def test_submit_a_job_file(client, repo_root):
    job = client.submit_job(repo_root / "examples/digits_mlp.yaml")
    assert (job.name, job.workers, job.max_restarts) == ("digits-mlp", 2, 3)


def test_get_unknown_job_is_not_found(client):
    with pytest.raises(ClientError) as info:
        client.get_job("j-000000000000")
    assert _code(info) == "NOT_FOUND" and "j-000000000000" in str(info.value)


def test_list_jobs_pages_newest_first_and_filters_by_state(client):
    ids = [client.submit_job({**SPEC, "name": f"job{i}"}).id for i in range(5)]
    for job_id in ids[1:3]:
        client.cancel_job(job_id)
    seen, token, pages = [], "", 0
    while True:
        page, token = client.list_jobs(page_size=2, page_token=token)
        pages += 1
        assert len(page) <= 2
        seen += [j.id for j in page]
        if not token:
            break
    assert seen == ids[::-1] and pages == 3
    cancelled, _ = client.list_jobs(states=[JobState.CANCELLED])
    assert [j.id for j in cancelled] == [ids[2], ids[1]]
    queued = [j.id for j in client.iter_jobs(states=["QUEUED"], page_size=1)]
    assert queued == [ids[4], ids[3], ids[0]]
    with pytest.raises(ClientError) as info:
        client.list_jobs(page_token="not-a-token")
    assert _code(info) == "INVALID_ARGUMENT" and "page_token" in str(info.value)


def test_kept_replies_show_each_change_of_a_job_at_the_next_call(server, client):
    # GetJob and ListJobs keep their encoded replies while the store says the jobs are
    # unchanged (JobMessages): every kind of change must show at the very next call.
    def views(job_id):
        listed = {j.id: j for j in client.list_jobs()[0]}
        return client.get_job(job_id), listed.get(job_id)

    job, worker = _running_job(server, client)
    for _ in range(2):  # the second call of each is served from what was kept
        got, listed = views(job.id)
        assert got.state is listed.state is JobState.RUNNING and got.last_step is None
    worker.report_progress([("metrics", {"step": 7, "loss": 0.25})])
    got, listed = views(job.id)
    assert (got.last_step, got.metrics) == (listed.last_step, listed.metrics) == (
        7, {"loss": 0.25})
    worker.heartbeat()
    heartbeat_at = server.store.get_job(job.id).heartbeat_at
    assert views(job.id)[0].heartbeat_at == views(job.id)[1].heartbeat_at == heartbeat_at
    server.store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, exit_code=0)
    got, listed = views(job.id)
    assert got.state is listed.state is JobState.SUCCEEDED and got.exit_code == 0
    client.delete_job(job.id)
    assert job.id not in {j.id for j in client.list_jobs()[0]}
    with pytest.raises(ClientError) as info:
        client.get_job(job.id)
    assert _code(info) == "NOT_FOUND"


def test_kept_listing_pages_show_new_jobs_and_owners_at_the_next_call(server, client):
    first = [client.submit_job({**SPEC, "name": f"job{i}"}).id for i in range(3)]
    pages = lambda **kw: [j.id for j in client.iter_jobs(page_size=2, **kw)]  # noqa: E731
    assert pages() == pages() == first[::-1]
    newer = client.submit_job(SPEC).id
    assert pages() == [newer, *first[::-1]]
    page, token = client.list_jobs(page_size=2)
    client.cancel_job(first[2])
    assert [j.state for j in client.list_jobs(page_size=2)[0]] == [JobState.QUEUED,
                                                                 JobState.CANCELLED]
    assert [j.id for j in client.list_jobs(page_size=2, page_token=token)[0]] == first[1::-1]
    # Owners: a new user's listing, an admin's filter by that owner, as each job arrives.
    _, alice_token = client.create_user("alice")
    with Client(server.address, token=alice_token, timeout=10) as alice:
        assert alice.list_jobs()[0] == [] and client.list_jobs(owner="alice")[0] == []
        mine = alice.submit_job(SPEC).id
        assert [j.id for j in alice.list_jobs()[0]] == [mine]
        assert [j.id for j in client.list_jobs(owner="alice")[0]] == [mine]
        assert pages() == [mine, newer, *first[::-1]]


def test_a_kept_reply_still_needs_a_valid_token_and_the_owner(server, client):
    _, alice_token = client.create_user("alice")
    _, bob_token = client.create_user("bob")
    with Client(server.address, token=alice_token, timeout=10) as alice, \
            Client(server.address, token=bob_token, timeout=10) as bob:
        job = alice.submit_job(SPEC)
        assert alice.get_job(job.id) == alice.get_job(job.id) == client.get_job(job.id)
        assert [j.id for j in alice.list_jobs()[0]] == [job.id]
        with pytest.raises(ClientError) as info:
            bob.get_job(job.id)
        assert _code(info) == "PERMISSION_DENIED"
        assert bob.list_jobs()[0] == []
        client.revoke_user("alice")
        for call in (lambda: alice.get_job(job.id), alice.list_jobs):
            with pytest.raises(ClientError) as info:
                call()
            assert _code(info) == "UNAUTHENTICATED"


def test_cancel_queued_job_then_again_then_a_finished_one(server, client):
    job = client.submit_job(SPEC)
    cancelled = client.cancel_job(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.finished_at is not None
    assert ("cancel", job.id) in server.runner.calls
    assert client.cancel_job(job.id).state is JobState.CANCELLED  # idempotent
    done = client.submit_job(SPEC)
    _launch(server, done.id)
    server.store.transition(done.id, JobState.RUNNING, JobState.SUCCEEDED, exit_code=0)
    with pytest.raises(ClientError) as info:
        client.cancel_job(done.id)
    assert _code(info) == "FAILED_PRECONDITION" and "SUCCEEDED" in str(info.value)


def test_cancel_running_job_records_it_and_asks_the_runner_to_end_it(server, client):
    job, _ = _running_job(server, client)
    # CANCELLING until the runner has seen the workers exit; a second cancel is a no-op.
    assert client.cancel_job(job.id).state is JobState.CANCELLING
    assert client.cancel_job(job.id).state is JobState.CANCELLING
    assert server.runner.calls[-1] == ("cancel", job.id)
    assert client.get_job(job.id).error == "cancelled by a user"


# ---------------------------------------------------------------- watching

def _consume(iterator, items: queue.Queue):
    try:
        for item in iterator:
            items.put(item)
        items.put("END")
    except ClientError as e:
        items.put(e)


def _take(items: queue.Queue, n: int) -> list:
    return [items.get(timeout=10) for _ in range(n)]


def test_late_watcher_gets_current_state_then_new_events(server, client):
    job, worker = _running_job(server, client)
    with worker:
        worker.report_progress([("metrics", {"step": 1, "loss": 2.0})])
        items: queue.Queue = queue.Queue()
        thread = threading.Thread(target=_consume, args=(client.watch_job(job.id), items))
        thread.start()
        first, *history = _take(items, 4)
        assert isinstance(first, Job) and first.state is JobState.RUNNING
        assert first.last_step == 1 and first.metrics["loss"] == 2.0
        assert [(e.seq, e.kind) for e in history] == [
            (1, EventKind.STATE), (2, EventKind.STATE), (3, EventKind.METRICS)]
        assert history[1].payload == {"state": "RUNNING", "previous": "QUEUED"}
        # Appended through the WorkerService while the watch is open:
        worker.report_progress([("metrics", {"step": 2, "loss": 1.5, "accuracy": 0.5}),
                                ("log", {"line": "hello from rank 0", "rank": 0})])
        metrics, line = _take(items, 2)
        assert (metrics.seq, metrics.payload) == (4, {"step": 2, "loss": 1.5, "accuracy": 0.5})
        assert (line.seq, line.payload) == (5, {"line": "hello from rank 0", "rank": 0})
        server.store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, exit_code=0)
        final, end = _take(items, 2)
        assert final.payload == {"state": "SUCCEEDED", "previous": "RUNNING", "exit_code": 0}
        assert end == "END"
        thread.join(timeout=10)
    # A watcher that already saw up to seq 4 gets the job, then only what came after.
    later = list(client.watch_job(job.id, after_seq=4))
    assert isinstance(later[0], Job) and later[0].state is JobState.SUCCEEDED
    assert [e.seq for e in later[1:]] == [5, 6]


def test_watch_unknown_job_is_not_found(client):
    with pytest.raises(ClientError) as info:
        next(client.watch_job("j-000000000000"))
    assert _code(info) == "NOT_FOUND"


def test_stopping_the_server_ends_open_watches(tmp_path):
    srv = serve(ServerSettings(tmp_path / "state", port=0, cluster=Cluster.local(SLOTS)))
    with Client(srv.address, token=srv.token) as c:
        job = c.submit_job(SPEC)
        items: queue.Queue = queue.Queue()
        thread = threading.Thread(target=_consume, args=(c.watch_job(job.id), items))
        thread.start()
        _take(items, 2)  # the job and its QUEUED event
        started = time.monotonic()
        srv.stop(grace=5)
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - started < 5
        last = items.get(timeout=1)  # the stream ended, cleanly or as UNAVAILABLE/CANCELLED
        assert last == "END" or (isinstance(last, ClientError)
                                 and last.code in ("UNAVAILABLE", "CANCELLED")), last


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("change, field", [
    ({"optimizer": {"name": "adam", "lr": -0.1}}, "optimizer.lr"),
    ({"model": {"name": "no-such-model"}}, "model.name"),
    ({"model": {"name": "mlp", "args": {"widht": 3}}}, "model.args.widht"),
    ({"dataset": {"name": "imagenet"}}, "dataset.name"),
    ({"batch_size": 9}, "batch_size"),
    ({"device": "tpu"}, "device"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
    ({"name": "bad name!"}, "name"),
    ({"max_steps": None}, "epochs"),
])
def test_bad_specs_are_invalid_argument_naming_the_field(client, change, field):
    with pytest.raises(ClientError) as info:
        client.submit_job({**SPEC, **change})
    assert _code(info) == "INVALID_ARGUMENT"
    assert f"{field}:" in info.value.details


@pytest.mark.parametrize("change, message", [
    ({"batch_size": "64"}, "batch_size: must be an integer, got '64'"),
    ({"optimizer": {"name": "sgd", "lr": "fast"}}, "optimizer.lr: must be a number, got 'fast'"),
    ({"seed": 2**64}, "seed: must fit in 64 bits"),
    ({"model": {"name": "mlp", "args": {"x": float("nan")}}}, "model.args: must be JSON data"),
    ({"batch_szie": 8}, "batch_szie: unknown field (did you mean 'batch_size'?)"),
])
def test_the_python_client_names_a_wrong_type_before_sending(server, client, change, message):
    before = sum(server.store.count_by_state().values())
    with pytest.raises(ClientError) as info:
        client.submit_job({**SPEC, **change})
    assert _code(info) == "INVALID_ARGUMENT"
    assert info.value.details.startswith(message), info.value.details
    assert sum(server.store.count_by_state().values()) == before


def test_spec_checks_happen_on_the_server(server):
    # A client in another language sends whatever it likes; the server names the field.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        bad = pb.JobSpec(name="x", model=pb.ModelSpec(name="mlp", args_json="[1]"))
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitJob(pb.SubmitJobRequest(spec=bad), metadata=bearer_metadata(server.token))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(
            "model.args: must be a mapping of argument names to values")
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitJob(pb.SubmitJobRequest(), metadata=bearer_metadata(server.token))
        assert info.value.details() == "spec: give exactly one of spec and spec_text, got 'neither'"


def test_type_errors_are_caught_before_sending(client):
    with pytest.raises(ClientError) as info:
        client.submit_job({**SPEC, "batch_size": "8"})
    assert str(info.value) == "INVALID_ARGUMENT: batch_size: must be an integer, got '8'"


def test_more_workers_than_the_cluster_has_is_refused(client):
    with pytest.raises(ClientError) as info:
        client.submit_job({**SPEC, "workers": SLOTS + 4, "batch_size": 8 * (SLOTS + 4)})
    assert str(info.value) == ("INVALID_ARGUMENT: workers: must be at most the cluster's "
                               "capacity of 4 slots, got 8")


def test_data_paths_must_lie_inside_the_data_roots(client, data_root, tmp_path):
    def npz(path):
        return {**SPEC, "dataset": {"name": "npz", "args": {"path": path}}}

    assert client.submit_job(npz(str(data_root / "train.npz"))).state is JobState.QUEUED
    outside = tmp_path / "secret.npz"
    link = data_root / "escape.npz"
    link.symlink_to(outside)
    for path, rule in [(str(outside), "must lie inside a data root"),
                       ("/etc/passwd", "must lie inside a data root"),
                       (str(data_root / ".." / "secret.npz"), "must lie inside a data root"),
                       (str(link), "must lie inside a data root"),
                       ("data/train.npz", "must be an absolute path")]:
        with pytest.raises(ClientError) as info:
            client.submit_job(npz(path))
        assert _code(info) == "INVALID_ARGUMENT", path
        assert info.value.details.startswith(f"dataset.args.path: {rule}"), path
    images = {**SPEC, "dataset": {"name": "idx", "args": {"images": str(data_root / "i"),
                                                          "labels": "/tmp/labels"}}}
    with pytest.raises(ClientError, match="dataset.args.labels"):
        client.submit_job(images)


def test_a_payload_over_the_message_limit_is_resource_exhausted(server, client):
    huge = {**SPEC, "model": {"name": "mlp", "args": {"note": "x" * (5 << 20)}}}
    with pytest.raises(ClientError) as info:  # our client refuses to send it
        client.submit_job(huge)
    assert _code(info) == "RESOURCE_EXHAUSTED"
    options = [("grpc.max_send_message_length", -1)]  # a client without our limits
    with grpc.insecure_channel(server.address, options=options) as channel:
        request = pb.SubmitJobRequest(spec=pb.JobSpec(name="x" * (5 << 20)))
        with pytest.raises(grpc.RpcError) as rpc_info:
            pb_grpc.CoordinatorStub(channel).SubmitJob(
                request, metadata=bearer_metadata(server.token), timeout=10)
        assert rpc_info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------- auth

def test_no_token_or_a_wrong_one_is_unauthenticated(server):
    for token in (None, "wrong"):
        with Client(server.address, token=token) as anonymous:
            with pytest.raises(ClientError) as info:
                anonymous.list_jobs()
            assert _code(info) == "UNAUTHENTICATED"
            assert anonymous.health() == "SERVING"  # health needs no token


def test_token_file_is_private_and_read_by_the_client(server, tmp_path):
    path = tmp_path / "state" / "token"
    assert path.read_text().strip() == server.token
    assert (path.stat().st_mode & 0o777) == 0o600
    with Client(server.address, state_dir=tmp_path / "state") as c:
        assert c.list_jobs() == ([], "")


def test_worker_tokens_act_only_on_their_own_job(server, client):
    job_a, worker_a = _running_job(server, client)
    job_b, worker_b = _running_job(server, client)
    with worker_a, worker_b:
        assert worker_a.heartbeat() is JobState.RUNNING
        with pytest.raises(ClientError) as info:  # the Coordinator service: never
            worker_a.get_job(job_a.id)
        assert _code(info) == "PERMISSION_DENIED"
        other = WorkerClient(server.address, job_a.id, worker_a.token)
        other.job_id = job_b.id  # A's token, asking about B
        with other, pytest.raises(ClientError) as info:
            other.report_progress([("log", {"line": "not mine"})])
        assert _code(info) == "PERMISSION_DENIED" and job_b.id in str(info.value)
        stolen = WorkerClient(server.address, job_b.id, worker_a.token)
        with stolen, pytest.raises(ClientError) as info:  # A's token claiming to be B's
            stolen.heartbeat()
        assert _code(info) == "UNAUTHENTICATED"
    assert [e.kind for e in server.store.events(job_b.id)] == [EventKind.STATE] * 2


def _stored_files(server) -> list[str]:
    return sorted(p.name for p in (server.settings.state_dir / "blobs").rglob("*")
                  if p.is_file())


@pytest.mark.parametrize("end", ["cancelled", "succeeded", "failed", "timed_out"])
def test_a_worker_token_dies_with_its_job(server, client, tmp_path, end):
    job, worker = _running_job(server, client)
    first, _ = _checkpoint(tmp_path / "ckpt", 5)
    late, _ = _checkpoint(tmp_path / "ckpt", 10, seed=1)
    with worker:
        worker.upload_checkpoint(first)
        if end == "cancelled":
            client.cancel_job(job.id)  # CANCELLING; the runner ends it once the workers exit:
            server.store.transition(job.id, JobState.CANCELLING, JobState.CANCELLED)
        else:
            server.store.transition(job.id, JobState.RUNNING, JobState(end.upper()))
        blobs = _stored_files(server)
        events = server.store.events(job.id)
        calls = {"upload": lambda: worker.upload_checkpoint(late),
                 "fetch": lambda: worker.fetch_checkpoint(tmp_path / "resume"),
                 "report": lambda: worker.report_progress([("log", {"line": "late"})]),
                 "heartbeat": worker.heartbeat}
        for name, call in calls.items():
            with pytest.raises(ClientError) as info:
                call()
            assert _code(info) == "FAILED_PRECONDITION", name
            assert f"is {end.upper()}" in str(info.value), name
    assert [c.step for c in client.list_checkpoints(job.id)] == [5]  # nothing stored
    assert _stored_files(server) == blobs and server.store.events(job.id) == events
    assert not (tmp_path / "resume").exists() or not os.listdir(tmp_path / "resume")


def test_a_worker_token_dies_when_a_newer_attempt_is_launched(server, client, tmp_path):
    job, old = _running_job(server, client)
    server.store.transition(job.id, JobState.RUNNING, JobState.RESTARTING)
    with old:
        # The runner ended the attempt: its SIGTERM checkpoint is still taken, progress is not.
        old.upload_checkpoint(_checkpoint(tmp_path / "ckpt", 5)[0])
        with pytest.raises(ClientError) as info:
            old.report_progress([("metrics", {"step": 5, "loss": 1.0})])
        assert _code(info) == "FAILED_PRECONDITION"
        token = new_token()  # the next attempt
        server.store.transition(job.id, JobState.RESTARTING, JobState.RUNNING,
                                token_hash=hash_token(token))
        blobs = _stored_files(server)
        with pytest.raises(ClientError) as info:
            old.upload_checkpoint(_checkpoint(tmp_path / "ckpt", 10, seed=1)[0])
        assert _code(info) == "UNAUTHENTICATED" and job.id in str(info.value)
        assert "current worker token" in str(info.value)
    assert [c.step for c in client.list_checkpoints(job.id)] == [5]
    assert _stored_files(server) == blobs
    with WorkerClient(server.address, job.id, token) as new:
        assert new.heartbeat() is JobState.RUNNING


def test_progress_for_a_job_that_is_not_running_is_refused(server, client):
    job, worker = _running_job(server, client)
    client.cancel_job(job.id)
    server.store.transition(job.id, JobState.CANCELLING, JobState.CANCELLED)
    with worker, pytest.raises(ClientError) as info:
        worker.report_progress([("metrics", {"step": 3, "loss": 1.0})])
    assert _code(info) == "FAILED_PRECONDITION"


def test_a_cancelled_job_keeps_what_its_workers_send_while_they_stop(server, client, tmp_path):
    job, worker = _running_job(server, client)
    path, arrays = _checkpoint(tmp_path / "ckpt", 7)
    with worker:
        assert client.cancel_job(job.id).state is JobState.CANCELLING
        # SIGTERM: the step finishes, its metrics are reported and its checkpoint uploaded.
        worker.report_progress([("metrics", {"step": 7, "loss": 0.25})])
        assert worker.heartbeat() is JobState.CANCELLING
        assert worker.upload_checkpoint(path).step == 7
    assert [c.step for c in client.list_checkpoints(job.id)] == [7]
    assert client.get_job(job.id).last_step == 7
    got = client.download_checkpoint(job.id, dest=tmp_path / "model.safetensors")
    assert got.step == 7
    downloaded = engine.load(got.path)
    assert sorted(downloaded) == sorted(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(downloaded[name].numpy(), array)


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_upload_list_and_download(server, client, tmp_path):
    job, worker = _running_job(server, client)
    path, arrays = _checkpoint(tmp_path / "ckpt", 5)
    manifest = verify_checkpoint(path)
    with worker:
        record = worker.upload_checkpoint(path)
    assert record.step == 5 and record.sha256 == _sha256(Path(path) / "manifest.json")
    listed = client.list_checkpoints(job.id)
    assert [c.step for c in listed] == [5]
    assert listed[0].manifest["files"] == manifest["files"]
    assert listed[0].size == sum(f.stat().st_size for f in Path(path).iterdir())
    events = [e for e in server.store.events(job.id) if e.kind is EventKind.CHECKPOINT]
    assert events[0].payload == {"step": 5, "sha256": record.sha256, "size": listed[0].size}

    got = client.download_checkpoint(job.id, dest=tmp_path / "model.safetensors")
    assert got.step == 5 and got.algorithm == "blake3"
    assert got.digest == manifest["files"][MODEL_FILE]["blake3"] == _blake3(got.path)
    assert _sha256(got.path) == _sha256(Path(path) / MODEL_FILE)
    loaded = engine.load(got.path)
    by_library = safetensors.numpy.load_file(str(got.path))
    assert list(loaded) == list(arrays) and sorted(by_library) == sorted(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array)
        np.testing.assert_array_equal(by_library[name], array)
    opt = client.download_checkpoint(job.id, step=5, file="optimizer.safetensors",
                                     dest=tmp_path)
    assert opt.path == tmp_path / "optimizer.safetensors"
    assert _blake3(opt.path) == manifest["files"]["optimizer.safetensors"]["blake3"]
    with pytest.raises(ClientError) as info:
        client.download_checkpoint(job.id, step=6, dest=tmp_path)
    assert _code(info) == "NOT_FOUND"
    with pytest.raises(ClientError) as info:
        client.download_checkpoint(job.id, file="../../token", dest=tmp_path)
    assert _code(info) == "INVALID_ARGUMENT"


def test_corrupted_blob_is_data_loss_and_resume_falls_back(server, client, tmp_path):
    job, worker = _running_job(server, client)
    with worker:
        for step in (5, 10):
            worker.upload_checkpoint(_checkpoint(tmp_path / "ckpt", step, seed=step)[0])
    newest = client.list_checkpoints(job.id)[-1]
    expected = newest.manifest["files"][MODEL_FILE]["blake3"]
    blob = _blob_path(server, expected)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    with pytest.raises(ClientError) as info:
        client.download_checkpoint(job.id, step=10, dest=tmp_path / "m.safetensors")
    assert _code(info) == "DATA_LOSS"
    assert f"hashing to blake3 {blake3.blake3(data).hexdigest()}" in str(info.value)
    assert f"with blake3 {expected}" in str(info.value)
    assert not (tmp_path / "m.safetensors").exists()
    assert not list(tmp_path.glob(".m.safetensors.*"))  # nor its temporary file
    assert client.download_checkpoint(job.id, dest=tmp_path / "m.safetensors").step == 5

    env = worker_environment(server.address, job.id, worker.token)
    resume_dir = tmp_path / "resume"
    path = fetch_resume_checkpoint(resume_dir, env)
    assert Path(path) == resume_dir / "step-00000005"
    assert read_checkpoint(path).step == 5  # verified, loadable by the worker's resume code
    assert sorted(os.listdir(resume_dir)) == ["step-00000005"]
    assert fetch_resume_checkpoint(resume_dir, env) == path  # an intact copy is kept
    logs = [e.payload["line"] for e in server.store.events(job.id) if e.kind is EventKind.LOG]
    assert any("step 10 is damaged" in line for line in logs)


def test_an_old_sha256_checkpoint_uploads_downloads_resumes_and_catches_damage(
        server, client, tmp_path):
    # A checkpoint as dptrain wrote it before BLAKE3: its manifest lists sha256 digests.
    job, worker = _running_job(server, client)
    path, _ = _checkpoint(tmp_path / "ckpt", 5)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    manifest["files"] = {name: {"sha256": _sha256(Path(path) / name),
                                "bytes": (Path(path) / name).stat().st_size}
                         for name in manifest["files"]}
    (Path(path) / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True)
                                              + "\n")
    with worker:
        worker.upload_checkpoint(path)
    assert client.list_checkpoints(job.id)[0].manifest["files"] == manifest["files"]
    got = client.download_checkpoint(job.id, dest=tmp_path / "m.safetensors")
    assert (got.algorithm, got.digest) == ("sha256", manifest["files"][MODEL_FILE]["sha256"])
    assert _sha256(got.path) == _sha256(Path(path) / MODEL_FILE)
    env = worker_environment(server.address, job.id, worker.token)
    resumed = fetch_resume_checkpoint(tmp_path / "resume", env)
    assert read_checkpoint(resumed).step == 5  # verified by the worker's own code

    blob = _blob_path(server, got.digest, "sha256")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ClientError) as info:
        client.download_checkpoint(job.id, step=5, dest=tmp_path / "again.safetensors")
    assert _code(info) == "DATA_LOSS" and f"with sha256 {got.digest}" in str(info.value)
    assert not (tmp_path / "again.safetensors").exists()


def test_protobufs_own_encoding_of_transfers_still_works_both_ways(server, client, tmp_path):
    # The client and the server (de)serialize chunks by hand (api.chunk_wire); a peer using
    # the generated code, e.g. another language's, must see no difference.
    job, worker = _running_job(server, client)
    path, _ = _checkpoint(tmp_path / "ckpt", 5)
    header, chunks = read_checkpoint_directory(job.id, path)
    stub = pb_grpc.WorkerServiceStub(worker.channel)
    requests = [pb.UploadCheckpointRequest(header=serde.upload_header_to_proto(header))] + [
        pb.UploadCheckpointRequest(chunk=pb.FileChunk(name=n, data=d)) for n, d in chunks]
    metadata = bearer_metadata(worker.token, job.id)
    assert stub.UploadCheckpoint(iter(requests), metadata=metadata, timeout=60).step == 5
    fetched = list(stub.FetchCheckpoint(pb.FetchCheckpointRequest(job_id=job.id),
                                        metadata=metadata, timeout=60))
    assert fetched[0].header.manifest_json == header.manifest_json
    by_file = {}
    for m in fetched[1:]:
        by_file[m.chunk.name] = by_file.get(m.chunk.name, b"") + m.chunk.data
    assert by_file == {f.name: (Path(path) / f.name).read_bytes() for f in header.files}
    download = list(pb_grpc.CoordinatorStub(client.channel).DownloadCheckpoint(
        pb.DownloadCheckpointRequest(job_id=job.id, file=MODEL_FILE),
        metadata=bearer_metadata(server.token), timeout=60))
    assert download[0].info.file.blake3 == _blake3(Path(path) / MODEL_FILE)
    assert b"".join(m.chunk for m in download[1:]) == (Path(path) / MODEL_FILE).read_bytes()
    worker.close()


def test_fetch_without_checkpoints_returns_none(server, client, tmp_path):
    job, worker = _running_job(server, client)
    with worker:
        assert worker.fetch_checkpoint(tmp_path / "resume") is None


def test_upload_with_a_bad_file_stores_nothing(server, client, tmp_path):
    job, worker = _running_job(server, client)
    path, _ = _checkpoint(tmp_path / "ckpt", 5)
    model = Path(path) / MODEL_FILE
    model.write_bytes(model.read_bytes()[:-1] + b"\0")  # differs from its manifest entry
    with worker, pytest.raises(ClientError) as info:
        worker.upload_checkpoint(path)
    assert _code(info) == "DATA_LOSS"
    assert client.list_checkpoints(job.id) == []


def test_checkpoint_over_the_size_limit_is_resource_exhausted(server, client, tmp_path):
    job, worker = _running_job(server, client)
    path, _ = _checkpoint(tmp_path / "ckpt", 5, width=1 << 16)  # model file > 1 MiB
    assert (Path(path) / MODEL_FILE).stat().st_size > MAX_CHECKPOINT_BYTES
    with worker, pytest.raises(ClientError) as info:
        worker.upload_checkpoint(path)
    assert _code(info) == "RESOURCE_EXHAUSTED"
    assert client.list_checkpoints(job.id) == []


def test_retention_keeps_the_newest_checkpoints(server, client, tmp_path):
    job, worker = _running_job(server, client)  # checkpoint.keep is 3
    with worker:
        for step in (5, 10, 15, 20):
            worker.upload_checkpoint(_checkpoint(tmp_path / "ckpt", step, seed=step)[0])
        assert [c.step for c in client.list_checkpoints(job.id)] == [10, 15, 20]
        # The same step uploaded again (a resumed run) replaces the stored one.
        again = worker.upload_checkpoint(_checkpoint(tmp_path / "again", 20, seed=99)[0])
    listed = client.list_checkpoints(job.id)
    assert [c.step for c in listed] == [10, 15, 20] and listed[-1].sha256 == again.sha256


# ---------------------------------------------------------------- the server itself

def _reflection_client(version: str):
    """Request and response classes and the method path of reflection `version`. v1's messages
    come from its descriptor in the default pool (grpcio-reflection ships v1alpha's only)."""
    if version == "v1alpha":
        return (reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse,
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    pool = descriptor_pool.Default()
    request, response = (message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"grpc.reflection.v1.ServerReflection{kind}")) for kind in ("Request", "Response"))
    return request, response, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_health_and_reflection(server, client, version):
    assert client.health() == "SERVING"
    assert client.health("dptrain.v1.Coordinator") == "SERVING"
    assert client.health("dptrain.v1.WorkerService") == "SERVING"
    request_type, response_type, method = _reflection_client(version)
    assert request_type.DESCRIPTOR.full_name == f"grpc.reflection.{version}.ServerReflectionRequest"
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(method, request_serializer=request_type.SerializeToString,
                                     response_deserializer=response_type.FromString)
        request = request_type(list_services="")
        responses = call(iter([request]), metadata=bearer_metadata(server.token))
        names = {s.name for s in next(responses).list_services_response.service}
        assert names == {"dptrain.v1.Coordinator", "dptrain.v1.WorkerService",
                         "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                         "grpc.reflection.v1alpha.ServerReflection"}
        for symbol in ("dptrain.v1.Coordinator", "grpc.reflection.v1.ServerReflection"):
            request = request_type(file_containing_symbol=symbol)
            response = next(call(iter([request]), metadata=bearer_metadata(server.token)))
            file = descriptor_pb2.FileDescriptorProto.FromString(  # the symbol's own file first
                response.file_descriptor_response.file_descriptor_proto[0])
            assert symbol.rpartition(".")[2] in [s.name for s in file.service]
            assert file.package == symbol.rpartition(".")[0]
        with pytest.raises(grpc.RpcError) as info:
            next(call(iter([request])))
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_listening_beyond_loopback_needs_tls(tmp_path):
    with pytest.raises(ServerConfigError, match="refusing to listen on 0.0.0.0 without TLS"):
        serve(ServerSettings(tmp_path / "state", host="0.0.0.0", port=0))
    with pytest.raises(ServerConfigError, match="both a certificate and its private key"):
        serve(ServerSettings(tmp_path / "state", port=0, tls_cert=tmp_path / "cert.pem"))


def test_a_taken_port_is_a_clear_error(server, tmp_path):
    with pytest.raises(ServerConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        serve(ServerSettings(tmp_path / "other", port=server.port))


def _self_signed(directory: Path) -> tuple[Path, Path]:
    # A user's own certificate, its own CA (dptrain tls init makes a CA-signed one instead).
    cert, key = directory / "cert.pem", directory / "key.pem"
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = _self_signed(tmp_path)
    srv = serve(ServerSettings(tmp_path / "state", port=0, tls_cert=cert, tls_key=key))
    try:
        assert srv.settings.tls_ca == cert.resolve()
        with Client(srv.address, token=srv.token, tls_ca=cert) as secure:
            assert secure.health() == "SERVING"
            assert secure.submit_job(SPEC).state is JobState.QUEUED
        with Client(srv.address, token=srv.token, timeout=2) as plaintext:
            with pytest.raises(ClientError) as info:
                plaintext.list_jobs()
            assert _code(info) == "UNAVAILABLE"
    finally:
        srv.stop(grace=0)


def test_metrics_endpoint(server, client, tmp_path):
    client.submit_job(SPEC)
    job, worker = _running_job(server, client)
    with worker:
        worker.upload_checkpoint(_checkpoint(tmp_path / "ckpt", 5)[0])
    client.download_checkpoint(job.id, dest=tmp_path / "m.safetensors")
    with pytest.raises(ClientError):
        client.get_job("j-000000000000")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    assert 'dptrain_jobs{state="QUEUED"} 1' in text
    assert 'dptrain_jobs{state="RUNNING"} 1' in text
    assert 'dptrain_jobs{state="CANCELLING"} 0' in text
    assert 'dptrain_jobs{state="TIMED_OUT"} 0' in text
    assert "dptrain_queue_length 1" in text
    assert 'dptrain_rpc_duration_seconds_count{method="/dptrain.v1.Coordinator/SubmitJob"} 2' \
        in text
    assert 'dptrain_rpc_duration_seconds_bucket{method="/dptrain.v1.Coordinator/GetJob",' \
        'le="+Inf"} 1' in text
    assert ('dptrain_rpc_requests_total{method="/dptrain.v1.Coordinator/GetJob",'
            'code="NOT_FOUND"} 1') in text
    model_size = (tmp_path / "m.safetensors").stat().st_size
    served = int(text.split('dptrain_checkpoint_bytes_total{direction="served"} ')[1].split()[0])
    stored = int(text.split('dptrain_checkpoint_bytes_total{direction="stored"} ')[1].split()[0])
    assert served == model_size
    assert stored == client.list_checkpoints(job.id)[0].size
