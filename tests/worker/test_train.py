"""The trainer end to end under real ``mpiexec``: the data each epoch feeds, exact resume
(after max_steps and after SIGTERM, in a later epoch than the first), checkpoint fallback, a
failing rank, a non-finite loss, invalid jobs, the launcher's command lines and
``dptrain run``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from jobkit import FAULTY_MODEL

from dptrain.engine import backend as engine_backend
from dptrain.worker.data import train_validation_split
from dptrain.worker.mpiexec_command import LaunchSettings, default_mpiexec, mpiexec_command

REPO = Path(__file__).resolve().parents[2]
WORKER = "import sys\nfrom dptrain.worker.__main__ import main\nsys.exit(main())\n"
JOB = {
    "name": "resume-test",
    "model": {"name": "mlp", "args": {"in_features": 32, "hidden": [64], "num_classes": 5,
                                      "dropout": 0.1}},  # dropout: the RNG must resume too
    "dataset": {"name": "synthetic", "args": {"n": 2048, "features": 32, "classes": 5},
                "validation_fraction": 0.125},          # 1792 training samples: 37 steps/epoch
    "optimizer": {"name": "adam", "lr": 3e-3},
    "scheduler": {"name": "cosine", "args": {"T_max": 400}},
    "batch_size": 48,                                   # divides among 1, 2 and 3 ranks
    "max_steps": 60,
    "seed": 3,
    "checkpoint": {"every_steps": 10, "keep": 2},
}


# A user's model that appends, on every training forward, the sample ids it was fed (the
# data's first column) to ``<path>.rank<R>``, one JSON list per line; it learns from the rest.
RECORDING_MODEL = '''
import json

from dptrain.engine import nn
from dptrain.worker.comm import Communicator


class Recorder(nn.Module):
    def __init__(self, path):
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.path = f"{path}.rank{Communicator().rank}"

    def forward(self, x):
        if self.training:
            with open(self.path, "a") as f:
                f.write(json.dumps(x.numpy()[:, 0].astype(int).tolist()) + "\\n")
        return self.linear(x[:, 1:])


def build(path):
    return Recorder(path)
'''


def write_job(directory: Path, name: str = "job.yaml", **changes) -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump({**JOB, **changes}))
    return path


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def final_metrics(stdout: str) -> dict:
    """The run's last stdout line, which must be the JSON metrics."""
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def worker(run_mpi):
    """``worker(n, job, *args)``: ``mpiexec -n n python -m dptrain.worker job *args``."""
    def run(n, job, *args, env=None, timeout=120):
        return run_mpi(n, WORKER, str(job), "--no-progress", *args, env=env, timeout=timeout)
    return run


@pytest.fixture(scope="module")
def reference_2_ranks(tmp_path_factory, run_mpi):
    """The uninterrupted 2-rank run of JOB to step 400: (final model sha256, its metrics)."""
    directory = tmp_path_factory.mktemp("reference")
    job = write_job(directory, max_steps=400)
    result = run_mpi(2, WORKER, str(job), "--no-progress", "--checkpoint-dir",
                     str(directory / "ckpt"))
    assert result.returncode == 0, result.stderr
    metrics = final_metrics(result.stdout)
    assert metrics["checkpoint"].endswith("step-00000400")
    return sha256(Path(metrics["checkpoint"]) / "model.safetensors"), metrics


