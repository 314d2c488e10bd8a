"""The ``mpiexec`` launcher: its command lines compared as strings, the environment of an
attempt, and its handles on real (stand-in ``mpiexec``) processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from jobkit import fake_mpiexec, processes_with_env, wait_for

from dptrain.coordinator.client.worker_reporter import create_reporter
from dptrain.coordinator.server.job_files import JobPaths, read_run_record
from dptrain.coordinator.server.launchers.base import (
    LaunchError,
    WorkerLaunch,
    attempt_environment,
    placement_text,
)
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher

BLAS = ["-genv", "OMP_NUM_THREADS", "1", "-genv", "OPENBLAS_NUM_THREADS", "1",
        "-genv", "MKL_NUM_THREADS", "1"]


def attempt(placement, root="/state/jobs/j-0123456789ab", resume=False, env=None):
    """An attempt of job ``j-0123456789ab`` (as the runner hands it to a launcher)."""
    return WorkerLaunch("j-0123456789ab", 2 if resume else 1, "j-0123456789ab.1.ab",
                        tuple(placement), JobPaths(Path(root)), env or {}, resume=resume)


@pytest.fixture
def launcher() -> MpiexecLauncher:
    return MpiexecLauncher(python="/venv/bin/python")


def test_first_attempt_on_this_machine(launcher):
    cmd = launcher.command(attempt([("localhost", 2)]))
    assert cmd == ["/venv/bin/mpiexec", "-n", "2", *BLAS, "/venv/bin/python", "-m", "mpi4py",
                   "-m", "dptrain.worker",
                   "/state/jobs/j-0123456789ab/spec.json",
                   "--checkpoint-dir", "/state/jobs/j-0123456789ab/checkpoints",
                   "--no-progress"]


def test_restart_across_hosts_names_the_placement_in_hydras_form():
    launcher = MpiexecLauncher(python="/venv/bin/python", mpiexec="/opt/mpi/mpiexec",
                               mpiexec_args=("-iface", "ib0"), blas_threads=2,
                               launcher_exec="/usr/local/bin/site-rsh --quiet")
    placement = (("node1", 4), ("node2", 2))
    cmd = launcher.command(attempt(placement, resume=True))
    assert cmd[cmd.index("-launcher-exec") + 1] == "/usr/local/bin/site-rsh --quiet"
    assert " ".join(cmd) == (
        "/opt/mpi/mpiexec -n 6 -hosts node1:4,node2:2 -launcher-exec /usr/local/bin/site-rsh "
        "--quiet -genv OMP_NUM_THREADS 2 -genv OPENBLAS_NUM_THREADS 2 -genv MKL_NUM_THREADS 2 "
        "-iface ib0 /venv/bin/python -m mpi4py -m dptrain.worker "
        "/state/jobs/j-0123456789ab/spec.json "
        "--checkpoint-dir /state/jobs/j-0123456789ab/checkpoints --resume --no-progress")
    assert placement_text(placement) == "node1:4,node2:2"  # the log's and run.json's


def test_ranks_are_not_pinned_by_default(launcher):
    # Two jobs on one host would both be pinned to its first cores.
    cmd = launcher.command(attempt([("localhost", 1)], root="/s/jobs/x"))
    assert "-bind-to" not in cmd
    pinned = MpiexecLauncher(python="/p", bind_to="core")
    assert "-bind-to core" in " ".join(pinned.command(attempt([("localhost", 1)], root="/s")))


def test_hosts_only_beyond_this_machine(launcher):
    assert "-hosts" not in launcher.command(attempt([("localhost", 4)]))
    cmd = launcher.command(attempt([("localhost", 2), ("node2", 2)]))
    assert cmd[cmd.index("-hosts") + 1] == "localhost:2,node2:2"


def test_environment_carries_the_job_token_not_the_coordinators():
    base = {"PATH": "/bin", "DPTRAIN_TOKEN": "admin", "DPTRAIN_ADDRESS": "x:1", "HOME": "/h",
            "DPTRAIN_HEARTBEAT_TIMEOUT": "300"}
    env = attempt_environment(base, job_id="j-0123456789ab", token="tok", run_id="j.1.ab",
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
    env = attempt_environment({"DPTRAIN_COORDINATOR": "stale:1"}, job_id="j", token="t",
                              run_id="r", server_address=None)
    assert "DPTRAIN_COORDINATOR" not in env and env["DPTRAIN_JOB_ID"] == "j"


# ---------------------------------------------------------------- handles on real processes

def test_an_attempt_is_found_again_and_terminated_then_killed(tmp_path):
    # What a restarted coordinator relies on: run.json names the attempt, the marker in the
    # environment finds its processes, terminate reaches them (SIGTERM, trapped here), and
    # kill ends what ignores it.
    mpiexec = fake_mpiexec(tmp_path, "trap 'echo terminated' TERM\necho working\n"
                                     "while :; do sleep 0.1; done\n")
    root = tmp_path / "job"
    root.mkdir()
    launch = attempt([("localhost", 2)], root=root,
                     env={**os.environ, "DPTRAIN_RUN_ID": "j-0123456789ab.1.ab"})
    launcher = MpiexecLauncher(mpiexec=mpiexec)
    with open(root / "worker.log", "ab") as log:
        handle = launcher.start(launch, log)
    try:
        record = read_run_record(launch.paths.run)
        assert record["run_id"] == "j-0123456789ab.1.ab" and record["attempt"] == 1
        assert record["hosts"] == "localhost:2" and record["command"][0] == mpiexec
        wait_for(lambda: "working" in (root / "worker.log").read_text(), 30,
                 what="the stand-in to start")
        assert handle.poll() is None
        found = launcher.recover(launch.paths)
        assert found is not None and found.poll() is None
        found.terminate()
        wait_for(lambda: "terminated" in (root / "worker.log").read_text(), 30,
                 what="SIGTERM to arrive")
        assert handle.poll() is None  # it trapped SIGTERM
        found.kill()
        assert wait_for(lambda: handle.poll(), 30, what="the kill") == 128 + signal.SIGKILL
        wait_for(lambda: found.poll() == -1, 30, what="the recovered handle to see it gone")
        assert launcher.recover(launch.paths) is None
    finally:
        handle.kill()
        handle.reap()
    assert not processes_with_env("j-0123456789ab.1.ab")


def test_a_missing_mpiexec_is_a_launch_error(tmp_path):
    root = tmp_path / "job"
    root.mkdir()
    with open(root / "worker.log", "ab") as log, pytest.raises(
            LaunchError, match=f"{tmp_path}/nothing: No such file or directory"):
        MpiexecLauncher(mpiexec=str(tmp_path / "nothing")).start(
            attempt([("localhost", 1)], root=root), log)
