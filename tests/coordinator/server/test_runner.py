"""The job runner against a real SQLite store, without gRPC: real ``mpiexec`` workers on tiny
jobs (they print to their log only), and stand-in ``mpiexec`` scripts for the failure policy,
timeouts, cancellation and coordinator restarts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import runnerkit
from jobkit import (
    SLOW_SPEC,
    TINY_SPEC,
    TINY_VAL_ACCURACY,
    fake_mpiexec,
    held_out_metrics,
    processes_with_env,
    rank_pids,
    spec,
    wait_for,
)
from runnerkit import cancel, log_lines, runner_process, states_of, submit, wait_state

from dptrain.coordinator.api.errors import StateConflict
from dptrain.coordinator.api.records import EventKind, JobState, hash_token, new_job
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.job_files import JobPaths, read_run_record
from dptrain.coordinator.server.joblog import LineRateLimit, LogTail
from dptrain.coordinator.server.launchers.base import Launcher, RunHandle, WorkerLaunch
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher
from dptrain.coordinator.server.runner import JobRunner, RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster, Host

pytestmark = pytest.mark.timeout(180)
S = JobState
# The fixtures (pytest finds them by these names).
state_dir, store, make_runner = runnerkit.state_dir, runnerkit.store, runnerkit.make_runner

# ---------------------------------------------------------------- real mpiexec workers

@pytest.mark.mpi
def test_job_runs_to_success_with_its_log_streamed(store, make_runner, state_dir):
    runner = make_runner()
    job_id = submit(store, runner, TINY_SPEC)
    job = wait_state(store, job_id, S.SUCCEEDED, S.FAILED)
    assert job.state is S.SUCCEEDED, job.error
    assert job.exit_code == 0 and job.placement == () and job.restarts == 0
    assert job.metrics["step"] == 20
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    lines = log_lines(store, job_id)
    assert any("checkpoint written" in line for line in lines)
    assert any(json.loads(line)["status"] == "completed" for line in lines
               if line.startswith("{"))
    paths = JobPaths(state_dir / "jobs" / job_id)
    log = paths.log.read_text()
    assert log.startswith(f"==== dptrain: attempt 1 of job {job_id} (tiny)")
    assert "2 rank(s) on localhost:2" in log.splitlines()[0]
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["step-00000015",
                                                                   "step-00000020"]
    # The final metrics are the last checkpoint's model's, and it learned.
    accuracy, loss = held_out_metrics(paths.checkpoints / "step-00000020/model.safetensors",
                                      TINY_SPEC)
    assert job.metrics["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert job.metrics["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert accuracy >= TINY_VAL_ACCURACY
    # These workers report to no server: the runner stored their checkpoints itself.
    stored = store.list_checkpoints(job_id)
    assert [c.step for c in stored] == [15, 20]
    local = json.loads((paths.checkpoints / "step-00000020" / "manifest.json").read_text())
    assert stored[-1].manifest["files"] == local["files"]
    assert json.loads(paths.spec.read_text()) == TINY_SPEC
    record = read_run_record(paths.run)
    assert record["attempt"] == 1 and record["coordinator_pid"] == os.getpid()
    assert "--resume" not in record["command"] and "--no-progress" in record["command"]
    assert job.token_hash and len(job.token_hash) == 64
    assert job.token_hash not in json.dumps(record)


@pytest.mark.mpi
def test_killed_rank_restarts_from_checkpoint_and_succeeds(store, make_runner, state_dir):
    runner = make_runner()
    job_id = submit(store, runner, SLOW_SPEC)
    wait_for(lambda: any("step-00000020" in line for line in log_lines(store, job_id)),
             90, what="the checkpoint of step 20")
    record = read_run_record(JobPaths(state_dir / "jobs" / job_id).run)
    ranks = rank_pids(record["run_id"])
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    job = wait_state(store, job_id, S.SUCCEEDED, S.FAILED, timeout=120)
    assert job.state is S.SUCCEEDED, job.error
    assert job.restarts == 1 and job.metrics["step"] == 250
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING",
                                        "SUCCEEDED"]
    restarting = [e.payload for e in store.events(job_id)
                  if e.kind is EventKind.STATE and e.payload["state"] == "RESTARTING"][0]
    assert restarting["error"].startswith("the worker group exited with code")
    log = (state_dir / "jobs" / job_id / "worker.log").read_text()
    assert "==== dptrain: attempt 2" in log and "resuming from the latest checkpoint" in log
    assert any(line.startswith("resumed from") and "at step" in line
               for line in log_lines(store, job_id))
    assert "--resume" in read_run_record(JobPaths(state_dir / "jobs" / job_id).run)["command"]


@pytest.mark.mpi
def test_invalid_job_fails_at_once_without_restarts(store, make_runner, tmp_path):
    runner = make_runner()
    bad = spec(TINY_SPEC, dataset={"name": "npz", "args": {"path": str(tmp_path / "no.npz")}})
    job_id = submit(store, runner, bad, max_restarts=3)
    job = wait_state(store, job_id, S.FAILED, S.SUCCEEDED)
    assert job.state is S.FAILED and job.restarts == 0 and job.exit_code == 2
    assert "no.npz" in job.error
    assert job.error.splitlines()[0].startswith("the worker group exited with code 2")


def test_an_unreachable_host_fails_the_job_in_the_preflight_without_restarts(
        store, state_dir, tmp_path):
    if shutil.which("ssh") is None:
        pytest.skip("needs the ssh client (Debian: apt-get install openssh-client)")
    host = "node-that-does-not-exist.invalid"
    runner = JobRunner(store, BlobStore(state_dir / "blobs"), Cluster((Host(host, 2),)), None,
                       RunnerSettings(state_dir, heartbeat_timeout=None, poll_interval=0.05))
    runner.start()
    try:
        job_id = submit(store, runner, TINY_SPEC, max_restarts=3)
        job = wait_state(store, job_id, S.FAILED, S.SUCCEEDED)
    finally:
        runner.stop()
    assert job.state is S.FAILED and job.restarts == 0 and job.exit_code is None
    assert job.error.startswith(f"preflight: host {host}: unreachable through ssh (exit code "
                                f"255): ssh: Could not resolve hostname {host}")
    assert "\n" not in job.error
    assert states_of(store, job_id) == ["QUEUED", "FAILED"]  # it never ran
    assert log_lines(store, job_id) == [f"[dptrain] {job.error}"]


def here_shell(folder: Path) -> str:
    """A remote shell, called as Hydra calls ssh (``CMD -x HOST "command"``), that runs the
    command on this machine: a host that shares this machine's file system."""
    path = folder / "here-shell"
    path.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nshift\n'
                    'exec sh -c "$*"\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("missing", ["data", "ca"])
