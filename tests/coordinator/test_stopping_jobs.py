"""End to end: jobs stopped before they finish — at their time limit, or cancelled — keep the
checkpoint their workers write while stopping, and EASY backfill keeps its promise to the head
of the queue when a backfilled job overruns its declared limit. A real coordinator on
loopback with two slots, real ``mpiexec`` workers, the client and the ``dptrain`` CLI."""

from __future__ import annotations

import re
import time
from pathlib import Path

import e2ekit
import pytest
from e2ekit import RUNNER_OPTIONS, watch_all
from jobkit import SLOW_SPEC, TINY_SPEC, run_cli, spec, tensor_digests, wait_for

from dptrain.coordinator.api.records import EventKind, JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster, PendingJob, RunningJob, schedule
from dptrain.worker.checkpoint_manifest import checkpoint_name, verify_checkpoint

pytestmark = [pytest.mark.timeout(400), pytest.mark.e2e, pytest.mark.mpi]
S = JobState
# The fixtures (pytest finds them by these names).
state_dir, server, client = e2ekit.state_dir, e2ekit.server, e2ekit.client

#: Trains far longer than any limit here (a checkpoint every 10 steps), on one rank.
ENDLESS = spec(SLOW_SPEC, name="endless", workers=1, max_steps=10_000_000)
#: Seconds the runner gives stopping workers before it kills them, in the backfill test.
KILL_GRACE = 10.0


def _stopped_step(client: Client, job_id: str) -> int:
    """The step the ended job's workers stopped after (the worker's own SIGTERM line)."""
    steps = [int(m[1]) for e in watch_all(client, job_id) if e.kind is EventKind.LOG
             and (m := re.match(r"SIGTERM: stopped after step (\d+)", e.payload["line"]))]
    assert len(steps) == 1, steps
    return steps[0]


def _state(client: Client, job_id: str, *states: JobState, timeout: float = 240):
    return wait_for(lambda: (job := client.get_job(job_id)).state in states and job, timeout,
                    what=f"job {job_id} to be {'/'.join(s.value for s in states)}")


@pytest.fixture
def backfill_server(serve_coordinator, state_dir: Path):
    options = {**RUNNER_OPTIONS, "kill_grace": KILL_GRACE}
    return serve_coordinator(stop_grace=1.0, cluster=Cluster.local(2),
                             runner=RunnerSettings(state_dir, **options))


def test_backfill_never_delays_the_head_when_jobs_overrun_their_limits(backfill_server,
                                                                       state_dir):
    with Client(backfill_server.address, token=backfill_server.token) as client:
        # One slot held by a job that declares 40 s and would run for ever; the head needs
        # both slots, so its reservation is when the holder's limit (and stop grace) is up.
        holder = client.submit_job(spec(ENDLESS, name="holder"), time_limit=40.0)
        holder = _state(client, holder.id, S.RUNNING)
        status = run_cli(backfill_server.address, state_dir, "status", holder.id)
        stops = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started_at + 40))
        assert f"time limit: 40 s per run (this run stops at {stops})" in status.stdout
        head = client.submit_job(spec(TINY_SPEC, name="head"), time_limit=600.0)
        # Declares 8 s, so it may jump ahead into the free slot; it too would run for ever.
        overrun = client.submit_job(spec(ENDLESS, name="overrun"), time_limit=8.0)
        assert _state(client, overrun.id, S.RUNNING, S.TIMED_OUT).started_at is not None
        assert client.get_job(head.id).state is S.QUEUED

        # The reservation, by hand (independently of the scheduler): the holder's start, its
        # limit and the grace its stopping workers have. The scheduler computes the same.
        reserved = holder.started_at + 40.0 + KILL_GRACE
        decision = schedule([PendingJob.from_job(client.get_job(head.id))],
                            [RunningJob.from_job(holder)], Cluster.local(2),
                            now=head.submitted_at, stop_grace=KILL_GRACE)
        assert decision.reservation.start_at == pytest.approx(reserved)

        for job_id, limit in ((overrun.id, 8.0), (holder.id, 40.0)):
            job = _state(client, job_id, S.TIMED_OUT, S.FAILED, S.SUCCEEDED, S.CANCELLED)
            assert job.state is S.TIMED_OUT, job.error
            assert job.restarts == 0 and job.finished_at - job.started_at >= limit
            step = _stopped_step(client, job_id)
            assert client.list_checkpoints(job_id)[-1].step == step  # stored at its stop
            assert job.error.startswith(f"time limit: the run went past the job's time limit "
                                        f"of {limit:g} s")
        head = _state(client, head.id, S.SUCCEEDED, S.FAILED)
        assert head.state is S.SUCCEEDED, head.error
        ended = [client.get_job(j).finished_at for j in (holder.id, overrun.id)]
        assert max(ended) <= head.started_at <= reserved


def test_cancel_keeps_the_checkpoint_written_while_stopping(server, client, state_dir,
                                                            tmp_path):
    job = client.submit_job(spec(ENDLESS, workers=2))
    wait_for(lambda: client.list_checkpoints(job.id), 120, what="a first checkpoint")
    cancelled = run_cli(server.address, state_dir, "cancel", "--wait", job.id)
    assert cancelled.returncode == 0, cancelled.stderr
    step = _stopped_step(client, job.id)
    assert cancelled.stdout.splitlines() == [
        f"{job.id} CANCELLING",
        f"{job.id} CANCELLED: cancelled by a user; stopped after step {step}, its checkpoint "
        f"stored"]
    final = client.get_job(job.id)
    assert final.state is S.CANCELLED and final.exit_code == 143 and final.placement == ()
    states = [e.payload["state"] for e in watch_all(client, job.id) if e.kind is EventKind.STATE]
    assert states == ["QUEUED", "RUNNING", "CANCELLING", "CANCELLED"]

    listing = run_cli(server.address, state_dir, "checkpoints", job.id)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[-1].split()[0] == str(step)
    # The stored checkpoint is the one the workers wrote: its download verifies, and its
    # tensors are those of the checkpoint directory (itself verified against its manifest).
    local = state_dir / "jobs" / job.id / "checkpoints" / checkpoint_name(step)
    assert verify_checkpoint(local)["step"] == step
    got = run_cli(server.address, state_dir, "download", job.id, "-o",
                  str(tmp_path / "model.safetensors"))
    assert got.returncode == 0, got.stderr
    assert tensor_digests(tmp_path / "model.safetensors") == tensor_digests(
        local / "model.safetensors")
    again = run_cli(server.address, state_dir, "cancel", job.id)  # a no-op now
    assert again.returncode == 0 and again.stdout.split() == [job.id, "CANCELLED"]
