"""coordinator.serde: job files <-> JobSpec messages for every field, and jobs, events and
checkpoints <-> their messages. Expected values are written out by hand, field by field."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from repo import REPO

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.api.records import CheckpointRecord, Event, EventKind, Job, JobState
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.worker import spec as worker_spec
from dptrain.worker.spec import JobSpec, JobSpecError, load_spec

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

# Every field of the worker's job spec set, none to its default.
FULL = {
    "name": "full-spec",
    "model": {"name": "mlp", "args": {"in_features": 16, "hidden": [32, 8], "num_classes": 4,
                                      "dropout": 0.25}},
    "dataset": {"name": "synthetic", "args": {"task": "classification", "n": 256, "features": 16,
                                              "classes": 4, "noise": 1.0, "seed": 3},
                "validation_fraction": 0.2},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 1e-4, "betas": [0.8, 0.99], "eps": 1e-6},
    "scheduler": {"name": "step", "args": {"step_size": 10, "gamma": 0.5}},
    "batch_size": 32,
    "epochs": 3,
    "max_steps": 50,
    "eval_every": 5,
    "seed": 7,
    "workers": 2,
    "device": "cuda",
    "allreduce": "nccl",
    "checkpoint": {"every_steps": 10, "keep": 2},
    "loss": "mylosses:focal",
    "code": "src",
}
# The one field a declarative job cannot have: an own loop's, with everything it may have.
FULL_OWN_LOOP = {"name": "own-loop", "entrypoint": "train.py --lr 0.1", "seed": 7,
                 "workers": 2, "device": "cuda", "checkpoint": {"every_steps": 10, "keep": 2},
                 "code": "src"}


def test_the_full_spec_sets_every_field_to_a_non_default():
    def check(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                check(value, f"{f.name}.")
                continue
            if f.name == "entrypoint":
                continue
            if f.default is not dataclasses.MISSING:
                assert value != f.default, f"{prefix}{f.name}"
            elif f.default_factory is not dataclasses.MISSING:
                assert value != f.default_factory(), f"{prefix}{f.name}"

    check(JobSpec.from_dict(FULL))
    assert JobSpec.from_dict(FULL_OWN_LOOP).entrypoint == "train.py --lr 0.1"


def test_an_own_loop_spec_round_trips_exactly():
    message = serde.spec_to_proto(FULL_OWN_LOOP)
    assert message.entrypoint == "train.py --lr 0.1" and not message.HasField("model")
    assert serde.spec_from_proto(pb.JobSpec.FromString(message.SerializeToString())) == (
        FULL_OWN_LOOP)


def test_message_mirrors_the_worker_spec_field_for_field():
    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    def proto_names(message):
        return {("args" if f.name == "args_json" else f.name) for f in message.DESCRIPTOR.fields}

    assert proto_names(pb.JobSpec) == names(JobSpec)
    for section, cls in worker_spec._SECTIONS.items():
        message = getattr(pb.JobSpec(), section)
        assert proto_names(message) == names(cls), section


def test_every_field_reaches_the_message_with_its_value():
    m = serde.spec_to_proto(FULL)
    assert (m.name, m.batch_size, m.epochs, m.max_steps) == ("full-spec", 32, 3, 50)
    assert (m.eval_every, m.seed, m.workers, m.device) == (5, 7, 2, "cuda")
    assert m.allreduce == "nccl"
    assert m.model.name == "mlp"
    assert m.model.args_json == ('{"in_features":16,"hidden":[32,8],"num_classes":4,'
                                 '"dropout":0.25}')
    assert m.dataset.name == "synthetic" and m.dataset.validation_fraction == 0.2
    assert m.dataset.args_json == ('{"task":"classification","n":256,"features":16,'
                                   '"classes":4,"noise":1.0,"seed":3}')
    o = m.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov) == ("sgd", 0.05, 0.9, True)
    assert (o.weight_decay, list(o.betas), o.eps) == (1e-4, [0.8, 0.99], 1e-6)
    assert m.scheduler.name == "step" and m.scheduler.args_json == '{"step_size":10,"gamma":0.5}'
    assert (m.checkpoint.every_steps, m.checkpoint.keep) == (10, 2)


def test_full_spec_round_trips_exactly():
    back = serde.spec_from_proto(serde.spec_to_proto(FULL))
    assert back == FULL
    # JSON keeps integers and floats apart: layer sizes stay ints, a 1.0 stays a float.
    assert type(back["model"]["args"]["hidden"][0]) is int
    assert type(back["dataset"]["args"]["noise"]) is float


def test_round_trip_through_bytes_on_the_wire():
    wire = serde.spec_to_proto(FULL).SerializeToString()
    assert serde.spec_from_proto(pb.JobSpec.FromString(wire)) == FULL


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_job_files_convert_both_ways(path):
    spec = load_spec(path)
    raw = yaml.safe_load(path.read_text())
    message = serde.spec_to_proto(raw)
    # The job file as written comes back as written ...
    back = serde.spec_from_proto(message)
    assert {k: v for k, v in back.items()} == {k: v for k, v in raw.items() if v is not None}
    # ... and means the same job, defaults and all.
    assert JobSpec.from_dict(back).to_dict() == spec.to_dict()
    assert serde.spec_from_proto(serde.spec_to_proto(spec)) == {
        k: v for k, v in spec.to_dict().items() if v is not None}


def test_absent_fields_stay_absent_and_take_the_worker_defaults():
    minimal = {"name": "m", "model": {"name": "mlp"}, "dataset": {"name": "digits"},
               "optimizer": {"name": "adam", "lr": 0.001}, "batch_size": 8, "epochs": 1}
    message = serde.spec_to_proto(minimal)
    assert not message.HasField("workers") and not message.HasField("device")
    assert not message.HasField("scheduler") and not message.HasField("checkpoint")
    assert not message.optimizer.HasField("eps") and list(message.optimizer.betas) == []
    back = serde.spec_from_proto(message)
    assert back == minimal
    spec = JobSpec.from_dict(back)
    assert (spec.workers, spec.device, spec.checkpoint.keep, spec.optimizer.betas) == (
        1, "cpu", 3, (0.9, 0.999))
    assert spec.dataset.validation_fraction == 0.1 and spec.scheduler is None


def test_zero_values_are_kept_distinct_from_absent():
    message = serde.spec_to_proto({"seed": 0, "eval_every": 0, "optimizer": {"lr": 0.0}})
    assert message.HasField("seed") and message.seed == 0
    assert message.optimizer.HasField("lr")
    assert serde.spec_from_proto(message) == {"seed": 0, "eval_every": 0,
                                              "optimizer": {"lr": 0.0}}


def test_an_empty_section_is_present():
    message = serde.spec_to_proto({"checkpoint": {}})
    assert message.HasField("checkpoint")
    assert serde.spec_from_proto(message) == {"checkpoint": {}}


@pytest.mark.parametrize("data, field, rule", [
    ({"batch_size": "64"}, "batch_size", "must be an integer"),
    ({"batch_size": True}, "batch_size", "must be an integer"),
    ({"seed": 2**64}, "seed", "must fit in 64 bits"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr", "must be a number"),
    ({"optimizer": {"nesterov": 1}}, "optimizer.nesterov", "must be true or false"),
    ({"optimizer": {"betas": 0.9}}, "optimizer.betas", "must be a pair of numbers"),
    ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas", "must be a pair of numbers"),
    ({"name": 5}, "name", "must be a string"),
    ({"batch_szie": 64}, "batch_szie", "unknown field"),
    ({"model": {"name": "mlp", "arg": {}}}, "model.arg", "unknown field"),
    ({"model": "mlp"}, "model", "must be a mapping"),
    ({"model": {"args": [1, 2]}}, "model.args", "must be a mapping"),
    ({"model": {"args": {"x": {1, 2}}}}, "model.args", "must be JSON data"),
    ({"dataset": {"args": {"scale": math.nan}}}, "dataset.args", "must be JSON data"),
])
def test_type_errors_name_the_field_in_the_spec_owner_before_serde(data, field, rule):
    # The client checks here before it maps the spec; the server runs the same check.
    with pytest.raises(JobSpecError) as info:
        worker_spec.check_types(data)
    first = [e for e in info.value.errors if e.path == field]
    assert first and rule in first[0].rule, info.value


@pytest.mark.parametrize("data, field", [
    ({"batch_size": "64"}, "batch_size"),
    ({"seed": 2**64}, "seed"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr"),
    ({"optimizer": {"betas": 0.9}}, "optimizer.betas"),
    ({"name": 5}, "name"),
    ({"batch_szie": 64}, "batch_szie"),
    ({"model": "mlp"}, "model"),
    ({"model": {"args": {"x": {1, 2}}}}, "model.args"),
    ({"dataset": {"args": {"scale": math.nan}}}, "dataset.args"),
])
def test_what_protobuf_cannot_carry_names_the_field(data, field):
    # serde maps generically: what the message cannot hold still names its path.
    with pytest.raises(ValidationError) as info:
        serde.spec_to_proto(data)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def _walked(data):
    """spec_to_proto's reference: the field-by-field walk alone."""
    message = pb.JobSpec()
    serde._fill(message, data, "")
    return message


