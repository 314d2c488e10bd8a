"""Hostile input to a REAL coordinator on a loopback port: each cause of an INTERNAL answer, a
hang or a corrupted store that was found, and its rule.

Requests go out raw (``pb`` messages, or bytes) where our own client would refuse to send them,
as a client in another language could. The server runs without a job runner (jobs stay QUEUED;
nothing is launched) except where a test needs real workers. What is stored is read back from
the store, or from the SQLite file itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2
from jobkit import descendants, kill_all, wait_for

from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.limits import MAX_ERROR_MESSAGE, channel_options
from dptrain.coordinator.api.records import JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import DB_FILE, ServerSettings, serve
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
DPTRAIN = str(Path(sys.executable).parent / "dptrain")
ARGS = {"in_features": 4, "hidden": [8], "num_classes": 3}
SPEC = {
    "name": "tiny", "model": {"name": "mlp", "args": ARGS},
    "dataset": {"name": "synthetic", "args": {"n": 64, "features": 4, "classes": 3}},
    "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 8, "max_steps": 20, "workers": 1,
    "checkpoint": {"keep": 3},
}
DEADLINE = 30.0


@pytest.fixture
def server(serve_coordinator, tmp_path):
    # The prefixes the tests' installed "user" modules need (none is allowed by default).
    return serve_coordinator(cluster=Cluster.local(2), data_roots=[tmp_path / "data"],
                             allowed_modules=["mypackage", "tripwire_model"])


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token, timeout=DEADLINE) as c:
        yield c


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address, options=channel_options()) as channel:
        yield pb_grpc.CoordinatorStub(channel)


def raw_spec(model_args_json: str = json.dumps(ARGS), **changes) -> pb.JobSpec:
    """SPEC as a message, written field by field (so that anything can go in)."""
    message = pb.JobSpec(
        name="tiny", model=pb.ModelSpec(name="mlp", args_json=model_args_json),
        dataset=pb.DatasetSpec(name="synthetic", args_json=json.dumps(SPEC["dataset"]["args"])),
        optimizer=pb.OptimizerSpec(name="adam", lr=0.01), batch_size=8, max_steps=20, workers=1)
    for name, value in changes.items():
        if isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def refusal(stub, server, request: pb.SubmitJobRequest) -> grpc.RpcError:
    """Submit `request`, which must be refused; check that nothing was stored."""
    before = sum(server.store.count_by_state().values())
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(request, metadata=bearer_metadata(server.token), timeout=DEADLINE)
    assert sum(server.store.count_by_state().values()) == before
    details = info.value.details()
    assert "\n" not in details and len(details) <= MAX_ERROR_MESSAGE
    return info.value


def assert_invalid(error: grpc.RpcError, prefix: str) -> None:
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(prefix), error.details()


def _nested(depth: int) -> str:
    """A JSON object whose arrays and objects nest `depth` levels deep."""
    return '{"x": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


# ---------------------------------------------------------------- args_json

@pytest.mark.parametrize("text", ['{"dropout": NaN}', '{"x": Infinity}', '{"x": [-Infinity]}',
                                  '{"x": 1e999}'])
def test_non_finite_args_json_is_refused_and_nothing_is_stored(server, stub, client, text):
    error = refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(text)))
    assert_invalid(error, "model.args: must hold only finite numbers (no NaN or Infinity)")
    assert client.list_jobs() == ([], "")


def test_args_json_nests_at_most_32_levels(server, stub, client):
    error = refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(_nested(2000))))
    assert_invalid(error, "model.args: must nest arrays and objects at most 32 levels deep")
    assert_invalid(refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(_nested(33)))),
                   "model.args: must nest")
    # 32 levels pass (a user's model: its arguments are checked where it is built).
    accepted = stub.SubmitJob(pb.SubmitJobRequest(spec=raw_spec(
        _nested(32), model=pb.ModelSpec(name="mypackage.models:build", args_json=_nested(32)))),
        metadata=bearer_metadata(server.token), timeout=DEADLINE)
    assert json.loads(accepted.spec.model.args_json) == json.loads(_nested(32))


# ---------------------------------------------------------------- listing survives a bad record

def _copy_row(db: Path, job_id: str, new_id: str, **columns) -> None:
    """Insert a copy of a job's row under another id, some columns replaced, straight into the
    database file (as an older version, or a damaged disk, might have left it)."""
    with sqlite3.connect(db) as conn:
        names = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        row = dict(zip(names, conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
                       .fetchone()))
        row.update(id=new_id, submitted_at=row["submitted_at"] + 1, **columns)
        conn.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES "
                     f"({', '.join('?' * len(row))})", list(row.values()))


def test_listing_survives_unreadable_job_records(server, client, tmp_path):
    good = client.submit_job(SPEC)
    db = tmp_path / "state" / DB_FILE
    spec = {**good.spec, "model": {"name": "mlp", "args": {**ARGS, "dropout": float("nan")}}}
    _copy_row(db, good.id, "j-00000000000a", spec=json.dumps(spec))  # a NaN: json.dumps' default
    _copy_row(db, good.id, "j-00000000000b", spec='{"name": "tiny", "mod')

    jobs = {job.id: job for job in client.iter_jobs()}
    assert set(jobs) == {good.id, "j-00000000000a"}  # the undecodable row is left out
    assert jobs[good.id].spec == good.spec and jobs[good.id].error == ""
    marked = jobs["j-00000000000a"]
    assert (marked.name, marked.state) == ("tiny", JobState.QUEUED)
    assert marked.error.startswith("unreadable record: model.args: cannot be carried by the "
                                    "message (Out of range float values are not JSON")
    assert client.get_job("j-00000000000a").error == marked.error
    with pytest.raises(ClientError) as info:
        client.get_job("j-00000000000b")
    assert info.value.code == "DATA_LOSS"
    assert info.value.details.startswith("job 'j-00000000000b': the stored record cannot be read")

    listing = subprocess.run(
        [DPTRAIN, "--address", server.address, "--state-dir", str(tmp_path / "state"), "jobs"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")})
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()[1:]] == [
        "j-00000000000a", good.id]


# ---------------------------------------------------------------- data paths

def test_nul_byte_in_a_data_path_is_invalid_argument(server, stub, tmp_path):
    dataset = pb.DatasetSpec(name="npz", args_json=json.dumps({"path": f"{tmp_path}/data/a\0.npz"}))
    error = refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(dataset=dataset)))
    assert_invalid(error, "dataset.args.path: must not contain a NUL byte, got ")


# ---------------------------------------------------------------- the job's own code

TRIPWIRE = """
import pathlib, sys
pathlib.Path({marker!r}).write_text("imported")
sys.exit(3)
"""


@pytest.fixture
def tripwire(tmp_path, monkeypatch):
    """A module that leaves a marker file and exits when imported; importable here and in
    children (PYTHONPATH). Returns (module name, marker path, environment)."""
    folder, marker = tmp_path / "user_code", tmp_path / "imported"
    folder.mkdir()
    (folder / "tripwire_model.py").write_text(TRIPWIRE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
    return "tripwire_model", marker, env


def test_coordinator_and_cli_never_import_the_models_a_job_names(server, client, tripwire,
                                                                 tmp_path, stub):
    module, marker, env = tripwire
    job = client.submit_job({**SPEC, "model": {"name": f"{module}:build", "args": ARGS}})
    assert job.state is JobState.QUEUED and job.spec["model"]["name"] == f"{module}:build"
    # unittest's __main__ runs unittest when imported: refused (not allowed), never imported.
    error = refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(
        model=pb.ModelSpec(name="unittest.__main__:main"))))
    assert_invalid(error, "model.name: must name the job's shipped code (none), a model of "
                          "the zoo, or a module under a prefix this coordinator allows")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**SPEC, "model": {"name": f"{module}:build"}}))
    cli = subprocess.run([DPTRAIN, "--address", server.address, "--state-dir",
                          str(tmp_path / "state"), "submit", str(job_file)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert cli.returncode == 0 and cli.stdout.startswith("j-"), cli.stderr
    assert not marker.exists()
    assert module not in sys.modules and "unittest.__main__" not in sys.modules
    error = refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(
        model=pb.ModelSpec(name="os.path:join; rm -rf"))))
    assert_invalid(error, "model.name: model 'os.path:join; rm -rf': a user's model is "
                          "named 'package.module:function'")


@pytest.mark.mpi
def test_only_the_worker_imports_the_model_and_fails_the_job_once(tripwire, tmp_path):
    module, marker, env = tripwire
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**SPEC, "model": {"name": f"{module}:build"}}))
    run = subprocess.run([sys.executable, "-m", "dptrain.worker", str(job), "--no-progress"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert marker.exists()  # the worker is where a user's code runs
    assert run.returncode == 2, run.stderr  # EXIT_INVALID: the runner does not restart it
    assert (f"dptrain worker: error: model '{module}:build': importing module '{module}' "
            f"failed: SystemExit: 3") in run.stderr


@pytest.mark.e2e
@pytest.mark.mpi
def test_a_missing_module_fails_the_job_once_without_restarts(tmp_path):
    srv = serve(ServerSettings(tmp_path / "state", cluster=Cluster.local(1),
                               allowed_modules=["no_such_module_xyz"],
                               runner=RunnerSettings(tmp_path / "state", heartbeat_timeout=60.0,
                                                     kill_grace=5.0, poll_interval=0.1)))
    try:
        with Client(srv.address, token=srv.token) as c:
            job = c.submit_job({**SPEC, "model": {"name": "no_such_module_xyz:build"}},
                               max_restarts=3)
            done = wait_for(lambda: (j := c.get_job(job.id)).state.terminal and j, 90,
                            what="the job to end")
    finally:
        srv.stop(grace=1.0)
        kill_all(descendants(os.getpid()))
    assert done.state is JobState.FAILED and done.restarts == 0 and done.exit_code == 2
    assert "cannot import module 'no_such_module_xyz'" in done.error


# ---------------------------------------------------------------- checkpoint manifests

def _running_job(server, client) -> tuple[str, tuple]:
    """A job moved to RUNNING as the runner would, and its worker's call metadata."""
    job = client.submit_job(SPEC)
    token = new_token()
    server.store.transition(job.id, JobState.QUEUED, JobState.RUNNING,
                            token_hash=hash_token(token), placement={"localhost": 1})
    return job.id, bearer_metadata(token, job.id)


