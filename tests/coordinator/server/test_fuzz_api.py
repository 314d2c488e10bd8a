"""Fuzzing every RPC of a REAL coordinator on a loopback port with random, mutated-valid and
hostile requests, and undecodable bytes.

Whatever arrives, every answer must be OK or a client-error status with a one-line message
(naming the field when INVALID_ARGUMENT), within a deadline; a refused submission or upload
must store nothing; and listing jobs and checkpoints must keep working.

The server has no job runner, so accepted jobs stay QUEUED and nothing is launched; one job is
moved to RUNNING with a worker token, as the runner does, so that the worker service's calls
reach their logic. Hypothesis runs derandomized (the same examples on every run), a bounded
number of them: ``DPTRAIN_FUZZ_EXAMPLES`` sets how many in all (default 1500), e.g.
``DPTRAIN_FUZZ_EXAMPLES=10000 pytest tests/coordinator/server/test_fuzz_api.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from archives import HOSTILE as HOSTILE_ARCHIVES
from archives import hostile as hostile_archive
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc import METHODS, call_rpc

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.limits import MAX_ERROR_MESSAGE, channel_options
from dptrain.coordinator.api.records import Job, JobState, hash_token, new_job, new_token
from dptrain.coordinator.server import users
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import ServerSettings, serve
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.worker.spec import JobSpec

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("DPTRAIN_FUZZ_EXAMPLES", "1500"))
DEADLINE = 30.0  # seconds per call: an answer that does not come by then is a hang
FD = descriptor.FieldDescriptor
#: Codes a caller's request may earn. DATA_LOSS only where the proto documents it for what a
#: caller sends: uploaded bytes that do not match their declared sha256.
CLIENT_ERRORS = frozenset({"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND",
                           "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
                           "ALREADY_EXISTS", "OUT_OF_RANGE"})
ALSO_ALLOWED = {"UploadCheckpoint": {"DATA_LOSS"}}
#: Every field name of the API: an INVALID_ARGUMENT message starts with a path rooted in one.
FIELD_NAMES = frozenset({f.name for m in pb.DESCRIPTOR.message_types_by_name.values()
                         for f in m.fields} | {"request", "args"})
_PATH_ROOT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[.\[:]")

SPEC = {
    "name": "fuzz", "model": {"name": "mlp", "args": {"in_features": 4, "hidden": [8],
                                                     "num_classes": 3}},
    "dataset": {"name": "synthetic", "args": {"n": 64, "features": 4, "classes": 3}},
    "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 8, "max_steps": 20, "workers": 2,
    "scheduler": {"name": "cosine", "args": {"T_max": 20}},
    "checkpoint": {"every_steps": 5, "keep": 3},
}


def _nested(depth: int) -> str:
    return '{"x": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


# ---------------------------------------------------------------- hostile values

HOSTILE_STRINGS = [
    "", " ", "\x00", "a\x00b", "x" * 5000, "é🙂\u202e\ufeff", "tiny\n", "NaN", "null", "{}",
    "../../etc/passwd", "/etc/passwd", "unittest.__main__:main", "this:s", "os:system",
    "no_such_module_xyz:build", "mlp", "lenet", "digits", "synthetic", "npz", "adam", "sgd",
    "cosine", "step", "cpu", "cuda", "model.safetensors", "optimizer.safetensors",
    "manifest.json", "a" * 64, "j-000000000000", "%s%n", "[" * 300,
]
HOSTILE_INTS = [0, 1, -1, 2, 3, 5, 8, 2**31 - 1, -(2**31), 2**31, 2**53 + 1, 2**62, 2**63 - 1,
                -(2**63), 10**9, 10**9 + 1]
HOSTILE_FLOATS = [0.0, -0.0, 1e-8, 0.5, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308,
                  5e-324]
HOSTILE_JSON_VALUES = [math.nan, math.inf, -math.inf, 10**400, 2**62, -1, 0, "", "\x00",
                       "x" * 3000, None, True, [], {}, [[[[[]]]]], {"a": {"b": {"c": None}}}]
HOSTILE_JSON_TEXTS = [
    '{"dropout": NaN}', '{"x": Infinity}', '{"x": -Infinity}', '{"x": 1e999}', _nested(2000),
    _nested(33), _nested(32), "[1]", '"text"', "", " ", "{", '{"x": 1', "null",
    '{"x": ' + "9" * 5000 + "}", '{"' + "k" * 5000 + '": 1}', '{"n": 4611686018427387904}',
    '{"T_max": 0}', '{"step_size": 0}', '{"path": "/etc/passwd"}', '{"path": "a\\u0000b"}',
    '{"\\ud800": 1}', '{"features": [65536, 65536]}', '{"task": "tokens", "vocab": 1e300}',
]

def hostile(pool: list[Any], others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value from `pool` two times in three, else one of `others`."""
    return st.one_of(st.sampled_from(pool), st.sampled_from(pool), others)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(HOSTILE_JSON_VALUES),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)  # NaN and Infinity go out as JSON's lax readers take