class _Section(dict):
    pass


@pytest.mark.parametrize("data", [
    FULL, FULL_OWN_LOOP, JobSpec.from_dict(FULL).to_dict(),
    JobSpec.from_dict(FULL_OWN_LOOP).to_dict(), {}, {"checkpoint": {}},
    {"model": {"name": None, "args": None}}, {"epochs": None, "scheduler": None},
    {"model": {"name": "mlp", "args": {"deep": {"é": [1, 2.5, None, True]}}}},
    {"optimizer": {"betas": (0.5, 0.25), "lr": 1}}, {"batch_size": True},
    # What the message cannot carry: the same error from both.
    {"bogus": None}, {"args": None}, {"args": {}}, {"model": {"args_json": "{}"}},
    {"args_json": "{}"}, {1: "x"}, {"model": {1: "x"}}, {"model": "mlp"},
    {"model": _Section(name="mlp")}, {"model": pb.ModelSpec(name="mlp")},
    {"name": {"a": 1}}, {"seed": 2**64}, {"seed": 1.5}, {"name": "\ud800"},
    {"optimizer": {"betas": "ab"}}, {"optimizer": {"betas": [0.9, "x"]}},
    {"dataset": {"args": {"scale": math.nan}}}, {"model": {"args": {"x": {1, 2}}}},
])
def test_spec_to_proto_builds_what_the_field_walk_builds(data):
    try:
        expected = _walked(data)
    except ValidationError as e:
        with pytest.raises(ValidationError) as info:
            serde.spec_to_proto(data)
        assert (info.value.field, str(info.value)) == (e.field, str(e))
    else:
        got = serde.spec_to_proto(data)
        assert got == expected
        assert [f.name for f, _ in got.ListFields()] == [
            f.name for f, _ in expected.ListFields()]