def test_the_preflight_names_a_missing_data_file_or_ca_certificate_on_a_host(
        store, make_runner, tmp_path, missing):
    data, ca = tmp_path / "data" / "train.npz", tmp_path / "tls" / "ca.pem"
    for path in ([ca] if missing == "data" else [data]):
        path.parent.mkdir()
        path.write_bytes(b"")
    job_spec = {**TINY_SPEC, "dataset": {"name": "npz", "args": {"path": str(data)}}}
    runner = make_runner(start=False, tls_ca=ca,
                         launcher=MpiexecLauncher(launcher_exec=here_shell(tmp_path)))
    runner.cluster = Cluster((Host("node2", 2),))
    runner.start()
    job_id = submit(store, runner, job_spec, max_restarts=3)
    job = wait_state(store, job_id, S.FAILED, S.SUCCEEDED)
    assert job.state is S.FAILED and job.restarts == 0
    assert job.error == {
        "data": f"preflight: host node2: no {data} there (dataset.args.path: the job's data "
                f"files must be at the same path on every host)",
        "ca": f"preflight: host node2: no {ca} there (DPTRAIN_TLS_CA: the CA certificate the "
              f"workers verify the coordinator with must be at the same path on every host)",
    }[missing]
    assert states_of(store, job_id) == ["QUEUED", "FAILED"]  # it never ran


@pytest.mark.mpi
def test_cancel_running_job_ends_its_workers(store, make_runner, state_dir):
    runner = make_runner(kill_grace=5.0)
    job_id = submit(store, runner, spec(SLOW_SPEC, max_steps=5000))
    wait_for(lambda: any("checkpoint written" in line for line in log_lines(store, job_id)),
             90, what="training to be under way")
    record = read_run_record(JobPaths(state_dir / "jobs" / job_id).run)
    job = cancel(store, runner, job_id)
    assert job.state is S.CANCELLING and job.placement  # it holds its slots while stopping
    wait_for(lambda: not processes_with_env(record["run_id"]), 30, what="the workers to end")
    job = wait_state(store, job_id, S.CANCELLED)
    wait_for(lambda: not runner.running(), 10, what="the runner to forget the group")
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "CANCELLING", "CANCELLED"]
    # SIGTERM, not SIGKILL, ended them: the workers checkpointed where they stopped, and the
    # runner stored that checkpoint (no server here to upload it to).
    stopped = [int(m[1]) for line in log_lines(store, job_id)
               if (m := re.match(r"SIGTERM: stopped after step (\d+)", line))]
    assert len(stopped) == 1 and job.placement == ()
    assert store.list_checkpoints(job_id)[-1].step == stopped[0]
    assert job.error == (f"cancelled by a user; stopped after step {stopped[0]}, its "
                         f"checkpoint stored")