def args_json(valid: dict[str, Any]) -> st.SearchStrategy[str]:
    """JSON text for an ``args_json`` field: valid args with hostile values put in, random JSON
    data, or hostile text."""
    mutated = st.builds(lambda key, value: _dumps({**valid, key: value}),
                        st.sampled_from([*valid, "x", "path", "n", "T_max"]),
                        hostile(HOSTILE_JSON_VALUES, json_values))
    return st.one_of(st.sampled_from(HOSTILE_JSON_TEXTS), mutated, st.just(_dumps(valid)),
                     json_values.map(_dumps), st.text(max_size=30))


def scalar(field: FD, json_args: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values for one scalar field of a message: hostile ones, and random ones of its type."""
    if field.name == "args_json":
        return args_json(json_args or {})
    t = field.type
    if t == FD.TYPE_STRING:
        return hostile(HOSTILE_STRINGS, st.text(max_size=40))
    if t == FD.TYPE_BYTES:
        return hostile([s.encode() for s in HOSTILE_JSON_TEXTS], st.binary(max_size=64))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_DOUBLE:
        return hostile(HOSTILE_FLOATS, st.floats())
    if t == FD.TYPE_ENUM:
        return st.integers(-3, 10) | st.sampled_from([-(2**31), 2**31 - 1])
    bits = 32 if t == FD.TYPE_INT32 else 64
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return hostile([v for v in HOSTILE_INTS if low <= v <= high], st.integers(low, high))


def _is_map(field: FD) -> bool:
    return field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


@st.composite
def random_message(draw: Any, message_type: descriptor.Descriptor, depth: int = 0) -> Message:
    """A message of `message_type` with random fields set (nested up to three levels)."""
    message = _new(message_type)
    for field in message_type.fields:
        if not draw(st.booleans()):
            continue
        _set(draw, message, field, depth)
    return message


def _new(message_type: descriptor.Descriptor) -> Message:
    return message_factory.GetMessageClass(message_type)()


def _set(draw: Any, message: Message, field: FD, depth: int) -> None:
    if _is_map(field):
        key_field, value_field = field.message_type.fields_by_name["key"], \
            field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(scalar(key_field), scalar(value_field), max_size=3))
        getattr(message, field.name).clear()
        getattr(message, field.name).update(entries)
    elif field.type == FD.TYPE_MESSAGE:
        if depth >= 3:
            return
        if field.is_repeated:
            items = draw(st.lists(random_message(field.message_type, depth + 1), max_size=3))
            del getattr(message, field.name)[:]
            getattr(message, field.name).extend(items)
        else:
            getattr(message, field.name).CopyFrom(draw(random_message(field.message_type,
                                                                      depth + 1)))
    elif field.is_repeated:
        del getattr(message, field.name)[:]
        getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=4)))
    else:
        setattr(message, field.name, draw(scalar(field)))


def _paths(message_type: descriptor.Descriptor, prefix: tuple = (), depth: int = 0
           ) -> Iterator[tuple[FD, ...]]:
    for field in message_type.fields:
        yield (*prefix, field)
        if field.type == FD.TYPE_MESSAGE and not _is_map(field) and \
                not field.is_repeated and depth < 3:
            yield from _paths(field.message_type, (*prefix, field), depth + 1)


@st.composite
def mutated(draw: Any, valid: Message, json_args: dict[str, Any] | None = None) -> Message:
    """`valid` with one to three of its fields (at any depth) set to hostile values or cleared."""
    message = type(valid)()
    message.CopyFrom(valid)
    paths = list(_paths(message.DESCRIPTOR))
    if not paths:  # a request without fields (ListUsers)
        return message
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        holder = message
        for field in path[:-1]:
            holder = getattr(holder, field.name)
        field = path[-1]
        if draw(st.integers(0, 4)) == 0:
            holder.ClearField(field.name)
        elif field.name == "args_json":
            holder.args_json = draw(args_json(json_args or {}))
        else:
            _set(draw, holder, field, depth=2)
    return message


# ---------------------------------------------------------------- the server under test

@dataclass
class Target:
    """The server, its channel, and the jobs requests may name."""

    server: Any
    channel: grpc.Channel
    running: str      # RUNNING, with a worker token: the worker service's calls reach it
    queued: str
    cancelled: str
    worker_token: str
    data_root: str

    def paths(self) -> list[str]:
        """Data paths: inside the data root, outside it, and malformed."""
        root = self.data_root
        return [f"{root}/train.npz", f"{root}/a\x00.npz", f"{root}/../escape.npz",
                "/etc/passwd", "relative/train.npz", f"{root}/{'x' * 5000}", ""]

    def job_ids(self) -> st.SearchStrategy[str]:
        return st.sampled_from([self.running, self.queued, self.cancelled]) | \
            st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=16)

    def metadata(self, method: str) -> st.SearchStrategy[tuple]:
        """Mostly the right credentials for `method` (so requests reach its logic), else
        another's, none, or malformed ones."""
        admin, worker = bearer_metadata(self.server.token), bearer_metadata(
            self.worker_token, self.running)
        right = admin if METHODS[method][0] == "dptrain.v1.Coordinator" else worker
        return st.sampled_from([right] * 12 + [
            admin, worker, bearer_metadata(self.worker_token, self.queued),
            bearer_metadata(self.worker_token), (), bearer_metadata("wrong"),
            (("authorization", "Bearer"),), (("authorization", "Basic " + "x" * 300),)])

    def jobs_stored(self) -> int:
        return sum(self.server.store.count_by_state().values())

    def checkpoints_stored(self) -> list[tuple[int, str]]:
        return [(r.step, r.sha256) for r in self.server.store.list_checkpoints(self.running)]


def _upload_messages(job_id: str, step: int, data: bytes = b"weights",
                     manifest_extra: dict | None = None) -> list[pb.UploadCheckpointRequest]:
    sha = hashlib.sha256(data).hexdigest()
    manifest = {"step": step, "epoch": 0, "metrics": {"loss": 0.5},
                "files": {"model.safetensors": {"sha256": sha, "bytes": len(data)}},
                **(manifest_extra or {})}
    header = pb.CheckpointHeader(job_id=job_id, step=step, manifest_json=_dumps(manifest).encode(),
                                 files=[pb.CheckpointFile(name="model.safetensors",
                                                          size=len(data), sha256=sha)])
    return [pb.UploadCheckpointRequest(header=header),
            pb.UploadCheckpointRequest(chunk=pb.FileChunk(name="model.safetensors", data=data))]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "data").mkdir()
    server = serve(ServerSettings(root / "state", cluster=Cluster.local(4),
                                  data_roots=[root / "data"]))
    try:
        jobs = [server.store.create_job(_job(name)) for name in ("running", "queued", "x")]
        users.create_user(FUZZ_USER, False, server.store)
        token = new_token()
        server.store.transition(jobs[0].id, JobState.QUEUED, JobState.RUNNING,
                                token_hash=hash_token(token), placement={"localhost": 2})
        server.store.transition(jobs[2].id, JobState.QUEUED, JobState.CANCELLED)
        with grpc.insecure_channel(server.address, options=channel_options()) as channel:
            t = Target(server, channel, jobs[0].id, jobs[1].id, jobs[2].id, token,
                       str(root / "data"))
            answer = _call(t, "UploadCheckpoint", _upload_messages(t.running, 5),
                           bearer_metadata(token, t.running))
            assert answer == ("OK", ""), answer
            yield t
    finally:
        server.stop(grace=0)
    assert "unittest.__main__" not in sys.modules  # a job named it: never imported here


