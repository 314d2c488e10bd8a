"""The encoded replies of the job RPCs, kept while the jobs they show are unchanged.

Encoding a job is most of what a GetJob or a ListJobs costs the servicer, and reading it from
the store most of the rest (docs/benchmarks.md, "Coordinator"). A job changes only through the
store, which counts every committed write of a job in its revision (`Store.job_revision`) and
of all jobs together (`Store.jobs_revision`). So a job's message is kept with the revision read
before the job was read, and used again while that revision stays; a page of the listing is
kept while no job at all was written. An unchanged job then costs a dict lookup.

A job's spec never changes: its encoded spec is kept across the job's revisions, from its
submission on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.records import Job
from dptrain.coordinator.server.store import Store
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb

__all__ = ["JobMessages", "BoundedCache"]

_PAGES = 64  # listing pages kept ...
_PAGE_BYTES = 1 << 20  # ... of at most this size each: at most 64 MiB, however large the specs

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A dict of at most `capacity` entries that forgets the oldest first; safe for many
    threads.

    Args:
        capacity: how many entries to keep.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The entry of `key`, or None."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        """Keep `value` under `key` (again the newest)."""
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = value
            while len(self._entries) > self.capacity:
                del self._entries[next(iter(self._entries))]

    def keys(self) -> list[K]:
        """The keys, oldest first."""
        with self._lock:
            return list(self._entries)


class JobMessages:
    """Jobs as the servicer reads and encodes them: records and messages kept by revision.

    The messages handed out are shared between calls: send them, never change them.

    Args:
        store: the server's store (its revisions, and its jobs when one is not kept).
        capacity: how many jobs (and, separately, specs) to keep; listing pages: at most
            64 of them, each of at most 1 MiB.
    """

    def __init__(self, store: Store, capacity: int = 4096):
        self.store = store
        self.specs: BoundedCache[str, pb.JobSpec] = BoundedCache(capacity)
        self._jobs: BoundedCache[str, tuple[int, Job, pb.Job]] = BoundedCache(capacity)
        self._pages: BoundedCache[Hashable, tuple[int, pb.ListJobsResponse]] = BoundedCache(
            min(capacity, _PAGES))

    def get(self, job_id: str) -> tuple[Job, pb.Job]:
        """The job and its message (`Store.get_job`, encoded), read again only once the job
        was written.

        Raises:
            JobNotFound: no such job.
        """
        revision = self.store.job_revision(job_id)  # first: see `Store.job_revision`
        kept = self._jobs.get(job_id)
        if kept is not None and kept[0] == revision:
            return kept[1], kept[2]
        job = self.store.get_job(job_id)
        message = self.message(job)
        self._jobs.put(job_id, (revision, job, message))
        return job, message

    def message(self, job: Job) -> pb.Job:
        """`serde.stored_job_to_proto(job)`, its spec encoded at most once per job."""
        spec = self.specs.get(job.id)
        if spec is None:
            try:
                spec = serde.spec_to_proto(job.spec)
            except (ValueError, OverflowError, TypeError):  # a record the API cannot carry:
                return serde.stored_job_to_proto(job)     # its summary, as serde makes it
            self.specs.put(job.id, spec)
        return serde.stored_job_to_proto(job, spec)

    def page(self, key: Hashable,
             read: Callable[[], tuple[list[Job], str]]) -> pb.ListJobsResponse:
        """A page of the listing: `read()`'s jobs and token, encoded, read again only once a
        job was written.

        Args:
            key: what `read` depends on (the request, as the caller may see it).
            read: reads the page from the store.
        """
        revision = self.store.jobs_revision  # first, as for one job
        kept = self._pages.get(key)
        if kept is not None and kept[0] == revision:
            return kept[1]
        page, token = read()
        response = pb.ListJobsResponse(jobs=[self.message(j) for j in page],
                                       next_page_token=token)
        if response.ByteSize() <= _PAGE_BYTES:
            self._pages.put(key, (revision, response))
        return response
