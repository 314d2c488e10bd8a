"""The `Store` interface: jobs, their events and checkpoint metadata.

One interface, two implementations that pass the same contract tests: `MemoryStore` (tests,
throw-away servers) and `SqliteStore` (the state directory's database). All the rules — state
transitions checked and applied by `api.records`, per-job event numbering, the ``state``
event written in the same transaction as the change it reports — live once, in `Store`; an
implementation supplies only a transaction object with a handful of primitive reads and writes.

Every method is safe to call from many threads at once (the gRPC server's thread pool); a write
either happens completely or not at all. Watchers block in `Store.wait_events` instead of polling.

Example::

    store = SqliteStore("state/coordinator.db")
    job = store.create_job(new_job("digits", spec))
    store.transition(job.id, JobState.QUEUED, JobState.RUNNING, placement={"localhost": 2})
    for event in store.events(job.id):
        print(event.seq, event.kind, event.payload)
    store.close()
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from dptrain.coordinator.api.errors import (
    AlreadyExists,
    CheckpointNotFound,
    JobNotFound,
    StateConflict,
    UserNotFound,
    ValidationError,
)
from dptrain.coordinator.api.records import (
    CheckpointRecord,
    Event,
    EventKind,
    Job,
    JobState,
    User,
    apply_transition,
    apply_update,
    check_checkpoint,
    check_payload,
    check_transition,
    check_user_name,
    state_event_payload,
)

__all__ = [
    "Store", "Transaction", "NewJob", "encode_page_token", "decode_page_token", "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE", "MAX_EVENTS",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_EVENTS = 1000
_JOB_REVISIONS = 65536  # jobs whose last write is remembered; past it, all start anew

T = TypeVar("T")


class Transaction(Protocol):
    """The primitives an implementation supplies; `Store` builds every operation from them.

    Inside ``Store._write(change)`` all calls form one atomic transaction; inside ``Store._read()``
    only the read methods are called.
    """

    def get_job(self, job_id: str) -> Job | None: ...
    def insert_job(self, job: Job) -> None: ...
    def replace_job(self, job: Job) -> None: ...
    def last_seq(self, job_id: str) -> int: ...
    def insert_events(self, events: list[Event]) -> None: ...
    def get_checkpoint(self, job_id: str, step: int | None) -> CheckpointRecord | None: ...
    def insert_checkpoint(self, record: CheckpointRecord) -> None: ...
    def delete_checkpoint(self, job_id: str, step: int) -> None: ...
    def set_checkpoint_keep(self, job_id: str, step: int, keep: bool) -> None: ...
    def delete_job(self, job_id: str) -> None:
        """Remove a job with its events and checkpoint records."""
    def list_jobs(self, states: frozenset[JobState] | None, after: tuple[float, str] | None,
                  limit: int, owner: str | None = None) -> list[Job]:
        """Jobs (of `owner`, when given) newest first (submitted_at, then id, descending),
        strictly after `after`."""
    def events(self, job_id: str, after_seq: int, limit: int) -> list[Event]: ...
    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]: ...
    def count_by_state(self) -> dict[JobState, int]: ...
    def all_checkpoints(self) -> list[CheckpointRecord]: ...
    def get_user(self, name: str) -> User | None: ...
    def user_by_token_hash(self, token_hash: str) -> User | None: ...
    def insert_user(self, user: User) -> None: ...
    def replace_user(self, user: User) -> None: ...
    def list_users(self) -> list[User]:
        """Every user, by name."""


def _states(states: JobState | Iterable[JobState]) -> frozenset[JobState]:
    if isinstance(states, (JobState, str)):
        return frozenset({JobState(states)})
    return frozenset(JobState(s) for s in states)


def encode_page_token(job: Job) -> str:
    """The opaque page token that continues a listing after `job`."""
    return base64.urlsafe_b64encode(f"{job.submitted_at!r}|{job.id}".encode()).decode()


def decode_page_token(token: str) -> tuple[float, str] | None:
    """The (submitted_at, id) key a page token continues after; None for the empty token.

    Raises:
        ValidationError: naming ``page_token`` when it is not one we issued.
    """
    if not token:
        return None
    try:
        submitted, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return float(submitted), job_id
    except (ValueError, binascii.Error, UnicodeError):
        raise ValidationError("page_token", "must be a token returned by list_jobs",
                              token) from None


class NewJob:
    """The change `Store.create_job` hands to `Store._write`: an object rather than a closure,
    so that a store may write the rows of several new jobs at once (`SqliteStore` inserts a
    group's in one statement per table) with the same rule as ``NewJob(job)(tx)``.

    Args:
        job: the job to store.
    """

    __slots__ = ("job",)

    def __init__(self, job: Job):
        self.job = job

    def __call__(self, tx: Transaction) -> None:
        """Insert the job and its first event; `AlreadyExists` if its id is taken."""
        if tx.get_job(self.job.id) is not None:
            raise self.exists()
        tx.insert_job(self.job)
        tx.insert_events([self.first_event()])

    def exists(self) -> AlreadyExists:
        """The error for an id that is taken."""
        return AlreadyExists(f"job {self.job.id!r} already exists")

    def first_event(self) -> Event:
        """The job's first event: its state, numbered 1 (no need to ask for its last: a
        deleted job's events go with it, so none of an earlier job of this id is left)."""
        job = self.job
        return Event(job.id, 1, job.submitted_at, EventKind.STATE, {"state": job.state.value})


class Store(ABC):
    """The coordinator's state: jobs, their event logs and their checkpoint records.

    Errors: `JobNotFound`/`CheckpointNotFound` (NOT_FOUND), `AlreadyExists`, `StateConflict`
    (FAILED_PRECONDITION), `api.records.ValidationError` (INVALID_ARGUMENT),
    `api.records.InvalidTransition` (a transition the state machine forbids),
    `StoreClosed`. Use it as a context manager or call `close`.
    """

    def __init__(self) -> None:
        self._signal_lock = threading.Lock()
        self._signals: dict[str, threading.Condition] = {}
        self._generation: dict[str, int] = {}
        self._closed = False
        # Token hash -> (users version, user): a call's token is looked up at every call, twice
        # for most (the interceptor, then the servicer's job rule). Every user write goes
        # through this object and bumps the version after its commit, so an entry made under
        # an older version is never used.
        self._users_version = 0
        self._token_users: dict[str, tuple[int, User]] = {}
        # Job revisions (`job_revision`): the same rule, for the jobs' encoded messages the
        # servicer keeps.
        self._revision_lock = threading.Lock()
        self._jobs_revision = 0
        self._revisions_floor = 0  # the revision of every job absent from _job_revisions
        self._job_revisions: dict[str, int] = {}

    # -- what an implementation provides

    @abstractmethod
    def _write(self, change: Callable[[Transaction], T]) -> T:
        """Run ``change(tx)`` as one write transaction and return its result once committed;
        an exception it raises rolls back its changes and is raised here.

        `change` may run on another thread (`SqliteStore` hands it to its committer), so it
        works through `tx` alone and calls none of the store's public methods.
        """

    @abstractmethod
    def _read(self) -> AbstractContextManager[Transaction]:
        """A read-only view for one operation."""

    def close(self) -> None:
        """Release the store's resources and wake every `wait_events` caller. Idempotent."""
        self._closed = True
        with self._signal_lock:
            for condition in self._signals.values():
                condition.notify_all()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs

    def create_job(self, job: Job) -> Job:
        """Store a new job (build it with `api.records.new_job`) and its first event.

        Args:
            job: the job, normally QUEUED.

        Returns:
            The stored job.

        Raises:
            AlreadyExists: a job with this id exists.
        """
        self._write(NewJob(job))
        self._job_written(job.id)
        self._notify(job.id)
        return job

    def get_job(self, job_id: str) -> Job:
        """The job with this id.

        Raises:
            JobNotFound: no such job.
        """
        with self._read() as tx:
            job = tx.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list_jobs(self, states: Iterable[JobState] | None = None, page_size: int = 0,
                  page_token: str = "", owner: str | None = None) -> tuple[list[Job], str]:
        """One page of jobs, newest first (by submission time, then id).

        The order is stable: paging through with the returned tokens sees every job that
        existed when the listing started exactly once, even while new jobs arrive.

        Args:
            states: only jobs in these states; None or empty for all.
            page_size: at most this many (0: `DEFAULT_PAGE_SIZE`; capped at `MAX_PAGE_SIZE`).
            page_token: "" for the first page, else the token the previous page returned.
            owner: only this user's jobs; None for everyone's.

        Returns:
            ``(jobs, next_page_token)``; the token is "" on the last page.

        Raises:
            ValidationError: a negative ``page_size`` or a ``page_token`` we did not issue.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
            raise ValidationError("page_size", "must be an integer >= 0", page_size)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token)
        wanted = _states(states) if states else None
        with self._read() as tx:
            jobs = tx.list_jobs(wanted, after, size + 1, owner or None)
        if len(jobs) > size:
            return jobs[:size], encode_page_token(jobs[size - 1])
        return jobs, ""

    def all_jobs(self, states: Iterable[JobState] | None = None) -> list[Job]:
        """Every job (in these states), newest first: `list_jobs` page after page.

        Args:
            states: only jobs in these states; None for all.
        """
        jobs, token = self.list_jobs(states, MAX_PAGE_SIZE)
        while token:
            page, token = self.list_jobs(states, MAX_PAGE_SIZE, token)
            jobs += page
        return jobs

    def update_job(self, job_id: str, *, states: Iterable[JobState] | None = None,
                   **fields: Any) -> Job:
        """Change some of a job's fields (not its state: use `transition`).

        Args:
            job_id: the job.
            states: when given, change it only while its state is one of these.
            fields: names from `api.records.MUTABLE_FIELDS`, e.g. ``heartbeat_at=t``.

        Returns:
            The updated job.

        Raises:
            JobNotFound, StateConflict, ValidationError.
        """
        def change(tx: Transaction) -> Job:
            updated = apply_update(self._job_in(tx, job_id, states), fields)
            tx.replace_job(updated)
            return updated

        updated = self._write(change)
        self._job_written(job_id)
        return updated

    def transition(self, job_id: str, from_states: JobState | Iterable[JobState],
                   to_state: JobState, *, now: float | None = None, **fields: Any) -> Job:
        """Atomically move a job from one of `from_states` to `to_state` (compare-and-set).

        The change, its bookkeeping (`api.records.apply_transition`) and a ``state``
        event are written in one transaction, so of several racing callers exactly one wins.

        Args:
            job_id: the job.
            from_states: the state(s) the caller expects the job to be in.
            to_state: the new state.
            now: the time of the change; default the current time.
            fields: other fields to set in the same step (e.g. ``error=``, ``exit_code=``).

        Returns:
            The updated job.

        Raises:
            InvalidTransition: some state in `from_states` may never move to `to_state`
                (checked before the job is read: a bug in the caller, not a race).
            JobNotFound: no such job.
            StateConflict: the job is in another state (someone else moved it first).
            ValidationError: a bad field.
        """
        expected = _states(from_states)
        for state in expected:
            check_transition(state, to_state)
        now = time.time() if now is None else now
        def change(tx: Transaction) -> Job:
            job = self._job_in(tx, job_id, expected)
            updated = apply_transition(job, to_state, now, fields)
            tx.replace_job(updated)
            self._append(tx, job_id, [(EventKind.STATE, state_event_payload(job, updated))], now)
            return updated

        updated = self._write(change)
        self._job_written(job_id)
        self._notify(job_id)
        return updated

    def delete_job(self, job_id: str, states: Iterable[JobState]
                   ) -> tuple[Job, list[CheckpointRecord]]:
        """Forget a job: its record, its events and its checkpoint records, in one
        transaction (the blobs stay: see `server.retention.delete_job`).

        Args:
            job_id: the job.
            states: delete it only while its state is one of these (its job is over).

        Returns:
            The deleted job and its deleted checkpoint records.

        Raises:
            JobNotFound: no such job.
            StateConflict: the job is in another state.
        """
        def change(tx: Transaction) -> tuple[Job, list[CheckpointRecord]]:
            job = self._job_in(tx, job_id, states)
            records = tx.list_checkpoints(job_id)
            tx.delete_job(job_id)
            return job, records

        job, records = self._write(change)
        self._job_written(job_id)
        self._notify(job_id)
        return job, records

    def job_revision(self, job_id: str) -> int:
        """A number that changes after every committed write of this job (deleting it too).

        For keeping something made from a job (its encoded message) between reads: read the
        revision first, then the job; what was made from that record is current for as long as
        the revision stays the same. (Revisions move only after a write's commit, so a record
        read after the revision holds at least every write it counts.) Writes made to the
        database by another process are not seen.

        Args:
            job_id: the job (existing or not).
        """
        return self._job_revisions.get(job_id, self._revisions_floor)

    @property
    def jobs_revision(self) -> int:
        """`job_revision`'s number for all jobs together: it changes after every committed
        write of any job (for keeping a listing)."""
        return self._jobs_revision

    def _job_written(self, job_id: str) -> None:
        """After a committed write of `job_id`: move its revision and all jobs'."""
        with self._revision_lock:
            self._jobs_revision += 1
            if len(self._job_revisions) >= _JOB_REVISIONS:
                # Forget them all at once: the new floor is newer than any revision given out,
                # so nothing kept under a forgotten one is taken for current.
                self._job_revisions.clear()
                self._revisions_floor = self._jobs_revision
                self._jobs_revision += 1
            self._job_revisions[job_id] = self._jobs_revision

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, zeros included)."""
        with self._read() as tx:
            counts = tx.count_by_state()
        return {s: counts.get(s, 0) for s in JobState}

    # -- events

    def append_event(self, job_id: str, kind: EventKind | str, payload: Mapping[str, Any], *,
                     now: float | None = None) -> int:
        """Append one event to a job's log.

        Args:
            job_id: the job.
            kind: ``state``, ``metrics``, ``log`` or ``checkpoint``.
            payload: JSON-serialisable mapping (see `api.records.Event`).
            now: the event's time; default the current time.

        Returns:
            Its sequence number (1 for a job's first event, then 2, 3, ...).

        Raises:
            JobNotFound, ValidationError.
        """
        return self.append_events(job_id, [(kind, payload)], now=now)[0]

    def append_events(self, job_id: str, items: Iterable[tuple[EventKind | str, Mapping]], *,
                      now: float | None = None, states: Iterable[JobState] | None = None,
                      fields: Mapping[str, Any] | None = None) -> list[int]:
        """Append several events, and optionally update the job, in one transaction.

        A worker's progress report is one call: its metrics and log events plus
        ``fields={"last_step": ..., "metrics": ..., "heartbeat_at": ...}``.

        Args:
            job_id: the job.
            items: ``(kind, payload)`` pairs, in order.
            now: the events' time; default the current time.
            states: when given, append only while the job's state is one of these.
            fields: job fields to update with them (as in `update_job`).

        Returns:
            The events' sequence numbers.

        Raises:
            JobNotFound, StateConflict, ValidationError.
        """
        checked = [check_payload(kind, payload) for kind, payload in items]
        now = time.time() if now is None else now
        def change(tx: Transaction) -> list[int]:
            job = self._job_in(tx, job_id, states)
            if fields:
                tx.replace_job(apply_update(job, fields))
            return self._append(tx, job_id, checked, now)

        seqs = self._write(change)
        if fields:
            self._job_written(job_id)
        self._notify(job_id)
        return seqs

    def events(self, job_id: str, after_seq: int = 0, limit: int = MAX_EVENTS) -> list[Event]:
        """A job's events with ``seq > after_seq``, oldest first, at most `limit` of them.

        Raises:
            JobNotFound: no such job.
            ValidationError: a negative `after_seq` or a `limit` outside 1..`MAX_EVENTS`.
        """
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise ValidationError("after_seq", "must be an integer >= 0", after_seq)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_EVENTS:
            raise ValidationError("limit", f"must be an integer in 1..{MAX_EVENTS}", limit)
        with self._read() as tx:
            events = tx.events(job_id, after_seq, limit)
            if not events and tx.get_job(job_id) is None:
                raise JobNotFound(job_id)
        return events

    def wait_events(self, job_id: str, after_seq: int = 0, limit: int = MAX_EVENTS,
                    timeout: float = 30.0) -> list[Event]:
        """Like `events`, but when there are none yet, wait up to `timeout` s for the next.

        A watcher loops ``events = store.wait_events(id, seq); seq = events[-1].seq`` and
        misses nothing: it is woken by any write to this job made through this store object.

        Returns:
            The new events, or [] when the timeout passed (or the store was closed) first.

        Raises:
            JobNotFound, ValidationError, StoreClosed.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._signal_lock:
                generation = self._generation.get(job_id, 0)
            events = self.events(job_id, after_seq, limit)
            if events:
                return events
            with self._signal_lock:
                condition = self._signals.setdefault(job_id,
                                                     threading.Condition(self._signal_lock))
                while self._generation.get(job_id, 0) == generation:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed:
                        return []
                    condition.wait(remaining)

    # -- checkpoints

    def add_checkpoint(self, record: CheckpointRecord, *,
                       states: Iterable[JobState] | None = None) -> CheckpointRecord:
        """Record a checkpoint whose blob is already stored, with a ``checkpoint`` event.

        Recording the same (job, step, sha256) again is a no-op (an upload retried).

        Args:
            record: the checkpoint.
            states: when given, record it only while the job's state is one of these (checked
                in the same transaction, so a job cancelled meanwhile gets nothing).

        Returns:
            The stored record.

        Raises:
            JobNotFound, ValidationError.
            StateConflict: the job is not in one of `states`.
            AlreadyExists: the job has a different checkpoint at this step (delete it first).
        """
        record = check_checkpoint(record)
        def change(tx: Transaction) -> CheckpointRecord | None:
            self._job_in(tx, record.job_id, states)
            existing = tx.get_checkpoint(record.job_id, record.step)
            if existing is not None:
                if existing.sha256 == record.sha256:
                    return existing
                raise AlreadyExists(f"job {record.job_id!r} already has a different checkpoint "
                                    f"at step {record.step} (sha256 {existing.sha256})")
            tx.insert_checkpoint(record)
            payload = {"step": record.step, "sha256": record.sha256, "size": record.size}
            self._append(tx, record.job_id, [(EventKind.CHECKPOINT, payload)], record.created_at)
            return None

        existing = self._write(change)
        if existing is not None:
            return existing
        self._notify(record.job_id)
        return record

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """A job's checkpoints, oldest step first.

        Raises:
            JobNotFound: no such job.
        """
        with self._read() as tx:
            if tx.get_job(job_id) is None:
                raise JobNotFound(job_id)
            return tx.list_checkpoints(job_id)

    def get_checkpoint(self, job_id: str, step: int | None = None) -> CheckpointRecord:
        """The job's checkpoint at `step`, or its latest when `step` is None.

        Raises:
            JobNotFound, CheckpointNotFound.
        """
        with self._read() as tx:
            record = tx.get_checkpoint(job_id, step)
            if record is None and tx.get_job(job_id) is None:
                raise JobNotFound(job_id)
        if record is None:
            raise CheckpointNotFound(job_id, step)
        return record

    def delete_checkpoint(self, job_id: str, step: int) -> CheckpointRecord:
        """Forget a checkpoint record (its blobs stay: see
        `server.checkpoint_store.prune_job_checkpoints`).

        Returns:
            The deleted record.

        Raises:
            JobNotFound, CheckpointNotFound.
        """
        def change(tx: Transaction) -> CheckpointRecord:
            self._job_in(tx, job_id, None)
            record = tx.get_checkpoint(job_id, step)
            if record is None:
                raise CheckpointNotFound(job_id, step)
            tx.delete_checkpoint(job_id, step)
            return record

        return self._write(change)

    def set_checkpoint_keep(self, job_id: str, step: int, keep: bool) -> CheckpointRecord:
        """Mark a checkpoint to be kept by retention (`keep` True), or unmark it.

        Returns:
            The record as it is now.

        Raises:
            JobNotFound, CheckpointNotFound.
            ValidationError: naming ``keep``, when it is not a bool.
        """
        if not isinstance(keep, bool):
            raise ValidationError("keep", "must be true or false", keep)
        def change(tx: Transaction) -> CheckpointRecord:
            self._job_in(tx, job_id, None)
            record = tx.get_checkpoint(job_id, step)
            if record is None:
                raise CheckpointNotFound(job_id, step)
            tx.set_checkpoint_keep(job_id, step, keep)
            return record

        return dataclasses.replace(self._write(change), keep=keep)

    def all_checkpoints(self) -> list[CheckpointRecord]:
        """Every job's checkpoint records, read in one snapshot (by job, then step).

        Which blobs they refer to is the checkpoint format's business, not the store's: see
        `server.checkpoint_store.referenced_blobs`.
        """
        with self._read() as tx:
            return tx.all_checkpoints()

    # -- users

    def create_user(self, user: User) -> User:
        """Store a new user.

        Raises:
            ValidationError: a bad name.
            AlreadyExists: the name is taken.
        """
        check_user_name(user.name)
        def change(tx: Transaction) -> None:
            if tx.get_user(user.name) is not None:
                raise AlreadyExists(f"user {user.name!r} already exists")
            tx.insert_user(user)

        self._write(change)
        self._users_changed()
        return user

    def get_user(self, name: str) -> User:
        """The user with this name.

        Raises:
            UserNotFound: no such user.
        """
        with self._read() as tx:
            user = tx.get_user(name)
        if user is None:
            raise UserNotFound(name)
        return user

    def user_by_token_hash(self, token_hash: str) -> User | None:
        """The user whose current token hashes to `token_hash`, or None (unknown, revoked or
        replaced: read at every call, so a change takes effect at the next one)."""
        if not token_hash:
            return None
        version = self._users_version
        cached = self._token_users.get(token_hash)
        if cached is not None and cached[0] == version:
            return cached[1]
        with self._read() as tx:
            user = tx.user_by_token_hash(token_hash)
        if user is not None:  # only users: unknown tokens would grow it without bound
            self._token_users[token_hash] = (version, user)
        return user

    def set_user_token(self, name: str, token_hash: str) -> User:
        """Replace a user's token by the one hashing to `token_hash` ("" revokes it).

        Returns:
            The updated user.

        Raises:
            UserNotFound: no such user.
        """
        def change(tx: Transaction) -> User:
            user = tx.get_user(name)
            if user is None:
                raise UserNotFound(name)
            user = dataclasses.replace(user, token_hash=token_hash)
            tx.replace_user(user)
            return user

        user = self._write(change)
        self._users_changed()
        return user

    def list_users(self) -> list[User]:
        """Every user, by name."""
        with self._read() as tx:
            return tx.list_users()

    def _users_changed(self) -> None:
        """After a committed user write: no token lookup made before it is used again."""
        self._users_version += 1
        self._token_users.clear()

    # -- shared helpers

    @staticmethod
    def _job_in(tx: Transaction, job_id: str, states: Iterable[JobState] | None) -> Job:
        job = tx.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if states is not None:
            expected = _states(states)
            if job.state not in expected:
                raise StateConflict(job_id, job.state, expected)
        return job

    @staticmethod
    def _append(tx: Transaction, job_id: str, items: list[tuple[EventKind, dict]],
                now: float) -> list[int]:
        first = tx.last_seq(job_id) + 1
        events = [Event(job_id, first + i, now, kind, payload)
                  for i, (kind, payload) in enumerate(items)]
        tx.insert_events(events)
        return [e.seq for e in events]

    def _notify(self, job_id: str) -> None:
        with self._signal_lock:
            self._generation[job_id] = self._generation.get(job_id, 0) + 1
            condition = self._signals.get(job_id)
            if condition is not None:
                condition.notify_all()