@pytest.mark.parametrize("args_json, rule", [
    ("[1, 2]", "must be a mapping of argument names to values"),
    ('"text"', "must be a mapping of argument names to values"),
])
def test_args_json_that_is_not_an_object_is_refused_by_the_spec_owner(args_json, rule):
    message = pb.JobSpec(model=pb.ModelSpec(name="mlp", args_json=args_json))
    with pytest.raises(JobSpecError) as info:
        worker_spec.check_types(serde.spec_from_proto(message))
    assert [str(e) for e in info.value.errors if e.path == "model.args"][0].startswith(
        f"model.args: {rule}")


def test_args_json_that_is_not_json_text_names_the_field():
    message = pb.JobSpec(model=pb.ModelSpec(name="mlp", args_json="{not json"))
    with pytest.raises(ValidationError, match="must be JSON text") as info:
        serde.spec_from_proto(message)
    assert info.value.field == "model.args"


def test_empty_args_json_means_no_arguments():
    assert serde.spec_from_proto(pb.JobSpec(model=pb.ModelSpec(name="m", args_json=""))) == {
        "model": {"name": "m", "args": {}}}


def test_oversized_spec_is_refused():
    message = pb.JobSpec(name="x" * (300 * 1024))
    with pytest.raises(ValidationError, match="spec: must be at most"):
        serde.spec_from_proto(message)


