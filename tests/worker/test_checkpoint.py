"""Checkpoints: the files on disk, exact round trips, verification, fallback and pruning."""

from __future__ import annotations

import errno
import json
import os

import blake3
import numpy as np
import pytest
import safetensors.numpy
from small_disk import small_disk

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import checkpoint as ckpt
from dptrain.worker.checkpoint import CheckpointError


def make_model_and_optimizer(seed: int = 0):
    engine.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    return model, engine.optim.Adam(model.parameters(), lr=0.01)


def train_steps(model, optimizer, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        rng = np.random.default_rng(i)
        x = engine.from_numpy(rng.standard_normal((8, 5)).astype(np.float32))
        y = engine.from_numpy(rng.integers(0, 3, 8))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def params(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def write(root, step: int, model, optimizer, **info):
    return ckpt.write_checkpoint(root, step, model.state_dict(), optimizer.state_dict(),
                                 {"epoch": 0, "position": step, **info})


def test_layout_and_manifest(tmp_path):
    model, opt = make_model_and_optimizer()
    train_steps(model, opt, 2)
    path = write(tmp_path, 2, model, opt, rng={"engine": [engine.get_rng_state()]})
    assert path == str(tmp_path / "step-00000002")
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors",
                                        "optimizer.safetensors"]
    manifest = json.loads((tmp_path / "step-00000002" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 2
    for name in ("model.safetensors", "optimizer.safetensors"):
        raw = (tmp_path / "step-00000002" / name).read_bytes()
        assert manifest["files"][name] == {"blake3": blake3.blake3(raw).hexdigest(),
                                           "bytes": len(raw)}
    # The arrays open with the safetensors library itself.
    weights = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    np.testing.assert_array_equal(weights["0.weight"], model[0].weight.numpy())
    moments = safetensors.numpy.load_file(os.path.join(path, "optimizer.safetensors"))
    assert set(moments) == {f"state.{i}.{k}" for i in range(4) for k in ("exp_avg",
                                                                         "exp_avg_sq")}
    assert manifest["optimizer"]["scalars"] == {str(i): {"step": 2} for i in range(4)}
    assert manifest["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]


def test_resuming_from_a_checkpoint_continues_bit_identically(tmp_path):
    straight, straight_opt = make_model_and_optimizer()
    train_steps(straight, straight_opt, 6)

    first, first_opt = make_model_and_optimizer()
    train_steps(first, first_opt, 3)
    write(tmp_path, 3, first, first_opt)
    loaded = ckpt.read_checkpoint(tmp_path / "step-00000003")
    resumed, resumed_opt = make_model_and_optimizer(seed=99)  # other initial values
    resumed.load_state_dict(loaded.model_state)
    resumed_opt.load_state_dict(loaded.optimizer_state)
    assert loaded.step == 3 and resumed_opt.state_dict()["state"][0]["step"] == 3
    train_steps(resumed, resumed_opt, 3, start=3)
    for name, value in params(straight).items():
        assert params(resumed)[name].tobytes() == value.tobytes(), name


def flip_byte(path, offset: int = -1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte ^ 0xFF]))


def test_verify_reports_each_kind_of_damage(tmp_path):
    model, opt = make_model_and_optimizer()
    for step in (1, 2, 3, 4, 5):
        write(tmp_path, step, model, opt)
    flip_byte(tmp_path / "step-00000001" / "model.safetensors")
    (tmp_path / "step-00000002" / "optimizer.safetensors").unlink()
    (tmp_path / "step-00000003" / "manifest.json").unlink()
    manifest = json.loads((tmp_path / "step-00000004" / "manifest.json").read_text())
    (tmp_path / "step-00000004" / "manifest.json").write_text(
        json.dumps({**manifest, "format_version": 99}))
    with open(tmp_path / "step-00000005" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    expected = {1: "model.safetensors fails its checksum", 2: "optimizer.safetensors is missing",
                3: "incomplete: it has no manifest.json", 4: "format version 99 is not 1",
                5: "model.safetensors has"}
    for step, message in expected.items():
        with pytest.raises(CheckpointError, match=message):
            ckpt.verify_checkpoint(tmp_path / ckpt.checkpoint_name(step))


def test_load_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    model, opt = make_model_and_optimizer()
    train_steps(model, opt, 1)
    write(tmp_path, 10, model, opt)
    good = params(model)
    train_steps(model, opt, 1, start=1)
    write(tmp_path, 20, model, opt)
    os.makedirs(tmp_path / "step-00000030")  # a write that died before its manifest
    flip_byte(tmp_path / "step-00000020" / "model.safetensors", offset=-5)
    found = ckpt.load_latest(tmp_path)
    assert found.step == 10 and found.path == str(tmp_path / "step-00000010")
    for name, value in good.items():
        np.testing.assert_array_equal(found.model_state[name].numpy(), value)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"checkpoint {tmp_path / 'step-00000030'} (step 30) is unusable: "
                             "incomplete")
    assert "(step 20) is unusable: model.safetensors fails its checksum" in err[1]
    assert err[2] == (f"falling back to checkpoint {tmp_path / 'step-00000010'} (step 10), "
                      "the newest intact one")
    assert ckpt.load_latest(tmp_path / "nothing-here") is None


def test_rewriting_a_step_replaces_it(tmp_path):
    model, opt = make_model_and_optimizer()
    write(tmp_path, 4, model, opt)
    train_steps(model, opt, 1)
    write(tmp_path, 4, model, opt)
    found = ckpt.read_checkpoint(tmp_path / "step-00000004")
    np.testing.assert_array_equal(found.model_state["2.bias"].numpy(), model[2].bias.numpy())


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    model, opt = make_model_and_optimizer()
    for step in (5, 10, 15, 20):
        write(tmp_path, step, model, opt)
    os.makedirs(tmp_path / "step-00000003")   # an old partial write
    os.makedirs(tmp_path / "step-00000025")   # a newer partial write is not counted
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(os.path.basename(p) for p in removed) == ["step-00000003", "step-00000005",
                                                            "step-00000010"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [15, 20, 25]
    assert ckpt.prune_checkpoints(tmp_path, keep=2) == []


def test_a_full_disk_fails_the_write_with_a_reason_and_keeps_the_older_checkpoints(tmp_path):
    with small_disk(tmp_path / "disk", size_mib=1) as disk:
        root = disk / "ckpt"
        model, optimizer = make_model_and_optimizer()
        older = write(root, 5, model, optimizer)
        expected = params(model)
        engine.manual_seed(1)
        big = nn.Linear(512, 512)  # 1 MiB of parameters alone: more than the disk has left
        big_optimizer = engine.optim.Adam(big.parameters(), lr=0.01)
        with pytest.raises(ckpt.CheckpointDiskFull) as info:
            write(root, 10, big, big_optimizer)
        assert info.value.errno == errno.ENOSPC and info.value.step == 10
        assert str(info.value) == (
            f"no space left to write the checkpoint of step 10 under {root} (No space left on "
            "device); the checkpoints written before are intact: free space there, then resume")
        # The partial checkpoint is gone (its space freed); the older one reads back intact.
        assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]
        latest = ckpt.load_latest(root)
        assert latest.path == older and latest.step == 5
        assert latest.model_state.keys() == expected.keys()
        for name, value in latest.model_state.items():
            np.testing.assert_array_equal(value.numpy(), expected[name])
