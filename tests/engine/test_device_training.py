"""Whole training steps on each device: every model of the registry, every optimizer,
``clip_grad_norm_`` and checkpoints, against the same steps on the CPU (itself checked against
PyTorch and finite differences elsewhere). On the strict device, any numpy-only call on the path
fails; on ``cuda`` (where a GPU is lent) the same tests prove the CuPy path."""

from __future__ import annotations

import numpy as np
import pytest
from devices import DEVICES

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.engine.models import get_model

DEVICE_ONLY = [d for d in DEVICES if d != "cpu"]

# Small instances of each registered model, with an input batch and a loss. No dropout: a
# device draws its masks from its own generator, whose numbers differ from the CPU's (as in
# PyTorch); tests/engine/test_devices.py checks the device's masks.
MODELS = {
    "mlp": (dict(in_features=6, hidden=(8,), num_classes=3, dropout=0.0),
            lambda: engine.randn(4, 6), lambda: engine.randint(0, 3, (4,))),
    "lenet": (dict(image_size=8, channels=(2, 3), hidden=(8, 6), num_classes=3),
              lambda: engine.randn(2, 1, 8, 8), lambda: engine.randint(0, 3, (2,))),
    "resnet": (dict(depth=8, width=4, num_classes=3),
               lambda: engine.randn(2, 3, 8, 8), lambda: engine.randint(0, 3, (2,))),
    "transformer_lm": (dict(vocab_size=11, d_model=8, n_layers=1, n_heads=2, context=6,
                            dropout=0.0),
                       lambda: engine.randint(0, 11, (2, 6)),
                       lambda: engine.randint(0, 11, (2, 6))),
    "lstm_lm": (dict(vocab_size=11, embed_dim=4, hidden_size=6),
                lambda: engine.randint(0, 11, (2, 5)), lambda: engine.randint(0, 11, (2, 5))),
}

OPTIMIZERS = {
    "sgd": lambda ps: engine.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3,
                                       nesterov=True),
    "adam": lambda ps: engine.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: engine.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
}


def _train(name: str, opt_name: str, device: str, steps: int = 2) -> list[np.ndarray]:
    args, make_x, make_y = MODELS[name]
    engine.manual_seed(0)
    model = get_model(name, **args).to(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    for _ in range(steps):
        x, y = make_x().to(device), make_y().to(device)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        assert loss.device == device
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    assert {p.device for p in model.parameters()} == {engine.Device(device)}
    return [p.numpy() for p in model.parameters()]


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("device", DEVICE_ONLY)
def test_training_steps_on_a_device_equal_the_cpu_steps(device, name, opt_name, monkeypatch):
    # A device runs the ops' array-generic form; the CPU runs it too with its compiled kernels
    # off (they round differently, and Adam turns a gradient's last bits into an update of up
    # to lr): tests/engine/test_cpu_kernels.py compares the kernels with this form.
    monkeypatch.setenv("DPTRAIN_CPU_KERNELS", "0")
    expected = _train(name, opt_name, "cpu")
    got = _train(name, opt_name, device)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICE_ONLY)
def test_checkpoints_from_a_device_load_on_the_cpu_and_back(device, tmp_path):
    engine.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(device)
    opt = engine.optim.Adam(model.parameters(), lr=0.1)
    model(engine.randn(5, 3, device=device)).sum().backward()
    opt.step()
    engine.save(model.state_dict(), tmp_path / "model.safetensors")
    host = engine.load(tmp_path / "model.safetensors")
    assert {t.device for t in host.values()} == {engine.Device("cpu")}
    for k, v in model.state_dict().items():
        assert host[k].tolist() == v.tolist()
    back = engine.load(tmp_path / "model.safetensors", map_location=device)
    assert {t.device for t in back.values()} == {engine.Device(device)}
    # A CPU model takes the device checkpoint, and a device optimizer the CPU one's state.
    cpu_model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    cpu_model.load_state_dict(back)
    assert [p.tolist() for p in cpu_model.parameters()] == [
        p.tolist() for p in model.parameters()]
    cpu_opt = engine.optim.Adam(cpu_model.parameters(), lr=0.1)
    cpu_opt.load_state_dict(opt.state_dict())
    state = next(iter(cpu_opt.state.values()))
    assert state["exp_avg"].device == "cpu"