def _upload(server, metadata, job_id: str, manifest: dict) -> pb.Checkpoint:
    data = b"weights"
    sha = hashlib.sha256(data).hexdigest()
    manifest = {"step": 5, "files": {"model.safetensors": {"sha256": sha, "bytes": len(data)}},
                **manifest}
    header = pb.CheckpointHeader(job_id=job_id, step=5, manifest_json=json.dumps(manifest).encode(),
                                 files=[pb.CheckpointFile(name="model.safetensors", size=len(data),
                                                          sha256=sha)])
    messages = [pb.UploadCheckpointRequest(header=header),
                pb.UploadCheckpointRequest(chunk=pb.FileChunk(name="model.safetensors",
                                                              data=data))]
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.WorkerServiceStub(channel).UploadCheckpoint(
            iter(messages), metadata=metadata, timeout=DEADLINE)


@pytest.mark.parametrize("manifest, prefix", [
    ({"metrics": [1, 2]}, "header.manifest_json.metrics: must be an object of metric names"),
    ({"metrics": {"loss": 10**400}}, "header.manifest_json.metrics.loss: must be a number "
                                     "within a double's range"),
    ({"epoch": 2**64}, "header.manifest_json.epoch: must be an integer in 0..2**63-1"),
    ({"step": 5.0}, "header.step: must equal the manifest's step (5.0)"),
    ({"spec": _nested(65)}, ""),  # a string: deep brackets inside it are text
])
def test_a_manifest_the_api_cannot_carry_stores_nothing(server, client, manifest, prefix):
    job_id, metadata = _running_job(server, client)
    if not prefix:
        assert _upload(server, metadata, job_id, manifest).step == 5
        return
    with pytest.raises(grpc.RpcError) as info:
        _upload(server, metadata, job_id, manifest)
    assert_invalid(info.value, prefix)
    assert server.store.list_checkpoints(job_id) == [] and client.list_checkpoints(job_id) == []


