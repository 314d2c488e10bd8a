"""The coordinator's domain types: job states and their transitions, jobs, events, checkpoints.

Plain data, no I/O and no grpc: the store persists these records, the scheduler reads them and
the servicer converts them to and from protobuf messages (in one module, `api.serde`).

A job moves through this state machine (`TRANSITIONS` is the single source of truth)::

    QUEUED ──> RUNNING ──> SUCCEEDED | FAILED | TIMED_OUT
       │         │   ^  \
       │         v   │   └──> CANCELLING ──> CANCELLED
       │       RESTARTING ──> FAILED | CANCELLED
       └──> FAILED | CANCELLED

``RESTARTING`` means a worker died and the job waits, holding no slots, to be launched again from
its latest checkpoint; the scheduler treats it like a queued job. ``CANCELLING`` means a user
cancelled a running job and its workers are stopping: they finish their step and upload a final
checkpoint, which the coordinator still accepts and stores; the job keeps its slots until they
have exited, then it is CANCELLED. ``TIMED_OUT`` (as in Slurm) means a run went past the job's
``time_limit`` and was stopped, its final checkpoint stored. ``SUCCEEDED``, ``FAILED``,
``TIMED_OUT`` and ``CANCELLED`` are terminal. `apply_transition` is the one function that
changes a job's state: the stores call it inside their transaction, so both implementations
apply the same rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dptrain.coordinator.api.errors import InvalidTransition, ValidationError
from dptrain.worker.spec import check_name

__all__ = [
    "JobState", "EventKind", "TRANSITIONS", "TERMINAL_STATES", "PENDING_STATES",
    "HOLDING_STATES",
    "Job", "Event", "CheckpointRecord", "User", "BUILTIN_ADMIN", "check_user_name",
    "check_transition", "new_job", "new_job_id", "apply_transition", "apply_update",
    "state_event_payload", "check_payload", "new_token", "hash_token", "verify_token",
    "check_checkpoint", "MUTABLE_FIELDS", "SubmitRequest", "ListRequest",
]


class JobState(str, Enum):
    """Where a job is in its life; the value is the name (as in the protobuf enum)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CANCELLING = "CANCELLING"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        """True for SUCCEEDED, FAILED, TIMED_OUT and CANCELLED, which no transition leaves."""
        return not TRANSITIONS[self]

    def __str__(self) -> str:
        return self.value


class EventKind(str, Enum):
    """What an event reports: a state change, a step's metrics, a log line, a saved checkpoint."""

    STATE = "state"
    METRICS = "metrics"
    LOG = "log"
    CHECKPOINT = "checkpoint"

    def __str__(self) -> str:
        return self.value


