"""The Slurm launcher without a cluster: its batch scripts compared as strings, Slurm's answers
parsed (lines copied from a real ``scontrol``), and the ``serve`` options that choose it. The
launcher against a real cluster: ``tests/coordinator/test_slurm.py``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from dptrain.coordinator.server.command import launcher_and_cluster
from dptrain.coordinator.server.job_files import JobPaths
from dptrain.coordinator.server.launchers.base import LaunchError, WorkerLaunch
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher
from dptrain.coordinator.server.launchers.slurm import (
    SlurmJobState,
    SlurmLauncher,
    parse_scontrol,
)

ROOT = "/state/jobs/j-0123456789ab"


def attempt(ranks: int = 2, resume: bool = False, root: str = ROOT,
            path: str = "/usr/bin:/bin") -> WorkerLaunch:
    """An attempt of job ``j-0123456789ab`` as the runner hands it to a launcher."""
    return WorkerLaunch("j-0123456789ab", 2 if resume else 1, "j-0123456789ab.1.ab",
                        (("slurm", ranks),), JobPaths(Path(root)),
                        {"DPTRAIN_JOB_TOKEN": "secret-token", "PATH": path}, resume=resume)


def test_first_attempt_script():
    script = SlurmLauncher(python="/venv/bin/python").script(attempt())
    assert script == f"""\