def test_a_deep_manifest_is_refused(server, client):
    job_id, metadata = _running_job(server, client)
    with pytest.raises(grpc.RpcError) as info:
        _upload(server, metadata, job_id, {"rng": json.loads(_nested(64))})
    assert_invalid(info.value, "header.manifest_json: must nest arrays and objects at most 64")


def test_checkpoints_stored_before_the_manifest_checks_still_list(server, client, tmp_path):
    job_id, metadata = _running_job(server, client)
    record = _upload(server, metadata, job_id, {"metrics": {"loss": 0.5}, "epoch": 1})
    with sqlite3.connect(tmp_path / "state" / DB_FILE) as conn:  # as an older version stored it
        (text,) = conn.execute("SELECT manifest FROM checkpoints").fetchone()
        manifest = {**json.loads(text), "metrics": [1], "epoch": 2**70}
        conn.execute("UPDATE checkpoints SET manifest = ?", (json.dumps(manifest),))
    (listed,) = client.list_checkpoints(job_id)
    assert (listed.step, listed.sha256, listed.manifest["metrics"], listed.manifest["epoch"]) == (
        5, record.sha256, {}, 0)


# ---------------------------------------------------------------- undecodable requests

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a field tag with an invalid wire type


def _raw_call(server, method: str, payload: bytes, metadata=(), streaming_request=False,
              streaming_response=False):
    with grpc.insecure_channel(server.address) as channel:
        if streaming_request and streaming_response:
            call = channel.stream_stream(method)(iter([payload]), metadata=metadata,
                                                 timeout=DEADLINE)
            return list(call)
        if streaming_request:
            return channel.stream_unary(method)(iter([payload]), metadata=metadata,
                                                timeout=DEADLINE)
        if streaming_response:
            return list(channel.unary_stream(method)(payload, metadata=metadata,
                                                     timeout=DEADLINE))
        return channel.unary_unary(method)(payload, metadata=metadata, timeout=DEADLINE)


