"""A job's own model, loss and data set, imported from the job file's directory (or its
``code:``) on every rank, whoever starts the ranks; and the error for every reference that
cannot be used, naming the field.

References: a built-in run of the same problem (the same arrays through the registry; the
built-in MSE with twice the learning rate for a loss of half the MSE under SGD, whose
updates are then identical)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from dptrain.worker.spec import JobSpec, JobSpecError

DPTRAIN = str(Path(sys.executable).parent / "dptrain")
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")

SYNTHETIC = {"task": "regression", "n": 256, "features": 8, "noise": 0.1, "seed": 4}

MODULES = {
    "mymodels.py": """
        from dptrain.engine import nn

        def small_mlp(in_features, out_features=1):
            return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(),
                                 nn.Linear(16, out_features))
        """,
    "mylosses.py": """
        import dptrain.engine.functional as F

        def half_mse(output, target):
            return 0.5 * F.mse_loss(output, target.reshape(*output.shape))

        not_a_function = 3
        """,
    "mydata.py": """
        from dptrain.worker.data import synthetic

        def arrays(**args):
            ds = synthetic(**args)
            return ds.x, ds.y

        def pairs(**args):
            ds = synthetic(**args)
            return [(ds.x[i], ds.y[i]) for i in range(len(ds))]
        """,
}


def base_spec(**changes) -> dict:
    spec = {
        "name": "own-code",
        "model": {"name": "mymodels:small_mlp", "args": {"in_features": 8}},
        "dataset": {"name": "synthetic", "args": SYNTHETIC, "validation_fraction": 0.25},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "batch_size": 32, "max_steps": 12, "eval_every": 0, "seed": 1, "workers": 2,
    }
    spec.update(changes)
    return spec


@pytest.fixture
def project(tmp_path) -> Path:
    """A directory on no path with the user's modules in ``src/`` (and a job file beside)."""
    code = tmp_path / "project" / "src"
    code.mkdir(parents=True)
    for name, text in MODULES.items():
        (code / name).write_text(textwrap.dedent(text))
    return tmp_path / "project"


def write(directory: Path, name: str, spec: dict) -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(spec))
    return path


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=300)


def final(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- syntax at submit

@pytest.mark.parametrize("change, message", [
    ({"loss": "no colon"}, "loss: loss 'no colon': a user's loss is named "
                           "'package.module:function'"),
    ({"loss": 3}, "loss: must be a string, got 3"),
    ({"dataset": {"name": "my data:load"}}, "dataset.name: data set 'my data:load': a user's "
                                            "data set is named 'package.module:function'"),
    ({"code": ""}, "code: must be a directory relative to the job file"),
])
def test_references_are_checked_by_syntax_without_importing(change, message):
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(base_spec(**change))
    assert message in str(info.value)


def test_a_reference_to_a_missing_module_is_valid_at_submit():
    # Only the workers can import it; validating a spec never runs a user's code.
    spec = JobSpec.from_dict(base_spec(loss="nowhere.at_all:f",
                                       dataset={"name": "nowhere.data:load"}))
    assert (spec.loss, spec.dataset.name) == ("nowhere.at_all:f", "nowhere.data:load")
    assert "nowhere" not in sys.modules


# ---------------------------------------------------------------- on the ranks

@pytest.mark.mpi
def test_dptrain_run_and_mpiexec_import_the_code_directory_alike(project, tmp_path):
    job = write(project, "job.yaml", base_spec(code="src", loss="mylosses:half_mse"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_run = final(run(DPTRAIN, "run", str(job), "--no-progress", cwd=elsewhere))
    by_mpiexec = final(run(MPIEXEC, "-n", "2", sys.executable, "-m", "dptrain.worker",
                           str(job), "--no-progress", cwd=elsewhere))
    assert by_run["status"] == "completed" and by_run["world_size"] == 2
    drop = ("samples_per_s", "train_time_s")
    assert {k: v for k, v in by_run.items() if k not in drop} == {
        k: v for k, v in by_mpiexec.items() if k not in drop}


@pytest.mark.mpi
def test_own_loss_matches_the_builtin_one(project):
    # SGD on half the MSE with twice the learning rate takes the same steps as on the MSE.
    own = final(run(DPTRAIN, "run", str(write(project, "own.yaml", base_spec(
        code="src", loss="mylosses:half_mse", optimizer={"name": "sgd", "lr": 0.1}))),
        "--no-progress", cwd=project))
    builtin = final(run(DPTRAIN, "run", str(write(project, "builtin.yaml", base_spec(
        code="src"))), "--no-progress", cwd=project))
    assert own["loss"] == pytest.approx(0.5 * builtin["loss"], rel=1e-5)
    assert own["val_loss"] == pytest.approx(0.5 * builtin["val_loss"], rel=1e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("loader", ["mydata:arrays", "mydata:pairs"])
def test_own_data_set_matches_the_registry(project, loader):
    own = final(run(DPTRAIN, "run", str(write(project, "own.yaml", base_spec(
        code="src", dataset={"name": loader, "args": SYNTHETIC,
                             "validation_fraction": 0.25}))), "--no-progress", cwd=project))
    builtin = final(run(DPTRAIN, "run", str(write(project, "builtin.yaml", base_spec(
        code="src"))), "--no-progress", cwd=project))
    for key in ("loss", "val_loss", "step", "val_samples"):
        assert own[key] == pytest.approx(builtin[key], rel=1e-6), key


@pytest.mark.mpi
@pytest.mark.parametrize("change, message", [
    ({"loss": "nowhere_at_all:f"}, "loss: loss 'nowhere_at_all:f': cannot import module "
                                   "'nowhere_at_all'"),
    ({"loss": "mylosses:missing"}, "loss: loss 'mylosses:missing': module 'mylosses' has no "
                                   "attribute 'missing'"),
    ({"loss": "mylosses:not_a_function"}, "loss: loss 'mylosses:not_a_function': "
                                          "'not_a_function' is a int, not a callable"),
    ({"dataset": {"name": "nowhere_data:load"}}, "dataset.name: data set 'nowhere_data:load': "
                                                 "cannot import module 'nowhere_data'"),
    ({"dataset": {"name": "mydata:missing"}}, "dataset.name: data set 'mydata:missing': "
                                              "module 'mydata' has no attribute 'missing'"),
    ({"model": {"name": "nowhere_models:net"}}, "model 'nowhere_models:net': cannot import "
                                                "module 'nowhere_models'"),
    ({"code": "no-such-dir"}, "code: must be a directory"),
])
def test_an_unusable_reference_fails_the_job_naming_the_field(project, change, message):
    result = run(DPTRAIN, "run", str(write(project, "bad.yaml", {**base_spec(code="src"),
                                                                 **change})),
                 "--no-progress", cwd=project)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count(message) == 1  # said once, by rank 0


@pytest.mark.mpi
def test_dptrain_run_of_the_custom_example(tmp_path):
    # From another directory: the example's modules come from beside its job file.
    example = Path(__file__).resolve().parents[2] / "examples" / "custom" / "job.yaml"
    metrics = final(run(DPTRAIN, "run", str(example), "--no-progress", cwd=tmp_path))
    assert (metrics["status"], metrics["world_size"], metrics["step"]) == ("completed", 2, 84)
    # 4 epochs of the small CNN with the focal loss: far above chance (0.1) on held-out digits.
    assert metrics["val_accuracy"] > 0.8 and metrics["val_samples"] == 449
