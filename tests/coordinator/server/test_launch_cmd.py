"""The runner's command lines and environments, compared as strings (no process is started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dptrain.coordinator.client.worker_reporter import create_reporter
from dptrain.coordinator.server.launchers.mpiexec import (
    JobPaths,
    RunnerSettings,
    needs_hostfile,
    worker_command,
    worker_environment,
)
from dptrain.coordinator.server.scheduler import Cluster, Launch

BLAS = ["-genv", "OMP_NUM_THREADS", "1", "-genv", "OPENBLAS_NUM_THREADS", "1",
        "-genv", "MKL_NUM_THREADS", "1"]


@pytest.fixture
def settings() -> RunnerSettings:
    return RunnerSettings("/state", python="/venv/bin/python")


def test_first_attempt_on_this_machine(settings):
    paths = JobPaths.of(settings, "j-0123456789ab")
    cmd = worker_command(Launch("j-0123456789ab", (("localhost", 2),)), paths, settings,
                         resume=False, hostfile=False)
    assert cmd == ["/venv/bin/mpiexec", "-n", "2", *BLAS, "/venv/bin/python", "-m",
                   "dptrain.worker",
                   "/state/jobs/j-0123456789ab/spec.json",
                   "--checkpoint-dir", "/state/jobs/j-0123456789ab/checkpoints",
                   "--no-progress"]


def test_restart_across_hosts_uses_the_placement_hostfile(settings):
    settings = RunnerSettings("/state", python="/venv/bin/python", mpiexec="/opt/mpi/mpiexec",
                              mpiexec_args=("-launcher", "ssh"), blas_threads=2)
    paths = JobPaths.of(settings, "j-0123456789ab")
    launch = Launch("j-0123456789ab", (("node1", 4), ("node2", 2)))
    cmd = worker_command(launch, paths, settings, resume=True, hostfile=True)
    assert " ".join(cmd) == (
        "/opt/mpi/mpiexec -n 6 -f /state/jobs/j-0123456789ab/hostfile "
        "-genv OMP_NUM_THREADS 2 -genv OPENBLAS_NUM_THREADS 2 -genv MKL_NUM_THREADS 2 "
        "-launcher ssh /venv/bin/python -m dptrain.worker /state/jobs/j-0123456789ab/spec.json "
        "--checkpoint-dir /state/jobs/j-0123456789ab/checkpoints --resume --no-progress")
    assert launch.hostfile() == "node1:4\nnode2:2\n"


def test_ranks_are_not_pinned_by_default(settings):
    # Two jobs on one host would both be pinned to its first cores.
    cmd = worker_command(Launch("j-0123456789ab", (("localhost", 1),)),
                         JobPaths(Path("/s/jobs/x")), settings, resume=False, hostfile=False)
    assert "-bind-to" not in cmd
    pinned = RunnerSettings("/state", python="/p", bind_to="core")
    assert "-bind-to core" in " ".join(worker_command(
        Launch("j", (("localhost", 1),)), JobPaths(Path("/s")), pinned, resume=False,
        hostfile=False))


def test_hostfile_only_beyond_this_machine():
    assert not needs_hostfile(Cluster.local(4))
    assert needs_hostfile(Cluster.parse_hostfile("node1:4\n"))
    assert needs_hostfile(Cluster.parse_hostfile("localhost:2\nnode2:2\n"))


def test_environment_carries_the_job_token_not_the_coordinators():
    base = {"PATH": "/bin", "DPTRAIN_TOKEN": "admin", "DPTRAIN_ADDRESS": "x:1", "HOME": "/h",
            "DPTRAIN_HEARTBEAT_TIMEOUT": "300"}
    env = worker_environment(base, job_id="j-0123456789ab", token="tok", run_id="j.1.ab",
                             server_address="10.0.0.5:50051", tls_ca="/etc/dptrain/ca.pem",
                             heartbeat_timeout=10, extra={"HOME": "/w"})
    assert env == {"PATH": "/bin", "HOME": "/w", "DPTRAIN_JOB_ID": "j-0123456789ab",
                   "DPTRAIN_JOB_TOKEN": "tok", "DPTRAIN_RUN_ID": "j.1.ab",
                   "DPTRAIN_COORDINATOR": "10.0.0.5:50051",
                   "DPTRAIN_TLS_CA": "/etc/dptrain/ca.pem", "PYTHONUNBUFFERED": "1",
                   "DPTRAIN_HEARTBEAT_TIMEOUT": "10.0"}  # the runner's, for the reporter


def test_the_reporter_heartbeats_within_the_coordinators_timeout():
    env = {"DPTRAIN_JOB_ID": "j-0123456789ab", "DPTRAIN_JOB_TOKEN": "tok"}
    for timeout, interval in ((None, 5.0), ("60.0", 5.0), ("2.0", 0.5)):
        environ = env if timeout is None else {**env, "DPTRAIN_HEARTBEAT_TIMEOUT": timeout}
        reporter = create_reporter("127.0.0.1:1", 0, environ)
        try:
            assert reporter.heartbeat_interval == interval
            assert reporter.heartbeat_timeout == (None if timeout is None else float(timeout))
        finally:
            reporter.close()
    assert create_reporter("127.0.0.1:1", 1, env) is None  # rank 0 alone reports
    with pytest.raises(ValueError, match="DPTRAIN_HEARTBEAT_TIMEOUT: must be a number of "
                                         "seconds > 0, got '-1'"):
        create_reporter("127.0.0.1:1", 0, {**env, "DPTRAIN_HEARTBEAT_TIMEOUT": "-1"})


def test_without_a_server_workers_only_print():
    env = worker_environment({"DPTRAIN_COORDINATOR": "stale:1"}, job_id="j", token="t",
                             run_id="r", server_address=None)
    assert "DPTRAIN_COORDINATOR" not in env and env["DPTRAIN_JOB_ID"] == "j"


def test_runner_settings_from_the_servers_settings():
    class ServerSettings:
        state_dir = Path("/srv/state")
        tls_ca = Path("/srv/ca.pem")
        address = "h:1"
        runner_options = {"heartbeat_timeout": 5.0}

    s = RunnerSettings.from_object(ServerSettings(), kill_grace=1.0)
    assert (s.state_dir, s.tls_ca, s.heartbeat_timeout, s.kill_grace) == (
        Path("/srv/state"), Path("/srv/ca.pem"), 5.0, 1.0)
    with pytest.raises(ValueError, match="runner options: unknown heartbeat"):
        RunnerSettings.from_object({"state_dir": "/s", "runner_options": {"heartbeat": 1}})
