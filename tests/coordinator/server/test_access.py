"""Authorisation as a table: every principal x every RPC of the service descriptor -> the
status code, against a REAL server on loopback (no runner: the tests launch a job the way the
runner does, moving it to RUNNING with a fresh worker token).

The expected table below is written out here, RPC by RPC, independently of the server's
`access.RULES`: a new RPC fails `test_every_rpc_has_a_rule_and_a_row_here` until both have a
row. An allowed call is made with a request that succeeds (OK), so an allowed answer is told
from a refusal by its code alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from rpc import METHODS, call_rpc

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.limits import channel_options
from dptrain.coordinator.api.records import JobState, hash_token, new_job, new_token
from dptrain.coordinator.server import users
from dptrain.coordinator.server.access import RULES
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import ServerSettings, serve
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.worker.code_archive import pack_directory
from dptrain.worker.spec import JobSpec

SPEC = {
    "name": "tiny", "model": {"name": "mlp", "args": {"in_features": 4, "hidden": [8],
                                                     "num_classes": 3}},
    "dataset": {"name": "synthetic", "args": {"n": 64, "features": 4, "classes": 3}},
    "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 8, "max_steps": 20, "workers": 2,
}

PRINCIPALS = ("admin", "user on own job", "user on another's job", "worker token of the job",
              "worker token of another job", "revoked user", "no token")
OK, DENIED, UNAUTH = "OK", "PERMISSION_DENIED", "UNAUTHENTICATED"
#: Who may call what, by kind of RPC: one answer per principal, in `PRINCIPALS`' order.
ANYONE = (OK, OK, OK, DENIED, DENIED, UNAUTH, UNAUTH)
OWNER = (OK, OK, DENIED, DENIED, DENIED, UNAUTH, UNAUTH)
ADMIN = (OK, DENIED, DENIED, DENIED, DENIED, UNAUTH, UNAUTH)
WORKER = (OK, DENIED, DENIED, OK, DENIED, UNAUTH, UNAUTH)
EXPECTED = {
    "SubmitJob": ANYONE, "ListJobs": ANYONE, "UploadCode": ANYONE,
    "GetJob": OWNER, "CancelJob": OWNER, "WatchJob": OWNER, "ListCheckpoints": OWNER,
    "DownloadCheckpoint": OWNER, "DeleteJob": OWNER, "KeepCheckpoint": OWNER,
    "CreateUser": ADMIN, "IssueToken": ADMIN, "RevokeUser": ADMIN, "ListUsers": ADMIN,
    "ReportProgress": WORKER, "Heartbeat": WORKER, "UploadCheckpoint": WORKER,
    "FetchCheckpoint": WORKER, "FetchCode": WORKER, "OpenCheckpointUpload": WORKER,
}


class World:
    """The server, its users' tokens and the code archive jobs run."""

    def __init__(self, server: Any, channel: grpc.Channel, tokens: dict[str, str],
                 code: bytes):
        self.server, self.channel, self.tokens, self.code = server, channel, tokens, code
        self.code_sha256 = hashlib.sha256(code).hexdigest()

    def running_job(self, owner: str) -> tuple[str, str]:
        """A job of `owner` with code, launched (RUNNING); its id and worker token."""
        spec = JobSpec.from_dict({**SPEC, "code": f"sha256:{self.code_sha256}"}).to_dict()
        job = self.server.store.create_job(new_job("tiny", spec, owner=owner))
        token = new_token()
        self.server.store.transition(job.id, JobState.QUEUED, JobState.RUNNING,
                                     token_hash=hash_token(token), placement={"localhost": 2})
        return job.id, token


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("access")
    (root / "code").mkdir()
    (root / "code" / "model.py").write_text("def build():\n    return None\n")
    server = serve(ServerSettings(root / "state", cluster=Cluster.local(4)))
    try:
        tokens = {"admin": server.token}
        for name in ("alice", "bob", "carol"):
            tokens[name] = users.create_user(name, False, server.store)[1]
        users.revoke_user("carol", server.store)
        with grpc.insecure_channel(server.address, options=channel_options()) as channel:
            world = World(server, channel, tokens, pack_directory(root / "code").data)
            assert _call(world, "UploadCode", _code_upload(world), bearer_metadata(
                server.token)) == OK
            yield world
    finally:
        server.stop(grace=0)


def _call(world: World, method: str, request: Any, metadata: tuple) -> str:
    """The status code's name of a call."""
    return call_rpc(world.channel, method, request, metadata)[0]


def _code_upload(world: World) -> list[pb.UploadCodeRequest]:
    return [pb.UploadCodeRequest(header=pb.CodeArchive(sha256=world.code_sha256,
                                                       size=len(world.code))),
            pb.UploadCodeRequest(chunk=world.code)]


