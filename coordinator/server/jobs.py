"""What the job RPCs do, as plain functions of ``(request, state)``: no grpc here.

The servicer (`server.service`) decodes a request into the small domain objects below,
calls one of these functions with the server's `ServiceState`, and encodes the result; errors
are `coordinator.errors` exceptions, which it turns into status codes. So every rule here is
tested without a server, and a second transport could call the same functions.

Submission rules, each an INVALID_ARGUMENT naming the field: the spec must pass the worker's own
validation (``worker.spec.JobSpec.from_dict``, every field), ask for no more ranks than the
cluster has slots, name data files only inside the configured data roots, and name its code
by the digest of an uploaded archive; its ``package.module:function`` references and its
entrypoint must name its shipped code, the model zoo or a module prefix the admin allows
(``worker.module_policy``, decided from the archive's listing: nothing is imported).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dptrain.coordinator.api.errors import StateConflict, ValidationError
from dptrain.coordinator.api.limits import (
    MAX_ERROR_MESSAGE,
    MAX_EVENTS_PER_REPORT,
    MAX_LOG_LINE,
    MAX_METRIC_NAMES,
    MAX_PAGE_SIZE,
    MAX_RESTARTS,
    MAX_TIME_LIMIT_S,
)
from dptrain.coordinator.api.records import (
    BUILTIN_ADMIN,
    HOLDING_STATES,
    TERMINAL_STATES,
    Event,
    EventKind,
    Job,
    JobState,
    ListRequest,
    SubmitRequest,
    new_job,
)
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.code_listing import archive_files
from dptrain.coordinator.server.metrics import Metrics
from dptrain.coordinator.server.scheduler import Cluster, validate_request
from dptrain.coordinator.server.store import Store
from dptrain.worker.code_archive import MAX_CODE_BYTES
from dptrain.worker.data import data_paths
from dptrain.worker.module_policy import spec_code_errors
from dptrain.worker.spec import JobSpec, JobSpecError, code_digest

__all__ = [
    "Runner", "ServiceState", "SubmitRequest", "ListRequest", "SpecInvalid",
    "validate_spec", "check_data_paths", "check_code", "check_job_code", "prepare_job",
    "queue_job", "submit_job",
    "list_jobs", "cancel_job", "watch_job", "report_progress", "heartbeat",
]

log = logging.getLogger("dptrain.coordinator")

#: The states a job may be cancelled from: every one but the final ones.
_ACTIVE = frozenset(JobState) - TERMINAL_STATES


class Runner(Protocol):
    """What the server expects of the job runner that `serve` builds.

    The runner owns the QUEUED -> RUNNING -> ... transitions of the jobs it launches. The
    server calls `start` once after it listens and `stop` once while shutting down; `wake`
    after every submission (schedule now, don't wait for the next tick); `cancel(job_id)`
    after the store has moved the job to CANCELLING (a running job) or CANCELLED (a pending
    one), so that the runner stops the job's process group, if it has one, stores the final
    checkpoint its workers write, and moves a CANCELLING job to CANCELLED once they have
    exited (its slots are held until then); also after the coordinator failed a job itself
    (`fail_job`), when the runner only ends the group and frees its slots.
    """

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wake(self) -> None: ...
    def cancel(self, job_id: str) -> None: ...


@dataclass
class ServiceState:
    """Everything the RPC logic works on: the server builds one and hands it to each call.

    Attributes:
        store: jobs, events and checkpoint records.
        blobs: checkpoint files, content-addressed.
        cluster: the slots jobs run on (submissions larger than it are refused).
        data_roots: directories data files must lie in (none: no data files allowed).
        default_max_restarts: a job's ``max_restarts`` when the submission gives none.
        runner: launches jobs; None when the server only queues them (tests).
        max_code_bytes: the largest code archive accepted, packed or unpacked.
        allowed_modules: the installed module prefixes jobs may name (``--allow-module``).
        metrics: counters for the Prometheus endpoint.
        stopping: set when the server shuts down (ends open watches).
        jobs_dir: where the job directories are (``STATE/jobs``); None: nowhere (tests).
        code_listings: where the code archives' listings are kept (``server.code_listing``);
            None: each submission reads the archive.
    """

    store: Store
    blobs: BlobStore
    cluster: Cluster
    data_roots: tuple[Path, ...] = ()
    default_max_restarts: int = 3
    runner: Runner | None = None
    max_code_bytes: int = MAX_CODE_BYTES
    allowed_modules: tuple[str, ...] = ()
    metrics: Metrics = field(default_factory=Metrics)
    stopping: threading.Event = field(default_factory=threading.Event)
    jobs_dir: Path | None = None
    code_listings: Path | None = None


class SpecInvalid(ValidationError):
    """A job spec the worker's validation refused; the message lists every broken rule.

    ``field``, ``rule`` and ``value`` describe the first; ``errors`` holds them all.

    Args:
        error: the worker's `JobSpecError`.
    """

    def __init__(self, error: JobSpecError):
        first = error.errors[0]
        self.errors = error.errors
        self.field, self.rule = first.path, first.rule
        self.value = getattr(first, "value", None)
        # As many whole errors as fit the message a client gets, then how many more there are:
        # a cut must not fall inside a rule.
        shown = [str(first)]
        for i, e in enumerate(error.errors[1:], 1):
            more = f"; and {len(error.errors) - i} more"
            if len("; ".join([*shown, str(e)])) + len(more) > MAX_ERROR_MESSAGE:
                shown[-1] += more
                break
            shown.append(str(e))
        Exception.__init__(self, "; ".join(shown))


# ---------------------------------------------------------------- validation

def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def data_files(dataset: str, args: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The arguments of a job's data set that name data files (``worker.data.data_paths``),
    as ``(field, value)`` pairs in name order, values unchecked (`check_data_paths` checks them).

    Example:
        >>> data_files("idx", {"images": "/data/x.idx", "labels": "/data/y.idx", "limit": 9})
        [('dataset.args.images', '/data/x.idx'), ('dataset.args.labels', '/data/y.idx')]
    """
    return [(f"dataset.args.{name}", args[name])
            for name in sorted(data_paths(dataset) & args.keys())]


def check_data_paths(spec: JobSpec, roots: Sequence[str | os.PathLike]) -> None:
    """Refuse data set arguments that name files outside the data roots.

    The paths are the arguments the data set's loader declares (``worker.data.data_paths``);
    each must be an absolute path and, with symbolic links resolved, inside one of `roots`.

    Args:
        spec: the validated spec.
        roots: the allowed directories (empty: no data files are allowed at all).

    Raises:
        ValidationError: naming ``dataset.args.<name>``.
    """
    if spec.dataset is None:  # an own training loop: its script reads what it reads
        return
    real_roots = [os.path.realpath(r) for r in roots]
    for path, item in data_files(spec.dataset.name, spec.dataset.args):
        if not isinstance(item, str):
            raise ValidationError(path, "must be a path (a string)", item)
        if "\0" in item:  # no file name holds one; the OS calls below would refuse it
            raise ValidationError(path, "must not contain a NUL byte", item)
        if not real_roots:
            raise ValidationError(path, "names a data file, but the coordinator allows "
                                  "none (start it with --data-root DIR)", item)
        if not os.path.isabs(item):
            raise ValidationError(path, "must be an absolute path", item)
        if not any(_inside(os.path.realpath(item), r) for r in real_roots):
            raise ValidationError(path, "must lie inside a data root ("
                                  + ", ".join(os.fspath(r) for r in roots) + ")", item)


def check_code(spec: JobSpec, state: ServiceState) -> None:
    """The submission rule of a spec's ``code``: an uploaded archive, by digest.

    Raises:
        ValidationError: naming ``code`` (a directory the client did not upload, or a
            digest no upload stored).
    """
    if spec.code is None:
        return
    digest = code_digest(spec.code)
    if digest is None:
        raise ValidationError("code", "must name uploaded code as 'sha256:<digest>' (clients "
                                      "upload the directory a job file names: UploadCode)",
                              spec.code)
    if not state.blobs.exists(digest):
        raise ValidationError("code", "names no uploaded archive (upload it first: "
                                      "UploadCode)", spec.code)


def check_job_code(spec: JobSpec, state: ServiceState) -> None:
    """The rule of what code a job may run (``worker.module_policy``): every reference and the
    entrypoint against the shipped code's listing, the zoo and ``state.allowed_modules``.

    Raises:
        SpecInvalid: naming every refused field, the rule and the value.
    """
    digest = code_digest(spec.code)
    # The stored archive passed check_archive at upload; its listing names the shipped files.
    files = None if digest is None else archive_files(state.code_listings, state.blobs, digest,
                                                      state.max_code_bytes)
    errors = spec_code_errors(spec, files, state.allowed_modules)
    if errors:
        raise SpecInvalid(JobSpecError(errors))


def validate_spec(spec: Mapping[str, Any], state: ServiceState) -> JobSpec:
    """Every check a submitted spec must pass.

    Args:
        spec: the job file's data.
        state: the server (its cluster and data roots).

    Returns:
        The validated spec, defaults filled in.

    Raises:
        SpecInvalid: the worker's validation failed (all broken rules, by field).
        ValidationError: too many workers for the cluster, or a data path outside the roots.
    """
    try:
        job_spec = JobSpec.from_dict(spec)
    except JobSpecError as e:
        raise SpecInvalid(e) from None
    validate_request(job_spec.workers, state.cluster)
    check_data_paths(job_spec, state.data_roots)
    check_code(job_spec, state)
    check_job_code(job_spec, state)
    return job_spec


# ---------------------------------------------------------------- the Coordinator service

def prepare_job(request: SubmitRequest, state: ServiceState, *,
                now: float | None = None, owner: str = BUILTIN_ADMIN) -> Job:
    """Validate a submission into the QUEUED job it asks for, storing nothing.

    The servicer encodes its reply from this job before `queue_job` stores it, so a job whose
    reply cannot be sent is refused, never stored.

    Args:
        request: the submission.
        state: the server.
        now: the submission time (default: the clock).
        owner: the user submitting it.

    Returns:
        The job to store.

    Raises:
        ValidationError: naming the field at fault.
    """
    spec = validate_spec(request.spec, state)
    max_restarts = (state.default_max_restarts if request.max_restarts is None
                    else request.max_restarts)
    if not 0 <= max_restarts <= MAX_RESTARTS:
        raise ValidationError("max_restarts", f"must be in 0..{MAX_RESTARTS}", max_restarts)
    if request.time_limit is not None and not 0 < request.time_limit <= MAX_TIME_LIMIT_S:
        raise ValidationError("time_limit", f"must be > 0 and at most {MAX_TIME_LIMIT_S} "
                              "seconds", request.time_limit)
    return new_job(spec.name, spec.to_dict(), priority=request.priority,
                   max_restarts=max_restarts, time_limit=request.time_limit, now=now,
                   owner=owner)


def queue_job(job: Job, state: ServiceState) -> Job:
    """Store a job from `prepare_job`, then wake the runner.

    Returns:
        The stored job, QUEUED.
    """
    job = state.store.create_job(job)
    log.info("job %s (%s) queued: %d worker(s)", job.id, job.name, job.workers)
    if state.runner is not None:
        state.runner.wake()
    return job


def submit_job(request: SubmitRequest, state: ServiceState, *, now: float | None = None,
               owner: str = BUILTIN_ADMIN) -> Job:
    """Validate and queue a job (`prepare_job`, then `queue_job`).

    Args:
        request: the submission.
        state: the server.
        now: the submission time (default: the clock).
        owner: the user submitting it.

    Returns:
        The stored job, QUEUED.

    Raises:
        ValidationError: naming the field at fault.
    """
    return queue_job(prepare_job(request, state, now=now, owner=owner), state)


def list_jobs(request: ListRequest, state: ServiceState) -> tuple[list[Job], str]:
    """One page of jobs (of ``request.owner``, "" for everyone's), newest first, at most
    `MAX_PAGE_SIZE` of them (so that a page of jobs with the largest specs still fits in one
    message). Which owner a caller may ask for is `access.Principal.list_owner`'s rule.

    Returns:
        ``(jobs, next_page_token)``; the token is "" on the last page.

    Raises:
        ValidationError: a bad page size or page token.
    """
    if request.page_size < 0:
        raise ValidationError("page_size", "must be >= 0", request.page_size)
    size = min(request.page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
    return state.store.list_jobs(request.states or None, size, request.page_token,
                                 request.owner or None)


def cancel_job(job_id: str, state: ServiceState, *, now: float | None = None) -> Job:
    """Cancel a job. A queued or restarting one is CANCELLED at once; a running one becomes
    CANCELLING and the runner stops its workers (they finish their step and upload a final
    checkpoint, which is stored), then moves it to CANCELLED. Without a runner there are no
    workers to wait for: CANCELLED at once.

    Args:
        job_id: the job.
        state: the server.
        now: the time of the change.

    Returns:
        The job, CANCELLING or CANCELLED (also when it already was: a second cancel is a
        no-op).

    Raises:
        JobNotFound: no such job.
        StateConflict: the job already SUCCEEDED, FAILED or TIMED_OUT.
    """
    while True:
        job = state.store.get_job(job_id)
        if job.state in (JobState.CANCELLED, JobState.CANCELLING):
            return job
        if job.state.terminal:
            raise StateConflict(job_id, job.state, _ACTIVE)
        target = (JobState.CANCELLING if job.state is JobState.RUNNING and state.runner
                  is not None else JobState.CANCELLED)
        try:
            job = state.store.transition(job_id, job.state, target, now=now,
                                         error="cancelled by a user")
            break
        except StateConflict:  # it moved meanwhile (e.g. started): try again from its new state
            continue
    _end_workers(job_id, state)
    return job


def fail_job(job_id: str, reason: str, state: ServiceState) -> Job | None:
    """Fail an active job for a reason the coordinator found itself (e.g. its disk is full
    for the job's checkpoints), and end its workers: a failure a restart would meet again.

    Args:
        job_id: the job.
        reason: the job's ``error``, one line.
        state: the server.

    Returns:
        The job, FAILED; None when it had ended already or is being cancelled.
    """
    while True:
        job = state.store.get_job(job_id)
        if job.state.terminal or job.state is JobState.CANCELLING:
            return None  # ended, or ending by a cancel that notes what could not be stored
        try:
            job = state.store.transition(job_id, job.state, JobState.FAILED, error=reason)
            break
        except StateConflict:  # it moved meanwhile: try again from its new state
            continue
    log.warning("job %s failed: %s", job_id, reason)
    _end_workers(job_id, state)
    return job


def _end_workers(job_id: str, state: ServiceState) -> None:
    """Ask the runner to end the workers of a job the store has ended."""
    if state.runner is not None:
        try:
            state.runner.cancel(job_id)
        except Exception:  # the job has ended either way; the runner's trouble is logged
            log.exception("runner failed to end the workers of job %s", job_id)


def watch_job(job_id: str, after_seq: int, state: ServiceState,
              is_active: Callable[[], bool] = lambda: True,
              poll_s: float = 0.5) -> Iterator[Job | Event]:
    """Follow a job: first the job as it is now, then its events after `after_seq`.

    The iteration ends once the job is in a final state and every event up to that change
    was yielded, or when `is_active` turns false (the client left), or the server stops.

    Args:
        job_id: the job.
        after_seq: yield only events with a larger sequence number.
        state: the server.
        is_active: polled between waits; False ends the watch.
        poll_s: how long one wait for new events lasts before `is_active` is polled again.

    Yields:
        The `Job`, then `Event`s, oldest first.

    Raises:
        JobNotFound: no such job (before anything is yielded).
        ValidationError: a negative `after_seq`.
    """
    if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
        raise ValidationError("after_seq", "must be an integer >= 0", after_seq)
    store = state.store
    yield store.get_job(job_id)
    seq = after_seq
    while is_active() and not state.stopping.is_set():
        # Look at the state *before* reading the events: the final state event is written in
        # the same transaction as the change, so once the job was terminal before a read, that
        # read holds everything. Looked at after, a change landing in between would end the
        # watch without its final event.
        ended = store.get_job(job_id).state.terminal
        events = store.events(job_id, seq)
        if not events:
            if ended:
                return
            events = store.wait_events(job_id, seq, timeout=poll_s)
        for event in events:
            yield event
            seq = event.seq


# ---------------------------------------------------------------- the workers' progress

def _clean_event(kind: EventKind, payload: dict[str, Any]) -> dict[str, Any]:
    if kind is EventKind.LOG:
        line = str(payload.get("line", "")).replace("\n", " ")
        if len(line) > MAX_LOG_LINE:
            line = line[:MAX_LOG_LINE - 15] + " ...[truncated]"
        return {**payload, "line": line}
    step = payload.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValidationError("events.metrics.step", "must be an integer >= 0", step)
    return payload


def report_progress(job_id: str, items: Iterable[tuple[EventKind, dict[str, Any]]],
                    state: ServiceState, *, now: float | None = None) -> int:
    """Store a worker's batch of events, and count it as a heartbeat.

    The job's ``last_step`` and ``metrics`` summary follow the newest metrics reported.

    Args:
        job_id: the job (its worker token was checked by the caller).
        items: ``(kind, payload)`` pairs: ``metrics`` (with ``step``) and ``log`` events.
        state: the server.
        now: the time (default: the clock).

    Returns:
        The sequence number of the last event stored (0 for an empty batch).

    Raises:
        ValidationError: too many events, or a bad one.
        JobNotFound: no such job.
        StateConflict: the job is neither RUNNING nor CANCELLING (a cancelled job's workers
            report until they have stopped).
    """
    items = [(EventKind(kind), dict(payload)) for kind, payload in items]
    if len(items) > MAX_EVENTS_PER_REPORT:
        raise ValidationError("events", f"at most {MAX_EVENTS_PER_REPORT} per report",
                              len(items))
    items = [(kind, _clean_event(kind, payload)) for kind, payload in items]
    now = time.time() if now is None else now
    fields: dict[str, Any] = {"heartbeat_at": now}
    metrics = [p for kind, p in items if kind is EventKind.METRICS]
    if metrics:
        job = state.store.get_job(job_id)
        summary = dict(job.metrics)
        for payload in metrics:
            for key, value in payload.items():
                if (key != "step" and isinstance(value, (int, float))
                        and not isinstance(value, bool)
                        and (key in summary or len(summary) < MAX_METRIC_NAMES)):
                    summary[key] = value
        fields["metrics"] = summary
        fields["last_step"] = max(p["step"] for p in metrics)
    if not items:
        state.store.update_job(job_id, states=HOLDING_STATES, **fields)
        return 0
    seqs = state.store.append_events(job_id, items, now=now, states=HOLDING_STATES,
                                     fields=fields)
    return seqs[-1]


def heartbeat(job_id: str, state: ServiceState, *, now: float | None = None) -> JobState:
    """Record that a RUNNING (or CANCELLING) job's training made progress (workers heartbeat
    only then).

    Returns:
        The job's state (RUNNING or CANCELLING).

    Raises:
        JobNotFound: no such job.
        StateConflict: the job is over (cancelled, timed out ...: stop reporting).
    """
    now = time.time() if now is None else now
    return state.store.update_job(job_id, states=HOLDING_STATES, heartbeat_at=now).state
