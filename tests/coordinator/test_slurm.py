"""The coordinator on a real single-node Slurm cluster (``slurmkit``: Debian's slurmctld, slurmd
and munge, started here): it submits, watches, cancels, restarts after a killed rank and
recovers after its own kill -9, all through Slurm. Parameters are compared with an undisturbed
local ``dptrain run`` of the same spec. Needs root and the Slurm packages (``.ci/run`` installs
them); skips with the reason otherwise."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from jobkit import (
    DPTRAIN,
    SLOW_SPEC,
    TINY_SPEC,
    ServeProcess,
    rank_pids,
    spec,
    tensor_digests,
    wait_for,
)
from slurmkit import SlurmCluster, missing_reason

from dptrain.coordinator.api.records import Event, EventKind, JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.job_files import JobPaths, read_run_record
from dptrain.coordinator.server.launchers.base import WorkerLaunch
from dptrain.coordinator.server.launchers.slurm import (
    SlurmLauncher,
    job_state,
    partition_cpus,
)
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster

pytestmark = [pytest.mark.timeout(300), pytest.mark.e2e, pytest.mark.mpi]
S = JobState
RUNNER_OPTIONS = {"heartbeat_timeout": 60.0, "kill_grace": 10.0, "poll_interval": 0.1}
#: Long enough to cancel or kill something mid-run: 2 ranks, a checkpoint every 10 steps.
LONG_SPEC = spec(SLOW_SPEC, name="long", max_steps=2000)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """One cluster for this module's tests; always stopped, its jobs cancelled."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster, monkeypatch) -> SlurmCluster:
    """The cluster, with ``SLURM_CONF`` set for this process and what it starts; after the test
    no job of it may be left in the queue."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    for name in [n for n in os.environ if n.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if name != "SLURM_CONF":
            monkeypatch.delenv(name)
    yield slurm_cluster
    try:  # a job cancelled at the end of a test may take a moment to leave the queue
        wait_for(lambda: not slurm_cluster.jobs(), 30, what="an empty Slurm queue")
    finally:
        left = slurm_cluster.jobs()
        if left:
            subprocess.run(["scancel", *map(str, left)], env=slurm_cluster.env())


@pytest.fixture
def server(slurm, serve_coordinator, state_dir: Path):
    # `slurm` first: the coordinator stops (and ends its Slurm jobs) before SLURM_CONF goes.
    return serve_coordinator(stop_grace=1.0, cluster=Cluster.local(2, host="slurm"),
                             runner=RunnerSettings(state_dir, launcher=SlurmLauncher(),
                                                   **RUNNER_OPTIONS))


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token) as c:
        yield c


def states_of(client: Client, job_id: str) -> list[str]:
    """The job's states, in order, once it has ended."""
    return [item.payload["state"] for item in client.watch_job(job_id)
            if isinstance(item, Event) and item.kind is EventKind.STATE]


def record(state_dir: Path, job_id: str) -> dict:
    return read_run_record(state_dir / "jobs" / job_id / "run.json")


def downloaded(client: Client, job_id: str, dest: Path) -> dict[str, str]:
    client.download_checkpoint(job_id, dest=dest)
    return tensor_digests(dest)


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True).stdout


def test_a_job_runs_as_a_slurm_job_to_the_parameters_of_a_local_run(client, state_dir,
                                                                      reference, tmp_path):
    job = client.submit_job(TINY_SPEC)
    assert states_of(client, job.id) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    final = client.get_job(job.id)
    assert final.last_step == 20 and record(state_dir, job.id)["hosts"] == "slurm:2"
    slurm_job = record(state_dir, job.id)["slurm_job_id"]
    shown = scontrol("show", "job", "-o", str(slurm_job))
    assert "JobState=COMPLETED" in shown and "NumTasks=2" in shown and "ExitCode=0:0" in shown
    assert f"JobName=dptrain-{record(state_dir, job.id)['run_id']}" in shown
    log = (state_dir / "jobs" / job.id / "worker.log").read_text()
    assert '"world_size": 2' in log  # one MPI world of both Slurm tasks
    assert downloaded(client, job.id, tmp_path / "got.safetensors") == reference(TINY_SPEC)[0]


def test_a_job_sbatch_refuses_fails_with_sbatchs_words(slurm, serve_coordinator, state_dir):
    server = serve_coordinator(cluster=Cluster.local(2, host="slurm"), runner=RunnerSettings(
        state_dir, launcher=SlurmLauncher(partition="nosuch"), **RUNNER_OPTIONS))
    with Client(server.address, token=server.token) as client:
        job = client.submit_job(TINY_SPEC)
        assert states_of(client, job.id) == ["QUEUED", "RUNNING", "FAILED"]
        assert client.get_job(job.id).error == (
            "cannot start the workers: sbatch: invalid partition specified: nosuch; Batch job "
            "submission failed: Invalid partition name specified")