# ---------------------------------------------------------------- jobs, events, checkpoints

def _job(**changes):
    spec = JobSpec.from_dict(FULL).to_dict()
    job = Job(id="j-0123456789ab", name="full-spec", spec=spec,
              submitted_at=1_700_000_000.25, priority=5, state=JobState.RUNNING, max_restarts=4,
              time_limit=600.5, started_at=1_700_000_010.5, finished_at=None, restarts=1,
              error="worker 1 died", exit_code=None, heartbeat_at=1_700_000_020.75,
              last_step=40, metrics={"loss": 0.5, "accuracy": 0.75, "total_steps": 50},
              placement=(("node1", 1), ("node2", 1)), token_hash="secret-hash")
    return dataclasses.replace(job, **changes)


def test_job_round_trip_keeps_every_field_but_the_token_hash():
    job = _job()
    message = serde.job_to_proto(job)
    assert message.state == pb.RUNNING and message.time_limit.seconds == 600
    assert message.time_limit.nanos == 500_000_000
    assert message.submitted_at.seconds == 1_700_000_000
    assert message.submitted_at.nanos == 250_000_000
    assert not message.HasField("finished_at") and not message.HasField("exit_code")
    assert [(p.host, p.slots) for p in message.placement] == [("node1", 1), ("node2", 1)]
    assert "secret-hash" not in str(message)
    assert message.workers == 2  # the spec's, repeated for other clients
    assert serde.job_from_proto(message) == dataclasses.replace(job, token_hash="")


def test_job_with_exit_code_and_no_optional_times():
    job = _job(state=JobState.FAILED, exit_code=0, time_limit=None, started_at=None,
               heartbeat_at=None, last_step=None, finished_at=1_700_000_100.0, placement=())
    message = serde.job_to_proto(job)
    assert message.HasField("exit_code") and message.exit_code == 0
    assert serde.job_from_proto(message) == dataclasses.replace(job, token_hash="")


def test_job_metrics_keep_only_numbers():
    message = serde.job_to_proto(_job(metrics={"loss": 1, "status": "completed", "ok": True}))
    assert dict(message.metrics) == {"loss": 1.0}


def test_job_spec_without_optional_fields_comes_back_complete():
    spec = load_spec(REPO / "examples" / "digits_mlp.yaml").to_dict()
    assert spec["max_steps"] is None and spec["scheduler"] is None
    job = _job(spec=spec)
    assert serde.job_from_proto(serde.job_to_proto(job)).spec == spec


@pytest.mark.parametrize("kind, payload, oneof", [
    (EventKind.STATE, {"state": "QUEUED"}, "state"),
    (EventKind.STATE, {"state": "RESTARTING", "previous": "RUNNING", "error": "rank 1 died",
                       "exit_code": 1, "restarts": 2}, "state"),
    (EventKind.METRICS, {"step": 12, "loss": 0.25, "epoch": 1, "status": "completed"},
     "metrics"),
    (EventKind.LOG, {"line": "resumed from step 200", "rank": 0}, "log"),
    (EventKind.LOG, {"line": "no rank"}, "log"),
    (EventKind.CHECKPOINT, {"step": 200, "sha256": "a" * 64, "size": 12345}, "checkpoint"),
])
def test_event_round_trip(kind, payload, oneof):
    event = Event("j-0123456789ab", 7, 1_700_000_000.5, kind, payload)
    message = serde.event_to_proto(event)
    assert message.WhichOneof("payload") == oneof and message.seq == 7
    back = serde.event_from_proto(message)
    if kind is EventKind.METRICS:  # numbers travel as doubles: 1 comes back as 1.0
        assert back.payload == {"step": 12, "loss": 0.25, "epoch": 1.0, "status": "completed"}
        assert back == dataclasses.replace(event, payload=back.payload)
    else:
        assert back == event