FUZZ_USER = "fuzzer"  # a user the user RPCs may name (none of the callers' tokens is its)


def _job(name: str) -> Job:
    spec = JobSpec.from_dict({**SPEC, "name": name})
    return new_job(name, spec.to_dict())


# ---------------------------------------------------------------- calling and judging

def _call(t: Target, method: str, request: Any, metadata: tuple) -> tuple[str, str]:
    return call_rpc(t.channel, method, request, metadata, DEADLINE)


def judge(t: Target, method: str, request: Any, metadata: tuple) -> str:
    """Make the call and check its answer and what it stored; return the status code."""
    jobs, checkpoints = t.jobs_stored(), t.checkpoints_stored()
    code, details = _call(t, method, request, metadata)
    assert code in CLIENT_ERRORS | ALSO_ALLOWED.get(method, set()), (code, details)
    if code != "OK":
        assert details and "\n" not in details and len(details) <= MAX_ERROR_MESSAGE, details
    if code == "INVALID_ARGUMENT":
        root = _PATH_ROOT.match(details)
        assert root and root.group(1) in FIELD_NAMES, f"names no field: {details!r}"
    if method == "SubmitJob":
        assert t.jobs_stored() == jobs + (code == "OK"), (code, details)
    else:
        assert t.jobs_stored() == jobs
    if method == "UploadCheckpoint" and code != "OK":
        assert t.checkpoints_stored() == checkpoints, (code, details)
    for listing, listing_request in (("ListJobs", pb.ListJobsRequest(page_size=100)),
                                     ("ListCheckpoints", pb.ListCheckpointsRequest(
                                         job_id=t.running))):
        assert _call(t, listing, listing_request, bearer_metadata(t.server.token)) == \
            ("OK", ""), f"{listing} broke after {method}"
    return code


