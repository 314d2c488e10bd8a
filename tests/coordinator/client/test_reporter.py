"""Rank 0's reporter against a REAL coordinator on a loopback port (no workers run): progress,
heartbeats that mean progress, and checkpoint uploads that survive the coordinator going away
and coming back. The runner is simulated as in test_service.py: `_launch` moves the job to
RUNNING with a fresh worker token."""

from __future__ import annotations

import re
import shutil
import time

import pytest
from jobkit import TINY_SPEC, free_port, small_checkpoint, spec, wait_for

from dptrain.coordinator.api.records import EventKind, JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.client.worker_client import WorkerClient
from dptrain.coordinator.client.worker_reporter import CoordinatorReporter
from dptrain.coordinator.server.scheduler import Cluster

SPEC = spec(TINY_SPEC, checkpoint={"every_steps": 5, "keep": 3})
START = {"name": "tiny", "world_size": 2, "start_step": 0, "total_steps": 20,
         "steps_per_epoch": 7, "resumed_from": None}


@pytest.fixture
def coordinator(serve_coordinator):
    """``coordinator()`` starts a server on the test's state directory and port; a later call
    starts another one there after the first was stopped. All are stopped at the end."""
    port = free_port()
    return lambda: serve_coordinator(port=port, cluster=Cluster.local(2))


def _launch(server, job_id: str, from_state: JobState = JobState.QUEUED) -> str:
    """What the runner does when it starts an attempt: RUNNING, with a fresh worker token."""
    token = new_token()
    server.store.transition(job_id, from_state, JobState.RUNNING, token_hash=hash_token(token))
    return token


def _running_job(server) -> tuple[str, WorkerClient]:
    with Client(server.address, token=server.token) as client:
        job_id = client.submit_job(SPEC).id
    return job_id, WorkerClient(server.address, job_id, _launch(server, job_id), timeout=5)


def _stored_steps(server, job_id: str) -> list[int]:
    return [c.step for c in server.store.list_checkpoints(job_id)]


def test_reporter_sends_progress_and_checkpoints(coordinator, tmp_path):
    server = coordinator()
    job_id, worker = _running_job(server)
    lines: list[str] = []
    reporter = CoordinatorReporter(worker, step_interval=0.0, flush_interval=0.05,
                                   heartbeat_interval=0.1, log=lines.append)
    try:
        reporter.on_start(START)
        for step in range(1, 4):
            reporter.on_step(step, {"epoch": 0, "loss": 1.0 / step, "accuracy": 0.1 * step,
                                    "lr": 0.01, "samples": 8 * step, "samples_per_s": 100.0})
        reporter.on_eval(3, {"val_loss": 0.75, "val_accuracy": 0.5, "val_samples": 16})
        reporter.on_log("a message")
        reporter.on_checkpoint(3, small_checkpoint(tmp_path / "ckpt", 3))
        assert _stored_steps(server, job_id) == [3]  # uploaded while the loop waited
        reporter.on_end({"status": "completed", "step": 3, "loss": 0.33, "accuracy": 0.3})
    finally:
        reporter.close()
    assert lines == []
    events = server.store.events(job_id)
    metrics = [e.payload for e in events if e.kind is EventKind.METRICS]
    assert metrics[0] == {"step": 0, "total_steps": 20, "start_step": 0, "steps_per_epoch": 7,
                          "world_size": 2}
    assert [m["step"] for m in metrics[1:4]] == [1, 2, 3] and metrics[3]["loss"] == 1 / 3
    assert metrics[4] == {"step": 3, "val_loss": 0.75, "val_accuracy": 0.5, "val_samples": 16}
    assert metrics[-1]["status"] == "completed"
    # the runner streams the workers' output; the reporter sends only its own start line
    assert "a message" not in [e.payload["line"] for e in events if e.kind is EventKind.LOG]
    assert [e.payload["step"] for e in events if e.kind is EventKind.CHECKPOINT] == [3]
    stored = server.store.get_job(job_id)
    assert stored.last_step == 3 and stored.metrics["total_steps"] == 20
    assert stored.metrics["val_accuracy"] == 0.5


def test_checkpoints_written_while_the_coordinator_is_down_are_uploaded_when_it_is_back(
        coordinator, tmp_path):
    server = coordinator()
    job_id, worker = _running_job(server)
    lines: list[str] = []
    reporter = CoordinatorReporter(worker, flush_interval=0.05, retry_interval=0.2,
                                   heartbeat_interval=60, log=lines.append)  # only uploads
    try:
        reporter.on_start(START)
        reporter.on_checkpoint(5, small_checkpoint(tmp_path / "ckpt", 5))
        assert _stored_steps(server, job_id) == [5]
        server.stop(grace=0)
        # Its own upload is the first call to fail (nothing else was pending).
        reporter.on_checkpoint(10, small_checkpoint(tmp_path / "ckpt", 10))
        time.sleep(1.0)  # several retries fail meanwhile
        server = coordinator()
        wait_for(lambda: _stored_steps(server, job_id) == [5, 10], 30,
                 what="the checkpoint written while the coordinator was down")
        server.stop(grace=0)
        for step in (15, 20):  # training goes on while nobody listens
            reporter.on_step(step, {"loss": 1.0})
            reporter.on_checkpoint(step, small_checkpoint(tmp_path / "ckpt", step))
        time.sleep(1.0)
        server = coordinator()
        wait_for(lambda: _stored_steps(server, job_id) == [10, 15, 20], 30,
                 what="the checkpoints written while the coordinator was down again")
    finally:
        reporter.close()
    assert any("will retry" in line and "UNAVAILABLE" in line for line in lines), lines
    assert not any("not uploaded" in line for line in lines), lines
    assert server.store.get_job(job_id).last_step == 20  # the events waited too


