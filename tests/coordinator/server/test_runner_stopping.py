"""The runner stops jobs — past their time limit, or cancelled — keeping the checkpoint their
workers write while stopping, also across a coordinator kill -9 in the middle of the stop.
Real SQLite store, real ``mpiexec`` workers or stand-in ``mpiexec`` scripts, no gRPC (the
runner stores the checkpoints from the job's directory itself)."""

from __future__ import annotations

import os
import re
import signal

import pytest
import runnerkit
from jobkit import (
    FAKE_FINAL_STEP,
    SLOW_SPEC,
    TINY_SPEC,
    fake_mpiexec,
    processes_with_env,
    spec,
    wait_for,
)
from runnerkit import cancel, log_lines, runner_process, states_of, submit, wait_state

from dptrain.coordinator.api.records import JobState, new_job
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.checkpoint_store import verify_record
from dptrain.coordinator.server.job_files import JobPaths, read_run_record

pytestmark = pytest.mark.timeout(180)
S = JobState
# The fixtures (pytest finds them by these names).
state_dir, store, make_runner = runnerkit.state_dir, runnerkit.store, runnerkit.make_runner


def stopping_workers(pause: float = 0.0, terms: int = 1) -> str:
    """Stand-in workers that run until SIGTERM, then take `pause` seconds (or until the
    `terms`-th SIGTERM: a checkpoint that takes long), write a real checkpoint of step
    FAKE_FINAL_STEP and end as preempted workers do."""
    return ("n=0\ntrap 'n=$((n+1))' TERM\necho working\n"
            "while [ $n -lt 1 ]; do sleep 0.1; done\n"
            f"echo stopping\nsleep {pause}\nwhile [ $n -lt {terms} ]; do sleep 0.1; done\n"
            "complete \"$@\" | sed s/completed/preempted/\nexit 143\n")



@pytest.mark.mpi
def test_a_run_past_its_time_limit_is_stopped_with_its_final_checkpoint(store, make_runner,
                                                                        state_dir):
    runner = make_runner(kill_grace=30.0)
    limit = 4.0
    job_id = submit(store, runner, spec(SLOW_SPEC, max_steps=100_000), max_restarts=3,
                    time_limit=limit)
    job = wait_state(store, job_id, S.TIMED_OUT, S.FAILED, S.SUCCEEDED)
    assert job.state is S.TIMED_OUT, job.error
    # Stopped, not restarted: a time limit is the job's, another attempt would overrun too.
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "TIMED_OUT"]
    assert job.restarts == 0 and job.exit_code == 143 and job.placement == ()
    assert job.finished_at - job.started_at >= limit
    # SIGTERM, not SIGKILL: the workers finished their step and checkpointed it, and that
    # checkpoint is stored and intact.
    lines = log_lines(store, job_id)
    stopped = [int(m[1]) for line in lines
               if (m := re.match(r"SIGTERM: stopped after step (\d+)", line))]
    assert len(stopped) == 1 and stopped[0] > 0
    assert any(line.startswith("[dptrain] time limit of 4 s reached after") for line in lines)
    record = store.list_checkpoints(job_id)[-1]
    assert record.step == stopped[0]
    verify_record(record, BlobStore(state_dir / "blobs"))
    assert re.fullmatch(rf"time limit: the run went past the job's time limit of 4 s \(ran "
                        rf"[\d.]+ s\); stopped after step {stopped[0]}, its checkpoint stored",
                        job.error)


def test_a_time_limit_is_per_run(store, make_runner, tmp_path):
    # The first attempt fails at once; the relaunch gets the whole limit again (as Slurm's
    # requeued jobs do) and completes well within it.
    mpiexec = fake_mpiexec(tmp_path, 'case "$*" in *--resume*) sleep 1; complete "$@"; '
                                     'exit 0;; esac\nexit 1\n')
    runner = make_runner(mpiexec=mpiexec)
    job_id = submit(store, runner, TINY_SPEC, time_limit=600.0)
    job = wait_state(store, job_id, S.SUCCEEDED, S.FAILED, S.TIMED_OUT)
    assert job.state is S.SUCCEEDED and job.restarts == 1


def test_a_cancel_while_stopping_at_the_time_limit_wins(store, make_runner, tmp_path,
                                                        state_dir):
    mpiexec = fake_mpiexec(tmp_path, stopping_workers(pause=2.0))
    runner = make_runner(mpiexec=mpiexec)
    job_id = submit(store, runner, TINY_SPEC, time_limit=1.0)
    wait_for(lambda: "stopping" in log_lines(store, job_id), 60, what="the stop to begin")
    assert cancel(store, runner, job_id).state is S.CANCELLING
    assert cancel(store, runner, job_id).state is S.CANCELLING  # again: nothing changes
    job = wait_state(store, job_id, S.CANCELLED, S.TIMED_OUT, S.FAILED)
    assert job.state is S.CANCELLED
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "CANCELLING", "CANCELLED"]
    assert job.error == (f"cancelled by a user; stopped after step {FAKE_FINAL_STEP}, its "
                         f"checkpoint stored")
    assert [c.step for c in store.list_checkpoints(job_id)] == [FAKE_FINAL_STEP]


@pytest.mark.parametrize("stopping", ["cancelled", "past its time limit"])
def test_a_coordinator_kill9_while_a_job_stops_ends_it_after_the_restart(
        store, make_runner, tmp_path, state_dir, stopping):
    # A first coordinator, in a child process, runs the job; it is being stopped when that
    # coordinator is killed: cancelled in the store, or past its time limit, its workers
    # stopping (their checkpoint takes long: the next SIGTERM cuts that short).
    terms = {"cancelled": 1, "past its time limit": 2}[stopping]
    mpiexec = fake_mpiexec(tmp_path, stopping_workers(terms=terms))
    limit = {"cancelled": None, "past its time limit": 1.0}[stopping]
    job_id = store.create_job(new_job("tiny", TINY_SPEC, time_limit=limit)).id
    first = runner_process(state_dir, mpiexec, slots=2)
    try:
        wait_for(lambda: "working" in log_lines(store, job_id), 30, what="the first launch")
        if stopping == "cancelled":  # what the server records; the runner dies before acting
            store.transition(job_id, S.RUNNING, S.CANCELLING, error="cancelled by a user")
        else:
            wait_for(lambda: "stopping" in log_lines(store, job_id), 30, what="the stop")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    orphan = read_run_record(JobPaths(state_dir / "jobs" / job_id).run)
    assert processes_with_env(orphan["run_id"]), "the workers outlive a kill -9"
    make_runner(mpiexec=mpiexec, kill_grace=30.0)
    # The restarted coordinator ends the orphaned group (SIGTERM again: its checkpoint is
    # written), stores that checkpoint, and ends the job; it never runs the job again.
    job = store.get_job(job_id)
    expected = {"cancelled": S.CANCELLED, "past its time limit": S.TIMED_OUT}[stopping]
    assert job.state is expected, job.error
    assert not processes_with_env(orphan["run_id"])
    assert states_of(store, job_id) == ["QUEUED", "RUNNING"] + (
        ["CANCELLING", "CANCELLED"] if stopping == "cancelled" else ["TIMED_OUT"])
    assert [c.step for c in store.list_checkpoints(job_id)] == [FAKE_FINAL_STEP]
    assert job.error.endswith(f"the latest stored checkpoint is step {FAKE_FINAL_STEP}")
