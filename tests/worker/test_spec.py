"""The job spec: parsing, defaults, the stable hash, and errors that name field, rule and value."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from dptrain.worker.spec import (
    JobSpec,
    JobSpecError,
    load_spec,
    spec_hash,
    trajectory_differences,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BASE = {
    "name": "unit",
    "model": {"name": "mlp", "args": {"in_features": 8, "hidden": [16], "num_classes": 3}},
    "dataset": {"name": "synthetic", "args": {"n": 64, "features": 8, "classes": 3}},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "batch_size": 16,
    "max_steps": 10,
}


def with_change(path: str, value, base: dict = BASE) -> dict:
    """A deep copy of `base` with the dotted `path` set to `value` (or removed for ...)."""
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("name", ["digits_mlp.yaml", "digits_lenet.yaml", "synthetic_bench.yaml"])
def test_example_job_files_are_valid(name):
    spec = load_spec(EXAMPLES / name)
    assert spec.batch_size % spec.workers == 0


def test_defaults_are_filled_and_round_trip():
    spec = JobSpec.from_dict(BASE)
    assert (spec.epochs, spec.eval_every, spec.seed, spec.workers, spec.device) == (
        None, 0, 0, 1, "cpu")
    assert (spec.checkpoint.every_steps, spec.checkpoint.keep) == (0, 3)
    assert spec.optimizer.betas == (0.9, 0.999) and spec.dataset.validation_fraction == 0.1
    data = spec.to_dict()
    json.dumps(data)  # plain data
    assert JobSpec.from_dict(data) == spec


def test_to_dict_matches_dataclasses_asdict_and_shares_nothing():
    # The reference: the standard library's deep copy, with tuples as lists (JSON data).
    spec = JobSpec.from_dict(with_change("model.args", {"in_features": 64, "hidden": [32, 16],
                                                        "num_classes": 10}))
    reference = json.loads(json.dumps(dataclasses.asdict(spec)))
    data = spec.to_dict()
    assert data == reference
    data["model"]["args"]["hidden"].append(8)
    assert spec.model.args["hidden"] == [32, 16]


def test_hash_is_stable_under_key_order_and_explicit_defaults():
    reordered = dict(reversed(list(BASE.items())))
    explicit = {**BASE, "seed": 0, "workers": 1, "checkpoint": {"keep": 3}}
    h = spec_hash(JobSpec.from_dict(BASE))
    assert len(h) == 64
    assert spec_hash(JobSpec.from_dict(reordered)) == h
    assert spec_hash(JobSpec.from_dict(explicit)) == h
    assert spec_hash(JobSpec.from_dict(with_change("optimizer.lr", 0.2))) != h


@pytest.mark.parametrize("path, value, message", [
    ("optimizer.lr", -0.1, "optimizer.lr: must be a finite number >= 0, got -0.1"),
    ("optimizer.lr", "fast", "optimizer.lr: must be a number, got 'fast'"),
    ("optimizer.name", "adagrad", "optimizer.name: must be one of sgd, adam, adamw, got "
                                  "'adagrad'"),
    ("optimizer.betas", [0.9, 1.0], "optimizer.betas[1]: must be in [0, 1), got 1.0"),
    ("optimizer.nesterov", True, None),  # valid: momentum 0.9 with sgd
    ("batch_size", "64", "batch_size: must be an integer, got '64'"),
    ("batch_size", 0, "batch_size: must be >= 1, got 0"),
    ("max_steps", True, "max_steps: must be an integer, got True"),
    ("max_steps", -5, "max_steps: must be >= 1, got -5"),
    ("model.name", "mlpp", "model.name: unknown model 'mlpp' (did you mean 'mlp'?)"),
    ("model.args.depth", 3, "model.args.depth: is not an argument of model 'mlp'"),
    ("dataset.name", "imagenet", "dataset.name: unknown data set (known: digits, idx, npy, "
                                 "npz, synthetic, text), got 'imagenet'"),
    ("dataset.args.rows", 3, "dataset.args.rows: is not an argument of data set 'synthetic'"),
    ("dataset.validation_fraction", 1.0, "dataset.validation_fraction: must be in [0, 1), "
                                         "got 1.0"),
    ("device", "tpu", "device: must be one of cpu, cuda, auto, got 'tpu'"),
    ("allreduce", "gloo", "allreduce: must be one of auto, host, cuda_aware, nccl, "
                          "shared_memory, mpi, got 'gloo'"),
    ("allreduce", "nccl", "allreduce: chooses how GPU gradients are reduced: it needs device "
                          "cuda or auto (CPU gradients: auto, shared_memory or mpi), got 'nccl'"),
    ("checkpoint.keep", 0, "checkpoint.keep: must be >= 1, got 0"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps: must be >= 0"),
    ("eval_every", -1, "eval_every: must be >= 0, got -1"),
    ("workers", 0, "workers: must be >= 1, got 0"),
    ("workers", 2.0, "workers: must be an integer, got 2.0"),
    ("seed", 2**63, "seed: must fit in 64 bits (-2**63..2**63-1), got 9223372036854775808"),
    ("name", "a/b", "name: must be 1-128 characters of letters, digits"),
    ("optimizer", ..., "optimizer: is required"),
    ("batch_sise", 16, "batch_sise: unknown field (did you mean 'batch_size'?)"),
    ("scheduler", {"name": "cosine"}, "scheduler.args.T_max: is required by scheduler "
                                      "'cosine'"),
    ("scheduler", {"name": "warmup"}, "scheduler.name: must be one of step, cosine, linear"),
    ("scheduler", {"name": "step", "args": {"step_size": 5, "gamma": 0.5}}, None),
    ("scheduler", None, None),
])
def test_validation_names_field_rule_and_value(path, value, message):
    data = with_change(path, value)
    if message is None:
        JobSpec.from_dict(data)
        return
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("allreduce", ["shared_memory", "mpi"])
@pytest.mark.parametrize("device, rejected", [("cpu", False), ("cuda", True), ("auto", True)])
def test_cpu_allreduce_choices_are_for_cpu_jobs(allreduce, device, rejected):
    data = {**with_change("device", device), "allreduce": allreduce}
    if not rejected:
        assert JobSpec.from_dict(data).allreduce == allreduce
        return
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(data)
    assert (f"allreduce: chooses how CPU gradients are reduced: it needs device cpu, got "
            f"{allreduce!r}") in str(info.value)


def test_batch_must_divide_among_workers():
    with pytest.raises(JobSpecError,
                       match=r"batch_size: must be divisible by the number of ranks \(3\), "
                             r"got 16"):
        JobSpec.from_dict({**BASE, "workers": 3})


def test_momentum_is_sgd_only_and_epochs_or_steps_required():
    data = with_change("optimizer.name", "adam")
    data.pop("max_steps")
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(data)
    paths = [e.path for e in info.value.errors]
    assert paths == ["optimizer.momentum", "epochs"]
    assert "applies to sgd only, not adam" in str(info.value)


def test_every_error_is_reported_at_once():
    data = with_change("optimizer.lr", -1)
    data = with_change("device", "gpu", data)
    data = with_change("checkpoint.keep", 0, data)
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(data)
    assert [e.path for e in info.value.errors] == ["optimizer.lr", "device", "checkpoint.keep"]


def test_yaml_reads_exponent_floats(tmp_path):
    # PyYAML's YAML 1.1 would read 1e-3 as the string '1e-3'.
    path = tmp_path / "job.yaml"
    path.write_text("name: y\nmodel: {name: mlp}\ndataset: {name: digits}\n"
                    "optimizer: {name: adam, lr: 1e-3, eps: 1E-08}\nbatch_size: 8\nepochs: 1\n")
    spec = load_spec(path)
    assert spec.optimizer.lr == 1e-3 and spec.optimizer.eps == 1e-8


def test_json_job_file(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(BASE))
    assert load_spec(path) == JobSpec.from_dict(BASE)


@pytest.mark.parametrize("text, message", [
    (None, "cannot read the job file (No such file or directory)"),
    ("name: [unclosed\n", "does not parse"),
    ("- a list\n", "must hold a mapping of job fields, got 'list'"),
])
def test_unreadable_job_files(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(JobSpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_trajectory_differences_allow_run_length_changes_only():
    saved = JobSpec.from_dict(BASE).to_dict()
    longer = JobSpec.from_dict({**BASE, "max_steps": 100, "eval_every": 5, "name": "again",
                                "checkpoint": {"every_steps": 3}})
    assert trajectory_differences(saved, longer) == []
    other = JobSpec.from_dict(with_change("optimizer.lr", 0.5, {**BASE, "seed": 1}))
    assert trajectory_differences(saved, other) == ["optimizer.lr", "seed"]
