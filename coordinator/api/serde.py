"""Every conversion between protobuf messages and the coordinator's domain objects: one module.

The servicer decodes each request here, calls plain logic (`server.jobs`,
`server.checkpoint_store`) with domain objects, and encodes the answer here; the clients use
the same functions the other way round. Nothing else touches protobuf fields.

Job specs: a job file's plain data (``worker.spec.JobSpec.to_dict()`` or a parsed YAML file)
maps field for field onto the ``JobSpec`` message. Every scalar there is ``optional``, so a field
left out of the file stays unset in the message and comes back left out, taking the worker's
default. Model, data set and scheduler ``args`` travel as JSON text (``args_json``), which keeps
integers and floats apart (the .proto file says why). The mapping is generic, field by field from
the message's descriptor: the types of a spec are the spec owner's (``worker.spec``), which
the client applies before sending and the server after receiving. A value protobuf cannot hold
is a `coordinator.errors.ValidationError` naming its path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from google.protobuf import descriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from dptrain.coordinator.api.checkpoint_upload import CheckpointUpload, FileEntry, record_files
from dptrain.coordinator.api.chunk_wire import Chunk
from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.api.hashed_io import BytesLike
from dptrain.coordinator.api.limits import MAX_ARGS_DEPTH, MAX_ARGS_JSON_BYTES, MAX_SPEC_BYTES
from dptrain.coordinator.api.records import (
    CheckpointRecord,
    Event,
    EventKind,
    Job,
    JobState,
    ListRequest,
    SubmitRequest,
    User,
)
from dptrain.coordinator.api.strict_json import loads
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.worker.spec import JobSpec, JobSpecError, check_types, parse_spec_text

__all__ = [
    "spec_to_proto", "spec_from_proto", "submit_request_to_proto", "submit_request_from_proto",
    "list_request_from_proto", "job_to_proto", "stored_job_to_proto", "job_from_proto",
    "state_to_proto", "state_from_proto", "event_to_proto", "event_from_proto",
    "worker_event_to_proto", "worker_event_from_proto", "checkpoint_to_proto",
    "checkpoint_from_proto", "upload_header_to_proto", "upload_header_from_proto",
    "file_entry_to_proto", "file_entry_from_proto", "chunks_from_upload", "timestamp", "seconds",
    "code_header_from_upload", "code_chunks", "user_to_proto", "user_from_proto",
]

_ARGS_FIELDS = {"args": "args_json"}  # job file key -> message field


# ---------------------------------------------------------------- times and states

def timestamp(seconds_: float) -> Timestamp:
    """A unix time in seconds as a ``Timestamp``.

    Args:
        seconds_: unix seconds.

    Returns:
        The message (nanosecond resolution).
    """
    whole, nanos = _split(seconds_)
    return Timestamp(seconds=whole, nanos=nanos)


def _split(value: float) -> tuple[int, int]:
    """Whole seconds and nanoseconds, exact enough that `seconds` gives back the same float
    (splitting first: ``value * 1e9`` would lose the low digits of a unix time)."""
    whole = math.floor(value)
    nanos = round((value - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return whole, nanos


def seconds(message: Timestamp | Duration) -> float:
    """A ``Timestamp`` (unix seconds) or ``Duration`` as float seconds."""
    return message.seconds + message.nanos / 1e9


def _duration(value: float) -> Duration:
    whole, nanos = _split(value)  # value > 0: both parts positive, as Duration wants
    return Duration(seconds=whole, nanos=nanos)


def state_to_proto(state: JobState | str) -> int:
    """A `JobState` as the protobuf enum value (same names)."""
    return pb.JobState.Value(JobState(state).value)


def state_from_proto(value: int) -> JobState:
    """The protobuf enum value as a `JobState`.

    Raises:
        ValidationError: naming ``state`` for UNSPECIFIED or an unknown number.
    """
    try:
        return JobState(pb.JobState.Name(value))
    except ValueError:
        raise ValidationError("state", "must be one of " + ", ".join(s.value for s in JobState),
                              value) from None


# ---------------------------------------------------------------- job specs

# json.dumps(value, allow_nan=False, separators=(",", ":")) without building an encoder per
# call (a submission's reply encodes two or three args).
_ARGS_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _set(message: Message, field: descriptor.FieldDescriptor, value: Any, path: str) -> None:
    """Set one field of `message` from plain data, as protobuf converts it.

    Types are the spec owner's (``worker.spec``): clients check a spec there before sending,
    the server after receiving. A value protobuf itself cannot hold is reported by its path.
    """
    name = field.name
    if field.type == field.TYPE_MESSAGE and not field.is_repeated:
        section = getattr(message, name)
        _fill(section, value, f"{path}.")
        section.SetInParent()  # present even when given as {}
        return
    try:
        if name == "args_json":
            setattr(message, name, _ARGS_JSON(value))
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValidationError(path, f"cannot be carried by the message ({e})", value) from None


def _fill(message: Message, data: Any, prefix: str) -> None:
    """Copy `data` into `message` key by key; ``args`` is carried as ``args_json``."""
    where = prefix.rstrip(".") or "spec"
    if not isinstance(data, Mapping):
        raise ValidationError(where, "cannot be carried by the message (it needs a mapping)",
                              data)
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        name = _ARGS_FIELDS.get(key, key)
        if not isinstance(key, str) or name not in fields or key == "args_json":
            raise ValidationError(f"{prefix}{key}", f"is not a field of {where}", value)
        if value is not None:  # left out, as YAML's `epochs: ~` or to_dict()'s `scheduler: None`
            _set(message, fields[name], value, f"{prefix}{key}")


def spec_to_proto(spec: Mapping[str, Any] | Any) -> pb.JobSpec:
    """A job spec as a ``JobSpec`` message.

    Args:
        spec: the job file's data (a mapping) or a ``worker.spec.JobSpec``.

    Returns:
        The message; fields absent (or None) in `spec` stay unset.

    Raises:
        ValidationError: naming the path of a key the message has no field for, or of a value
            protobuf cannot hold (the types of a spec are checked by ``worker.spec``).
    """
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    try:
        # The whole message in one constructor call, 3x faster than field by field; every
        # spec it cannot carry takes the walk below, which names what is at fault.
        return pb.JobSpec(**_constructor_args(spec))
    except (_Unusual, TypeError, ValueError, RecursionError):
        pass
    message = pb.JobSpec()
    _fill(message, spec, "")
    return message


class _Unusual(Exception):
    """Data that `_constructor_args` leaves to `_fill`."""


_PLAIN_VALUES = frozenset({str, int, float, bool, list, tuple})


def _constructor_args(data: Any) -> dict[str, Any]:
    """`data` as keyword arguments of its message's constructor (sections as dicts, which
    protobuf makes present even when empty, as `_fill` does), for what `_fill` would carry
    the same way: dicts, plain values and ``args``."""
    if type(data) is not dict or "args_json" in data:
        raise _Unusual
    out: dict[str, Any] = {}
    for key, value in data.items():
        kind = type(value)
        if key == "args":
            out["args_json"] = None if value is None else _ARGS_JSON(value)
        elif kind is dict:
            out[key] = _constructor_args(value)
        elif kind in _PLAIN_VALUES or value is None:  # None: unset, yet a field it must name
            out[key] = value
        else:
            raise _Unusual
    return out


def _read(message: Message, prefix: str) -> dict[str, Any]:
    # ListFields: only the fields that are set (repeated ones when not empty), walked in C;
    # asking each field of the descriptor was most of a submission's decoding.
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        name = field.name
        if field.is_repeated:
            out[name] = list(value)
        elif name == "args_json":
            key = f"{prefix}args"
            size = len(value.encode())
            if size > MAX_ARGS_JSON_BYTES:
                raise ValidationError(key, f"must be at most {MAX_ARGS_JSON_BYTES} bytes of "
                                      "JSON", f"{size} bytes")
            # JSON text's own rules here; what the arguments must be, the spec owner says.
            out["args"] = loads(value, key, max_depth=MAX_ARGS_DEPTH) if value.strip() else {}
        elif field.type == field.TYPE_MESSAGE:
            out[name] = _read(value, f"{prefix}{name}.")
        else:
            out[name] = value
    return out


def spec_from_proto(message: pb.JobSpec) -> dict[str, Any]:
    """A ``JobSpec`` message as a job file's plain data, for ``JobSpec.from_dict``.

    Args:
        message: the message.

    Returns:
        Only the fields that are set (so the worker's defaults apply to the rest).

    Raises:
        ValidationError: a too large spec, or ``args_json`` that is not JSON text.
    """
    size = message.ByteSize()
    if size > MAX_SPEC_BYTES:
        raise ValidationError("spec", f"must be at most {MAX_SPEC_BYTES} bytes serialized",
                              f"{size} bytes")
    return _read(message, "")


def spec_from_text(text: str) -> dict[str, Any]:
    """A job file's text (``SubmitJobRequest.spec_text``, YAML or JSON) as plain data, held to
    the limits of a ``JobSpec`` message, for ``JobSpec.from_dict``.

    It is parsed as ``dptrain submit`` reads a file (``worker.spec.parse_spec_text``). A spec
    whose fields have the right types then travels through the message it stands for
    (`spec_to_proto`, `spec_from_proto`), so its size and ``args`` nesting are checked as a
    structured spec's are; any other goes on as it is, and ``JobSpec.from_dict`` names its
    fields with the messages a structured spec gets.

    Raises:
        ValidationError: naming ``spec_text`` when it is too long, does not parse or holds no
            mapping; or as `spec_from_proto`.
    """
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise ValidationError("spec_text", f"must be at most {MAX_SPEC_BYTES} bytes",
                              f"{size} bytes")
    try:
        data = parse_spec_text(text, "spec_text")
    except JobSpecError as e:  # quoting the text sent (cut short), as any value is
        raise ValidationError("spec_text", e.errors[0].rule, text) from None
    try:
        check_types(data)
    except JobSpecError:
        return data
    return spec_from_proto(spec_to_proto(data))


# ---------------------------------------------------------------- requests

def submit_request_to_proto(spec: Mapping[str, Any] | Any, priority: int = 0,
                            max_restarts: int | None = None,
                            time_limit: float | None = None) -> pb.SubmitJobRequest:
    """A SubmitJob request.

    Args:
        spec: the job spec (mapping or ``worker.spec.JobSpec``).
        priority: higher runs first.
        max_restarts: None for the server's default.
        time_limit: seconds per run, or None.

    Returns:
        The request.

    Raises:
        ValidationError: naming a bad field.
    """
    request = pb.SubmitJobRequest(spec=spec_to_proto(spec))
    _set(request, request.DESCRIPTOR.fields_by_name["priority"], priority, "priority")
    if max_restarts is not None:
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or not (
                0 <= max_restarts < 2**31):
            raise ValidationError("max_restarts", "must be an integer >= 0", max_restarts)
        request.max_restarts = max_restarts
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not (
                math.isfinite(time_limit) and time_limit > 0):
            raise ValidationError("time_limit", "must be a number of seconds > 0", time_limit)
        request.time_limit.CopyFrom(_duration(time_limit))
    return request


def submit_request_from_proto(request: pb.SubmitJobRequest) -> SubmitRequest:
    """A SubmitJob request as the logic's `SubmitRequest`.

    Raises:
        ValidationError: naming ``spec`` and ``spec_text`` when neither or both are given,
            ``spec_text`` when it does not parse, or a bad spec field.
    """
    has_text = request.HasField("spec_text")
    if request.HasField("spec") == has_text:
        raise ValidationError("spec", "give exactly one of spec and spec_text",
                              "both" if has_text else "neither")
    return SubmitRequest(
        spec=spec_from_text(request.spec_text) if has_text else spec_from_proto(request.spec),
        priority=request.priority,
        max_restarts=request.max_restarts if request.HasField("max_restarts") else None,
        time_limit=seconds(request.time_limit) if request.HasField("time_limit") else None)


def list_request_from_proto(request: pb.ListJobsRequest) -> ListRequest:
    """A ListJobs request as the logic's `ListRequest`.

    Raises:
        ValidationError: naming ``states`` for an unknown or UNSPECIFIED state.
    """
    return ListRequest(states=tuple(state_from_proto(s) for s in request.states),
                       page_size=request.page_size, page_token=request.page_token,
                       owner=request.owner)


# ---------------------------------------------------------------- jobs

def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries as doubles; integers beyond a double's range are left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out[str(key)] = float(value)
            except OverflowError:
                continue
    return out


def job_to_proto(job: Job, spec: pb.JobSpec | None = None) -> pb.Job:
    """A stored job as a ``Job`` message (the worker token's hash stays on the server).

    Args:
        job: the job.
        spec: ``spec_to_proto(job.spec)`` when the caller keeps it (a job's spec never
            changes, and encoding it is most of this function's cost); None: encode it here.

    Returns:
        The message; only numeric metrics are included.
    """
    m = pb.Job(id=job.id, name=job.name,
               spec=spec_to_proto(job.spec) if spec is None else spec, workers=job.workers,
               priority=job.priority, state=state_to_proto(job.state),
               max_restarts=job.max_restarts, restarts=job.restarts, error=job.error,
               submitted_at=timestamp(job.submitted_at), metrics=_numbers(job.metrics),
               placement=[pb.HostSlots(host=h, slots=n) for h, n in job.placement],
               owner=job.owner)
    if job.time_limit is not None:
        m.time_limit.CopyFrom(_duration(job.time_limit))
    for name in ("started_at", "finished_at", "heartbeat_at"):
        value = getattr(job, name)
        if value is not None:
            getattr(m, name).CopyFrom(timestamp(value))
    if job.exit_code is not None:
        m.exit_code = job.exit_code
    if job.last_step is not None:
        m.last_step = job.last_step
    return m


def stored_job_to_proto(job: Job, spec: pb.JobSpec | None = None) -> pb.Job:
    """A stored job as a ``Job`` message, even when its record cannot be sent whole.

    A record stored before today's checks may hold what the API cannot carry (a NaN in its
    spec's args). Rather than failing every listing that contains it, its message then holds
    only the id, name, state and submission time, and ``error`` says what cannot be sent.

    Args:
        job: the job.
        spec: its encoded spec, as for `job_to_proto`.

    Returns:
        `job_to_proto`'s message, or that marked summary.
    """
    try:
        return job_to_proto(job, spec)
    except (ValueError, OverflowError, TypeError) as e:
        reason = " ".join(str(e).split())[:300]
        return pb.Job(id=job.id, name=job.name, state=state_to_proto(job.state),
                      workers=job.workers, submitted_at=timestamp(job.submitted_at),
                      owner=job.owner, error=f"unreadable record: {reason}")


def job_from_proto(m: pb.Job) -> Job:
    """A ``Job`` message as a `Job` (for clients; ``token_hash`` is empty).

    Args:
        m: the message.

    Returns:
        The job; ``spec`` as ``JobSpec.to_dict()`` gave it on the server.
    """
    def opt_time(name: str) -> float | None:
        return seconds(getattr(m, name)) if m.HasField(name) else None

    # A stored spec is complete (JobSpec.to_dict()); what the message leaves out was None.
    spec = spec_from_proto(m.spec)
    for f in dataclasses.fields(JobSpec):
        if f.default is None:
            spec.setdefault(f.name, None)
    # The message repeats the spec's workers for clients in other languages; a summary of a
    # record that cannot be sent whole (`stored_job_to_proto`) has no spec but still says it.
    spec.setdefault("workers", m.workers)
    return Job(id=m.id, name=m.name, spec=spec,
               submitted_at=seconds(m.submitted_at), priority=m.priority,
               state=state_from_proto(m.state), max_restarts=m.max_restarts,
               time_limit=opt_time("time_limit"), started_at=opt_time("started_at"),
               finished_at=opt_time("finished_at"), restarts=m.restarts, error=m.error,
               exit_code=m.exit_code if m.HasField("exit_code") else None,
               heartbeat_at=opt_time("heartbeat_at"),
               last_step=m.last_step if m.HasField("last_step") else None,
               metrics=dict(m.metrics),
               placement=tuple((p.host, p.slots) for p in m.placement), owner=m.owner)


# ---------------------------------------------------------------- users

def user_to_proto(user: User) -> pb.User:
    """A user as a ``User`` message (its token hash stays on the server)."""
    return pb.User(name=user.name, admin=user.admin, created_at=timestamp(user.created_at),
                   active=user.active)


def user_from_proto(m: pb.User) -> User:
    """A ``User`` message as a `User` for clients, who never see a token's hash: its
    ``token_hash`` only marks an active user (a non-empty placeholder) from a revoked one."""
    return User(m.name, m.admin, seconds(m.created_at), "active" if m.active else "")


# ---------------------------------------------------------------- events

def _metrics_to_proto(payload: Mapping[str, Any]) -> pb.Metrics:
    m = pb.Metrics(step=int(payload.get("step") or 0))
    for key, value in payload.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            m.values[key] = float(value)
        elif isinstance(value, str):
            m.text[key] = value
        else:  # bools, lists, mappings: their JSON text
            m.text[key] = json.dumps(value)
    return m


def _metrics_from_proto(m: pb.Metrics) -> dict[str, Any]:
    return {"step": m.step, **dict(m.values), **dict(m.text)}


def _log_to_proto(payload: Mapping[str, Any]) -> pb.LogLine:
    line = pb.LogLine(line=str(payload.get("line", "")))
    if payload.get("rank") is not None:
        line.rank = int(payload["rank"])
    return line


def _log_from_proto(m: pb.LogLine) -> dict[str, Any]:
    return {"line": m.line, **({"rank": m.rank} if m.HasField("rank") else {})}


def event_to_proto(event: Event) -> pb.Event:
    """A stored event as an ``Event`` message.

    Args:
        event: the event (payloads as documented on `api.records.Event`).

    Returns:
        The message, its payload in the oneof matching the kind.
    """
    m = pb.Event(job_id=event.job_id, seq=event.seq, time=timestamp(event.time))
    p = event.payload
    if event.kind is EventKind.STATE:
        change = m.state
        change.state = state_to_proto(p["state"])
        if p.get("previous"):
            change.previous = state_to_proto(p["previous"])
        change.error = str(p.get("error", ""))
        if p.get("exit_code") is not None:
            change.exit_code = int(p["exit_code"])
        change.restarts = int(p.get("restarts", 0))
    elif event.kind is EventKind.METRICS:
        m.metrics.CopyFrom(_metrics_to_proto(p))
    elif event.kind is EventKind.LOG:
        m.log.CopyFrom(_log_to_proto(p))
    else:
        m.checkpoint.CopyFrom(pb.CheckpointSaved(step=int(p.get("step", 0)),
                                                 sha256=str(p.get("sha256", "")),
                                                 size=int(p.get("size", 0))))
    return m


def event_from_proto(m: pb.Event) -> Event:
    """An ``Event`` message as an `Event` (payload as the store keeps it)."""
    kind = m.WhichOneof("payload")
    if kind == "state":
        s = m.state
        payload: dict[str, Any] = {"state": state_from_proto(s.state).value}
        if s.previous:
            payload["previous"] = state_from_proto(s.previous).value
        if s.error:
            payload["error"] = s.error
        if s.HasField("exit_code"):
            payload["exit_code"] = s.exit_code
        if s.restarts:
            payload["restarts"] = s.restarts
        event_kind = EventKind.STATE
    elif kind == "metrics":
        payload, event_kind = _metrics_from_proto(m.metrics), EventKind.METRICS
    elif kind == "log":
        payload, event_kind = _log_from_proto(m.log), EventKind.LOG
    else:
        c = m.checkpoint
        payload = {"step": c.step, "sha256": c.sha256, "size": c.size}
        event_kind = EventKind.CHECKPOINT
    return Event(m.job_id, m.seq, seconds(m.time), event_kind, payload)


def worker_event_to_proto(kind: EventKind | str, payload: Mapping[str, Any]) -> pb.WorkerEvent:
    """A worker's ``(kind, payload)`` (``metrics`` or ``log``) as a ``WorkerEvent``.

    Raises:
        ValidationError: naming ``kind`` for another kind.
    """
    kind = EventKind(kind)
    if kind is EventKind.METRICS:
        return pb.WorkerEvent(metrics=_metrics_to_proto(payload))
    if kind is EventKind.LOG:
        return pb.WorkerEvent(log=_log_to_proto(payload))
    raise ValidationError("kind", "a worker reports metrics or log events", kind.value)


def worker_event_from_proto(m: pb.WorkerEvent) -> tuple[EventKind, dict[str, Any]]:
    """A ``WorkerEvent`` as ``(kind, payload)`` for the store.

    Raises:
        ValidationError: naming ``events`` for an empty event.
    """
    kind = m.WhichOneof("payload")
    if kind == "metrics":
        return EventKind.METRICS, _metrics_from_proto(m.metrics)
    if kind == "log":
        return EventKind.LOG, _log_from_proto(m.log)
    raise ValidationError("events", "each event must hold metrics or a log line", "empty")


# ---------------------------------------------------------------- checkpoints

def file_entry_to_proto(entry: FileEntry) -> pb.CheckpointFile:
    """A `FileEntry` as a ``CheckpointFile``: its digest in the field named by its algorithm.

    Raises:
        ValidationError: naming ``algorithm`` when the message has no field for it.
    """
    if entry.algorithm not in ("sha256", "blake3"):
        raise ValidationError("algorithm", "must be sha256 or blake3", entry.algorithm)
    return pb.CheckpointFile(name=entry.name, size=entry.size, **{entry.algorithm: entry.digest})


def file_entry_from_proto(m: pb.CheckpointFile) -> FileEntry:
    """A ``CheckpointFile`` as a `FileEntry` (BLAKE3 when ``blake3`` is set, else sha256)."""
    if m.blake3:
        return FileEntry(name=m.name, size=m.size, digest=m.blake3, algorithm="blake3")
    return FileEntry(name=m.name, size=m.size, digest=m.sha256, algorithm="sha256")


def checkpoint_to_proto(record: CheckpointRecord) -> pb.Checkpoint:
    """A stored checkpoint as a ``Checkpoint`` message.

    Args:
        record: the record; its manifest is the worker's ``manifest.json``.

    Returns:
        The message, with the files, epoch and numeric metrics of the manifest.
    """
    # Uploads are checked (`server.checkpoint_store`); records stored before those checks may
    # hold an epoch or metrics the message cannot carry, which are left out here.
    manifest = record.manifest
    epoch, metrics = manifest.get("epoch"), manifest.get("metrics")
    return pb.Checkpoint(
        job_id=record.job_id, step=record.step, sha256=record.sha256, size=record.size,
        created_at=timestamp(record.created_at),
        files=[file_entry_to_proto(f) for f in record_files(record)],
        metrics=_numbers(metrics) if isinstance(metrics, Mapping) else {},
        epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool)
        and 0 <= epoch < 2**63 else 0, keep=record.keep)


def checkpoint_from_proto(m: pb.Checkpoint) -> CheckpointRecord:
    """A ``Checkpoint`` message as a `CheckpointRecord` (for clients).

    The manifest holds what the message carries: step, epoch, metrics and
    ``files: {name: {blake3 or sha256, bytes}}`` as in the worker's ``manifest.json``.
    """
    files = (file_entry_from_proto(f) for f in m.files)
    manifest = {"step": m.step, "epoch": m.epoch, "metrics": dict(m.metrics),
                "files": {f.name: f.manifest_entry() for f in files}}
    return CheckpointRecord(m.job_id, m.step, m.sha256, m.size, seconds(m.created_at), manifest,
                            m.keep)


def upload_header_to_proto(upload: CheckpointUpload) -> pb.CheckpointHeader:
    """A `CheckpointUpload` as a ``CheckpointHeader`` (upload and fetch streams)."""
    return pb.CheckpointHeader(job_id=upload.job_id, step=upload.step,
                               manifest_json=upload.manifest_json,
                               files=[file_entry_to_proto(f) for f in upload.files])


def upload_header_from_proto(m: pb.CheckpointHeader) -> CheckpointUpload:
    """A ``CheckpointHeader`` as a `CheckpointUpload`."""
    return CheckpointUpload(job_id=m.job_id, step=m.step, manifest_json=bytes(m.manifest_json),
                            files=tuple(file_entry_from_proto(f) for f in m.files))


def chunks_from_upload(messages: Iterable[Any]) -> Iterator[tuple[str, BytesLike]]:
    """The ``(file name, bytes)`` chunks of an upload or fetch stream after its header.

    Args:
        messages: the rest of the stream: ``api.chunk_wire.Chunk``s as its decoder gives them,
            or ``UploadCheckpointRequest`` / ``FetchCheckpointResponse`` messages.

    Yields:
        Each chunk's file name and data (a read-only view of the received bytes, or bytes).

    Raises:
        ValidationError: naming ``header`` when a second header arrives.
    """
    for chunk in _after_header(messages):
        yield chunk.name, chunk.data


def _after_header(messages: Iterable[Any]) -> Iterator[Any]:
    """Each message's ``chunk`` (a stream's messages after its header)."""
    for m in messages:
        if isinstance(m, Chunk):
            yield m
            continue
        if m.WhichOneof("item") != "chunk":
            raise ValidationError("header", "only the first message may be a header",
                                  "a second header")
        yield m.chunk


# ---------------------------------------------------------------- code

def code_header_from_upload(first: Any) -> tuple[str, int]:
    """The ``(sha256, size)`` a code upload's (or fetch's) first message declares.

    Raises:
        ValidationError: naming ``header`` when the first message is missing or not one.
    """
    kind = None if first is None else first.WhichOneof("item")
    if kind not in ("header", "info"):
        raise ValidationError("header", "the first message must be the archive's header", kind)
    header = first.header if kind == "header" else first.info
    return header.sha256, header.size


def code_chunks(messages: Iterable[Any]) -> Iterator[bytes]:
    """The archive's bytes of a code upload or fetch stream after its first message.

    Raises:
        ValidationError: naming ``header`` when a second header arrives.
    """
    return _after_header(messages)