def test_a_job_waiting_in_slurms_queue_is_not_taken_for_a_hung_one(slurm, serve_coordinator,
                                                                     state_dir, reference,
                                                                     tmp_path):
    # Another user's job holds the whole node, so the coordinator's job waits in the queue
    # for longer than the heartbeat timeout and the start-up grace together. Once the ranks
    # run, their first report must come within the grace: ranks importing numpy and mpi4py
    # took up to 18 s on a loaded 2-core machine, hence 30.
    heartbeat, grace = 8.0, 30.0
    blocker = subprocess.run(["sbatch", "--parsable", "--exclusive", f"--chdir={tmp_path}",
                              "--output=/dev/null", "--wrap", "sleep 600"],
                             capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: "JobState=RUNNING" in scontrol("show", "job", "-o", blocker), 60,
             what="the blocking job to run")
    server = serve_coordinator(cluster=Cluster.local(2, host="slurm"), runner=RunnerSettings(
        state_dir, launcher=SlurmLauncher(), heartbeat_timeout=heartbeat, startup_grace=grace,
        kill_grace=10.0, poll_interval=0.1))
    with Client(server.address, token=server.token) as client:
        job = client.submit_job(TINY_SPEC)
        wait_for(lambda: (record(state_dir, job.id) or {}).get("slurm_job_id"), 60, what="sbatch")
        slurm_job = str(record(state_dir, job.id)["slurm_job_id"])
        time.sleep(heartbeat + grace + 5)
        shown = scontrol("show", "job", "-o", slurm_job)
        assert "JobState=PENDING" in shown and "Reason=Resources" in shown
        assert client.get_job(job.id).state is S.RUNNING
        subprocess.run(["scancel", blocker], check=True)
        assert states_of(client, job.id) == ["QUEUED", "RUNNING", "SUCCEEDED"]
        final = client.get_job(job.id)
        assert final.restarts == 0 and final.last_step == 20
        assert str(record(state_dir, job.id)["slurm_job_id"]) == slurm_job  # the one attempt
        lines = [item.payload["line"] for item in client.watch_job(job.id)
                 if isinstance(item, Event) and item.kind is EventKind.LOG]
        assert (f"[dptrain] waiting for slurm job {slurm_job} to start the ranks (the heartbeat "
                f"timeout counts once they run)") in lines
        assert any(line.startswith("[dptrain] the ranks started after ") and
                   line.endswith(f" s waiting (slurm job {slurm_job})") for line in lines)
        assert downloaded(client, job.id, tmp_path / "got.safetensors") == reference(
            TINY_SPEC)[0]


def test_the_account_and_sbatch_args_reach_slurm(slurm, tmp_path):
    # Slurm checks an account only with accounting (slurmdbd and its database, which this
    # cluster does not run: it takes any name); what is tested is that the name gets there.
    launcher = SlurmLauncher(account="proj-7", sbatch_args=("--hold",))  # held: never runs
    paths = JobPaths(tmp_path / "jobs" / "j-0123456789ab")
    paths.checkpoints.mkdir(parents=True)
    launch = WorkerLaunch("j-0123456789ab", 1, "j-0123456789ab.1.ab", (("slurm", 2),), paths,
                          dict(os.environ), resume=False)
    with open(paths.log, "ab") as output:
        handle = launcher.start(launch, output)
    slurm_job = str(read_run_record(paths.run)["slurm_job_id"])
    try:
        shown = scontrol("show", "job", "-o", slurm_job)
        assert "Account=proj-7" in shown and "JobState=PENDING" in shown
        assert "Reason=JobHeldUser" in shown
        kept = scontrol("write", "batch_script", slurm_job, "-")
        assert "#SBATCH --account=proj-7\n#SBATCH --hold\n" in kept
        assert handle.poll() is None and not handle.started()  # held: no heartbeat clock
    finally:
        handle.kill()


