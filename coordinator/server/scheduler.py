"""Which queued jobs start now, and where: a pure policy over slots (no grpc, no processes).

The cluster is a set of hosts with a number of *slots* each (one slot runs one worker rank; by
default one host, ``localhost``, with a slot per core; `Cluster.from_hostfile` reads a
hostfile). `schedule` is called whenever something changes (a job submitted,
finished or failed, a time limit passed) with the pending jobs, the running jobs and the time,
and returns the jobs to launch now with their placements. It keeps no state between calls.

Policy:

* **Gang scheduling.** A job starts only when all its ranks fit at once; its ranks may span
  hosts. Placement prefers one host (the fullest that fits, to keep large holes free), else the
  fewest hosts (the emptiest first).
* **Order.** Higher ``priority`` first, then earlier ``submitted_at``, then the job id. Jobs are
  started in this order while they fit.
* **EASY backfill.** The first job that does not fit — the *head* — gets a reservation: the
  earliest time enough slots free up for it, computed from the running jobs' start times and
  time limits. A later job may start now only if it fits now and either it ends (by its own
  time limit) no later than the reservation, or it uses only *spare* slots — slots that are
  free at the reservation beyond what the head needs. So a backfilled job never delays the head.
  Time limits are enforced (`server.runner` stops a run at its limit, its workers checkpoint
  and are killed after ``stop_grace`` seconds at the latest), so a job's slots are free by
  ``started_at + time_limit + stop_grace``: that is the end the reservation counts with.
  A running job without a time limit never frees its slots in this computation; if the head's
  reservation cannot be computed at all, nothing backfills.
* **Oversized jobs** (more ranks than the whole cluster) are refused at submission
  (`validate_request`); any that reach `schedule` (the cluster shrank over a restart) are
  reported in `Decision.unschedulable` instead of blocking the queue.

Jobs that are RESTARTING wait for slots like queued jobs and keep their original submission
time, so they come before later submissions of the same priority.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.api.records import Job
from dptrain.worker.hostfile import Placement, read_hostfile

__all__ = [
    "Host", "Cluster", "PendingJob", "RunningJob", "Launch", "Reservation", "Decision",
    "schedule", "validate_request", "queue_order",
]


@dataclass(frozen=True)
class Host:
    """A machine that runs up to `slots` worker ranks."""

    name: str
    slots: int


@dataclass(frozen=True)
class Cluster:
    """The hosts jobs may run on. Build it with `local` or `from_hostfile`.

    Args:
        hosts: at least one host; names unique, slots >= 1.

    Raises:
        ValidationError: naming ``hosts`` or ``slots``.
    """

    hosts: tuple[Host, ...]

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValidationError("hosts", "must list at least one host", self.hosts)
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValidationError("hosts", "host names must be unique", names)
        for h in self.hosts:
            if isinstance(h.slots, bool) or not isinstance(h.slots, int) or h.slots < 1:
                raise ValidationError("slots", f"host {h.name!r} must have an integer >= 1",
                                      h.slots)

    @property
    def capacity(self) -> int:
        """The total number of slots."""
        return sum(h.slots for h in self.hosts)

    @classmethod
    def local(cls, slots: int | None = None, host: str = "localhost") -> Cluster:
        """One host with `slots` slots.

        Args:
            slots: how many ranks may run at once; default ``os.cpu_count()``.
            host: the host's name.
        """
        return cls((Host(host, slots if slots is not None else os.cpu_count() or 1),))

    @classmethod
    def from_hostfile(cls, path: str | os.PathLike) -> Cluster:
        """The hosts of a hostfile (`dptrain.worker.hostfile`, the parser ``dptrain run``
        uses too), in file order.

        Raises:
            HostfileError: unreadable, or a bad line (the message gives ``path:line:``).
        """
        return cls(tuple(Host(name, slots) for name, slots in read_hostfile(path)))


def validate_request(workers: int, cluster: Cluster) -> None:
    """Refuse, at submission, a job that could never run on this cluster.

    Args:
        workers: the job's ``workers`` (>= 1: the spec's own rule, checked before).
        cluster: where it would run.

    Raises:
        ValidationError: naming ``workers``, the rule (with the capacity) and the value.
    """
    if workers > cluster.capacity:
        raise ValidationError("workers", f"must be at most the cluster's capacity of "
                              f"{cluster.capacity} slots", workers)


@dataclass(frozen=True)
class PendingJob:
    """A job waiting for slots (QUEUED or RESTARTING).

    ``time_limit`` is in seconds per run; None when unknown.
    """

    id: str
    workers: int
    priority: int = 0
    submitted_at: float = 0.0
    time_limit: float | None = None

    @classmethod
    def from_job(cls, job: Job) -> PendingJob:
        """The scheduler's view of a stored job."""
        return cls(job.id, job.workers, job.priority, job.submitted_at, job.time_limit)


@dataclass(frozen=True)
class RunningJob:
    """A job holding slots: ``placement`` lists ``(host, slots)``; it ends by
    ``started_at + time_limit`` (never, as far as we know, when ``time_limit`` is None)."""

    id: str
    placement: Placement
    started_at: float
    time_limit: float | None = None

    @property
    def end(self) -> float | None:
        """When its time limit runs out, or None."""
        return None if self.time_limit is None else self.started_at + self.time_limit

    @classmethod
    def from_job(cls, job: Job) -> RunningJob:
        """The scheduler's view of a stored RUNNING job."""
        return cls(job.id, tuple(job.placement), job.started_at or 0.0, job.time_limit)


