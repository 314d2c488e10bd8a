"""End to end: a real coordinator on loopback, real ``mpiexec`` workers reporting to it over
gRPC, the Python client and the ``dptrain`` command line. Jobs are tiny digits MLPs."""

from __future__ import annotations

import os
import random
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import blake3
import e2ekit
import numpy as np
import pytest
import yaml
from e2ekit import RUNNER_OPTIONS, run_record, watch_all
from jobkit import (
    DPTRAIN,
    SLOW_SPEC,
    TINY_SPEC,
    TINY_VAL_ACCURACY,
    ServeProcess,
    held_out_metrics,
    processes_with_env,
    rank_pids,
    run_cli,
    spec,
    tensor_digests,
    wait_for,
)

from dptrain import engine
from dptrain.coordinator.api.records import Event, EventKind, Job, JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.client.follow import curves_figure
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import ServerSettings, serve

pytestmark = [pytest.mark.timeout(240), pytest.mark.e2e, pytest.mark.mpi]
S = JobState


def blake3_of(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


# The fixtures (pytest finds them by these names).
state_dir, server, client = e2ekit.state_dir, e2ekit.server, e2ekit.client


def test_submit_to_success_with_metrics_and_checkpoints(client, state_dir, tmp_path):
    job = client.submit_job(TINY_SPEC)
    assert job.state is S.QUEUED
    events = watch_all(client, job.id)
    states = [e.payload["state"] for e in events if e.kind is EventKind.STATE]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]
    steps = [e.payload for e in events if e.kind is EventKind.METRICS and "loss" in e.payload]
    assert steps and steps[-1]["step"] == 20 and all(p["loss"] > 0 for p in steps)
    assert any("val_accuracy" in e.payload for e in events if e.kind is EventKind.METRICS)
    assert [e.payload["step"] for e in events if e.kind is EventKind.CHECKPOINT] == [5, 10, 15,
                                                                                    20]
    job = client.get_job(job.id)
    assert job.state is S.SUCCEEDED and job.last_step == 20 and job.exit_code == 0

    records = client.list_checkpoints(job.id)
    assert [r.step for r in records] == [15, 20]  # checkpoint.keep = 2
    got = client.download_checkpoint(job.id, dest=tmp_path / "model.safetensors")
    assert got.step == 20 and got.algorithm == "blake3" and blake3_of(got.path) == got.digest
    # The reported validation metrics are those of the final model, and it learned.
    accuracy, loss = held_out_metrics(got.path, TINY_SPEC)
    assert job.metrics["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert job.metrics["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert accuracy >= TINY_VAL_ACCURACY
    assert got.digest == records[-1].manifest["files"]["model.safetensors"]["blake3"]
    # The same bytes the worker wrote into its checkpoint directory.
    local = state_dir / "jobs" / job.id / "checkpoints" / "step-00000020" / "model.safetensors"
    assert blake3_of(local) == got.digest
    ours = engine.load(got.path)
    from safetensors.numpy import load_file

    theirs = load_file(str(got.path))
    assert sorted(ours) == sorted(theirs) and len(theirs) == 4
    for name, array in theirs.items():
        np.testing.assert_array_equal(ours[name].numpy(), array)
    older = client.download_checkpoint(job.id, step=15, dest=tmp_path)
    assert older.step == 15 and older.path == tmp_path / "model.safetensors"


@pytest.fixture
def umask_000():
    """The most permissive umask: what the coordinator creates must be private all the same."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_state_directory_is_private_whatever_the_umask(umask_000, client, state_dir):
    job = client.submit_job(TINY_SPEC)
    watch_all(client, job.id)
    assert client.get_job(job.id).state is S.SUCCEEDED
    found = {}  # name -> (is a directory, permission bits)
    for path in [state_dir, *state_dir.rglob("*")]:
        mode = path.lstat().st_mode
        assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), path
        found[str(path.relative_to(state_dir))] = (stat.S_ISDIR(mode), stat.S_IMODE(mode))
    wrong = {name: oct(bits) for name, (is_dir, bits) in found.items()
             if bits != (0o700 if is_dir else 0o600)}
    assert wrong == {}
    step = f"jobs/{job.id}/checkpoints/step-00000020"
    assert {"token", "coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "runner.lock",
            f"jobs/{job.id}/worker.log", f"jobs/{job.id}/spec.json", f"jobs/{job.id}/run.json",
            f"{step}/model.safetensors", f"{step}/manifest.json"} <= set(found)
    blobs = [name for name, (is_dir, _) in found.items()
             if name.startswith("blobs/") and not is_dir]
    assert len(blobs) >= 3  # the uploaded checkpoints' files


def test_cancel_ends_the_workers(client, state_dir):
    job = client.submit_job(spec(SLOW_SPEC, max_steps=10_000))
    wait_for(lambda: client.get_job(job.id).last_step, 60, what="training to start")
    run_id = run_record(state_dir, job.id)["run_id"]
    assert client.cancel_job(job.id).state is S.CANCELLING
    wait_for(lambda: not processes_with_env(run_id), 30, what="the workers to end")
    wait_for(lambda: client.get_job(job.id).state is S.CANCELLED, 30, what="CANCELLED")
    assert client.cancel_job(job.id).state is S.CANCELLED  # again: a no-op


def test_two_jobs_over_two_slots_run_one_after_the_other(client):
    first = client.submit_job(spec(TINY_SPEC, name="first"))
    second = client.submit_job(spec(TINY_SPEC, name="second"))
    assert client.get_job(second.id).state is S.QUEUED
    watch_all(client, second.id)
    a, b = client.get_job(first.id), client.get_job(second.id)
    assert a.state is S.SUCCEEDED and b.state is S.SUCCEEDED
    assert a.finished_at <= b.started_at


def test_killed_worker_resumes_to_the_same_parameters(client, state_dir, tmp_path):
    undisturbed = client.submit_job(SLOW_SPEC)
    watch_all(client, undisturbed.id)
    assert client.get_job(undisturbed.id).state is S.SUCCEEDED
    reference = client.download_checkpoint(undisturbed.id, dest=tmp_path / "a.safetensors")

    job = client.submit_job(SLOW_SPEC)
    # Kill in the second epoch (21 steps per epoch), so the resumed run must draw the order of
    # an epoch the uninterrupted run reshuffled to.
    wait_for(lambda: any(r.step >= 30 for r in client.list_checkpoints(job.id)), 90,
             what="a checkpoint at step 30")
    ranks = rank_pids(run_record(state_dir, job.id)["run_id"])
    assert len(ranks) == 2
    os.kill(ranks[0], signal.SIGKILL)
    events = watch_all(client, job.id)
    states = [e.payload["state"] for e in events if e.kind is EventKind.STATE]
    assert states == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING", "SUCCEEDED"]
    final = client.get_job(job.id)
    assert final.restarts == 1 and final.last_step == 250
    resumed = client.download_checkpoint(job.id, dest=tmp_path / "b.safetensors")
    assert resumed.step == reference.step == 250
    assert resumed.digest == reference.digest  # bit-identical to the undisturbed run


@pytest.fixture
def coordinator(state_dir: Path, tmp_path: Path):
    """``dptrain serve`` in a process of its own (started by the test); stopped at the end."""
    serve_process = ServeProcess(state_dir, tmp_path / "serve.log", "--slots", "2",
                                 "--heartbeat-timeout", "60")
    yield serve_process
    serve_process.stop()


def test_coordinator_kill9_and_restart_completes_the_job(coordinator, state_dir):
    coordinator.start()
    with coordinator.client() as client:
        job = client.submit_job(spec(SLOW_SPEC, max_steps=1000))
        wait_for(lambda: client.list_checkpoints(job.id), 90, what="a first checkpoint")
    before = events_so_far(coordinator.address, state_dir, job.id)
    assert before
    coordinator.kill()
    coordinator.start()
    with coordinator.client() as client:
        events = watch_all(client, job.id)
        final = client.get_job(job.id)
        assert final.state is S.SUCCEEDED, final.error
        assert final.last_step == 1000 and final.restarts == 0
        assert [(e.seq, e.kind, e.payload) for e in events[:len(before)]] == before
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert any("the coordinator restarted" in e.payload.get("line", "") for e in events
                   if e.kind is EventKind.LOG)
        assert client.list_checkpoints(job.id)[-1].step == 1000


# ---------------------------------------------------------------- faults: nothing is lost

#: Long enough to be killed mid-run, with the issue's checkpointing (every 100 steps, two kept,
#: and the final step's); one rank keeps it quick (what is lost does not depend on the ranks).
KILL_SPEC = spec(TINY_SPEC, name="kills", max_steps=2000, eval_every=500, workers=1,
                 checkpoint={"every_steps": 100, "keep": 2})


def _downloaded(coordinator: ServeProcess, job_id: str, dest: Path) -> dict[str, str]:
    """The tensor digests of ``dptrain download JOB``."""
    got = run_cli(coordinator.address, coordinator.state_dir, "download", job_id, "-o", str(dest))
    assert got.returncode == 0, got.stderr
    return tensor_digests(dest)


def _finished(client: Client, job_ids: list[str], timeout: float = 240) -> list[Job]:
    return wait_for(lambda: all((jobs := [client.get_job(j) for j in job_ids])[i].state.terminal
                                for i in range(len(job_ids))) and jobs,
                    timeout, what="the jobs to finish")


@pytest.mark.parametrize("downtime", ["until the workers are done", 0.5])
def test_no_checkpoint_is_lost_across_a_coordinator_kill9(coordinator, state_dir, reference,
                                                          tmp_path, downtime):
    coordinator.start()
    with coordinator.client() as client:
        job_id = client.submit_job(KILL_SPEC).id
        wait_for(lambda: (client.get_job(job_id).last_step or 0) >= 300, 120,
                 what="step 300")
    run_id = run_record(state_dir, job_id)["run_id"]
    coordinator.kill()
    if downtime == "until the workers are done":  # the final checkpoint: never uploaded
        wait_for(lambda: not processes_with_env(f"DPTRAIN_RUN_ID={run_id}"), 120,
                 what="the workers to finish while the coordinator is down")
        log = (state_dir / "jobs" / job_id / "worker.log").read_text()
        assert '"status": "completed"' in log and '"step": 2000' in log
    else:
        time.sleep(downtime)
    coordinator.start()
    with coordinator.client() as client:
        [job] = _finished(client, [job_id])
    assert job.state is S.SUCCEEDED and job.last_step == 2000 and job.restarts == 0, job.error
    listing = run_cli(coordinator.address, state_dir, "checkpoints", job_id)
    stored = [int(line.split()[0]) for line in listing.stdout.splitlines()[1:]]
    # The coordinator keeps what the job kept on disk (keep: 2), the final step among them.
    # The other is 1900, or the step at which the recovered coordinator's SIGTERM found the
    # workers, when that came after 1900.
    local = sorted(int(p.name.removeprefix("step-"))
                   for p in (state_dir / "jobs" / job_id / "checkpoints").glob("step-*"))
    assert stored == local and len(stored) == 2 and stored[-1] == 2000
    assert 1900 <= stored[0] < 2000
    assert _downloaded(coordinator, job_id, tmp_path / "got.safetensors") == \
        reference(KILL_SPEC)[0]


@pytest.mark.slow
def test_repeated_coordinator_kills_lose_no_checkpoint(coordinator, reference, tmp_path):
    # Several jobs; kill -9 at random steps, back after a random downtime. More rounds:
    # DPTRAIN_STRESS_ITERATIONS=N.
    rounds = int(os.environ.get("DPTRAIN_STRESS_ITERATIONS", "2"))
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    specs = [spec(KILL_SPEC, name=f"stress-{i}", seed=i, max_steps=3000) for i in range(3)]
    expected = reference(*specs)
    coordinator.start()
    with coordinator.client() as client:
        job_ids = [client.submit_job(job_spec).id for job_spec in specs]
    for _ in range(rounds):
        with coordinator.client() as client:
            running = [job for job in map(client.get_job, job_ids) if job.state is S.RUNNING]
            if running:
                target = rng.choice(running)
                step = (target.last_step or 0) + rng.randint(50, 1500)

                def reached(job_id: str = target.id, step: int = step) -> bool:
                    job = client.get_job(job_id)
                    return job.state is not S.RUNNING or (job.last_step or 0) >= step

                wait_for(reached, 120, what=f"step {step}")
        coordinator.kill()
        time.sleep(rng.uniform(0.2, 3.0))
        coordinator.start()
    with coordinator.client() as client:
        jobs = _finished(client, job_ids)
    for i, job in enumerate(jobs):
        assert job.state is S.SUCCEEDED and job.last_step == 3000, (seed, job.error)
        got = _downloaded(coordinator, job.id, tmp_path / f"{job.id}.safetensors")
        assert got == expected[i], f"job {job.id} (seed {seed}): not the undisturbed parameters"


def _rank(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"PMI_RANK"])


def test_a_hung_rank_is_found_after_the_heartbeat_timeout(state_dir):
    server = serve(ServerSettings(state_dir, cluster=Cluster.local(2), runner=RunnerSettings(
        state_dir, **{**RUNNER_OPTIONS, "heartbeat_timeout": 10.0, "kill_grace": 2.0})))
    try:
        with Client(server.address, token=server.token) as client:
            job = client.submit_job(spec(TINY_SPEC, name="hang", max_steps=1_000_000,
                                         eval_every=0), max_restarts=0)
            wait_for(lambda: (client.get_job(job.id).last_step or 0) >= 20, 90,
                     what="training to be under way")
            ranks = rank_pids(run_record(state_dir, job.id)["run_id"])
            # Rank 1 stops inside a step (like a hung GPU kernel or a frozen host); rank 0
            # waits for it in the next collective, its reporter thread alive.
            os.kill(next(pid for pid in ranks if _rank(pid) == 1), signal.SIGSTOP)
            [job] = _finished(client, [job.id], timeout=120)
    finally:
        server.stop(grace=1.0)
    assert job.state is S.FAILED
    found = re.fullmatch(r"no training progress for (\d+\.\d) s since step (\d+) \(limit 10 s\): "
                         r"a hung rank or collective\? \(gave up after 0 restart\(s\)\)",
                         job.error.splitlines()[0])
    assert found, job.error
    assert float(found[1]) >= 10.0 and int(found[2]) == job.last_step >= 20


def events_so_far(address: str, state_dir: Path, job_id: str) -> list[tuple]:
    from dptrain.coordinator.client.follow import events_now

    client = Client(address, state_dir=state_dir)  # events_now closes it
    return [(e.seq, e.kind, e.payload) for e in events_now(client, job_id, idle=0.5)]


# ---------------------------------------------------------------- the command line

def dptrain(*args: str, server, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(server.address, server.settings.state_dir, *args, timeout=timeout)


def test_cli_workflow(server, tmp_path):
    job_file = tmp_path / "tiny.yaml"
    job_file.write_text(yaml.safe_dump(TINY_SPEC))
    done = dptrain("submit", str(job_file), "--follow", server=server)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("job j-") and "SUCCEEDED at step 20" in summary
    assert "val_acc" in summary and "20/20" in done.stderr  # the progress bar's last state
    job_id = summary.split()[1]

    listing = dptrain("jobs", server=server)
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split()[:4] == ["ID", "NAME", "OWNER", "STATE"]
    assert f"{job_id}  tiny  admin  SUCCEEDED" in listing.stdout  # the state dir's token

    status = dptrain("status", job_id, server=server)
    assert "state:      SUCCEEDED" in status.stdout and "step:       20" in status.stdout

    logs = dptrain("logs", job_id, server=server)
    assert logs.returncode == 0 and "checkpoint written to" in logs.stdout

    model = tmp_path / "model.safetensors"
    got = dptrain("download", job_id, "-o", str(model), server=server)
    assert got.returncode == 0 and got.stdout.startswith(f"{model}: model.safetensors of step 20")
    assert set(engine.load(model)) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    png = tmp_path / "curves.png"
    plot = dptrain("plot", job_id, "-o", str(png), server=server)
    assert plot.returncode == 0, plot.stderr
    steps = _assert_plot_shows_the_metrics(png, server.store.events(job_id),
                                           f"tiny ({job_id}, SUCCEEDED)")
    assert plot.stdout == f"{png}: loss and accuracy of {job_id} over {steps} step(s)\n"

    missing = dptrain("status", "j-000000000000", server=server)
    assert missing.returncode == 4
    assert missing.stderr.strip().splitlines() == [
        "dptrain: error: NOT_FOUND: job 'j-000000000000' not found"]


def _assert_plot_shows_the_metrics(png: Path, events: list[Event], title: str) -> int:
    """`png` is a non-blank two-panel picture, drawn from a figure whose curves are the job's
    metrics (the last value reported for each step). Returns the steps of the training loss."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (400, 1100)  # 11 x 4 inches at 100 dpi: loss and accuracy
    ink = (image[..., :3] < 0.9).any(axis=2)
    assert ink[:, :550].mean() > 0.01 and ink[:, 550:].mean() > 0.01  # both panels drawn
    expected: dict[tuple[str, str], dict[int, float]] = {}
    for e in events:
        if e.kind is EventKind.METRICS and "step" in e.payload:
            for key, panel, curve in (("loss", "loss", "training"),
                                      ("val_loss", "loss", "validation"),
                                      ("accuracy", "accuracy", "training"),
                                      ("val_accuracy", "accuracy", "validation")):
                if key in e.payload:
                    expected.setdefault((panel, curve), {})[e.payload["step"]] = e.payload[key]
    # Per-step metrics are throttled in time; the final step and the evaluations always come.
    assert 20 in expected[("loss", "training")] and 20 in expected[("accuracy", "training")]
    assert sorted(expected[("loss", "validation")]) == [10, 20]
    fig, steps = curves_figure(events, title)
    try:
        drawn = {(ax.get_ylabel(), line.get_label()): line.get_xydata().tolist()
                 for ax in fig.axes for line in ax.get_lines()}
        assert drawn == {key: [[step, value] for step, value in sorted(points.items())]
                         for key, points in expected.items()}
        assert steps == len(expected[("loss", "training")])
        again = png.with_name("again.png")
        fig.savefig(again, format="png", dpi=100)
    finally:
        plt.close(fig)
    np.testing.assert_array_equal(matplotlib.image.imread(again), image)  # what the CLI drew
    return steps


def test_cli_bad_spec_is_one_line(server, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec(TINY_SPEC, optimizer={"name": "adam", "lr": -1})))
    result = dptrain("submit", str(bad), server=server)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optimizer.lr" in lines[0], result.stderr
    unreachable = subprocess.run([DPTRAIN, "--address", "127.0.0.1:1", "--token-file",
                                  str(server.settings.state_dir / "token"), "jobs"],
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 5 and len(unreachable.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- your own code in a job

CUSTOM = Path(__file__).resolve().parents[2] / "examples" / "custom"


def _own_project(tmp_path: Path, job: dict) -> Path:
    """examples/custom's modules in a directory on no path, with `job` as its job file."""
    project = tmp_path / "somewhere" / "project"
    project.mkdir(parents=True)
    for name in ("mymodels.py", "mylosses.py", "mydata.py", "train.py"):
        (project / name).write_text((CUSTOM / name).read_text())
    (project / "job.yaml").write_text(yaml.safe_dump({**job, "code": "."}))
    return project / "job.yaml"


def _killed_once(client: Client, state_dir: Path, job_id: str, step: int) -> list[str]:
    """Kill one rank of the job after a checkpoint of `step` or later is stored; the job's
    state changes until it ends."""
    wait_for(lambda: any(r.step >= step for r in client.list_checkpoints(job_id)), 120,
             what=f"a checkpoint at step {step}")
    ranks = rank_pids(run_record(state_dir, job_id)["run_id"])
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    return [e.payload["state"] for e in watch_all(client, job_id) if e.kind is EventKind.STATE]


def test_shipped_code_job_restarts_after_a_killed_rank_to_the_same_parameters(
        client, state_dir, tmp_path):
    job_file = _own_project(tmp_path, {**yaml.safe_load((CUSTOM / "job.yaml").read_text()),
                                       "epochs": 12, "checkpoint": {"every_steps": 10,
                                                                    "keep": 2}})
    undisturbed = client.submit_job(job_file)
    assert undisturbed.spec["code"].startswith("sha256:")
    watch_all(client, undisturbed.id)
    done = client.get_job(undisturbed.id)
    assert done.state is S.SUCCEEDED, done.error
    reference = client.download_checkpoint(undisturbed.id, dest=tmp_path / "a.safetensors")

    job = client.submit_job(job_file)
    assert job.spec["code"] == undisturbed.spec["code"]  # the same bytes, stored once
    states = _killed_once(client, state_dir, job.id, 30)
    assert states == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING", "SUCCEEDED"]
    final = client.get_job(job.id)
    assert final.restarts == 1 and final.last_step == done.last_step == 252
    resumed = client.download_checkpoint(job.id, dest=tmp_path / "b.safetensors")
    assert resumed.digest == reference.digest  # bit-identical to the undisturbed run
    # The ranks imported the shipped modules, unpacked beside the job's spec.
    digest = job.spec["code"].removeprefix("sha256:")
    assert (state_dir / "jobs" / job.id / "code" / digest / "mymodels.py").is_file()


def test_an_own_loop_job_reports_checkpoints_restarts_and_resumes(client, state_dir, tmp_path):
    job_file = _own_project(tmp_path, {"name": "own-loop", "workers": 2,
                                       "entrypoint": "train.py --epochs 12 --lr 3e-3",
                                       "checkpoint": {"keep": 2}})
    undisturbed = client.submit_job(job_file)
    events = watch_all(client, undisturbed.id)
    done = client.get_job(undisturbed.id)
    assert done.state is S.SUCCEEDED, done.error
    assert done.last_step == 12 * 28 and done.metrics["loss"] > 0
    losses = [e.payload["loss"] for e in events
              if e.kind is EventKind.METRICS and "loss" in e.payload]
    assert losses and losses[-1] < losses[0]  # progress streamed as it trained
    assert [r.step for r in client.list_checkpoints(undisturbed.id)] == [11 * 28, 12 * 28]
    reference = client.download_checkpoint(undisturbed.id, dest=tmp_path / "a.safetensors")

    job = client.submit_job(job_file)
    states = _killed_once(client, state_dir, job.id, 2 * 28)
    assert states == ["QUEUED", "RUNNING", "RESTARTING", "RUNNING", "SUCCEEDED"]
    final = client.get_job(job.id)
    assert final.restarts == 1 and final.last_step == 12 * 28
    resumed = client.download_checkpoint(job.id, dest=tmp_path / "b.safetensors")
    assert resumed.digest == reference.digest  # resumed after the checkpoint's epoch, exactly


def test_an_own_loop_job_with_shipped_code_survives_a_coordinator_kill9(coordinator, state_dir,
                                                                          tmp_path):
    job_file = _own_project(tmp_path, {"name": "own-loop", "workers": 2,
                                       "entrypoint": "train.py --epochs 20",
                                       "checkpoint": {"keep": 2}})
    coordinator.start()
    with coordinator.client() as client:
        job = client.submit_job(job_file)
        wait_for(lambda: client.list_checkpoints(job.id), 90, what="a first checkpoint")
    coordinator.kill()
    coordinator.start()  # its start-up clean-up keeps the code blob the job names
    digest = job.spec["code"].removeprefix("sha256:")
    assert (state_dir / "blobs" / digest[:2] / digest[2:]).is_file()
    with coordinator.client() as client:
        watch_all(client, job.id)
        final = client.get_job(job.id)
        assert final.state is S.SUCCEEDED, final.error
        assert final.last_step == 20 * 28
        assert client.list_checkpoints(job.id)[-1].step == 20 * 28