# ---------------------------------------------------------------- policy, with stand-ins

def test_gang_order_over_limited_slots(store, make_runner, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, 'sleep 0.5\necho done\ncomplete "$@"\n')
    runner = make_runner(slots=2, mpiexec=mpiexec)
    first = submit(store, runner, spec(TINY_SPEC, name="first"))
    second = submit(store, runner, spec(TINY_SPEC, name="second"))
    small = submit(store, runner, spec(TINY_SPEC, name="small", workers=1, batch_size=32),
                   priority=-1)
    for job_id in (first, second, small):
        assert wait_state(store, job_id, S.SUCCEEDED, S.FAILED).state is S.SUCCEEDED
    a, b, c = (store.get_job(j) for j in (first, second, small))
    assert a.finished_at <= b.started_at  # both need both slots: one after the other
    assert b.finished_at <= c.started_at  # lower priority waits, no backfill past b's start


def test_failures_restart_up_to_max_restarts_then_fail(store, make_runner, tmp_path,
                                                       state_dir):
    mpiexec = fake_mpiexec(tmp_path, 'echo "rank 1 failed: boom ($*)"\necho "last words"\n'
                                     'exit 1\n')
    runner = make_runner(mpiexec=mpiexec)
    job_id = submit(store, runner, TINY_SPEC, max_restarts=2)
    job = wait_state(store, job_id, S.FAILED)
    assert job.restarts == 2 and job.exit_code == 1
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING",
                                        "RESTARTING", "RUNNING", "FAILED"]
    first_line, *rest = job.error.splitlines()
    assert first_line.startswith("the worker group exited with code 1: rank 1 failed: boom")
    assert first_line.endswith("(gave up after 2 restart(s))")
    assert rest[-1] == "last words" and "--resume" in rest[-2]
    log = (state_dir / "jobs" / job_id / "worker.log").read_text()
    assert [line.split(" of job")[0] for line in log.splitlines() if line.startswith("====")] \
        == ["==== dptrain: attempt 1", "==== dptrain: attempt 2", "==== dptrain: attempt 3"]


@pytest.mark.parametrize("ending", ["no checkpoint", "no final line"])
def test_exit_0_without_the_final_checkpoint_is_no_success(store, make_runner, tmp_path, ending):
    body = ("echo '{\"status\": \"completed\", \"step\": 20}'\n" if ending == "no checkpoint"
            else 'complete "$@" > /dev/null\n')
    runner = make_runner(mpiexec=fake_mpiexec(tmp_path, body))
    job_id = submit(store, runner, TINY_SPEC, max_restarts=1)
    job = wait_state(store, job_id, S.FAILED, S.SUCCEEDED)
    assert job.state is S.FAILED and job.restarts == 1 and job.exit_code == 0
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING", "FAILED"]
    first_line = job.error.splitlines()[0]
    if ending == "no checkpoint":
        directory = runner.settings.job_paths(job_id).checkpoints / "step-00000020"
        assert first_line == (f"the workers exited with code 0, but the final checkpoint "
                              f"(step 20) cannot be stored from {directory}: incomplete: it has "
                              f"no manifest.json (gave up after 1 restart(s))")
    else:
        assert first_line == ("the workers exited with code 0, but their final metrics (the "
                              "JSON line naming the final step) are not in worker.log, so the "
                              "final checkpoint is unknown (gave up after 1 restart(s))")


def test_missing_heartbeats_end_the_group_and_count_as_failure(store, make_runner, tmp_path):
    # Ignores SIGTERM like a rank stuck in a collective: SIGKILL must follow.
    mpiexec = fake_mpiexec(tmp_path, "trap '' TERM\necho started\nwhile :; do sleep 0.1; done\n")
    runner = make_runner(mpiexec=mpiexec, heartbeat_timeout=1.0, startup_grace=1.0,
                         kill_grace=1.0)
    job_id = submit(store, runner, TINY_SPEC, max_restarts=0)
    job = wait_state(store, job_id, S.FAILED, timeout=30)
    assert re.match(r"no training progress for \d+\.\d s since the attempt started \(limit 1 s, "
                    r"start-up included\): a hung rank or collective\? \(gave up", job.error)
    assert job.exit_code == 128 + signal.SIGKILL
    assert any("ending the worker group" in line for line in log_lines(store, job_id))


