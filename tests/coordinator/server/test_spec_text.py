"""``SubmitJobRequest.spec_text``: a job file's text as it is (YAML or JSON), sent raw as grpcurl
or a client in another language would, to a REAL coordinator on loopback. It queues the job the
structured ``spec`` does, and a bad spec gets the same message either way."""

from __future__ import annotations

import json

import grpc
import pytest
import yaml

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc

JOB_YAML = """\
# the digits MLP, as a job file
name: digits-mlp
model: {name: mlp, args: {in_features: 64, hidden: [32], num_classes: 10}}
dataset: {name: digits, validation_fraction: 0.25}
optimizer: {name: adam, lr: 1e-3}     # YAML 1.2: a float, as in a job file
batch_size: 32
max_steps: 20
workers: 2
checkpoint: {every_steps: 5, keep: 2}
"""


@pytest.fixture
def server(serve_coordinator):
    return serve_coordinator(cluster=Cluster.local(2))


@pytest.fixture
def submit(server):
    """``submit(request) -> pb.Job``, raising grpc.RpcError, as a raw client."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        yield lambda request: stub.SubmitJob(request, metadata=bearer_metadata(server.token),
                                             timeout=30)


def _stored(server) -> int:
    return sum(server.store.count_by_state().values())


def _refused(server, submit, request) -> str:
    before = _stored(server)
    with pytest.raises(grpc.RpcError) as info:
        submit(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _stored(server) == before
    return info.value.details()


def test_a_yaml_job_file_as_text_queues_the_job_its_structured_spec_does(server, submit):
    as_text = submit(pb.SubmitJobRequest(spec_text=JOB_YAML, priority=3))
    structured = submit(pb.SubmitJobRequest(spec=serde.spec_to_proto(yaml.safe_load(
        JOB_YAML.replace("1e-3", "0.001"))), priority=3))
    assert as_text.state == structured.state == pb.QUEUED and as_text.priority == 3
    stored = [server.store.get_job(job.id) for job in (as_text, structured)]
    assert stored[0].spec == stored[1].spec
    assert stored[0].spec["optimizer"]["lr"] == 0.001  # 1e-3 read as a number, not a string
    assert stored[0].spec["model"]["args"] == {"in_features": 64, "hidden": [32],
                                               "num_classes": 10}


def test_json_is_a_job_file_too(server, submit):
    job = yaml.safe_load(JOB_YAML)
    job["optimizer"]["lr"] = 0.001
    reply = submit(pb.SubmitJobRequest(spec_text=json.dumps(job)))
    assert server.store.get_job(reply.id).spec["name"] == "digits-mlp"


@pytest.mark.parametrize("request_kwargs, which", [
    ({}, "neither"),
    ({"spec_text": JOB_YAML, "spec": pb.JobSpec(name="x")}, "both"),
    ({"spec_text": "", "spec": pb.JobSpec(name="x")}, "both"),  # present, though empty
])
def test_exactly_one_of_spec_and_spec_text(server, submit, request_kwargs, which):
    details = _refused(server, submit, pb.SubmitJobRequest(**request_kwargs))
    assert details == f"spec: give exactly one of spec and spec_text, got {which!r}"


def _deep(depth: int) -> dict:
    value: object = []
    for _ in range(depth - 2):
        value = [value]
    return {"x": value}


# Each bad spec, changed from the job file above: the message is the same as text or message.
BAD = [
    ({"optimizer": {"name": "adam", "lr": -0.1}},
     "optimizer.lr: must be a finite number >= 0, got -0.1"),
    ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
    ({"workers": 3}, "batch_size: must be divisible by the number of ranks (3), got 32"),
    ({"model": {"name": "os:system", "args": {"command": "id > f"}}},
     "model.name: must name the job's shipped code (none), a model of the zoo"),
    ({"model": {"name": "mlp", "args": _deep(33)}},
     "model.args: must nest arrays and objects at most 32 levels deep"),
    ({"dataset": {"name": "digits", "validation_fraction": "a quarter"}},
     "dataset.validation_fraction: must be a number, got 'a quarter'"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_field_gets_the_same_message_both_ways(server, submit, changes, message):
    job = {**yaml.safe_load(JOB_YAML), **changes}
    as_text = _refused(server, submit, pb.SubmitJobRequest(spec_text=yaml.safe_dump(job)))
    try:
        structured_request = pb.SubmitJobRequest(spec=serde.spec_to_proto(job))
    except ValidationError:  # a value of the wrong type: the message cannot carry it
        structured_request = None
    if structured_request is not None:
        assert _refused(server, submit, structured_request) == as_text
    assert as_text.startswith(message), as_text


def test_a_misspelt_field_is_named_as_dptrain_submit_names_it(server, submit):
    text = JOB_YAML.replace("optimizer:", "optimzer:")
    details = _refused(server, submit, pb.SubmitJobRequest(spec_text=text))
    assert details.startswith("optimzer: unknown field (did you mean 'optimizer'?); job has ")


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "spec_text: does not parse: while parsing a flow sequence"),
    ("- a list\n- of things\n", "spec_text: must hold a mapping of job fields, got "
                                "'- a list\\n- of things\\n'"),
    ("just text", "spec_text: must hold a mapping of job fields, got 'just text'"),
    ("[" * 100_000, "spec_text: must be at most 32768 bytes, got '100000 bytes'"),
    ("[" * 30_000, "spec_text: does not parse: "),
])
def test_text_that_is_no_job_file_is_refused_naming_spec_text(server, submit, text, message):
    details = _refused(server, submit, pb.SubmitJobRequest(spec_text=text))
    assert details.startswith(message), details
    assert "\n" not in details
