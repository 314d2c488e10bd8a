"""Domain rules: the state machine, job validation, worker tokens, error -> status mapping."""

from __future__ import annotations

import itertools

import pytest

from dptrain.coordinator.api.errors import (
    BlobCorrupted,
    CheckpointNotFound,
    InvalidTransition,
    StateConflict,
    ValidationError,
    status_name,
)
from dptrain.coordinator.api.records import (
    TERMINAL_STATES,
    JobState,
    apply_transition,
    check_transition,
    hash_token,
    new_job,
    new_token,
    verify_token,
)

S = JobState
# The lifecycle written out by hand, independently of TRANSITIONS.
ALLOWED = {
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.FAILED), (S.QUEUED, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.RESTARTING), (S.RUNNING, S.CANCELLING), (S.RUNNING, S.TIMED_OUT),
    (S.RESTARTING, S.RUNNING), (S.RESTARTING, S.FAILED), (S.RESTARTING, S.CANCELLED),
    (S.CANCELLING, S.CANCELLED),
}


@pytest.mark.parametrize("current, target", list(itertools.product(JobState, JobState)))
def test_state_machine(current, target):
    if (current, target) in ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(InvalidTransition, match=f"from {current.value} to {target.value}"):
            check_transition(current, target)


def test_terminal_states():
    assert TERMINAL_STATES == {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMED_OUT}
    assert all(s.terminal for s in TERMINAL_STATES) and not S.RESTARTING.terminal
    assert not S.CANCELLING.terminal  # its workers are still stopping
    with pytest.raises(InvalidTransition, match="none, it is terminal"):
        check_transition(S.CANCELLED, S.QUEUED)


def test_apply_transition_lets_explicit_fields_win():
    job = new_job("j", {"workers": 1}, now=1.0)
    running = apply_transition(job, S.RUNNING, 5.0, {"heartbeat_at": 4.0})
    assert (running.started_at, running.heartbeat_at) == (5.0, 4.0)
    assert job.state is S.QUEUED  # records are immutable


def test_new_job_defaults_and_id():
    job = new_job("digits-mlp", {"batch_size": 64, "workers": 2}, now=3.0)
    assert job.id.startswith("j-") and len(job.id) == 14
    assert (job.state, job.priority, job.restarts, job.submitted_at) == (S.QUEUED, 0, 0, 3.0)
    assert new_job("a", {}).id != new_job("a", {}).id


@pytest.mark.parametrize("kw, message", [
    ({"name": ""}, "name: must be 1-128 characters of"),
    ({"name": "bad name"}, "name: must be 1-128 characters of"),
    ({"priority": 1.5}, "priority: must be an integer, got 1.5"),
    ({"max_restarts": -1}, "max_restarts: must be >= 0, got -1"),
    ({"time_limit": 0}, "time_limit: must be > 0 seconds (or None for no limit), got 0"),
    ({"time_limit": float("inf")}, "time_limit: must be a finite number"),
    ({"spec": {"x": {1, 2}}}, "spec: must be JSON-serialisable"),
    ({"spec": [1]}, "spec: must be a mapping, got [1]"),
    ({"job_id": "job-1"}, "id: must be 'j-' and 12 lowercase hex digits, got 'job-1'"),
])
def test_new_job_errors_name_field_rule_and_value(kw, message):
    args = {"name": "j", "spec": {}, **kw}
    with pytest.raises(ValidationError) as e:
        new_job(args.pop("name"), args.pop("spec"), **args)
    assert str(e.value).startswith(message)


def test_worker_tokens():
    token = new_token()
    assert len(token) >= 40 and token != new_token()
    stored = hash_token(token)
    assert token not in stored and verify_token(token, stored)
    assert not verify_token(token + "x", stored) and not verify_token(token, "")


def test_errors_map_to_grpc_status_names():
    assert status_name(ValidationError("workers", "must be >= 1", 0)) == "INVALID_ARGUMENT"
    assert status_name(CheckpointNotFound("j-1", None)) == "NOT_FOUND"
    assert status_name(StateConflict("j-1", S.SUCCEEDED, [S.RUNNING])) == "FAILED_PRECONDITION"
    assert status_name(BlobCorrupted("a" * 64, "b" * 64, 3)) == "DATA_LOSS"
    assert status_name(RuntimeError()) == "INTERNAL"