# ---------------------------------------------------------------- requests

def _valid_requests(t: Target) -> dict[str, Any]:
    """A request each method accepts (for UploadCheckpoint: its messages)."""
    return {
        "SubmitJob": serde.submit_request_to_proto(SPEC, priority=1, max_restarts=2,
                                                   time_limit=60.0),
        "GetJob": pb.GetJobRequest(job_id=t.queued),
        "ListJobs": pb.ListJobsRequest(states=[pb.QUEUED], page_size=10),
        "CancelJob": pb.CancelJobRequest(job_id=t.cancelled),
        "WatchJob": pb.WatchJobRequest(job_id=t.cancelled),
        "ListCheckpoints": pb.ListCheckpointsRequest(job_id=t.running),
        "DownloadCheckpoint": pb.DownloadCheckpointRequest(job_id=t.running,
                                                           file="manifest.json"),
        "ReportProgress": pb.ReportProgressRequest(job_id=t.running, events=[
            pb.WorkerEvent(metrics=pb.Metrics(step=3, values={"loss": 0.5})),
            pb.WorkerEvent(log=pb.LogLine(line="hello", rank=0))]),
        "Heartbeat": pb.HeartbeatRequest(job_id=t.running),
        "FetchCheckpoint": pb.FetchCheckpointRequest(job_id=t.running),
        "OpenCheckpointUpload": _upload_messages(t.running, 7)[0].header,  # a ticket, no bytes
        "FetchCode": pb.FetchCodeRequest(job_id=t.running),
        # Only the job that stays RUNNING is named: deleting a target would change the run.
        "DeleteJob": pb.DeleteJobRequest(job_id=t.running),
        "KeepCheckpoint": pb.KeepCheckpointRequest(job_id=t.running, step=0, keep=True),
        "CreateUser": pb.CreateUserRequest(name="newcomer", admin=False),
        "IssueToken": pb.IssueTokenRequest(name=FUZZ_USER),
        "RevokeUser": pb.RevokeUserRequest(name=FUZZ_USER),
        "ListUsers": pb.ListUsersRequest(),
    }


