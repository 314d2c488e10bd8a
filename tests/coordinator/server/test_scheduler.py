"""The scheduling policy: hand-worked cases, hostfiles, and properties over random clusters and
queues, including a simulated timeline in which the head of the queue is never delayed."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptrain.coordinator.api.errors import HostfileError, ValidationError
from dptrain.coordinator.api.records import JobState, new_job
from dptrain.coordinator.server.scheduler import (
    Cluster,
    Decision,
    Host,
    Launch,
    PendingJob,
    Reservation,
    RunningJob,
    queue_order,
    schedule,
    validate_request,
)


def P(job_id, workers, priority=0, submitted=0.0, limit=None):  # noqa: N802 - reads as a table
    return PendingJob(job_id, workers, priority, submitted, limit)


def R(job_id, placement, started=0.0, limit=None):  # noqa: N802
    return RunningJob(job_id, tuple(placement.items()), started, limit)


def started(decision: Decision) -> list[str]:
    return [launch.job_id for launch in decision.launches]


LOCAL4 = Cluster.local(4, host="h")

# ---------------------------------------------------------------- hand-worked cases


def test_gang_a_job_starts_only_when_all_its_ranks_fit():
    d = schedule([P("a", 2)], [R("r", {"h": 3})], LOCAL4, now=0.0)
    assert d.launches == () and d.reservation == Reservation("a", None, 0)
    d = schedule([P("a", 2)], [R("r", {"h": 2})], LOCAL4, now=0.0)
    assert d.launches == (Launch("a", (("h", 2),)),)


def test_higher_priority_first():
    d = schedule([P("low", 3, priority=0, submitted=1.0), P("high", 3, priority=5,
                                                              submitted=2.0)], [], LOCAL4, 0.0)
    assert started(d) == ["high"] and d.reservation.job_id == "low"


def test_fifo_within_a_priority_then_id():
    jobs = [P("c", 1, submitted=2.0), P("b", 1, submitted=1.0), P("a", 1, submitted=2.0)]
    assert [j.id for j in queue_order(jobs)] == ["b", "a", "c"]
    assert started(schedule(jobs, [], LOCAL4, 0.0)) == ["b", "a", "c"]


def test_jobs_start_in_order_while_they_fit():
    d = schedule([P("a", 1, submitted=1), P("b", 2, submitted=2), P("c", 1, submitted=3)],
                 [], LOCAL4, 0.0)
    assert started(d) == ["a", "b", "c"] and d.reservation is None


def test_backfill_allowed_when_it_ends_before_the_reservation():
    # r holds 3 of 4 slots until t=100; the head needs all 4, so it is reserved t=100.
    running = [R("r", {"h": 3}, started=0.0, limit=100.0)]
    pending = [P("head", 4, submitted=1), P("short", 1, submitted=2, limit=50.0),
               P("long", 1, submitted=3, limit=200.0)]
    d = schedule(pending, running, LOCAL4, now=10.0)
    assert d.reservation == Reservation("head", 100.0, 0)
    assert started(d) == ["short"]  # ends at 60 <= 100; "long" would end at 210 and delay it


def test_backfill_exactly_at_the_reservation_is_allowed():
    running = [R("r", {"h": 3}, started=0.0, limit=100.0)]
    d = schedule([P("head", 4), P("x", 1, submitted=1, limit=90.0)], running, LOCAL4, 10.0)
    assert started(d) == ["x"]


def test_the_stop_grace_counts_in_the_reservation_and_in_backfill():
    # A job stopped at its limit may hold its slots for the grace (5 s) after it: r frees its
    # 3 slots by 0 + 100 + 5 = 105, and a backfilled job must be gone by then, grace included.
    running = [R("r", {"h": 3}, started=0.0, limit=100.0)]
    pending = [P("head", 4), P("too_long", 1, submitted=1, limit=91.0),
               P("fits", 1, submitted=2, limit=90.0)]
    d = schedule(pending, running, LOCAL4, now=10.0, stop_grace=5.0)
    assert d.reservation == Reservation("head", 105.0, 0)
    assert started(d) == ["fits"]  # 10 + 90 + 5 = 105 <= 105; 10 + 91 + 5 = 106 is not


def test_backfill_into_spare_slots_needs_no_time_limit():
    # 10 slots, r holds 7 until t=100: the head (5) is reserved t=100 with 10 - 5 = 5 spare.
    cluster = Cluster.local(10, host="h")
    running = [R("r", {"h": 7}, started=0.0, limit=100.0)]
    pending = [P("head", 5), P("x", 2, submitted=1), P("y", 1, submitted=2),
               P("z", 1, submitted=3)]
    d = schedule(pending, running, cluster, now=0.0)
    assert d.reservation == Reservation("head", 100.0, 5)
    assert started(d) == ["x", "y"]  # 3 slots free now: x and y use them, z does not fit


def test_backfill_denied_when_it_would_take_slots_the_head_needs():
    # 8 slots, r holds 6 until t=100, the head needs 7: only 1 spare slot at t=100.
    cluster = Cluster.local(8, host="h")
    running = [R("r", {"h": 6}, started=0.0, limit=100.0)]
    d = schedule([P("head", 7), P("x", 2, submitted=1)], running, cluster, now=0.0)
    assert d.reservation == Reservation("head", 100.0, 1) and d.launches == ()
    d = schedule([P("head", 7), P("x", 2, submitted=1, limit=100.0)], running, cluster, 0.0)
    assert started(d) == ["x"]  # but a job that is gone by t=100 may run


def test_unknown_time_limits_mean_no_reservation_and_no_backfill():
    running = [R("r", {"h": 3}, started=0.0, limit=None)]
    d = schedule([P("head", 4), P("tiny", 1, submitted=1, limit=1.0)], running, LOCAL4, 0.0)
    assert d.reservation == Reservation("head", None, 0) and d.launches == ()


def test_reservation_waits_for_enough_jobs_to_end():
    running = [R("r1", {"h": 1}, 0.0, 50.0), R("r2", {"h": 1}, 0.0, 80.0),
               R("r3", {"h": 1}, 0.0, 30.0), R("forever", {"h": 1}, 0.0, None)]
    d = schedule([P("head", 3)], running, LOCAL4, now=10.0)
    assert d.reservation == Reservation("head", 80.0, 0)  # r3 at 30, r1 at 50, r2 at 80


def test_jobs_launched_in_the_same_pass_count_for_the_reservation():
    pending = [P("a", 2, submitted=0, limit=100.0), P("head", 4, submitted=1),
               P("s", 2, submitted=2, limit=50.0)]
    d = schedule(pending, [], LOCAL4, now=0.0)
    assert started(d) == ["a", "s"] and d.reservation == Reservation("head", 100.0, 0)
    pending[2] = P("s", 2, submitted=2, limit=150.0)
    assert started(schedule(pending, [], LOCAL4, now=0.0)) == ["a"]


def test_an_overdue_job_counts_as_ending_now():
    running = [R("r", {"h": 4}, started=0.0, limit=10.0)]
    d = schedule([P("head", 4)], running, LOCAL4, now=25.0)
    assert d.reservation == Reservation("head", 25.0, 0)


def test_oversized_jobs_are_reported_not_blocking():
    d = schedule([P("huge", 5), P("ok", 2, submitted=1)], [], LOCAL4, 0.0)
    assert d.unschedulable == ("huge",) and started(d) == ["ok"]


def test_multi_host_placement():
    cluster = Cluster((Host("a", 4), Host("b", 2), Host("c", 4)))
    d = schedule([P("three", 3)], [], cluster, 0.0)
    assert d.launches[0].placement == (("a", 3),)  # fullest host that fits; a before c
    d = schedule([P("two", 2)], [], cluster, 0.0)
    assert d.launches[0].placement == (("b", 2),)  # b fits exactly
    d = schedule([P("six", 6)], [], cluster, 0.0)
    launch = d.launches[0]
    assert launch.placement == (("a", 4), ("c", 2)) and launch.workers == 6
    d = schedule([P("ten", 10)], [], cluster, 0.0)
    assert d.launches[0].placement == (("a", 4), ("b", 2), ("c", 4))


def test_running_jobs_are_subtracted_per_host_and_overcommit_is_harmless():
    cluster = Cluster((Host("a", 2), Host("b", 2)))
    running = [R("old", {"a": 3, "gone": 5})]  # a shrank to 2 slots; host "gone" was removed
    d = schedule([P("x", 2), P("y", 1, submitted=1)], running, cluster, 0.0)
    assert started(d) == ["x"] and d.launches[0].placement == (("b", 2),)


def test_views_of_stored_jobs():
    job = new_job("j", {"workers": 3}, priority=2, time_limit=60.0, now=5.0)
    assert PendingJob.from_job(job) == PendingJob(job.id, 3, 2, 5.0, 60.0)
    running = job.__class__(**{**job.__dict__, "state": JobState.RUNNING, "started_at": 9.0,
                               "placement": (("a", 3),)})
    assert RunningJob.from_job(running) == RunningJob(job.id, (("a", 3),), 9.0, 60.0)
    assert RunningJob.from_job(running).end == 69.0


# ---------------------------------------------------------------- capacity and hostfiles


def test_validate_request_refuses_more_ranks_than_the_cluster():
    cluster = Cluster.local(8)
    validate_request(8, cluster)
    with pytest.raises(ValidationError) as e:
        validate_request(9, cluster)
    assert e.value.field == "workers"
    assert str(e.value) == "workers: must be at most the cluster's capacity of 8 slots, got 9"


def test_local_cluster_defaults_to_the_core_count():
    assert Cluster.local().capacity == (os.cpu_count() or 1)
    assert Cluster.local(3).hosts == (Host("localhost", 3),)
    with pytest.raises(ValidationError, match="slots"):
        Cluster.local(0)


def test_from_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("n1:2\nn2:2\n")
    assert Cluster.from_hostfile(path).hosts == (Host("n1", 2), Host("n2", 2))
    with pytest.raises(HostfileError, match="cannot read the hostfile"):
        Cluster.from_hostfile(tmp_path / "missing")


# ---------------------------------------------------------------- properties


@st.composite
def situations(draw):
    """A random cluster, running jobs that fit in it, and a queue (some jobs oversized)."""
    slots = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    cluster = Cluster(tuple(Host(f"h{i}", n) for i, n in enumerate(slots)))
    free = dict(zip((h.name for h in cluster.hosts), slots))
    running = []
    for k in range(draw(st.integers(0, 4))):
        placement = {}
        for host in free:
            n = draw(st.integers(0, free[host]))
            if n:
                placement[host] = n
                free[host] -= n
        if placement:
            limit = draw(st.none() | st.integers(1, 50).map(float))
            running.append(R(f"r{k}", placement, started=draw(st.integers(0, 20)), limit=limit))
    pending = [P(f"p{k}", draw(st.integers(1, cluster.capacity + 1)), draw(st.integers(0, 2)),
                 float(draw(st.integers(0, 5))), draw(st.none() | st.integers(1, 50).map(float)))
               for k in range(draw(st.integers(0, 8)))]
    return cluster, running, pending, free, float(draw(st.integers(20, 40)))


@settings(max_examples=300, deadline=None)
@given(situations())
def test_never_over_capacity_and_every_job_gets_exactly_its_ranks(situation):
    cluster, running, pending, free, now = situation
    d = schedule(pending, running, cluster, now)
    by_id = {j.id: j for j in pending}
    assert len(set(started(d))) == len(d.launches)
    used = dict.fromkeys(free, 0)
    for launch in d.launches:
        assert launch.workers == by_id[launch.job_id].workers
        assert all(n >= 1 for _, n in launch.placement)
        for host, n in launch.placement:
            used[host] += n
    assert all(used[h] <= free[h] for h in free)
    assert set(d.unschedulable) == {j.id for j in pending if j.workers > cluster.capacity}
    # Gang + order: every job ahead of the head started; without a reservation nothing
    # after the head did.
    order = [j.id for j in queue_order(pending) if j.workers <= cluster.capacity]
    if d.reservation is None:
        assert started(d) == order
    else:
        head = order.index(d.reservation.job_id)
        assert started(d)[:head] == order[:head]
        if d.reservation.start_at is None:
            assert started(d) == order[:head]


@st.composite
def workloads(draw):
    slots = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    cluster = Cluster(tuple(Host(f"h{i}", n) for i, n in enumerate(slots)))
    jobs = []
    grace = draw(st.integers(0, 3))
    for k in range(draw(st.integers(1, 10))):
        limit = draw(st.integers(1, 20))
        # The actual run time: a job that overruns its limit is stopped, its workers gone
        # within the grace (the runner enforces limits), so it ends by limit + grace.
        jobs.append((P(f"j{k}", draw(st.integers(1, cluster.capacity)),
                       draw(st.integers(0, 2)), float(k), float(limit)),
                     draw(st.integers(1, limit + grace))))
    return cluster, jobs, float(grace)


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_backfill_never_delays_the_head_in_a_simulated_timeline(workload):
    """Everything is submitted at t=0 and runs at most its time limit plus the stop grace
    (overrunning jobs are stopped). Whenever a job is the blocked head, it must start no later
    than the first reservation it was given."""
    cluster, jobs, grace = workload
    runtime = {job.id: t for job, t in jobs}
    pending = [job for job, _ in jobs]
    running: list[tuple[RunningJob, float]] = []  # (job, actual end)
    promised: dict[str, float] = {}
    start: dict[str, float] = {}
    now = 0.0
    while pending or running:
        d = schedule(pending, [r for r, _ in running], cluster, now, stop_grace=grace)
        if d.reservation is not None and d.reservation.job_id not in promised:
            assert d.reservation.start_at is not None  # every limit is known
            promised[d.reservation.job_id] = d.reservation.start_at
        for launch in d.launches:
            job = next(j for j in pending if j.id == launch.job_id)
            pending.remove(job)
            running.append((RunningJob(job.id, launch.placement, now, job.time_limit),
                            now + runtime[job.id]))
            start[job.id] = now
        assert running, "nothing runs and nothing starts: the queue is stuck"
        now = min(end for _, end in running)
        running = [(r, end) for r, end in running if end > now]
    for job_id, reserved in promised.items():
        assert start[job_id] <= reserved, (job_id, start[job_id], reserved)