@pytest.mark.parametrize("method, streams", [
    ("/dptrain.v1.Coordinator/GetJob", (False, False)),
    ("/dptrain.v1.Coordinator/SubmitJob", (False, False)),
    ("/dptrain.v1.Coordinator/WatchJob", (False, True)),
    ("/dptrain.v1.WorkerService/UploadCheckpoint", (True, False)),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", (True, True)),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", (True, True)),
])
def test_undecodable_bytes_are_invalid_argument_and_refused_unread_without_a_token(
        server, method, streams):
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(server, method, GARBAGE, bearer_metadata(server.token), *streams)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"request: must be the serialized request message "
                                           f"of {method} (DecodeError: ")
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(server, method, GARBAGE, (), *streams)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    if "Reflection" in method:  # the same stream still works with a message that decodes
        answer = _raw_call(server, method, good, bearer_metadata(server.token), *streams)
        assert b"dptrain.v1.Coordinator" in answer[0]


# ---------------------------------------------------------------- specs that can only fail

@pytest.mark.parametrize("changes, prefix", [
    ({"batch_size": 2**62}, "batch_size: must be at most 1048576 (2**20)"),
    ({"max_steps": 2**63 - 1}, "max_steps: must be at most 1000000000"),
    ({"epochs": 2**62}, "epochs: must be at most 1000000000"),
    ({"dataset": pb.DatasetSpec(name="synthetic", args_json='{"n": 4611686018427387904}')},
     "dataset.args.n: must be at most 67108864 (2**26)"),
    ({"dataset": pb.DatasetSpec(name="synthetic", args_json='{"features": [65536, 65536]}')},
     "dataset.args.features: (numbers per sample) must be at most 268435456"),
    ({"scheduler": pb.SchedulerSpec(name="cosine", args_json='{"T_max": 0}')},
     "scheduler.args: T_max must be a positive int, got 0"),
    ({"scheduler": pb.SchedulerSpec(name="step", args_json='{"step_size": 0}')},
     "scheduler.args: step_size must be a positive int, got 0"),
    ({"scheduler": pb.SchedulerSpec(name="cosine", args_json='{"T_max": 1%s}' % ("0" * 400))},
     "scheduler.args: cannot make a schedule of these values (OverflowError: "),
])
def test_specs_that_can_only_fail_or_never_end_are_refused(server, stub, changes, prefix):
    assert_invalid(refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(**changes))), prefix)


def test_a_time_limit_beyond_a_year_is_refused(server, stub):
    request = pb.SubmitJobRequest(spec=raw_spec(), time_limit=Duration(seconds=2**63 - 1))
    assert_invalid(refusal(stub, server, request),
                   "time_limit: must be > 0 and at most 31622400 seconds")