def test_metrics_message_splits_numbers_and_text():
    message = serde.event_to_proto(Event("j-0123456789ab", 1, 0.0, EventKind.METRICS,
                                         {"step": 3, "loss": 0.5, "status": "ok",
                                          "checkpoint": None, "flag": True}))
    assert message.metrics.step == 3
    assert dict(message.metrics.values) == {"loss": 0.5}
    assert dict(message.metrics.text) == {"status": "ok", "flag": "true"}


def test_worker_events_round_trip():
    for kind, payload in [(EventKind.METRICS, {"step": 4, "val_loss": 0.125}),
                          (EventKind.LOG, {"line": "hello", "rank": 0})]:
        message = serde.worker_event_to_proto(kind, payload)
        assert serde.worker_event_from_proto(message) == (kind, payload)
    with pytest.raises(ValidationError, match="kind"):
        serde.worker_event_to_proto(EventKind.STATE, {"state": "RUNNING"})
    with pytest.raises(ValidationError, match="events"):
        serde.worker_event_from_proto(pb.WorkerEvent())


def test_checkpoint_record_to_message():
    manifest = {"step": 200, "epoch": 9, "metrics": {"loss": 0.125, "note": "x"},
                "files": {"optimizer.safetensors": {"sha256": "b" * 64, "bytes": 20},
                          "model.safetensors": {"sha256": "a" * 64, "bytes": 10}}}
    record = CheckpointRecord("j-0123456789ab", 200, "c" * 64, 130, 1_700_000_000.5, manifest)
    message = serde.checkpoint_to_proto(record)
    assert [(f.name, f.size, f.sha256) for f in message.files] == [
        ("model.safetensors", 10, "a" * 64), ("optimizer.safetensors", 20, "b" * 64)]
    assert (message.step, message.epoch, message.size, message.sha256) == (200, 9, 130, "c" * 64)
    assert dict(message.metrics) == {"loss": 0.125}
    back = serde.checkpoint_from_proto(message)
    assert (back.job_id, back.step, back.sha256, back.size, back.created_at) == (
        record.job_id, 200, "c" * 64, 130, 1_700_000_000.5)
    assert back.manifest["files"] == manifest["files"]


def test_submit_request_round_trip_and_checks():
    request = serde.submit_request_to_proto(FULL, priority=-3, max_restarts=0, time_limit=90.5)
    domain = serde.submit_request_from_proto(request)
    assert (domain.priority, domain.max_restarts, domain.time_limit) == (-3, 0, 90.5)
    assert domain.spec == FULL
    plain = serde.submit_request_from_proto(serde.submit_request_to_proto(FULL))
    assert (plain.max_restarts, plain.time_limit) == (None, None)
    with pytest.raises(ValidationError, match="time_limit"):
        serde.submit_request_to_proto(FULL, time_limit=0)
    with pytest.raises(ValidationError, match="max_restarts"):
        serde.submit_request_to_proto(FULL, max_restarts=-1)
    with pytest.raises(ValidationError, match="^spec: give exactly one of spec and spec_text"):
        serde.submit_request_from_proto(pb.SubmitJobRequest())


def test_states_map_by_name():
    for state in JobState:
        assert pb.JobState.Name(serde.state_to_proto(state)) == state.value
        assert serde.state_from_proto(serde.state_to_proto(state)) is state
    with pytest.raises(ValidationError, match="state"):
        serde.state_from_proto(pb.JOB_STATE_UNSPECIFIED)