_ARGS_OF = {"model": SPEC["model"]["args"], "dataset": SPEC["dataset"]["args"],
            "scheduler": SPEC["scheduler"]["args"]}


@st.composite
def requests(draw: Any, t: Target, method: str) -> Any:
    """A request for `method`: random, mutated from a valid one, or valid with a job id of
    ours or a hostile one."""
    _, m = METHODS[method]
    if method == "UploadCheckpoint":
        return draw(uploads(t))
    if method == "UploadCode":
        return draw(code_uploads())
    if method == "SubmitJob" and draw(st.booleans()):
        return draw(submissions(t))
    valid = _valid_requests(t)[method]
    kind = draw(st.sampled_from(["random", "mutated", "mutated", "job"]))
    if kind == "random":
        request = draw(random_message(m.input_type))
    elif kind == "mutated":
        args = draw(st.sampled_from(list(_ARGS_OF.values())))
        request = draw(mutated(valid, args))
    else:
        request = type(valid)()
        request.CopyFrom(valid)
    if "job_id" in m.input_type.fields_by_name and kind != "random" and draw(st.booleans()):
        request.job_id = draw(t.job_ids().filter(
            lambda job_id: (method != "CancelJob" or job_id != t.running)
            and (method != "DeleteJob" or job_id == t.running)))
    if method == "CancelJob" and request.job_id == t.running:
        request.job_id = t.queued  # the worker service's calls need their job running
    return request


@st.composite
def submissions(draw: Any, t: Target) -> pb.SubmitJobRequest:
    """A submission of the valid spec with one to three values replaced: hostile argument
    values, names and paths in the model's, data set's and schedule's args (written as JSON
    text the way any client could), or hostile values of the spec's own fields."""
    spec = copy.deepcopy(SPEC)
    changed: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["model", "dataset", "scheduler", "name", "field"]))
        if where == "name":
            section = draw(st.sampled_from(["model", "dataset", "scheduler"]))
            spec[section]["name"] = draw(hostile(HOSTILE_STRINGS, st.text(max_size=20)))
        elif where == "field":
            field = draw(st.sampled_from([f for f in pb.JobSpec.DESCRIPTOR.fields
                                          if f.type != FD.TYPE_MESSAGE]))
            changed[field.name] = draw(st.lists(scalar(field), max_size=3) if field.is_repeated
                                       else scalar(field))
        else:
            args = spec[where]["args"]
            key = draw(st.sampled_from([*args, "dropout", "path", "files", "x", "k" * 300]))
            args[key] = draw(hostile(HOSTILE_JSON_VALUES + t.paths(), json_values))
            if key in ("path", "files"):
                spec["dataset"]["name"] = "npz"
    message = pb.JobSpec(name=spec["name"])
    for section in ("model", "dataset", "scheduler"):
        part = getattr(message, section)
        part.name, part.args_json = spec[section]["name"], _dumps(spec[section]["args"])
    message.optimizer.CopyFrom(pb.OptimizerSpec(name="adam", lr=0.01))
    message.batch_size, message.max_steps, message.workers = 8, 20, 2
    for name, value in changed.items():
        if isinstance(value, list):
            del getattr(message, name)[:]
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return pb.SubmitJobRequest(spec=message, priority=draw(scalar(
        pb.SubmitJobRequest.DESCRIPTOR.fields_by_name["priority"])))