@pytest.mark.mpi
def test_epochs_that_make_more_than_a_billion_steps_fail_on_the_worker(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**SPEC, "max_steps": None, "epochs": 10**9}))
    run = subprocess.run([sys.executable, "-m", "dptrain.worker", str(job), "--no-progress"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert ("dptrain worker: error: epochs: must make at most 1000000000 steps, at 7 per epoch "
            "(or give max_steps), got 1000000000") in run.stderr


@pytest.mark.mpi
def test_a_data_set_argument_its_constructor_refuses_fails_the_job_once(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.zeros((16, 4), np.float32), y=np.zeros(16, np.int64))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**SPEC, "dataset": {"name": "npz", "args": {
        "path": str(tmp_path / "data.npz"), "scale": "abc"}}}))
    run = subprocess.run([sys.executable, "-m", "dptrain.worker", str(job), "--no-progress"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr  # EXIT_INVALID: not restarted, it would fail again
    assert ("dptrain worker: error: data set 'npz': could not convert string to float: 'abc'"
            in run.stderr)


def test_a_job_file_nested_too_deeply_is_one_line_naming_the_file(tmp_path):
    for job in (tmp_path / "deep.yaml", tmp_path / "deep.json"):
        job.write_text('{"name": "x", "model": {"name": "mlp", "args": '
                       + _nested(3000) + "}}")
        cli = subprocess.run([DPTRAIN, "--address", "127.0.0.1:1", "submit", str(job)],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 2 and cli.stdout == ""
        assert cli.stderr == (f"dptrain: error: INVALID_ARGUMENT: {job}: does not parse: it "
                              "nests lists and mappings deeper than the parser can follow\n")


# ---------------------------------------------------------------- messages

def test_a_cut_message_keeps_its_rule(server, stub):
    dataset = pb.DatasetSpec(name="digits", args_json=json.dumps({"k" * 5000: 1}))
    error = refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(dataset=dataset)))
    assert_invalid(error, "dataset.args.kkk")
    assert "...: is not an argument of data set 'digits' (it takes flatten)" in error.details()
    many = raw_spec(name="x" * 3000, dataset=dataset, batch_size=0, device="y" * 3000,
                    optimizer=pb.OptimizerSpec(name="z" * 3000, lr=-1), eval_every=-1,
                    scheduler=pb.SchedulerSpec(name="w" * 3000), seed=-1)
    details = refusal(stub, server, pb.SubmitJobRequest(spec=many)).details()
    assert details.startswith("name: must be 1-128 characters")
    # Whole errors, as many as fit, then how many more there are.
    assert details.endswith("; and 1 more") and len(details) <= MAX_ERROR_MESSAGE, details


def test_names_and_digests_with_a_trailing_newline_are_refused(server, stub, client):
    assert_invalid(refusal(stub, server, pb.SubmitJobRequest(spec=raw_spec(name="tiny\n"))),
                   "name: must be 1-128 characters")
    job_id, metadata = _running_job(server, client)
    header = pb.CheckpointHeader(
        job_id=job_id, step=1, manifest_json=json.dumps({"step": 1, "files": {}}).encode(),
        files=[pb.CheckpointFile(name="model.safetensors", size=1, sha256="a" * 64 + "\n")])
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.WorkerServiceStub(channel).UploadCheckpoint(
            iter([pb.UploadCheckpointRequest(header=header)]), metadata=metadata,
            timeout=DEADLINE)
    assert_invalid(info.value, "header.files[0].sha256: must be 64 lowercase hex digits")


def test_a_system_exit_in_a_handler_is_answered(tmp_path):
    """gRPC's threads catch only Exception: the servicer's edge must answer a SystemExit."""
    from concurrent import futures

    from dptrain.coordinator.server.service import _aborting

    def exits(request: bytes, context) -> bytes:
        with _aborting(context):
            sys.exit("a job's code called exit()")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Exits", {"Call": grpc.unary_unary_rpc_method_handler(exits)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/test.Exits/Call")(b"", timeout=DEADLINE)
    finally:
        server.stop(None)
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error: SystemExit: a job's code called exit()"