class QueueLauncher(Launcher):
    """Attempts wait in a queue until the test opens it, as a batch scheduler's do; then they
    start through a real `MpiexecLauncher` (``test_slurm.py`` does the same with real Slurm)."""

    def __init__(self, inner: MpiexecLauncher):
        self.inner, self.open = inner, threading.Event()

    def start(self, launch: WorkerLaunch, output) -> RunHandle:
        return _QueuedRun(self, launch)

    def recover(self, paths: JobPaths) -> RunHandle | None:
        return self.inner.recover(paths)


class _QueuedRun(RunHandle):
    description = "the test's queue"

    def __init__(self, queue: QueueLauncher, launch: WorkerLaunch):
        self.queue, self.launch = queue, launch
        self.ranks: RunHandle | None = None
        self.dequeued: int | None = None  # the exit code of an attempt ended in the queue

    def started(self) -> bool:
        return self.ranks is not None

    def poll(self) -> int | None:
        if self.ranks is None and self.dequeued is None and self.queue.open.is_set():
            with open(self.launch.paths.log, "ab") as output:
                self.ranks = self.queue.inner.start(self.launch, output)
        return self.dequeued if self.ranks is None else self.ranks.poll()

    def terminate(self) -> None:
        if self.ranks is None:
            self.dequeued = 128 + signal.SIGTERM
        else:
            self.ranks.terminate()

    def kill(self) -> None:
        if self.ranks is None:
            self.dequeued = 128 + signal.SIGKILL
        else:
            self.ranks.kill()


def test_an_attempt_waiting_in_a_queue_is_not_taken_for_a_hung_one(store, make_runner,
                                                                     tmp_path):
    queue = QueueLauncher(MpiexecLauncher(mpiexec=fake_mpiexec(tmp_path, 'complete "$@"\n')))
    runner = make_runner(launcher=queue, heartbeat_timeout=1.0, startup_grace=1.0)
    job_id = submit(store, runner, TINY_SPEC, max_restarts=0)
    wait_state(store, job_id, S.RUNNING)
    time.sleep(4)  # four times the heartbeat timeout and the start-up grace, in the queue
    assert store.get_job(job_id).state is S.RUNNING
    queue.open.set()
    assert wait_state(store, job_id, S.SUCCEEDED, S.FAILED).state is S.SUCCEEDED
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    lines = log_lines(store, job_id)
    assert ("[dptrain] waiting for the test's queue to start the ranks (the heartbeat timeout "
            "counts once they run)") in lines
    started = [line for line in lines if line.startswith("[dptrain] the ranks started")]
    assert len(started) == 1
    assert re.fullmatch(r"\[dptrain\] the ranks started after (\d+) s waiting \(the test's "
                        r"queue\)", started[0])
    assert int(started[0].split()[5]) >= 4
    assert not any("ending the worker group" in line for line in lines)


def test_the_heartbeat_clock_starts_when_the_queue_starts_the_ranks(store, make_runner,
                                                                    tmp_path):
    hung = fake_mpiexec(tmp_path, "echo started\nwhile :; do sleep 0.1; done\n")
    queue = QueueLauncher(MpiexecLauncher(mpiexec=hung))
    runner = make_runner(launcher=queue, heartbeat_timeout=1.0, startup_grace=1.0,
                         kill_grace=1.0)
    job_id = submit(store, runner, TINY_SPEC, max_restarts=0)
    wait_state(store, job_id, S.RUNNING)
    time.sleep(3)
    assert store.get_job(job_id).state is S.RUNNING
    opened = time.time()
    queue.open.set()
    job = wait_state(store, job_id, S.FAILED, timeout=30)
    failed = time.time()
    waited = re.match(r"no training progress for (\d+\.\d) s since the attempt started "
                      r"\(limit 1 s, start-up included\)", job.error)
    assert waited, job.error
    # Counted from when the ranks started (after `opened`), not from the 3 s in the queue.
    assert 1 <= float(waited.group(1)) <= failed - opened