@dataclass(frozen=True)
class Launch:
    """Start `job_id` now with ``placement``: ``(host, slots)`` pairs, ranks numbered in order."""

    job_id: str
    placement: Placement

    @property
    def workers(self) -> int:
        """The number of ranks (the sum of the placement's slots)."""
        return sum(n for _, n in self.placement)


@dataclass(frozen=True)
class Reservation:
    """The head of the queue's reservation: it can start at ``start_at`` (None: unknown, so
    nothing backfills), when ``spare_slots`` more than it needs will be free."""

    job_id: str
    start_at: float | None
    spare_slots: int


@dataclass(frozen=True)
class Decision:
    """What `schedule` decided: jobs to launch now (in queue order), the head's reservation
    (None when every pending job started), and pending jobs larger than the whole cluster."""

    launches: tuple[Launch, ...]
    reservation: Reservation | None = None
    unschedulable: tuple[str, ...] = ()


def queue_order(jobs: Iterable[PendingJob]) -> list[PendingJob]:
    """Pending jobs in scheduling order: priority (high first), submission time, id."""
    return sorted(jobs, key=lambda j: (-j.priority, j.submitted_at, j.id))


def schedule(pending: Iterable[PendingJob], running: Iterable[RunningJob], cluster: Cluster,
             now: float, stop_grace: float = 0.0) -> Decision:
    """Decide which pending jobs start now and where (see the module docstring for the policy).

    Args:
        pending: jobs waiting for slots (QUEUED and RESTARTING).
        running: jobs holding slots.
        cluster: the hosts.
        now: the current time (unix seconds, same clock as the jobs' times).
        stop_grace: seconds a job stopped at its time limit may hold its slots after it (the
            runner's ``kill_grace``).

    Returns:
        The launches, the head's reservation and the jobs that can never fit.

    Example:
        >>> c = Cluster.local(4)
        >>> d = schedule([PendingJob("a", 2), PendingJob("b", 3)], [], c, now=0.0)
        >>> [(l.job_id, l.placement) for l in d.launches], d.reservation
        ([('a', (('localhost', 2),))], Reservation(job_id='b', start_at=None, spare_slots=0))
    """
    order = [h.name for h in cluster.hosts]
    free = {h.name: h.slots for h in cluster.hosts}
    running = list(running)
    for job in running:
        for host, n in job.placement:
            if host in free:
                free[host] -= n
    launches: list[Launch] = []
    reservation: Reservation | None = None
    spare = 0
    unschedulable = []
    queue = queue_order(pending)
    limits = {job.id: job.time_limit for job in queue}
    for job in queue:
        if job.workers > cluster.capacity:
            unschedulable.append(job.id)
            continue
        if _usable(free) < job.workers:
            if reservation is None:
                started = [RunningJob(lj.job_id, lj.placement, now, limits[lj.job_id])
                           for lj in launches]
                reservation = _reserve(job, free, running + started, now, stop_grace)
                spare = reservation.spare_slots
            continue
        if reservation is not None:
            ends_in_time = (reservation.start_at is not None and job.time_limit is not None
                            and now + job.time_limit + stop_grace <= reservation.start_at)
            if not ends_in_time:
                if job.workers > spare:
                    continue
                spare -= job.workers
        launches.append(Launch(job.id, _place(free, job.workers, order)))
    return Decision(tuple(launches), reservation, tuple(unschedulable))


def _usable(free: Mapping[str, int]) -> int:
    # A host can be over-committed (the cluster shrank over a restart): it offers 0, not < 0.
    return sum(max(0, n) for n in free.values())


def _reserve(head: PendingJob, free: Mapping[str, int], running: list[RunningJob],
             now: float, stop_grace: float) -> Reservation:
    """The earliest time the head fits if running jobs end at their time limits (plus the
    grace a stopped job's workers have to checkpoint and exit)."""
    projected = dict(free)
    ends = sorted((max(job.end + stop_grace, now), i) for i, job in enumerate(running)
                  if job.end is not None)
    i = 0
    while i < len(ends):
        t = ends[i][0]
        while i < len(ends) and ends[i][0] == t:  # release everything ending at t together
            for host, n in running[ends[i][1]].placement:
                if host in projected:
                    projected[host] += n
            i += 1
        if _usable(projected) >= head.workers:
            return Reservation(head.id, t, _usable(projected) - head.workers)
    return Reservation(head.id, None, 0)


def _place(free: dict[str, int], ranks: int, order: list[str]) -> Placement:
    """Take `ranks` slots from `free` (which must have them): the fullest single host that
    fits, else the emptiest hosts first. Returns the placement in cluster order."""
    rank_of = {h: i for i, h in enumerate(order)}
    single = [h for h in order if free[h] >= ranks]
    if single:
        host = min(single, key=lambda h: (free[h], rank_of[h]))
        taken = {host: ranks}
    else:
        taken, needed = {}, ranks
        for host in sorted(order, key=lambda h: (-free[h], rank_of[h])):
            if needed == 0 or free[host] <= 0:
                break
            taken[host] = min(free[host], needed)
            needed -= taken[host]
    for host, n in taken.items():
        free[host] -= n
    return tuple((h, taken[h]) for h in order if h in taken)
