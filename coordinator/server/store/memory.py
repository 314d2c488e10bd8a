"""`MemoryStore`: the `Store` contract kept in this process's memory."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from dptrain.coordinator.api.errors import StoreClosed
from dptrain.coordinator.api.records import CheckpointRecord, Event, Job, JobState, User
from dptrain.coordinator.server.store.base import Store, T, Transaction

__all__ = ["MemoryStore"]


class _MemoryTransaction:
    """`Transaction` over MemoryStore's dicts, with an undo log for rollback. Records go in and
    come out as deep copies, so no caller shares a mutable dict with the stored state."""

    def __init__(self, store: MemoryStore):
        self._jobs, self._events = store._jobs, store._events
        self._checkpoints, self._users = store._checkpoints, store._users
        self.undo: list[Any] = []

    def get_job(self, job_id: str) -> Job | None:
        return copy.deepcopy(self._jobs.get(job_id))

    def insert_job(self, job: Job) -> None:
        self._jobs[job.id] = copy.deepcopy(job)
        self._events[job.id] = []
        self._checkpoints[job.id] = {}
        self.undo.append(lambda: (self._jobs.pop(job.id), self._events.pop(job.id),
                                  self._checkpoints.pop(job.id)))

    def replace_job(self, job: Job) -> None:
        old = self._jobs[job.id]
        self._jobs[job.id] = copy.deepcopy(job)
        self.undo.append(lambda: self._jobs.__setitem__(job.id, old))

    def last_seq(self, job_id: str) -> int:
        return len(self._events[job_id])

    def insert_events(self, events: list[Event]) -> None:
        for e in events:
            log = self._events[e.job_id]
            log.append(copy.deepcopy(e))
            self.undo.append(log.pop)

    def get_checkpoint(self, job_id: str, step: int | None) -> CheckpointRecord | None:
        records = self._checkpoints.get(job_id, {})
        if step is None:
            step = max(records, default=None)
        return copy.deepcopy(records.get(step))

    def insert_checkpoint(self, record: CheckpointRecord) -> None:
        records = self._checkpoints[record.job_id]
        records[record.step] = copy.deepcopy(record)
        self.undo.append(lambda: records.pop(record.step))

    def delete_checkpoint(self, job_id: str, step: int) -> None:
        records = self._checkpoints[job_id]
        old = records.pop(step)
        self.undo.append(lambda: records.__setitem__(step, old))

    def set_checkpoint_keep(self, job_id: str, step: int, keep: bool) -> None:
        records = self._checkpoints[job_id]
        old = records[step]
        records[step] = dataclasses.replace(old, keep=keep)
        self.undo.append(lambda: records.__setitem__(step, old))

    def delete_job(self, job_id: str) -> None:
        saved = (self._jobs.pop(job_id), self._events.pop(job_id),
                 self._checkpoints.pop(job_id))

        def restore() -> None:
            self._jobs[job_id], self._events[job_id], self._checkpoints[job_id] = saved
        self.undo.append(restore)

    def list_jobs(self, states: frozenset[JobState] | None, after: tuple[float, str] | None,
                  limit: int, owner: str | None = None) -> list[Job]:
        jobs = sorted((j for j in self._jobs.values()
                       if (states is None or j.state in states)
                       and (owner is None or j.owner == owner)
                       and (after is None or (j.submitted_at, j.id) < after)),
                      key=lambda j: (j.submitted_at, j.id), reverse=True)
        return copy.deepcopy(jobs[:limit])

    def events(self, job_id: str, after_seq: int, limit: int) -> list[Event]:
        return copy.deepcopy(self._events.get(job_id, [])[after_seq:after_seq + limit])

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        records = self._checkpoints.get(job_id, {})
        return copy.deepcopy([records[step] for step in sorted(records)])

    def count_by_state(self) -> dict[JobState, int]:
        counts: dict[JobState, int] = {}
        for job in self._jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    def all_checkpoints(self) -> list[CheckpointRecord]:
        return copy.deepcopy([self._checkpoints[job_id][step]
                              for job_id in sorted(self._checkpoints)
                              for step in sorted(self._checkpoints[job_id])])

    def get_user(self, name: str) -> User | None:
        return self._users.get(name)  # frozen, with immutable fields: no copy needed

    def user_by_token_hash(self, token_hash: str) -> User | None:
        return next((u for u in self._users.values() if u.token_hash == token_hash), None)

    def insert_user(self, user: User) -> None:
        self._users[user.name] = user
        self.undo.append(lambda: self._users.pop(user.name))

    def replace_user(self, user: User) -> None:
        old = self._users[user.name]
        self._users[user.name] = user
        self.undo.append(lambda: self._users.__setitem__(user.name, old))

    def list_users(self) -> list[User]:
        return [self._users[name] for name in sorted(self._users)]


class _MemoryContext:
    """Holds MemoryStore's lock for one operation; undoes a failed write's changes."""

    def __init__(self, store: MemoryStore):
        self._store = store

    def __enter__(self) -> _MemoryTransaction:
        self._store._lock.acquire()
        if self._store._closed:
            self._store._lock.release()
            raise StoreClosed("the store is closed")
        self._tx = _MemoryTransaction(self._store)
        return self._tx

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is not None:
                for undo in reversed(self._tx.undo):
                    undo()
        finally:
            self._store._lock.release()


class MemoryStore(Store):
    """A `Store` in this process's memory, for tests and throw-away servers.

    One lock serialises every operation; a failed write is undone before the lock is released.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[Event]] = {}
        self._checkpoints: dict[str, dict[int, CheckpointRecord]] = {}
        self._users: dict[str, User] = {}

    def _write(self, change: Callable[[Transaction], T]) -> T:
        with _MemoryContext(self) as tx:
            return change(tx)

    def _read(self) -> AbstractContextManager[Transaction]:
        return _MemoryContext(self)