def test_cancel_reaches_the_ranks_through_scancel(client, state_dir):
    job = client.submit_job(LONG_SPEC)
    wait_for(lambda: client.list_checkpoints(job.id), 120, what="a first checkpoint")
    run = record(state_dir, job.id)
    ranks = rank_pids(run["run_id"])
    assert len(ranks) == 2
    # The worker token is in the ranks' environment only: not in the script, not in what
    # scontrol shows of the job, not on any command line.
    with open(f"/proc/{ranks[0]}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    token = environ[b"DPTRAIN_JOB_TOKEN"].decode()
    assert len(token) >= 32
    seen = [(state_dir / "jobs" / job.id / "job.sbatch").read_text(),
            scontrol("show", "job", "-dd", str(run["slurm_job_id"])),
            scontrol("write", "batch_script", str(run["slurm_job_id"]), "-")]
    assert "srun --mpi=pmi2" in seen[2]  # what Slurm keeps of the script is ours
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                seen.append(f.read().decode(errors="replace"))
        except OSError:
            continue
    assert not [text for text in seen if token in text]

    assert client.cancel_job(job.id).state is S.CANCELLING
    wait_for(lambda: (state := job_state(run["slurm_job_id"])) and state.finished, 60,
             what="the Slurm job to end")
    wait_for(lambda: not rank_pids(run["run_id"]), 30, what="the ranks to exit")
    log = (state_dir / "jobs" / job.id / "worker.log").read_text()
    assert '"status": "preempted"' in log  # SIGTERM reached the ranks: they checkpointed
    final = wait_for(lambda: (got := client.get_job(job.id)).state is S.CANCELLED and got, 60,
                     what="CANCELLED")
    stopped = int(re.search(r"SIGTERM: stopped after step (\d+)", log)[1])
    assert final.error == (f"cancelled by a user; stopped after step {stopped}, its "
                           f"checkpoint stored")
    assert client.list_checkpoints(job.id)[-1].step == stopped  # that checkpoint is kept


def test_a_killed_rank_restarts_from_its_checkpoint_as_a_new_slurm_job(client, state_dir,
                                                                       reference, tmp_path):
    job_spec = spec(SLOW_SPEC, max_steps=150)
    job = client.submit_job(job_spec)
    wait_for(lambda: any(r.step >= 30 for r in client.list_checkpoints(job.id)), 120,
             what="a checkpoint at step 30")
    first = record(state_dir, job.id)
    ranks = rank_pids(first["run_id"])
    assert len(ranks) == 2
    os.kill(ranks[0], signal.SIGKILL)
    assert states_of(client, job.id) == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING",
                                         "SUCCEEDED"]
    final = client.get_job(job.id)
    assert final.restarts == 1 and final.last_step == 150
    second = record(state_dir, job.id)
    assert second["attempt"] == 2 and second["slurm_job_id"] != first["slurm_job_id"]
    assert "JobState=FAILED" in scontrol("show", "job", "-o", str(first["slurm_job_id"]))
    assert "--resume" in (state_dir / "jobs" / job.id / "job.sbatch").read_text()
    assert downloaded(client, job.id, tmp_path / "got.safetensors") == reference(job_spec)[0]


def test_a_restarted_coordinator_recovers_the_slurm_job_by_its_id(slurm, state_dir, tmp_path,
                                                                  reference):
    coordinator = ServeProcess(state_dir, tmp_path / "serve.log", "--launcher", "slurm",
                               "--slots", "2", "--heartbeat-timeout", "60")
    job_spec = spec(LONG_SPEC, max_steps=200)
    try:
        coordinator.start()
        with coordinator.client() as client:
            job_id = client.submit_job(job_spec).id
            wait_for(lambda: (client.get_job(job_id).last_step or 0) >= 30, 120,
                     what="step 30")
        first = record(state_dir, job_id)
        coordinator.kill()
        assert not job_state(first["slurm_job_id"]).finished  # it runs without a coordinator
        coordinator.start()
        with coordinator.client() as client:
            events = [item for item in client.watch_job(job_id) if isinstance(item, Event)]
            final = client.get_job(job_id)
            assert final.state is S.SUCCEEDED and final.last_step == 200, final.error
            assert final.restarts == 0
            assert any("found this job's workers still running: ended them"
                       in e.payload.get("line", "") for e in events if e.kind is EventKind.LOG)
            got = downloaded(client, job_id, tmp_path / "got.safetensors")
        # The recovered job was ended through Slurm (its ranks checkpointed on SIGTERM), and
        # the job went on as a new Slurm job.
        ended = job_state(first["slurm_job_id"])
        assert ended.finished and ended.state != "COMPLETED"
        assert record(state_dir, job_id)["slurm_job_id"] != first["slurm_job_id"]
        assert got == reference(job_spec)[0]
    finally:
        coordinator.stop()


def test_singleton_ranks_under_srun_mpi_none_are_refused(slurm, tmp_path):
    (tmp_path / "job.json").write_text(json.dumps(TINY_SPEC))
    got = subprocess.run(["srun", "--mpi=none", "--ntasks=2", DPTRAIN.replace(
        "/dptrain", "/python"), "-m", "dptrain.worker", str(tmp_path / "job.json"),
        "--no-progress"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert got.returncode == 2, got.stderr
    expected = ("dptrain worker: error: SLURM_NTASKS: Slurm started 2 task(s) but the MPI world "
                "has 1 rank(s)")
    assert got.stderr.count(expected) == 2, got.stderr  # each task, alone in its world
    assert not list(tmp_path.glob("step-*"))


def test_mpiexec_inside_an_allocation_is_not_refused(slurm, tmp_path):
    # Hydra starts its proxy as one Slurm task (SLURM_NTASKS=1 in the ranks) and gives the
    # ranks a world of its own: the world-size check must tell this from singletons.
    (tmp_path / "job.json").write_text(json.dumps(TINY_SPEC))
    python = DPTRAIN.replace("/dptrain", "/python")
    got = subprocess.run(["salloc", "--ntasks=2", DPTRAIN.replace("/dptrain", "/mpiexec"),
                          "-n", "2", python, "-m", "dptrain.worker", str(tmp_path / "job.json"),
                          "--no-progress"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout.strip().splitlines()[-1])["world_size"] == 2


def test_the_default_slots_are_the_partitions_cpus(slurm):
    assert partition_cpus() == partition_cpus("debug") == os.cpu_count()