#!/bin/sh
#SBATCH --job-name=dptrain-j-0123456789ab.1.ab
#SBATCH --ntasks=2
#SBATCH --output={ROOT}/worker.log
#SBATCH --open-mode=append
#SBATCH --chdir={ROOT}
umask 077
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
exec srun --mpi=pmi2 --kill-on-bad-exit=1 /venv/bin/python -m mpi4py -m dptrain.worker \
{ROOT}/spec.json --checkpoint-dir {ROOT}/checkpoints --no-progress
"""
    assert "secret-token" not in script


def test_a_time_limit_becomes_slurms_own_later_limit_unless_one_is_given():
    # The runner stops the attempt by its limit plus the grace (here 600 + 10 s); Slurm's
    # limit is that in whole minutes, rounded up, and one more: 610 s -> 11 -> 12 minutes.
    limited = dataclasses.replace(attempt(), stop_by=610.0)
    script = SlurmLauncher(python="/venv/bin/python").script(limited).splitlines()
    assert script[5:7] == [f"#SBATCH --chdir={ROOT}", "#SBATCH --time=12"]
    exact = dataclasses.replace(attempt(), stop_by=660.0)  # 11 minutes exactly
    assert "#SBATCH --time=12" in SlurmLauncher().script(exact).splitlines()
    given = SlurmLauncher(sbatch_args=("--time=02:00:00",)).script(limited).splitlines()
    assert [line for line in given if "time" in line] == ["#SBATCH --time=02:00:00"]
    assert not any("time" in line for line in SlurmLauncher().script(attempt()).splitlines())


def test_resumed_attempt_with_partition_account_and_more_options():
    launcher = SlurmLauncher(python="/opt/venv/bin/python", partition="gpu", account="proj-7",
                             sbatch_args=("--time=02:00:00", "--constraint=a100 & ib"),
                             blas_threads=None)
    root = "/shared/dptrain state/jobs/j-0123456789ab"
    script = launcher.script(attempt(ranks=16, resume=True, root=root))
    assert script.splitlines() == [
        "#!/bin/sh",
        "#SBATCH --job-name=dptrain-j-0123456789ab.1.ab",
        "#SBATCH --ntasks=16",
        f"#SBATCH '--output={root}/worker.log'",
        "#SBATCH --open-mode=append",
        f"#SBATCH '--chdir={root}'",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-7",
        "#SBATCH --time=02:00:00",
        "#SBATCH '--constraint=a100 & ib'",
        "umask 077",
        "exec srun --mpi=pmi2 --kill-on-bad-exit=1 /opt/venv/bin/python -m mpi4py -m "
        f"dptrain.worker '{root}/spec.json' --checkpoint-dir '{root}/checkpoints' --resume "
        "--no-progress",
    ]


# Lines as ``scontrol show job -o ID`` printed them on a Slurm 22.05 cluster (shortened).
RUNNING = ("JobId=21409798 JobName=dptrain-x UserId=root(0) GroupId=root(0) MCS_label=N/A "
           "Priority=4294901758 Nice=0 Account=(null) QOS=(null) JobState=RUNNING Reason=None "
           "Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 "
           "RunTime=00:00:04 TimeLimit=UNLIMITED")
KILLED_RANK = RUNNING.replace("JobState=RUNNING", "JobState=FAILED").replace(
    "ExitCode=0:0", "ExitCode=137:0")
SCRIPT_SIGNALLED = RUNNING.replace("JobState=RUNNING", "JobState=CANCELLED").replace(
    "ExitCode=0:0", "ExitCode=0:9")


@pytest.mark.parametrize("line, expected", [
    (RUNNING, SlurmJobState("RUNNING", None)),
    (RUNNING.replace("RUNNING", "PENDING", 1), SlurmJobState("PENDING", None)),
    (RUNNING.replace("JobState=RUNNING", "JobState=COMPLETED"), SlurmJobState("COMPLETED", 0)),
    (KILLED_RANK, SlurmJobState("FAILED", 137)),
    (SCRIPT_SIGNALLED, SlurmJobState("CANCELLED", 128 + 9)),
    ("", None),
])
def test_scontrol_states_and_exit_codes(line, expected):
    assert parse_scontrol(line) == expected
    if expected is not None:
        assert expected.finished == (expected.state not in ("RUNNING", "PENDING"))
        # Only a queued job's ranks have not started (the runner's heartbeat clock waits).
        assert expected.waiting == (expected.state == "PENDING")


def test_a_missing_sbatch_is_a_launch_error(tmp_path):
    launch = attempt(root=str(tmp_path / "job"), path=str(tmp_path))  # no Slurm commands there
    (tmp_path / "job").mkdir()
    with pytest.raises(LaunchError, match=r"^sbatch: not found: the Slurm client commands"):
        SlurmLauncher().start(launch, None)
    # The script was written, private, without the token.
    script = tmp_path / "job" / "job.sbatch"
    assert script.stat().st_mode & 0o777 == 0o600
    assert "secret-token" not in script.read_text()


def serve_args(*argv: str) -> argparse.Namespace:
    """``dptrain serve ARGV`` as the command line parses it."""
    from dptrain.coordinator.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_serve_chooses_mpiexec_by_default():
    launcher, cluster = launcher_and_cluster(serve_args("--slots", "3"))
    assert isinstance(launcher, MpiexecLauncher)
    assert [(h.name, h.slots) for h in cluster.hosts] == [("localhost", 3)]


def test_serve_with_slurm_and_slots():
    launcher, cluster = launcher_and_cluster(serve_args(
        "--launcher", "slurm", "--slots", "64", "--partition", "cpu", "--account", "a1",
        "--sbatch-arg=--time=1:00:00", "--sbatch-arg=--qos=low"))
    assert launcher == SlurmLauncher(partition="cpu", account="a1",
                                     sbatch_args=("--time=1:00:00", "--qos=low"))
    assert [(h.name, h.slots) for h in cluster.hosts] == [("slurm", 64)]


@pytest.mark.parametrize("argv, message", [
    (["--partition", "gpu"], "--partition: only with --launcher slurm (got --launcher mpiexec)"),
    (["--sbatch-arg=--time=1"], "--sbatch-arg: only with --launcher slurm"),
    (["--launcher", "slurm", "--hostfile", "hosts"], "--hostfile: Slurm places the ranks"),
])
def test_serve_options_that_do_not_go_together(argv, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        launcher_and_cluster(serve_args(*argv))


def test_default_slots_without_slurm_commands_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo there
    with pytest.raises(LaunchError, match=r"^sinfo: not found: the Slurm client commands "):
        launcher_and_cluster(serve_args("--launcher", "slurm"))
