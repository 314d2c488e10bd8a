"""Your own training loop (`dptrain.worker.init`): run by ``dptrain run train.py``, plain
``mpiexec python train.py`` and as a job's ``entrypoint``; its checkpoints in dptrain's format,
and a resumed run ending with the same parameters as an uninterrupted one (the reference)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jobkit import tensor_digests
from repo import REPO

from dptrain.worker.checkpoint import MODEL_FILE, list_checkpoints, read_checkpoint
from dptrain.worker.mpiexec_command import LaunchSettings, mpiexec_command
from dptrain.worker.spec import JobSpec, JobSpecError

DPTRAIN = str(Path(sys.executable).parent / "dptrain")
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
CUSTOM = REPO / "examples" / "custom"


def run(*argv: str, cwd: Path = CUSTOM) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=300)


def final(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def last_model(directory: Path) -> dict[str, str]:
    step, path = list_checkpoints(directory)[-1]
    return tensor_digests(Path(path) / MODEL_FILE)


# ---------------------------------------------------------------- the spec

@pytest.mark.parametrize("data, message", [
    ({"entrypoint": "train.py", "model": {"name": "mlp"}},
     "model: does not apply to an entrypoint job (the script trains)"),
    ({"entrypoint": "train.py", "batch_size": 8}, "batch_size: does not apply to an entrypoint"),
    ({"entrypoint": "train.py", "eval_every": 5}, "eval_every: does not apply to an entrypoint"),
    ({"entrypoint": ""}, "entrypoint: must name a script (relative to the code directory)"),
    ({"entrypoint": "/abs/train.py"}, "entrypoint: must name a script (relative to the code"),
    ({"entrypoint": "train.py 'open"}, "entrypoint: must split into a script and its "
                                       "arguments (No closing quotation)"),
    ({}, "model: is required (or give an entrypoint: your own training script)"),
])
def test_an_entrypoint_job_leaves_the_declarative_loop_out(data, message):
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict({"name": "own", **data})
    assert message in str(info.value)


def test_an_entrypoint_job_needs_a_name_alone():
    spec = JobSpec.from_dict({"name": "own", "entrypoint": "train.py --lr 0.1", "workers": 2})
    assert (spec.entrypoint, spec.workers, spec.model, spec.batch_size) == (
        "train.py --lr 0.1", 2, None, None)


def test_a_script_runs_as_python_script_args_with_its_checkpoints_in_the_environment():
    cmd = mpiexec_command(LaunchSettings("train.py", 2, checkpoint_dir="ck", resume=True,
                                         python="/v/bin/python", blas_threads=None,
                                         bind_to=None, script_args=("--lr", "0.1")))
    assert " ".join(cmd) == ("/v/bin/mpiexec -n 2 -genv DPTRAIN_CHECKPOINT_DIR ck "
                             "-genv DPTRAIN_RESUME 1 /v/bin/python -m mpi4py train.py --lr 0.1")


# ---------------------------------------------------------------- runs

@pytest.mark.mpi
def test_a_resumed_own_loop_ends_as_an_uninterrupted_one(tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    whole = final(run(DPTRAIN, "run", "train.py", "-n", "2", "--checkpoint-dir", str(straight),
                      "--", "--epochs", "3"))
    first = final(run(DPTRAIN, "run", "train.py", "-n", "2", "--checkpoint-dir", str(halves),
                      "--", "--epochs", "2"))
    second = final(run(DPTRAIN, "run", "train.py", "-n", "2", "--checkpoint-dir", str(halves),
                       "--resume", "--", "--epochs", "3"))
    # 1,797 digits over 2 ranks of 32: 28 steps an epoch.
    assert (first["step"], whole["step"], second["step"]) == (56, 84, 84)
    assert second["epoch"] == 2 and whole["status"] == second["status"] == "completed"
    assert last_model(halves) == last_model(straight)
    assert second["loss"] == whole["loss"]


@pytest.mark.mpi
def test_a_resumed_run_draws_the_dropout_masks_of_an_uninterrupted_one_on_a_device(tmp_path):
    # Dropout on the strict device draws from the device's generator: the resumed half ends
    # with the straight run's parameters only if the checkpoint restored that generator.
    script = str(Path(__file__).parent / "mpi_scripts" / "device_dropout_loop.py")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    whole = final(run(DPTRAIN, "run", script, "-n", "2", "--checkpoint-dir", str(straight),
                      "--", "--epochs", "4", cwd=tmp_path))
    final(run(DPTRAIN, "run", script, "-n", "2", "--checkpoint-dir", str(halves), "--",
              "--epochs", "2", cwd=tmp_path))
    second = final(run(DPTRAIN, "run", script, "-n", "2", "--checkpoint-dir", str(halves),
                       "--resume", "--", "--epochs", "4", cwd=tmp_path))
    assert whole["step"] == second["step"] == 16  # 64 samples, 16 a step, 4 epochs
    assert last_model(halves) == last_model(straight)
    assert second["loss"] == whole["loss"]
    manifest = read_checkpoint(list_checkpoints(halves)[-1][1]).manifest
    # Each rank's device stream: the seed and the draws made on the strict device so far (16
    # steps of one dropout mask each).
    assert [s["devices"] for s in manifest["rng"]["engine"]] == [
        {"seed": 0, "draws": {"strict": 16}}] * 2


@pytest.mark.mpi
def test_own_loop_checkpoints_are_dptrain_checkpoints(tmp_path):
    result = final(run(DPTRAIN, "run", "train.py", "-n", "2", "--checkpoint-dir",
                       str(tmp_path), "--", "--epochs", "1"))
    checkpoint = read_checkpoint(result["checkpoint"])  # sha256-verified
    assert checkpoint.step == 28 and checkpoint.manifest["world_size"] == 2
    assert sorted(checkpoint.model_state) == ["0.bias", "0.weight", "4.bias", "4.weight"]
    assert len(checkpoint.manifest["rng"]["engine"]) == 2  # every rank's stream
    assert checkpoint.optimizer_state["param_groups"][0]["lr"] == 3e-3


@pytest.mark.mpi
def test_plain_mpiexec_runs_a_script_reporting_on_stdout(tmp_path):
    result = run(MPIEXEC, "-n", "2", sys.executable, str(CUSTOM / "train.py"), "--epochs", "1",
                 cwd=tmp_path)
    metrics = final(result)
    # Nothing saved: the final step is the last reported one (28 steps, a report every 10).
    assert (metrics["status"], metrics["step"], metrics["world_size"]) == ("completed", 20, 2)
    assert metrics["checkpoint"] is None  # no checkpoint directory: none written
    assert "step 10: loss " in result.stdout and "step 20: loss " in result.stdout


@pytest.mark.mpi
def test_an_entrypoint_job_trains_as_its_script_does(tmp_path):
    spec = yaml.safe_load((CUSTOM / "own_loop.yaml").read_text())
    by_job = final(run(DPTRAIN, "run", str(CUSTOM / "own_loop.yaml"), "--checkpoint-dir",
                       str(tmp_path / "job"), "--no-progress", cwd=tmp_path))
    script, *args = spec["entrypoint"].split()
    by_script = final(run(DPTRAIN, "run", script, "-n", str(spec["workers"]),
                          "--checkpoint-dir", str(tmp_path / "script"), "--", *args))
    assert by_job["name"] == "custom-own-loop" and by_job["step"] == by_script["step"] == 84
    assert last_model(tmp_path / "job") == last_model(tmp_path / "script")
    manifest = read_checkpoint(by_job["checkpoint"]).manifest
    assert manifest["spec"]["entrypoint"] == spec["entrypoint"]


@pytest.mark.mpi
def test_a_missing_entrypoint_script_fails_naming_the_field(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "own", "entrypoint": "nope.py --x", "workers": 2}))
    result = run(DPTRAIN, "run", str(job), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("entrypoint: must name a script in the code directory") == 1


def test_arguments_after_a_job_file_are_refused(tmp_path):
    result = run(DPTRAIN, "run", str(REPO / "examples" / "digits_mlp.yaml"), "--", "--lr", "1",
                 cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("dptrain: error: arguments after the job file (--lr 1) "
                                    "are for a training script")