@pytest.mark.mpi
def test_every_epoch_feeds_each_training_sample_once_in_a_new_order(tmp_path, worker):
    (tmp_path / "recorder.py").write_text(RECORDING_MODEL)
    n, n_val, batch, epochs = 80, 16, 16, 3  # 64 training samples: 4 steps per epoch
    ids = np.arange(n)
    np.savez(tmp_path / "ids.npz", x=np.stack([ids, ids % 3], axis=1).astype(np.float32),
             y=ids % 2)
    job = write_job(tmp_path, model={"name": "recorder:build",
                                     "args": {"path": str(tmp_path / "fed")}},
                    dataset={"name": "npz", "args": {"path": str(tmp_path / "ids.npz")},
                             "validation_fraction": n_val / n},
                    batch_size=batch, max_steps=None, epochs=epochs)
    result = worker(2, job, env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"})
    assert result.returncode == 0, result.stderr
    fed = [[json.loads(line) for line in (tmp_path / f"fed.rank{r}").read_text().splitlines()]
           for r in range(2)]
    steps = epochs * (n - n_val) // batch
    assert [len(f) for f in fed] == [steps, steps]
    assert all(len(shard) == batch // 2 for f in fed for shard in f)
    # Rank r takes the r-th half of every global batch.
    order = [fed[0][t] + fed[1][t] for t in range(steps)]
    per_epoch = [sum(order[e * 4:(e + 1) * 4], []) for e in range(epochs)]
    validation = set(train_validation_split(n, n_val / n, JOB["seed"])[1].tolist())
    training = sorted(set(range(n)) - validation)
    for e, seen in enumerate(per_epoch):
        assert sorted(seen) == training, f"epoch {e} did not feed every sample exactly once"
    assert len({tuple(seen) for seen in per_epoch}) == epochs, "an epoch repeated an order"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 3])