_S = JobState
#: Allowed transitions: state -> the states it may move to. Terminal states map to nothing.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.RUNNING, _S.FAILED, _S.CANCELLED}),
    # RUNNING -> CANCELLED directly only where no runner supervises the job (a server that
    # only queues); with one, a cancel passes through CANCELLING.
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.RESTARTING, _S.CANCELLING,
                           _S.TIMED_OUT}),
    _S.RESTARTING: frozenset({_S.RUNNING, _S.FAILED, _S.CANCELLED}),
    _S.CANCELLING: frozenset({_S.CANCELLED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.TIMED_OUT: frozenset(),
}
TERMINAL_STATES: frozenset[JobState] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
#: States of jobs waiting for slots: what the scheduler's queue is made of.
PENDING_STATES: frozenset[JobState] = frozenset({_S.QUEUED, _S.RESTARTING})
#: States of jobs whose workers hold slots (and may report and upload checkpoints).
HOLDING_STATES: frozenset[JobState] = frozenset({_S.RUNNING, _S.CANCELLING})

BUILTIN_ADMIN = "admin"
"""The admin user every coordinator has: its token is the server's ``STATE_DIR/token``, and
the jobs of a database from before users belong to it."""


def check_transition(current: JobState, target: JobState) -> None:
    """Raise unless the state machine allows ``current -> target``.

    Args:
        current: the state the job is in.
        target: the state it should move to.

    Raises:
        InvalidTransition: naming both states and what is allowed.
    """
    current, target = JobState(current), JobState(target)
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(current, target, TRANSITIONS[current])


@dataclass(frozen=True)
class Job:
    """One submitted job, as the store keeps it.

    ``spec`` is the worker's job spec as plain JSON data (``worker.spec.JobSpec.to_dict()``;
    ``JobSpec.from_dict(job.spec)`` turns it back); the number of ranks is the spec's
    ``workers``, read by the `workers` property and stored nowhere else.
    ``time_limit`` (seconds per run, None: unknown) lets the scheduler reserve slots for the
    head of the queue, and the runner stops a run that goes past it (TIMED_OUT): each run, a
    restart's too, gets the whole limit, counted from its ``started_at``. ``started_at`` and
    ``heartbeat_at`` are reset on every entry to RUNNING, so they describe the current run;
    ``placement`` lists ``(host, slots)`` of the current run and is empty whenever the job
    holds no slots. ``metrics`` is the latest reported summary
    (e.g. ``{"loss": 0.31, "accuracy": 0.9}``). Only a hash of the worker token is kept.
    """

    id: str
    name: str
    spec: dict[str, Any]
    submitted_at: float
    priority: int = 0
    state: JobState = JobState.QUEUED
    max_restarts: int = 3
    time_limit: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    restarts: int = 0
    error: str = ""
    exit_code: int | None = None
    heartbeat_at: float | None = None
    last_step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    placement: tuple[tuple[str, int], ...] = ()
    token_hash: str = ""
    owner: str = BUILTIN_ADMIN

    @property
    def workers(self) -> int:
        """The number of ranks: the spec's ``workers`` (a stored spec is complete)."""
        return self.spec["workers"]


@dataclass(frozen=True)
class Event:
    """Something that happened to a job; ``seq`` counts 1, 2, 3, ... per job.

    Payloads by kind: ``state``: ``{"state", "previous"}`` plus ``error``/``exit_code``/
    ``restarts`` when set; ``metrics``: ``{"step", ...metric values}``; ``log``: ``{"line",
    "rank"?}``; ``checkpoint``: ``{"step", "sha256", "size"}``.
    """

    job_id: str
    seq: int
    time: float
    kind: EventKind
    payload: dict[str, Any]


@dataclass(frozen=True)
class CheckpointRecord:
    """A stored checkpoint of a job at ``step``; every one of its files is a blob.

    Attributes:
        job_id: the job.
        step: the training step the checkpoint holds.
        sha256: the digest of its ``manifest.json``, which is also that file's blob name.
            The other files (``model.safetensors``, ``optimizer.safetensors``) are blobs
            named by the sha256s the manifest lists (see `server.checkpoint_store`).
        size: the bytes of all its files together, ``manifest.json`` included.
        created_at: when it was recorded (unix seconds).
        manifest: the parsed ``manifest.json`` (step, ``files: {name: {sha256, bytes}}``,
            spec hash, ...).
        keep: marked to be kept: retention never deletes it (only deleting its job does).
    """

    job_id: str
    step: int
    sha256: str
    size: int
    created_at: float
    manifest: dict[str, Any] = field(default_factory=dict)
    keep: bool = False


@dataclass(frozen=True)
class User:
    """Someone who may call the coordinator.

    Attributes:
        name: a name `check_user_name` accepts.
        admin: may act on every job and manage users; a user acts on its own jobs only.
        created_at: when it was created (unix seconds).
        token_hash: `hash_token` of its one valid token; "" once revoked (no token matches).
    """

    name: str
    admin: bool
    created_at: float
    token_hash: str = ""

    @property
    def active(self) -> bool:
        """It holds a valid token (not revoked)."""
        return bool(self.token_hash)


_USER_NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")


def check_user_name(name: Any) -> str:
    """A user name: 1-64 of ``a-z 0-9 . _ -``, starting with a letter (so it is safe in a
    file name, a log line and a Unix account's name).

    Raises:
        ValidationError: naming ``name``.
    """
    if not isinstance(name, str) or not _USER_NAME_RE.fullmatch(name):
        raise ValidationError("name", "must be 1-64 of a-z 0-9 . _ -, starting with a letter",
                              name)
    return name


# ---------------------------------------------------------------- requests

@dataclass(frozen=True)
class SubmitRequest:
    """A submission: the job file's data and how to run it.

    Attributes:
        spec: the job spec as plain data (fields left out take the worker's defaults).
        priority: higher runs first.
        max_restarts: None: the server's default.
        time_limit: seconds per run, or None when unknown.
    """

    spec: Mapping[str, Any]
    priority: int = 0
    max_restarts: int | None = None
    time_limit: float | None = None


@dataclass(frozen=True)
class ListRequest:
    """A page of the job list: jobs in `states` (empty: all) of `owner` ("": every job the
    caller may see), newest first."""

    states: tuple[JobState, ...] = ()
    page_size: int = 0
    page_token: str = ""
    owner: str = ""


# ---------------------------------------------------------------- construction and validation

_JOB_ID_RE = re.compile(r"^j-[0-9a-f]{12}$")
_INT64 = 2**63


def new_job_id() -> str:
    """A fresh job id: ``'j-'`` and 12 random hex digits (48 bits)."""
    return "j-" + secrets.token_hex(6)


def _check_int(name: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, "must be an integer", value)
    if not -_INT64 <= value < _INT64:
        raise ValidationError(name, "must fit in 64 bits", value)
    if low is not None and value < low:
        raise ValidationError(name, f"must be >= {low}", value)
    return value


def _check_time(name: str, value: Any, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(name, "must be a finite number of seconds or None", value)
    if positive and value <= 0:
        raise ValidationError(name, "must be > 0 seconds (or None for no limit)", value)
    return float(value)


def _check_json(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(name, "must be a mapping", value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValidationError(name, f"must be JSON-serialisable ({e})", value) from None
    return json.loads(text)  # a deep, plain copy: dicts, lists and scalars only


def _check_placement(name: str, value: Any) -> tuple[tuple[str, int], ...]:
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        out = tuple((str(h), int(n)) for h, n in pairs)
    except (TypeError, ValueError):
        raise ValidationError(name, "must be (host, slots) pairs", value) from None
    if any(not h or n < 1 for h, n in out):
        raise ValidationError(name, "hosts must be named and slots >= 1", value)
    return out


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(name, "must be a string", value)
    return value


def _check_opt_int(name: str, value: Any, low: int | None = None) -> int | None:
    return None if value is None else _check_int(name, value, low)


#: Fields `apply_update` and `apply_transition` may change, each with its checker.
MUTABLE_FIELDS = {
    "priority": lambda v: _check_int("priority", v),
    "max_restarts": lambda v: _check_int("max_restarts", v, 0),
    "time_limit": lambda v: _check_time("time_limit", v, positive=True),
    "started_at": lambda v: _check_time("started_at", v),
    "finished_at": lambda v: _check_time("finished_at", v),
    "restarts": lambda v: _check_int("restarts", v, 0),
    "error": lambda v: _check_str("error", v),
    "exit_code": lambda v: _check_opt_int("exit_code", v),
    "heartbeat_at": lambda v: _check_time("heartbeat_at", v),
    "last_step": lambda v: _check_opt_int("last_step", v, 0),
    "metrics": lambda v: _check_json("metrics", v),
    "placement": lambda v: _check_placement("placement", v),
    "token_hash": lambda v: _check_str("token_hash", v),
}


def _checked_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in fields.items():
        if name not in MUTABLE_FIELDS:
            raise ValidationError(name, "is not a job field that can be changed (one of "
                                  + ", ".join(sorted(MUTABLE_FIELDS)) + ")", value)
        out[name] = MUTABLE_FIELDS[name](value)
    return out


def new_job(name: str, spec: Mapping[str, Any], *, priority: int = 0,
            max_restarts: int = 3, time_limit: float | None = None, token_hash: str = "",
            now: float | None = None, job_id: str | None = None,
            owner: str = BUILTIN_ADMIN) -> Job:
    """A validated QUEUED job, ready for `Store.create_job`.

    Args:
        name: a label, 1-128 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit.
        spec: the worker job spec as plain data (``JobSpec.to_dict()``, its ``workers``
            included: the server validates it first, `jobs.validate_spec`).
        priority: higher runs first.
        max_restarts: how often a failed worker group is relaunched before the job FAILS.
        time_limit: seconds per run, > 0, or None when unknown (disables backfill past it).
        token_hash: `hash_token` of the job's worker token.
        now: submission time (unix seconds); default the current time.
        job_id: the id to use; default `new_job_id()`.
        owner: the user submitting it.

    Returns:
        The job, state QUEUED.

    Raises:
        ValidationError: naming the first field that breaks a rule.
    """
    if (error := check_name(name)) is not None:
        raise ValidationError(error.path, error.rule, name)
    if job_id is not None and (not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id)):
        raise ValidationError("id", "must be 'j-' and 12 lowercase hex digits", job_id)
    return Job(
        id=job_id or new_job_id(), name=name, spec=_check_json("spec", spec),
        priority=_check_int("priority", priority),
        max_restarts=_check_int("max_restarts", max_restarts, 0),
        time_limit=_check_time("time_limit", time_limit, positive=True),
        token_hash=_check_str("token_hash", token_hash),
        submitted_at=time.time() if now is None else _check_time("submitted_at", now),
        owner=check_user_name(owner),
    )


def apply_update(job: Job, fields: Mapping[str, Any]) -> Job:
    """`job` with some mutable fields changed (the state is changed only by `apply_transition`).

    Args:
        job: the current record.
        fields: field name -> new value; names from `MUTABLE_FIELDS`.

    Returns:
        The updated copy.

    Raises:
        ValidationError: an unknown or immutable field, or a bad value.
    """
    return dataclasses.replace(job, **_checked_fields(fields))


def apply_transition(job: Job, target: JobState, now: float,
                     fields: Mapping[str, Any] | None = None) -> Job:
    """`job` moved to `target`, with the bookkeeping every transition implies.

    Entering RUNNING sets ``started_at`` and ``heartbeat_at`` to `now` (the run's start and the
    heartbeat grace period begin at launch); entering RESTARTING counts one restart and clears
    the placement; entering a terminal state sets ``finished_at`` and clears the placement.
    Explicit `fields` win over these defaults.

    Args:
        job: the current record.
        target: the new state.
        now: the time of the change (unix seconds).
        fields: other fields to set in the same step (names from `MUTABLE_FIELDS`).

    Returns:
        The updated copy.

    Raises:
        InvalidTransition: the state machine forbids ``job.state -> target``.
        ValidationError: a bad field.
    """
    target = JobState(target)
    check_transition(job.state, target)
    auto: dict[str, Any] = {}
    if target is JobState.RUNNING:
        auto = {"started_at": now, "heartbeat_at": now}
    elif target is JobState.RESTARTING:
        auto = {"restarts": job.restarts + 1, "placement": ()}
    elif target.terminal:
        auto = {"finished_at": now, "placement": ()}
    changed = {**auto, **_checked_fields(fields or {})}
    return dataclasses.replace(job, state=target, **changed)


def state_event_payload(before: Job, after: Job) -> dict[str, Any]:
    """The payload of the ``state`` event recorded with a transition.

    Args:
        before: the job before the transition.
        after: the job after it.

    Returns:
        ``{"state", "previous"}`` plus ``error``, ``exit_code`` and ``restarts`` when set.
    """
    payload: dict[str, Any] = {"state": after.state.value, "previous": before.state.value}
    if after.error:
        payload["error"] = after.error
    if after.exit_code is not None:
        payload["exit_code"] = after.exit_code
    if after.restarts:
        payload["restarts"] = after.restarts
    return payload


def check_payload(kind: EventKind | str, payload: Mapping[str, Any]) -> tuple[EventKind, dict]:
    """Validate an event before it is stored.

    Args:
        kind: one of `EventKind` (or its value).
        payload: JSON-serialisable mapping.

    Returns:
        The kind as `EventKind` and a plain deep copy of the payload.

    Raises:
        ValidationError: naming ``kind`` or ``payload``.
    """
    try:
        kind = EventKind(kind)
    except ValueError:
        raise ValidationError("kind", "must be one of "
                              + ", ".join(k.value for k in EventKind), kind) from None
    return kind, _check_json("payload", payload)


def check_checkpoint(record: CheckpointRecord) -> CheckpointRecord:
    """Validate a checkpoint record before it is stored.

    Args:
        record: the record to check.

    Returns:
        A copy with a float ``created_at`` and a plain deep copy of the manifest.

    Raises:
        ValidationError: naming ``step``, ``sha256``, ``size``, ``created_at``, ``manifest`` or
            ``keep``.
    """
    _check_int("step", record.step, 0)
    if not isinstance(record.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", record.sha256):
        raise ValidationError("sha256", "must be 64 lowercase hex digits", record.sha256)
    _check_int("size", record.size, 0)
    if record.created_at is None:
        raise ValidationError("created_at", "must be a time in unix seconds", None)
    if not isinstance(record.keep, bool):
        raise ValidationError("keep", "must be true or false", record.keep)
    return dataclasses.replace(record, created_at=_check_time("created_at", record.created_at),
                               manifest=_check_json("manifest", record.manifest))


# ---------------------------------------------------------------- tokens

def new_token() -> str:
    """A fresh secret token, a worker's or a user's (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The sha256 hex digest of a token: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def verify_token(token: str, token_hash: str) -> bool:
    """True when `token` hashes to `token_hash` (constant-time comparison).

    Args:
        token: the bearer token a worker presented.
        token_hash: the job's stored `Job.token_hash` (empty: no token matches).
    """
    return bool(token_hash) and hmac.compare_digest(hash_token(token), token_hash)