def test_a_refused_report_does_not_stop_uploads_but_a_dead_token_stops_everything(
        coordinator, tmp_path):
    server = coordinator()
    job_id, worker = _running_job(server)
    lines: list[str] = []
    reporter = CoordinatorReporter(worker, flush_interval=0.05, log=lines.append)
    try:
        reporter.on_start(START)
        # The runner ends this attempt (a coordinator restart, a heartbeat timeout): progress
        # is refused, but the checkpoint written at SIGTERM is still stored.
        server.store.transition(job_id, JobState.RUNNING, JobState.RESTARTING)
        reporter.on_step(7, {"loss": 1.0})
        reporter.flush()
        reporter.on_checkpoint(7, small_checkpoint(tmp_path / "ckpt", 7))
        assert _stored_steps(server, job_id) == [7]
        # The next attempt is launched: this attempt's token is dead.
        _launch(server, job_id, JobState.RESTARTING)
        reporter.on_checkpoint(8, small_checkpoint(tmp_path / "ckpt", 8))
        reporter.on_step(8, {"loss": 1.0})
    finally:
        reporter.close()
    assert _stored_steps(server, job_id) == [7]
    assert len(lines) == 2, lines
    assert "FAILED_PRECONDITION" in lines[0] and "dropped" in lines[0]
    assert lines[1].startswith("stopped reporting: UNAUTHENTICATED")


def test_heartbeats_mean_progress(coordinator):
    # A rank stuck in a hung collective leaves rank 0 waiting without progress: the coordinator
    # must hear nothing more, so that its heartbeat timeout ends the job.
    server = coordinator()
    job_id, worker = _running_job(server)
    launched_at = server.store.get_job(job_id).heartbeat_at
    lines: list[str] = []
    reporter = CoordinatorReporter(worker, flush_interval=0.02, heartbeat_interval=0.05,
                                   heartbeat_timeout=0.5, log=lines.append)
    try:
        time.sleep(0.3)  # starting up (imports, data): nothing to tell yet
        assert server.store.get_job(job_id).heartbeat_at == launched_at
        reporter.on_start(START)
        reporter.on_step(1, {"loss": 1.0})
        stepped = wait_for(lambda: (job := server.store.get_job(job_id)).last_step == 1
                           and job.heartbeat_at, 10, what="step 1 to be reported")
        wait_for(lambda: lines, 10, what="the stall to be noticed")
        assert len(lines) == 1 and re.fullmatch(
            r"no training progress for (\d+\.\d) s since step 1: the coordinator ends the job "
            r"after 0.5 s \(a hung rank or collective\?\)", lines[0]), lines
        assert float(lines[0].split()[4]) >= 0.5
        assert server.store.get_job(job_id).heartbeat_at == stepped  # silence meanwhile
        reporter.on_log("resumed from ...")  # progress no event carries: a heartbeat tells it
        wait_for(lambda: server.store.get_job(job_id).heartbeat_at > stepped, 10,
                 what="a heartbeat")
    finally:
        reporter.close()


def test_reporter_stops_quietly_when_the_job_is_cancelled(coordinator):
    server = coordinator()
    job_id, worker = _running_job(server)
    lines: list[str] = []
    reporter = CoordinatorReporter(worker, flush_interval=0.05, log=lines.append)
    with Client(server.address, token=server.token) as client:
        client.cancel_job(job_id)
    reporter.on_log("too late")
    reporter.on_step(1, {"loss": 1.0})
    reporter.close()
    assert len(lines) == 1 and "FAILED_PRECONDITION" in lines[0]


def test_reporter_survives_an_unreachable_coordinator(tmp_path):
    lines: list[str] = []
    client = WorkerClient("127.0.0.1:1", "j-000000000000", "token", timeout=5)
    reporter = CoordinatorReporter(client, flush_interval=0.05, log=lines.append)
    reporter.on_step(1, {"loss": 1.0})
    reporter.on_log("nobody is listening")
    for step in (1, 2, 3):
        reporter.on_checkpoint(step, small_checkpoint(tmp_path / "ckpt", step))
    shutil.rmtree(tmp_path / "ckpt" / "step-00000001")  # pruned by the worker: superseded
    reporter.on_end({"status": "completed", "step": 3})
    reporter.close()  # returns: it does not wait for a coordinator that is not there
    assert len(lines) == 2, lines
    assert "UNAVAILABLE" in lines[0] and "127.0.0.1:1" in lines[0]
    assert lines[1] == ("checkpoint(s) of step 2, 3 not uploaded (the coordinator is "
                        "unreachable): it stores them from the job's checkpoint directory")