def test_heartbeats_keep_a_job_alive(store, make_runner, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, 'sleep 3\ncomplete "$@"\n')
    runner = make_runner(mpiexec=mpiexec, heartbeat_timeout=1.0, startup_grace=1.0)
    job_id = submit(store, runner, TINY_SPEC, max_restarts=0)
    wait_state(store, job_id, S.RUNNING)
    while store.get_job(job_id).state is S.RUNNING:  # what the servicer does on a report
        try:
            store.update_job(job_id, states=[S.RUNNING], heartbeat_at=time.time())
        except StateConflict:
            break
        time.sleep(0.2)
    assert wait_state(store, job_id, S.SUCCEEDED, S.FAILED).state is S.SUCCEEDED


def test_cancel_queued_job_never_starts(store, make_runner, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, 'sleep 2\ncomplete "$@"\n')
    runner = make_runner(slots=2, mpiexec=mpiexec)
    running = submit(store, runner, TINY_SPEC)
    wait_state(store, running, S.RUNNING)
    queued = submit(store, runner, spec(TINY_SPEC, name="queued"))
    assert cancel(store, runner, queued).state is S.CANCELLED
    assert wait_state(store, running, S.SUCCEEDED).state is S.SUCCEEDED
    assert states_of(store, queued) == ["QUEUED", "CANCELLED"]
    assert cancel(store, runner, queued).state is S.CANCELLED  # again: a no-op


def test_log_lines_are_streamed_at_a_bounded_rate(store, make_runner, tmp_path, state_dir):
    mpiexec = fake_mpiexec(tmp_path, 'i=0; while [ $i -lt 3000 ]; do echo "line $i"; '
                                     'i=$((i+1)); done\ncomplete "$@"\n')
    runner = make_runner(mpiexec=mpiexec, log_rate=10.0, log_burst=100)
    job_id = submit(store, runner, TINY_SPEC)
    assert wait_state(store, job_id, S.SUCCEEDED).state is S.SUCCEEDED
    lines = log_lines(store, job_id)
    assert lines[:3] == ["line 0", "line 1", "line 2"]
    assert 100 <= len(lines) < 200
    assert any("not streamed (rate limit)" in line for line in lines)
    log = (state_dir / "jobs" / job_id / "worker.log").read_text().splitlines()
    assert log[1:3001] == [f"line {i}" for i in range(3000)]  # the file keeps every line


def test_graceful_stop_terminates_and_the_next_start_resumes(store, make_runner, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, 'case "$*" in *--resume*) complete "$@"; exit 0;; esac\n'
                                     "trap 'echo checkpointed; exit 143' TERM\n"
                                     "while :; do sleep 0.1; done\n")
    runner = make_runner(mpiexec=mpiexec)
    job_id = submit(store, runner, TINY_SPEC, max_restarts=0)
    wait_state(store, job_id, S.RUNNING)
    time.sleep(0.3)
    runner.stop()
    job = store.get_job(job_id)
    assert job.state is S.RESTARTING and job.restarts == 0 and job.exit_code == 143
    assert "checkpointed" in log_lines(store, job_id)
    make_runner(mpiexec=mpiexec)
    job = wait_state(store, job_id, S.SUCCEEDED, S.FAILED)
    assert job.state is S.SUCCEEDED and job.restarts == 0


def test_second_runner_on_the_same_state_dir_is_refused(make_runner):
    make_runner()
    with pytest.raises(RuntimeError, match="another coordinator is using this state"):
        make_runner()


