"""engine.models: the registry, each model's names, shapes and input checks, and training on real
(offline) data: lenet and resnet on scikit-learn's digits, the language models on a generated
corpus whose structure they must learn.

References are independent of the code: hand-written state-dict key lists, accuracy on held-out
images, the corpus's unigram entropy computed here. Where PyTorch is installed, the benchmark's
PyTorch twins (bench/torch_models.py) are checked to compute the same function.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.engine.models import (
    get_constructor,
    get_model,
    list_models,
    model_signature,
    register_model,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _seed():
    engine.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small matrices gain nothing from BLAS threads, and on a busy machine threads that wait
    for each other make training several times slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        yield
        return
    with threadpool_limits(1):
        yield


# ================================================================ registry

def test_list_models_names_the_zoo():
    assert set(list_models()) >= {"mlp", "lenet", "resnet", "transformer_lm", "lstm_lm"}
    assert list_models() == sorted(list_models())


def test_unknown_model_name_lists_the_known_ones_and_suggests_a_close_match():
    with pytest.raises(ValueError) as err:
        get_model("resnt")
    msg = str(err.value)
    assert "unknown model 'resnt'" in msg and "did you mean 'resnet'" in msg
    for name in ("lenet", "lstm_lm", "mlp", "resnet", "transformer_lm"):
        assert name in msg
    assert "package.module:function" in msg


def test_unknown_argument_names_the_model_its_arguments_and_what_came():
    with pytest.raises(TypeError) as err:
        get_model("lenet", image_size=8, num_layers=3)
    msg = str(err.value)
    assert msg.startswith("model 'lenet':") and "num_layers" in msg
    assert "image_size=28, in_channels=1, num_classes=10, channels=(6, 16), hidden=(120, 84)" \
        in msg
    assert "got: image_size=8, num_layers=3" in msg


@pytest.mark.parametrize(("name", "args", "match"), [
    ("lenet", {"image_size": 32}, r"lenet: image_size must be one of \[8, 28\], got 32"),
    ("resnet", {"depth": 10}, r"resnet: depth must be 6n \+ 2 .* got 10"),
    ("resnet", {"width": 0}, "resnet: width must be a positive integer, got 0"),
    ("mlp", {"hidden": [64, -1]}, "mlp: hidden must be a non-empty sequence of positive"),
    ("mlp", {"dropout": 1.0}, r"mlp: dropout must be a number in \[0, 1\), got 1.0"),
    ("transformer_lm", {"d_model": 30, "n_heads": 4},
     r"transformer_lm: d_model \(30\) must be divisible by n_heads \(4\)"),
    ("lstm_lm", {"hidden_size": "big"}, "lstm_lm: hidden_size must be a positive integer"),
])
def test_bad_argument_values_name_the_model_and_accepted_arguments(name, args, match):
    with pytest.raises(ValueError, match=match) as err:
        get_model(name, **args)
    assert f"model {name!r}" in str(err.value) and "it accepts:" in str(err.value)


def test_package_module_function_names_a_users_constructor():
    m = get_model("dptrain.engine.nn:Linear", in_features=3, out_features=2)
    assert isinstance(m, nn.Linear) and m.weight.shape == (2, 3)
    assert get_constructor("dptrain.engine.nn:Linear") is nn.Linear
    assert get_constructor("lenet").__name__ == "LeNet"
    assert model_signature("dptrain.engine.models.mlp:mlp") == \
        "in_features=64, hidden=(128, 64), num_classes=10, dropout=0.0"
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.models'"):
        get_model("no_such_pkg.models:build")
    with pytest.raises(ValueError, match="module 'engine.nn' has no attribute 'Nope'"):
        get_model("engine.nn:Nope")
    with pytest.raises(TypeError, match="'__all__' is a list, not a callable"):
        get_model("engine.models:__all__")
    with pytest.raises(TypeError, match="returned a dict, not an engine.nn.Module"):
        get_model("builtins:dict")


def test_register_model_adds_a_name_and_refuses_a_clash():
    @register_model("test_models_tiny")
    def tiny(width: int = 2) -> nn.Module:
        return nn.Linear(1, width)

    assert "test_models_tiny" in list_models()
    assert get_model("test_models_tiny", width=5).out_features == 5
    with pytest.raises(ValueError, match="already registered as 'test_models_tiny'"):
        register_model("test_models_tiny")(lambda: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="without ':'"):
        register_model("a:b")


# ================================================================ names, shapes, input checks

def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                      "num_batches_tracked")]


def test_state_dict_keys_are_pytorch_style():
    assert list(get_model("mlp").state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert list(get_model("lenet").state_dict()) == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
        "classifier.1.weight", "classifier.1.bias", "classifier.3.weight", "classifier.3.bias",
        "classifier.5.weight", "classifier.5.bias"]
    expected = ["conv1.weight", *_bn("bn1")]
    for stage in (1, 2, 3):
        b = f"layer{stage}.0"
        expected += [f"{b}.conv1.weight", *_bn(f"{b}.bn1"), f"{b}.conv2.weight", *_bn(f"{b}.bn2")]
        if stage > 1:
            expected += [f"{b}.downsample.0.weight", *_bn(f"{b}.downsample.1")]
    expected += ["fc.weight", "fc.bias"]
    assert list(get_model("resnet", depth=8).state_dict()) == expected
    block = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
             "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
             "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
    assert list(get_model("transformer_lm", n_layers=2).state_dict()) == [
        "tok_emb.weight", "pos_emb.weight", *[f"blocks.{i}.{k}" for i in (0, 1) for k in block],
        "norm.weight", "norm.bias"]
    assert list(get_model("lstm_lm").state_dict()) == [
        "embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0",
        "lstm.bias_hh_l0", "head.weight", "head.bias"]


def test_resnet_depth_and_width_set_blocks_and_channels():
    m = get_model("resnet", depth=20, width=8, in_channels=1)
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert m.conv1.weight.shape == (8, 1, 3, 3) and m.fc.weight.shape == (10, 32)
    assert m(engine.randn(2, 1, 8, 8)).shape == (2, 10)


def test_transformer_lm_is_causal_and_its_head_is_tied():
    m = get_model("transformer_lm", vocab_size=20, d_model=16, n_layers=2, n_heads=2,
                  context=10)
    assert "head.weight" not in m.state_dict()
    ids = np.random.default_rng(0).integers(0, 20, (2, 10))
    later = ids.copy()
    later[:, 6:] = (later[:, 6:] + 1) % 20
    a, b = (m(engine.from_numpy(x)).numpy() for x in (ids, later))
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])
    F.cross_entropy(m(engine.from_numpy(ids)).reshape(-1, 20),
                    engine.from_numpy(ids.reshape(-1))).backward()
    assert m.tok_emb.weight.grad is not None and m.pos_emb.weight.grad is not None


@pytest.mark.parametrize(("name", "args", "x", "match"), [
    ("lenet", {"image_size": 8}, engine.randn(2, 1, 28, 28),
     r"lenet: expected input of shape \(N, 1, 8, 8\), got \(2, 1, 28, 28\)"),
    ("resnet", {}, engine.randn(2, 1, 32, 32), r"resnet: expected input of shape \(N, 3, H, W\)"),
    ("transformer_lm", {"context": 8}, engine.zeros(1, 9, dtype=engine.int64),
     "sequence length 9 exceeds the model's context of 8"),
    ("lstm_lm", {"vocab_size": 5}, engine.full((1, 3), 7, dtype=engine.int64),
     r"token ids must be in \[0, 5\)"),
    ("lstm_lm", {}, engine.zeros(2, 3), r"\(N, T\) integer Tensor .* dtype float32"),
])
def test_models_reject_bad_input_with_expected_and_got(name, args, x, match):
    with pytest.raises(ValueError, match=match):
        get_model(name, **args)(x)


# ================================================================ the PyTorch twins of the bench

@pytest.mark.parametrize(("name", "args", "shape"), [
    ("lenet", {}, (3, 1, 28, 28)),
    ("lenet", {"image_size": 8}, (3, 1, 8, 8)),
    ("resnet", {"depth": 14, "width": 4}, (3, 3, 16, 16)),
    ("transformer_lm", {"vocab_size": 30, "d_model": 16, "n_heads": 2, "context": 12}, (3, 12)),
])
def test_benchmark_twins_compute_the_same_function(name, args, shape):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import torch_models
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ours = get_model(name, **args).double()
    theirs = torch_models.TWINS[name](**args).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch_models.load_engine_weights(theirs, ours.state_dict())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, shape) if name == "transformer_lm" else rng.standard_normal(shape)
    for mode in ("train", "eval"):  # batch norm: batch statistics, then running statistics
        getattr(ours, mode)()
        getattr(theirs, mode)()
        out = ours(engine.from_numpy(x))
        tout = theirs(torch.from_numpy(x))
        np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-9, atol=1e-10)


# ================================================================ training on real data

def _digits(seed: int = 0):
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) float32 images standardised with the training
    split's mean and deviation, split 75/25."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 4
    train, test = order[n_test:], order[:n_test]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def _train_classifier(model, epochs: int, lr: float, batch: int = 32) -> float:
    """Adam with a cosine learning-rate decay; returns the held-out accuracy."""
    xtr, ytr, xte, yte = _digits()
    opt = engine.optim.Adam(model.parameters(), lr=lr)
    schedule = engine.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(engine.from_numpy(xtr[idx])),
                                   engine.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    model.eval()
    with engine.no_grad():
        pred = model(engine.from_numpy(xte)).argmax(1).numpy()
    return float((pred == yte).mean())


@pytest.mark.slow
def test_lenet_reaches_97_percent_on_held_out_digits():
    acc = _train_classifier(get_model("lenet", image_size=8, channels=(16, 32)), epochs=15,
                            lr=3e-3)
    assert acc >= 0.97


@pytest.mark.slow
def test_resnet_reaches_97_percent_on_held_out_digits():
    acc = _train_classifier(get_model("resnet", depth=8, width=8, in_channels=1), epochs=5,
                            lr=3e-3)
    assert acc >= 0.97


_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def _corpus(n_words: int, seed: int) -> str:
    """Words drawn uniformly from a fixed list: a new word's first letter is a free choice of
    8, every other character is determined by the ones before it."""
    rng = np.random.default_rng(seed)
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), n_words)) + " "


def _train_char_lm(name: str, args: dict, lr: float, steps: int,
                   T: int = 32, batch: int = 16) -> tuple[float, float]:
    """Train on one corpus; return (held-out loss per character, corpus unigram entropy)."""
    train_text, held_text = _corpus(3000, 0), _corpus(400, 1)
    chars = sorted(set(train_text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in train_text])
    held = np.array([index[c] for c in held_text])
    p = np.bincount(data, minlength=len(chars)) / len(data)
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats per character

    model = get_model(name, vocab_size=len(chars), **args)
    opt = engine.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - T - 1, batch)
        x = np.stack([data[s:s + T] for s in starts])
        y = np.stack([data[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(model(engine.from_numpy(x)).reshape(-1, len(chars)),
                               engine.from_numpy(y.reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    n = (len(held) - 1) // T
    x, y = held[:n * T].reshape(n, T), held[1:n * T + 1].reshape(n, T)
    with engine.no_grad():
        held_loss = F.cross_entropy(model(engine.from_numpy(x)).reshape(-1, len(chars)),
                                    engine.from_numpy(y.reshape(-1))).item()
    return held_loss, unigram_entropy


@pytest.mark.slow
def test_lstm_lm_learns_the_corpus_well_below_unigram_entropy():
    loss, entropy = _train_char_lm("lstm_lm", {"embed_dim": 16, "hidden_size": 64},
                                   lr=1e-2, steps=150)
    # about 2.6 nats; the best possible is ln(8) per 6.4 characters, about 0.33 nats
    assert entropy > 2.5
    assert loss < 0.3 * entropy


@pytest.mark.slow
def test_transformer_lm_learns_the_corpus_well_below_unigram_entropy():
    loss, entropy = _train_char_lm("transformer_lm", {"d_model": 32, "n_layers": 2,
                                                      "n_heads": 2, "context": 32},
                                   lr=3e-3, steps=200)
    assert loss < 0.3 * entropy