@st.composite
def uploads(draw: Any, t: Target) -> list[pb.UploadCheckpointRequest]:
    """An upload's messages: valid for a new step, with a hostile manifest, header or chunks,
    reordered, or random."""
    step = draw(st.integers(0, 10**6))
    manifest_extra = draw(st.sampled_from([
        {}, {"metrics": [1, 2]}, {"metrics": {"loss": 10**400}}, {"metrics": {"loss": math.nan}},
        {"metrics": "x"}, {"epoch": 2**64}, {"epoch": -1}, {"epoch": True}, {"step": step + 0.0},
        {"step": True}, {"files": []}, {"spec": json.loads(_nested(70))}]))
    messages = _upload_messages(t.running, step, draw(st.binary(max_size=32)), manifest_extra)
    kind = draw(st.sampled_from(["as is", "header", "chunk", "order", "random"]))
    if kind == "header":
        header = draw(mutated(messages[0].header))
        messages[0] = pb.UploadCheckpointRequest(header=header)
    elif kind == "chunk":
        messages[1] = pb.UploadCheckpointRequest(chunk=draw(mutated(messages[1].chunk)))
    elif kind == "order":
        messages = draw(st.permutations(messages * draw(st.integers(0, 2))))
    elif kind == "random":
        messages = draw(st.lists(random_message(pb.UploadCheckpointRequest.DESCRIPTOR),
                                 max_size=4))
    return messages


@st.composite
def code_uploads(draw: Any) -> list[pb.UploadCodeRequest]:
    """A code upload's messages: a valid or hostile archive, with its header right, wrong,
    mutated or missing, reordered, or random messages."""
    data = draw(st.sampled_from([hostile_archive(m) for m in HOSTILE_ARCHIVES.values()]
                                + [b"", b"not an archive"]))
    header = pb.CodeArchive(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    messages = [pb.UploadCodeRequest(header=header), pb.UploadCodeRequest(chunk=data)]
    kind = draw(st.sampled_from(["as is", "header", "order", "random"]))
    if kind == "header":
        messages[0] = pb.UploadCodeRequest(header=draw(mutated(header)))
    elif kind == "order":
        messages = draw(st.permutations(messages * draw(st.integers(0, 2))))
    elif kind == "random":
        messages = draw(st.lists(random_message(pb.UploadCodeRequest.DESCRIPTOR), max_size=4))
    return messages


# ---------------------------------------------------------------- the tests

def _settings(share: float) -> settings:
    return settings(max_examples=max(1, round(EXAMPLES * share)), derandomize=True,
                    database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("method", sorted(METHODS))
@_settings(0.8 / len(METHODS))
@given(data=st.data())
def test_every_rpc_answers_hostile_requests_with_client_errors(target, method, data):
    request = data.draw(requests(target, method), label="request")
    metadata = data.draw(target.metadata(method), label="metadata")
    judge(target, method, request, metadata)


@_settings(0.2)
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=64),
       authenticated=st.booleans(), data=st.data())
def test_undecodable_bytes_are_refused_by_every_rpc(target, method, payload, authenticated,
                                                   data):
    metadata = bearer_metadata(target.server.token) if authenticated else ()
    request = [payload] * data.draw(st.integers(1, 2)) if METHODS[method][1].client_streaming \
        else payload
    code = judge(target, method, request, metadata)
    if not authenticated:
        assert code == "UNAUTHENTICATED"  # refused before its bytes are read