def test_stop_at_max_steps_and_resume_is_bit_identical(tmp_path, worker, n):
    straight = worker(n, write_job(tmp_path, "a.yaml"), "--checkpoint-dir", tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    # Stop in the second epoch (step 45; 37 steps per epoch) and resume there: an epoch whose
    # order the resumed run must draw afresh, as the uninterrupted run reshuffled it.
    first = worker(n, write_job(tmp_path, "b.yaml", max_steps=45), "--checkpoint-dir",
                   tmp_path / "b")
    assert first.returncode == 0, first.stderr
    assert final_metrics(first.stdout)["step"] == 45
    resumed = worker(n, write_job(tmp_path, "c.yaml"), "--checkpoint-dir", tmp_path / "b",
                     "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'b' / 'step-00000045'} at step 45 (epoch 1, batch 8)" \
        in resumed.stderr
    assert final_metrics(resumed.stdout)["world_size"] == n
    assert sha256(tmp_path / "b/step-00000060/model.safetensors") == \
        sha256(tmp_path / "a/step-00000060/model.safetensors")
    assert sha256(tmp_path / "b/step-00000060/optimizer.safetensors") == \
        sha256(tmp_path / "a/step-00000060/optimizer.safetensors")


@pytest.mark.mpi
def test_a_job_asking_for_shared_memory_trains_the_bits_mpis_allreduce_trains(tmp_path, worker):
    # With 2 ranks every summed element is one float addition, which commutes: the buckets
    # summed in the shared window (the default on one node, or asked for) must give the very
    # bits MPI's all-reduce gives.
    models = {}
    for allreduce in ("auto", "shared_memory", "mpi"):
        job = write_job(tmp_path, f"{allreduce}.yaml", max_steps=30, allreduce=allreduce)
        result = worker(2, job, "--checkpoint-dir", tmp_path / allreduce)
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr  # /dev/shm had room: no fallback
        models[allreduce] = sha256(tmp_path / allreduce / "step-00000030/model.safetensors")
    assert models["shared_memory"] == models["auto"] == models["mpi"]
    one = worker(1, write_job(tmp_path, "one.yaml", max_steps=30, allreduce="shared_memory"),
                 "--checkpoint-dir", tmp_path / "one")  # one rank: a node of its own
    assert one.returncode == 0, one.stderr


@pytest.mark.mpi
def test_a_run_resumed_at_its_final_step_ends_naming_its_final_checkpoint(tmp_path, worker):
    job = write_job(tmp_path, max_steps=12)
    first = worker(1, job, "--checkpoint-dir", tmp_path / "c")
    assert first.returncode == 0, first.stderr
    final = tmp_path / "c" / "step-00000012"
    written = (final / "manifest.json").read_bytes()
    again = worker(1, job, "--checkpoint-dir", tmp_path / "c", "--resume")
    assert again.returncode == 0, again.stderr
    metrics = final_metrics(again.stdout)
    assert metrics["status"] == "completed" and metrics["step"] == 12
    assert metrics["checkpoint"] == str(final)  # what the coordinator must hold at the end
    assert (final / "manifest.json").read_bytes() == written  # not written again


@pytest.mark.mpi
def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path, worker,
                                                           reference_2_ranks):
    job = write_job(tmp_path, "long.yaml", max_steps=100_000,
                    checkpoint={"every_steps": 5, "keep": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    mpiexec = Path(sys.executable).parent / "mpiexec"
    proc = subprocess.Popen([str(mpiexec), "-n", "2", sys.executable, "-m", "dptrain.worker",
                             str(job),
                             "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        # Wait for a checkpoint in the second epoch (37 steps per epoch), so that the run
        # stops, and resumes, after the data has been reshuffled once.
        deadline = time.monotonic() + 60
        while not any(int(m.parent.name.split("-")[1]) >= 40
                      for m in (tmp_path / "ckpt").glob("step-*/manifest.json")):
            assert proc.poll() is None, proc.communicate()  # it ended early: show its output
            assert time.monotonic() < deadline, "no checkpoint at step 40 within 60 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler's preemption sends
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143, err
    metrics = final_metrics(out)
    stopped = metrics["step"]
    assert metrics["status"] == "preempted" and 40 <= stopped < 400 and metrics["epoch"] >= 1
    assert f"SIGTERM: stopped after step {stopped}; continue with --resume" in err
    assert metrics["checkpoint"] == str(tmp_path / f"ckpt/step-{stopped:08d}")
    resumed = worker(2, write_job(tmp_path, "rest.yaml", max_steps=400), "--checkpoint-dir",
                     tmp_path / "ckpt", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped} " in resumed.stderr
    assert sha256(tmp_path / "ckpt/step-00000400/model.safetensors") == reference_2_ranks[0]


@pytest.mark.mpi
def test_corrupted_newest_checkpoint_falls_back_and_still_resumes_exactly(
        tmp_path, worker, reference_2_ranks):
    first = worker(2, write_job(tmp_path, max_steps=50), "--checkpoint-dir", tmp_path / "ckpt")
    assert first.returncode == 0, first.stderr
    newest = tmp_path / "ckpt/step-00000050/model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 1
    newest.write_bytes(bytes(data))
    resumed = worker(2, write_job(tmp_path, max_steps=400), "--checkpoint-dir",
                     tmp_path / "ckpt", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (f"checkpoint {tmp_path / 'ckpt/step-00000050'} (step 50) is unusable: "
            "model.safetensors fails its checksum") in resumed.stderr
    assert f"falling back to checkpoint {tmp_path / 'ckpt/step-00000040'}" in resumed.stderr
    assert "at step 40 (epoch 1, batch 3)" in resumed.stderr
    assert sha256(tmp_path / "ckpt/step-00000400/model.safetensors") == reference_2_ranks[0]


@pytest.mark.mpi
def test_resume_refuses_a_checkpoint_of_a_different_job(tmp_path, worker):
    first = worker(1, write_job(tmp_path, max_steps=10), "--checkpoint-dir", tmp_path / "c")
    assert first.returncode == 0, first.stderr
    other = write_job(tmp_path, "other.yaml", seed=4, optimizer={"name": "adam", "lr": 0.1})
    result = worker(2, other, "--checkpoint-dir", tmp_path / "c", "--resume")
    assert result.returncode == 2
    assert "differs in optimizer.lr, seed" in result.stderr
    assert result.stderr.count("dptrain worker: error:") == 1  # rank 0 speaks for all


@pytest.mark.mpi
@pytest.mark.skipif(engine_backend.cupy_available(), reason="needs no GPU: CuPy sees one here")
def test_device_auto_trains_on_the_cpu_without_a_gpu_and_cuda_says_what_is_missing(
        tmp_path, worker):
    on_cpu = worker(2, write_job(tmp_path, "cpu.yaml", max_steps=5, device="cpu"))
    auto = worker(2, write_job(tmp_path, "auto.yaml", max_steps=5, device="auto"))
    assert on_cpu.returncode == auto.returncode == 0, auto.stderr
    learned = ("loss", "accuracy", "val_loss", "val_accuracy", "step")
    got, expected = final_metrics(auto.stdout), final_metrics(on_cpu.stdout)
    assert [got[k] for k in learned] == [expected[k] for k in learned]
    cuda = worker(2, write_job(tmp_path, "cuda.yaml", max_steps=5, device="cuda"))
    assert cuda.returncode == 2
    lines = [line for line in cuda.stderr.splitlines() if "dptrain worker: error:" in line]
    assert len(lines) == 1  # rank 0 speaks for both
    assert lines[0].startswith("dptrain worker: error: device: 'cuda' on rank 0: ")
    assert "pip install 'dptrain[cuda12]' or 'dptrain[cuda13]'" in lines[0] or (
        "no GPU is visible" in lines[0])


@pytest.mark.mpi
def test_a_failing_rank_ends_the_whole_job(tmp_path, worker):
    (tmp_path / "faulty.py").write_text(FAULTY_MODEL)
    job = write_job(tmp_path, model={"name": "faulty:build", "args": {"mode": "raise"}})
    result = worker(3, job, env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"})
    assert result.returncode == 1, result.stderr
    assert ("dptrain worker: rank 1 of 3 failed: RuntimeError: injected failure at step 3"
            in result.stderr.splitlines())
    assert "rank 0 of 3 failed" not in result.stderr and "rank 2 of 3" not in result.stderr
    assert result.stdout == ""  # aborted: no rank went on to report final metrics


@pytest.mark.mpi
def test_a_non_finite_loss_stops_the_job_naming_the_step(tmp_path, worker):
    (tmp_path / "faulty.py").write_text(FAULTY_MODEL)
    job = write_job(tmp_path, model={"name": "faulty:build", "args": {"mode": "nan",
                                                                      "step": 4}})
    result = worker(2, job, "--checkpoint-dir", tmp_path / "c",
                    env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"})
    assert result.returncode == 3, result.stderr
    assert "non-finite loss (nan) at step 4 (epoch 0)" in result.stderr
    metrics = final_metrics(result.stdout)
    assert metrics["status"] == "diverged" and metrics["step"] == 3
    assert not (tmp_path / "c").exists()  # nothing written from a diverged state


@pytest.mark.mpi
def test_invalid_jobs_exit_2_with_one_message(tmp_path, worker):
    bad = write_job(tmp_path, optimizer={"name": "adam", "lr": -1})
    result = worker(2, bad)
    assert result.returncode == 2
    assert result.stderr.count("optimizer.lr: must be a finite number >= 0, got -1.0") == 1
    missing = write_job(tmp_path, "npz.yaml", dataset={"name": "npz", "args": {
        "path": str(tmp_path / "none.npz")}})
    result = worker(2, missing)
    assert result.returncode == 2
    assert result.stderr.count("none.npz' does not exist") == 1
    uneven = write_job(tmp_path, "uneven.yaml", batch_size=50)
    result = worker(3, uneven)
    assert result.returncode == 2
    assert "batch_size: must be divisible by the number of ranks (3), got 50" in result.stderr


@pytest.mark.mpi
def test_dptrain_run_digits_on_two_ranks():
    dptrain = Path(sys.executable).parent / "dptrain"
    result = subprocess.run([str(dptrain), "run", "examples/digits_mlp.yaml", "-n", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = final_metrics(result.stdout)
    assert metrics["status"] == "completed" and metrics["world_size"] == 2
    assert metrics["step"] == 630 and metrics["checkpoint"] is None
    assert metrics["val_accuracy"] > 0.93 and metrics["val_samples"] == 449
    assert result.stdout.count("\n") == 1  # stdout holds the JSON line alone
    assert result.stderr.count("job digits-mlp: 2 rank(s)") == 1  # rank 1 stays quiet
    assert "samples/s=" in result.stderr and "acc=" in result.stderr  # rank 0's progress bar


@pytest.mark.parametrize("argv, message", [
    (["run", "missing.yaml"], "dptrain: error: missing.yaml: cannot read the job file"),
    (["run", "examples/digits_mlp.yaml", "-n", "3"],
     "dptrain: error: batch_size: must be divisible by the number of ranks (3)"),
    (["run", "examples/digits_mlp.yaml", "--resume"],
     "dptrain: error: --resume needs --checkpoint-dir"),
])
def test_dptrain_errors_are_one_line(argv, message):
    dptrain = Path(sys.executable).parent / "dptrain"
    result = subprocess.run([str(dptrain), *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


# ---------------------------------------------------------------- the launcher

def test_launch_command_defaults():
    cmd = mpiexec_command(LaunchSettings("job.yaml", 2, python="/venv/bin/python"))
    assert " ".join(cmd) == (
        "/venv/bin/mpiexec -n 2 -bind-to core -genv OMP_NUM_THREADS 1 -genv OPENBLAS_NUM_THREADS 1 "
        "-genv MKL_NUM_THREADS 1 /venv/bin/python -m mpi4py -m dptrain.worker job.yaml")


def test_launch_command_with_everything():
    settings = LaunchSettings(
        "/jobs/j.yaml", 4, checkpoint_dir="/ck/j", resume=True, hosts=(("n1", 2), ("n2", 2)),
        launcher_exec="/bin/rsh-ish",
        bind_to="socket", blas_threads=2, env={"DPTRAIN_COORDINATOR": "127.0.0.1:7000", "A": "1"},
        progress=False, python="/py", mpiexec="/usr/bin/mpiexec", mpiexec_args=("-bind-to",
                                                                                "core"))
    assert " ".join(mpiexec_command(settings)) == (
        "/usr/bin/mpiexec -n 4 -hosts n1:2,n2:2 -launcher-exec /bin/rsh-ish -bind-to socket "
        "-genv OMP_NUM_THREADS 2 "
        "-genv OPENBLAS_NUM_THREADS 2 -genv MKL_NUM_THREADS 2 -genv A 1 "
        "-genv DPTRAIN_COORDINATOR 127.0.0.1:7000 -bind-to core /py -m mpi4py -m dptrain.worker "
        "/jobs/j.yaml "
        "--checkpoint-dir /ck/j --resume --no-progress")


def test_dptrain_mpiexec_names_the_launcher():
    assert default_mpiexec("/v/bin/python", {}) == "/v/bin/mpiexec"
    assert default_mpiexec("/v/bin/python", {"DPTRAIN_MPIEXEC": ""}) == "/v/bin/mpiexec"
    site = {"DPTRAIN_MPIEXEC": "/opt/intel/mpi/bin/mpiexec"}
    assert default_mpiexec("/v/bin/python", site) == "/opt/intel/mpi/bin/mpiexec"


@pytest.mark.mpi
def test_dptrain_run_starts_the_ranks_with_the_mpiexec_dptrain_mpiexec_names(tmp_path):
    # A cluster's own MPI stands here as the mpich wheel's Hydra under its other name, behind
    # a script that leaves a mark when it is the one run.
    hydra = Path(sys.executable).parent / "mpiexec.hydra"
    site = tmp_path / "site-mpiexec"
    site.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" > {tmp_path}/used\nexec {hydra} "$@"\n')
    site.chmod(0o755)
    job = write_job(tmp_path, max_steps=3)
    env = {**os.environ, "DPTRAIN_MPIEXEC": str(site)}
    dptrain = Path(sys.executable).parent / "dptrain"
    result = subprocess.run([str(dptrain), "run", str(job), "-n", "2", "--no-progress"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert final_metrics(result.stdout)["world_size"] == 2
    assert (tmp_path / "used").read_text().startswith("-n 2 ")


def test_launch_command_can_leave_blas_threads_alone_and_checks_counts():
    cmd = mpiexec_command(LaunchSettings("j.yaml", 1, blas_threads=None, bind_to=None,
                                         python="/p/python"))
    assert cmd == ["/p/mpiexec", "-n", "1", "/p/python", "-m", "mpi4py", "-m", "dptrain.worker",
                   "j.yaml"]
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        mpiexec_command(LaunchSettings("j.yaml", 0))
    with pytest.raises(ValueError, match="blas_threads must be >= 1"):
        mpiexec_command(LaunchSettings("j.yaml", 1, blas_threads=0))