def test_recovery_after_coordinator_kill9(store, make_runner, tmp_path, state_dir):
    # A first coordinator, in a child process, launches a job whose "workers" run until
    # SIGTERM; we SIGKILL that coordinator, then start a runner on the same state directory.
    mpiexec = fake_mpiexec(tmp_path, 'case "$*" in *--resume*) echo resumed; complete "$@"; '
                                     'exit 0;; esac\n'
                                     "trap 'echo terminated; complete \"$@\"; exit 143' TERM\n"
                                     "echo working\nwhile :; do sleep 0.1; done\n")
    job_id = store.create_job(new_job("tiny", TINY_SPEC)).id
    queued = store.create_job(new_job("later", spec(TINY_SPEC, name="later"))).id
    first = runner_process(state_dir, mpiexec, slots=3)
    try:
        wait_for(lambda: "working" in log_lines(store, job_id), 30, what="the first launch")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    orphan = read_run_record(JobPaths(state_dir / "jobs" / job_id).run)
    assert processes_with_env(orphan["run_id"]), "the workers outlive a kill -9"
    assert store.get_job(job_id).state is S.RUNNING
    make_runner(slots=3, mpiexec=mpiexec)
    assert store.get_job(queued).state is S.QUEUED  # recovery leaves queued jobs alone
    job = wait_state(store, job_id, S.SUCCEEDED, S.FAILED)
    assert job.state is S.SUCCEEDED and job.restarts == 0
    assert not processes_with_env(orphan["run_id"])
    lines = log_lines(store, job_id)
    assert "resumed" in lines
    log = (state_dir / "jobs" / job_id / "worker.log").read_text().splitlines()
    assert log.index("terminated") < log.index("resumed")  # SIGTERM first: it checkpoints
    assert any("found this job's workers still running" in line for line in lines)
    assert states_of(store, job_id) == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING",
                                        "SUCCEEDED"]
    # The SIGTERM checkpoint, which no worker uploaded, was stored before the relaunch.
    events = store.events(job_id)
    stored = next(e.seq for e in events if e.kind is EventKind.LOG and "stored the checkpoint "
                  "of step 20 from the job's checkpoint directory" in e.payload["line"])
    relaunched = [e.seq for e in events if e.kind is EventKind.STATE
                  and e.payload["state"] == "RUNNING"][1]
    assert stored < relaunched and [c.step for c in store.list_checkpoints(job_id)] == [20]
    assert wait_state(store, queued, S.RUNNING).started_at >= job.finished_at


# ---------------------------------------------------------------- pieces

def test_log_tail_returns_complete_lines_and_final_metrics(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"header\n")
    tail = LogTail(path, offset=7, keep=2)
    with open(path, "ab") as f:
        f.write(b"one\ntw")
        f.flush()
        assert tail.read() == ["one"]
        f.write(b"o\r\nbar 10%\r\xffbar 100%\n{\"status\": \"completed\", \"step\": 3}\nend")
        f.flush()
        assert tail.read() == ["two", "\ufffdbar 100%", '{"status": "completed", "step": 3}']
        assert tail.read(final=True) == ["end"]
    assert list(tail.recent) == ['{"status": "completed", "step": 3}', "end"]
    assert tail.final_metrics == {"status": "completed", "step": 3}


def test_log_tail_finds_final_metrics_behind_a_progress_bar(tmp_path):
    # stdout and stderr reach worker.log in arrival order: the JSON line may land right after
    # a progress-bar update that has no newline yet
    path = tmp_path / "log"
    path.write_bytes(b'\rjob 100%|##########| 20/20 [00:01]{"accuracy": 0.9, "status": '
                     b'"completed", "step": 20}\n\n')
    tail = LogTail(path)
    tail.read(final=True)
    assert tail.final_metrics == {"accuracy": 0.9, "status": "completed", "step": 20}


def test_line_rate_limit_is_a_token_bucket():
    now = [0.0]
    limit = LineRateLimit(rate=10, burst=5, clock=lambda: now[0])
    assert limit.admit(8) == 5 and limit.take_dropped() == 3 and limit.take_dropped() == 0
    now[0] = 0.25
    assert limit.admit(8) == 2
    now[0] = 10.0
    assert limit.admit(3) == 3 and limit.admit(3) == 2


def test_worker_token_is_only_hashed(store, make_runner, tmp_path, state_dir):
    out = tmp_path / "env.txt"
    mpiexec = fake_mpiexec(tmp_path, f'env > {out}\necho "$*" >> {out}\ncomplete "$@"\n')
    os.environ["DPTRAIN_TOKEN"] = "admin-secret"
    try:
        runner = make_runner(mpiexec=mpiexec)
        job_id = submit(store, runner, TINY_SPEC)
        job = wait_state(store, job_id, S.SUCCEEDED)
    finally:
        del os.environ["DPTRAIN_TOKEN"]
    env = dict(line.split("=", 1) for line in out.read_text().splitlines()[:-1] if "=" in line)
    assert hash_token(env["DPTRAIN_JOB_TOKEN"]) == job.token_hash
    assert env["DPTRAIN_JOB_ID"] == job_id and "DPTRAIN_TOKEN" not in env
    assert "DPTRAIN_COORDINATOR" not in env  # no server: console reporting only
    assert env["DPTRAIN_JOB_TOKEN"] not in out.read_text().splitlines()[-1]
    assert env["DPTRAIN_JOB_TOKEN"] not in (state_dir / "jobs" / job_id / "run.json").read_text()