def _checkpoint_upload(job_id: str, step: int) -> list[pb.UploadCheckpointRequest]:
    """A checkpoint of one file, as a worker uploads it."""
    data = f"weights of step {step}".encode()
    sha = hashlib.sha256(data).hexdigest()
    manifest = {"step": step, "epoch": 0, "metrics": {"loss": 0.5},
                "files": {"model.safetensors": {"sha256": sha, "bytes": len(data)}}}
    header = pb.CheckpointHeader(job_id=job_id, step=step, manifest_json=json.dumps(
        manifest).encode(), files=[pb.CheckpointFile(name="model.safetensors", size=len(data),
                                                     sha256=sha)])
    return [pb.UploadCheckpointRequest(header=header),
            pb.UploadCheckpointRequest(chunk=pb.FileChunk(name="model.safetensors", data=data))]


def _request(world: World, method: str, job_id: str) -> Any:
    """A request for `method` that succeeds when its caller is allowed, on job `job_id`."""
    fresh = f"u{time.monotonic_ns()}"  # a user name no other case uses
    if method in ("IssueToken", "RevokeUser"):
        users.create_user(fresh, False, world.server.store)
    if method == "DeleteJob":  # only a finished job may be deleted
        world.server.store.transition(job_id, JobState.RUNNING, JobState.CANCELLED)
    return {
        "SubmitJob": lambda: serde.submit_request_to_proto(SPEC, 0, None, None),
        "ListJobs": lambda: pb.ListJobsRequest(),
        "UploadCode": lambda: _code_upload(world),
        "GetJob": lambda: pb.GetJobRequest(job_id=job_id),
        "CancelJob": lambda: pb.CancelJobRequest(job_id=job_id),
        "WatchJob": lambda: pb.WatchJobRequest(job_id=job_id),
        "ListCheckpoints": lambda: pb.ListCheckpointsRequest(job_id=job_id),
        "DownloadCheckpoint": lambda: pb.DownloadCheckpointRequest(job_id=job_id),
        "DeleteJob": lambda: pb.DeleteJobRequest(job_id=job_id),
        "KeepCheckpoint": lambda: pb.KeepCheckpointRequest(job_id=job_id, step=5, keep=True),
        "CreateUser": lambda: pb.CreateUserRequest(name=fresh),
        "IssueToken": lambda: pb.IssueTokenRequest(name=fresh),
        "RevokeUser": lambda: pb.RevokeUserRequest(name=fresh),
        "ListUsers": lambda: pb.ListUsersRequest(),
        "ReportProgress": lambda: pb.ReportProgressRequest(job_id=job_id, events=[
            pb.WorkerEvent(log=pb.LogLine(line="hello", rank=0))]),
        "Heartbeat": lambda: pb.HeartbeatRequest(job_id=job_id),
        "UploadCheckpoint": lambda: _checkpoint_upload(job_id, 10),
        "OpenCheckpointUpload": lambda: _checkpoint_upload(job_id, 10)[0].header,
        "FetchCheckpoint": lambda: pb.FetchCheckpointRequest(job_id=job_id),
        "FetchCode": lambda: pb.FetchCodeRequest(job_id=job_id),
    }[method]()


def test_every_rpc_has_a_rule_and_a_row_here():
    described = {f"{service}/{name}" for name, (service, _) in METHODS.items()}
    assert set(RULES) == described
    assert set(EXPECTED) == set(METHODS)


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_who_may_call_what(world, method, principal):
    alice_job, alice_worker = world.running_job("alice")
    bob_job, bob_worker = world.running_job("bob")
    # The job has a stored checkpoint, so that an allowed download or fetch succeeds.
    assert _call(world, "UploadCheckpoint", _checkpoint_upload(alice_job, 5),
                 bearer_metadata(alice_worker, alice_job)) == OK
    metadata = {
        "admin": bearer_metadata(world.tokens["admin"]),
        "user on own job": bearer_metadata(world.tokens["alice"]),
        "user on another's job": bearer_metadata(world.tokens["bob"]),
        "worker token of the job": bearer_metadata(alice_worker, alice_job),
        "worker token of another job": bearer_metadata(bob_worker, bob_job),
        "revoked user": bearer_metadata(world.tokens["carol"]),
        "no token": (),
    }[principal]
    expected = EXPECTED[method][PRINCIPALS.index(principal)]
    assert _call(world, method, _request(world, method, alice_job), metadata) == expected


def _refusal(world: World, method: str, request: Any, metadata: tuple) -> str:
    """The details of a call refused with PERMISSION_DENIED."""
    service, _ = METHODS[method]
    with pytest.raises(grpc.RpcError) as info:
        world.channel.unary_unary(f"/{service}/{method}",
                                  request_serializer=type(request).SerializeToString)(
            request, metadata=metadata, timeout=30)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    return info.value.details()


def test_a_refusal_names_the_rule(world):
    alice_job, _ = world.running_job("alice")
    bob = bearer_metadata(world.tokens["bob"])
    assert _refusal(world, "GetJob", pb.GetJobRequest(job_id=alice_job), bob) == (
        f"job {alice_job!r} belongs to user 'alice': a user may act only on their own jobs "
        f"(admins on every job)")
    assert _refusal(world, "ListJobs", pb.ListJobsRequest(owner="alice"), bob) == (
        "owner: user 'bob' may list only their own jobs (admins every user's), got 'alice'")
    assert _refusal(world, "ListUsers", pb.ListUsersRequest(), bob) == (
        "dptrain.v1.Coordinator/ListUsers is for admins only; user 'bob' is not an admin")
