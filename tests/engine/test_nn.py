"""engine.nn: module registration and naming, state dicts, modes, layers, init and clipping.

References are independent of the code under test: hand-written key lists and repr strings,
numpy computations of forwards and hand-derived gradients, analytic moments of the init
distributions. Where PyTorch is installed, a few tests also compare with it.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
from devices import DEVICES

from dptrain import engine
from dptrain.engine import backend, nn
from dptrain.engine.nn import init
from dptrain.engine.nn.utils import (
    clip_grad_norm_,
    clip_grad_value_,
    parameters_to_vector,
    vector_to_parameters,
)


@pytest.fixture(autouse=True)
def _seed():
    engine.manual_seed(1234)


class Block(nn.Module):
    """A custom module with every kind of member: children, containers, a bare Parameter,
    a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.LayerNorm(8)])
        self.heads = nn.ModuleDict({"cls": nn.Linear(8, 3), "reg": nn.Linear(8, 1, bias=False)})
        self.scale = nn.Parameter(engine.ones(1))
        self.register_buffer("steps", engine.zeros(1, dtype=engine.int64))
        self.register_buffer("mask", engine.ones(8), persistent=False)

    def forward(self, x):
        h = self.encoder(x)
        for layer in self.layers:
            h = layer(h)
        return self.heads["cls"](h) * self.scale


PARAM_NAMES = [
    "scale",
    "encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
    "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
    "heads.cls.weight", "heads.cls.bias", "heads.reg.weight",
]


# ---------------------------------------------------------------- names and traversal

def test_named_parameters_use_pytorch_dotted_names():
    assert [n for n, _ in Block().named_parameters()] == PARAM_NAMES


def test_named_parameters_prefix_and_no_recurse():
    b = Block()
    assert [n for n, _ in b.named_parameters(recurse=False)] == ["scale"]
    assert [n for n, _ in b.encoder.named_parameters(prefix="enc")] == [
        "enc.0.weight", "enc.0.bias", "enc.2.weight", "enc.2.bias"]


def test_state_dict_has_params_then_persistent_buffers_per_module():
    sd = Block().state_dict()
    assert isinstance(sd, OrderedDict)
    assert list(sd) == ["scale", "steps"] + PARAM_NAMES[1:]
    assert "mask" not in sd


def test_state_dict_values_are_detached_and_share_memory():
    b = Block()
    sd = b.state_dict()
    w = sd["encoder.0.weight"]
    assert type(w) is engine.Tensor and not w.requires_grad and w.is_leaf
    assert np.shares_memory(w.data, b.encoder[0].weight.data)
    assert b.state_dict(keep_vars=True)["encoder.0.weight"] is b.encoder[0].weight


def test_buffers_names_and_state_dict_persistence():
    b = Block()
    assert [n for n, _ in b.named_buffers()] == ["steps", "mask"]
    assert len(list(b.buffers())) == 2
    b.register_buffer("mask", engine.zeros(8), persistent=True)
    assert "mask" in b.state_dict()
    b.register_buffer("steps", None)
    assert "steps" not in b.state_dict()
    assert [n for n, _ in b.named_buffers()] == ["mask"]


def test_named_modules_and_children():
    b = Block()
    assert [n for n, _ in b.named_modules()] == [
        "", "encoder", "encoder.0", "encoder.1", "encoder.2", "layers", "layers.0", "layers.1",
        "heads", "heads.cls", "heads.reg"]
    assert [n for n, _ in b.named_children()] == ["encoder", "layers", "heads"]
    assert list(b.children()) == [b.encoder, b.layers, b.heads]
    assert len(list(b.modules())) == 11


def test_shared_parameter_and_module_are_listed_once():
    m = nn.Module()
    m.a = nn.Linear(3, 3)
    m.b = nn.Linear(3, 3)
    m.b.weight = m.a.weight  # tied weights
    m.c = m.a  # the same module under two names
    assert [n for n, _ in m.named_parameters()] == ["a.weight", "a.bias", "b.bias"]
    assert len(list(m.parameters())) == 3
    assert [n for n, _ in m.named_modules()] == ["", "a", "b"]
    # state_dict, like PyTorch's, lists every path
    assert list(m.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias", "c.weight",
                                    "c.bias"]


def test_setattr_getattr_delattr_registries():
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        m.weight = engine.ones(2, 2)  # a plain Tensor cannot replace a Parameter
    m.weight = None
    assert m.weight is None and [n for n, _ in m.named_parameters()] == ["bias"]
    m.extra = nn.ReLU()
    assert m._modules["extra"] is m.extra
    del m.extra
    with pytest.raises(AttributeError, match="no attribute 'extra'"):
        _ = m.extra
    m.note = 3  # plain attributes are plain
    assert m.note == 3 and "note" not in m._modules
    with pytest.raises(KeyError, match="contain"):
        m.register_buffer("a.b", engine.ones(1))
    with pytest.raises(KeyError, match="already exists"):
        m.register_parameter("note", nn.Parameter(engine.ones(1)))


def test_assignment_before_init_is_an_error():
    class Bad(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(1, 1)

    with pytest.raises(AttributeError, match="before Module.__init__"):
        Bad()


# ---------------------------------------------------------------- load_state_dict

def test_load_state_dict_copies_in_place_and_bumps_versions():
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    weight_array, version = dst.weight.data, dst.weight._version[0]
    result = dst.load_state_dict(src.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert dst.weight.data is weight_array  # same array, new values
    np.testing.assert_array_equal(dst.weight.data, src.weight.data)
    np.testing.assert_array_equal(dst.bias.data, src.bias.data)
    assert dst.weight._version[0] == version + 1
    assert repr(result) == "<All keys matched successfully>"


def test_load_state_dict_accepts_arrays_and_casts_dtype():
    m = nn.Linear(2, 1)
    m.load_state_dict({"weight": np.array([[1.5, -2.0]]), "bias": np.array([0.25])})
    assert m.weight.dtype == np.float32
    assert m.weight.tolist() == [[1.5, -2.0]] and m.bias.tolist() == [0.25]


def test_load_state_dict_strict_reports_every_problem_at_once():
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    sd = m.state_dict()
    del sd["1.bias"]
    sd["0.weight"] = engine.zeros(4, 3)
    sd["extra.weight"] = engine.zeros(1)
    before = m[0].bias.data.copy()
    sd["0.bias"] = engine.full((2,), 7.0)
    with pytest.raises(RuntimeError) as err:
        m.load_state_dict(sd)
    msg = str(err.value)
    assert msg.startswith("Error(s) in loading state_dict for Sequential:")
    assert 'Missing key(s) in state_dict: "1.bias"' in msg
    assert 'Unexpected key(s) in state_dict: "extra.weight"' in msg
    assert ("size mismatch for 0.weight: copying a param with shape (4, 3) from checkpoint, "
            "the shape in current model is (2, 3)") in msg
    np.testing.assert_array_equal(m[0].bias.data, before)  # all or nothing


def test_load_state_dict_non_strict_returns_the_key_lists():
    m = nn.Linear(3, 2)
    result = m.load_state_dict({"weight": engine.ones(2, 3), "foo": engine.ones(1)},
                               strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["foo"]
    assert tuple(result) == (["bias"], ["foo"])
    assert m.weight.tolist() == [[1.0] * 3] * 2


def test_load_state_dict_shape_mismatch_raises_even_when_not_strict():
    m = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match=r"size mismatch for bias: .*\(5,\).*\(2,\)"):
        m.load_state_dict({"bias": engine.ones(5)}, strict=False)


def test_load_state_dict_restores_buffers_and_ignores_non_persistent():
    a, b = Block(), Block()
    a.steps.data[...] = 41
    b.load_state_dict(a.state_dict())
    assert b.steps.tolist() == [41]
    with pytest.raises(RuntimeError, match='Unexpected key.*"mask"'):
        b.load_state_dict({**a.state_dict(), "mask": engine.ones(8)})


# ---------------------------------------------------------------- modes and conversions

def test_train_eval_propagate_to_every_descendant():
    b = Block()
    assert all(m.training for m in b.modules())
    assert b.eval() is b
    assert not any(m.training for m in b.modules())
    b.train()
    assert all(m.training for m in b.modules())
    b.layers.train(False)
    assert b.training and not b.layers[1].training


def test_dropout_is_identity_in_eval_and_scales_in_training():
    x = engine.ones(200, 100)
    d = nn.Dropout(0.25)
    y = d(x).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    d.eval()
    np.testing.assert_array_equal(d(x).numpy(), x.numpy())
    with pytest.raises(ValueError):
        nn.Dropout(1.5)


def test_module_to_float64_keeps_identity_and_casts_grads():
    m = Block()
    w = m.encoder[0].weight
    m(engine.ones(2, 4)).sum().backward()
    assert m.to(engine.float64) is m
    assert m.encoder[0].weight is w and isinstance(w, nn.Parameter)
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert w.grad.dtype == np.float64
    assert m.steps.dtype == np.int64  # integer buffers are not cast
    assert m.mask.dtype == np.float64
    assert m(engine.ones(2, 4, dtype=engine.float64)).dtype == np.float64
    m.float()
    assert all(p.dtype == np.float32 for p in m.parameters())
    m.to("cpu")
    assert w.device == "cpu"


def test_zero_grad_requires_grad_and_apply():
    m = nn.Linear(2, 2)
    m(engine.ones(1, 2)).sum().backward()
    grad = m.weight.grad
    m.zero_grad(set_to_none=False)
    assert m.weight.grad is grad and not grad.numpy().any()
    m.zero_grad()
    assert m.weight.grad is None and m.bias.grad is None
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())
    seen = []
    nn.Sequential(nn.ReLU(), nn.Sequential(nn.Tanh())).apply(lambda mod: seen.append(
        type(mod).__name__))
    assert seen == ["ReLU", "Tanh", "Sequential", "Sequential"]


def test_forward_hooks_can_replace_inputs_and_outputs():
    m = nn.Identity()
    h1 = m.register_forward_pre_hook(lambda mod, args: args[0] * 2)
    h2 = m.register_forward_hook(lambda mod, args, out: out + 1)
    assert m(engine.tensor([1.0])).tolist() == [3.0]
    h1.remove()
    assert m(engine.tensor([1.0])).tolist() == [2.0]
    h2.remove()
    assert m(engine.tensor([1.0])).tolist() == [1.0]


def test_deepcopy_gives_independent_parameters():
    m = nn.Linear(2, 2)
    c = copy.deepcopy(m)
    assert isinstance(c.weight, nn.Parameter) and c.weight.requires_grad
    c.weight.data[...] = 0
    assert m.weight.numpy().any()


# ---------------------------------------------------------------- containers

def test_sequential_indexing_slicing_and_mutation():
    a, b, c = nn.Linear(1, 1), nn.ReLU(), nn.Tanh()
    s = nn.Sequential(a, b, c)
    assert len(s) == 3 and list(s) == [a, b, c] and s[-1] is c
    assert list(s[1:]) == [b, c] and isinstance(s[1:], nn.Sequential)
    with pytest.raises(IndexError):
        s[3]
    s.append(nn.Sigmoid())
    assert list(s._modules) == ["0", "1", "2", "3"]
    del s[0]
    assert list(s._modules) == ["0", "1", "2"] and s[0] is b
    named = nn.Sequential(OrderedDict([("fc", a), ("act", b)]))
    assert [n for n, _ in named.named_parameters()] == ["fc.weight", "fc.bias"]
    assert named(engine.tensor([[-3.0]])).shape == (1, 1)


def test_sequential_forward_chains_modules():
    s = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = engine.randn(5, 3)
    w0, b0, w1, b1 = (p.numpy() for p in s.parameters())
    expected = np.maximum(x.numpy() @ w0.T + b0, 0) @ w1.T + b1
    np.testing.assert_allclose(s(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_module_list_and_dict():
    ml = nn.ModuleList([nn.ReLU()])
    ml.append(nn.Tanh()).extend([nn.Sigmoid()])
    ml.insert(0, nn.Identity())
    assert [type(m).__name__ for m in ml] == ["Identity", "ReLU", "Tanh", "Sigmoid"]
    assert list(ml._modules) == ["0", "1", "2", "3"]
    del ml[1]
    assert [type(m).__name__ for m in ml] == ["Identity", "Tanh", "Sigmoid"]
    assert isinstance(ml[:2], nn.ModuleList) and len(ml[:2]) == 2
    with pytest.raises(NotImplementedError):
        ml(engine.ones(1))
    md = nn.ModuleDict([("b", nn.ReLU()), ("a", nn.Tanh())])
    md["c"] = nn.Linear(1, 1)
    assert list(md) == ["b", "a", "c"] and "a" in md and len(md) == 3
    assert [n for n, _ in md.named_parameters()] == ["c.weight", "c.bias"]
    assert isinstance(md.pop("b"), nn.ReLU) and list(md.keys()) == ["a", "c"]


# ---------------------------------------------------------------- layers

def test_linear_forward_and_gradients_match_hand_derivation():
    m = nn.Linear(3, 2)
    x = engine.randn(4, 3, requires_grad=True)
    g = np.arange(8, dtype=np.float32).reshape(4, 2) / 8 - 0.3  # upstream dL/dy
    y = m(x)
    W, b, X = m.weight.numpy(), m.bias.numpy(), x.numpy()
    np.testing.assert_allclose(y.numpy(), X @ W.T + b, rtol=1e-6, atol=1e-6)
    (y * engine.tensor(g)).sum().backward()
    np.testing.assert_allclose(m.weight.grad.numpy(), g.T @ X, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.bias.grad.numpy(), g.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), g @ W, rtol=1e-5, atol=1e-6)


def test_linear_shapes_dtype_and_no_bias():
    m = nn.Linear(5, 7, bias=False, dtype=engine.float64)
    assert m.weight.shape == (7, 5) and m.bias is None and m.weight.dtype == np.float64
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    assert m(engine.ones(2, 3, 5, dtype=engine.float64)).shape == (2, 3, 7)


def test_layer_norm_matches_numpy():
    ln = nn.LayerNorm(6)
    assert ln.weight.tolist() == [1.0] * 6 and ln.bias.tolist() == [0.0] * 6
    ln.weight.data[...] = np.linspace(0.5, 1.5, 6)
    ln.bias.data[...] = 0.1
    x = engine.randn(3, 6)
    X = x.numpy().astype(np.float64)
    ref = (X - X.mean(-1, keepdims=True)) / np.sqrt(X.var(-1, keepdims=True) + 1e-5)
    ref = ref * ln.weight.numpy() + 0.1
    np.testing.assert_allclose(ln(x).numpy(), ref, rtol=1e-5, atol=1e-5)
    plain = nn.LayerNorm((2, 3), elementwise_affine=False)
    assert list(plain.parameters()) == []
    assert plain(engine.randn(4, 2, 3)).shape == (4, 2, 3)


def test_embedding_lookup_and_padding_row():
    emb = nn.Embedding(5, 3, padding_idx=-1)
    assert emb.padding_idx == 4
    assert emb.weight.numpy()[4].tolist() == [0.0] * 3
    idx = engine.tensor([[0, 4], [2, 0]])
    out = emb(idx)
    np.testing.assert_array_equal(out.numpy(), emb.weight.numpy()[[[0, 4], [2, 0]]])
    out.sum().backward()
    np.testing.assert_array_equal(emb.weight.grad.numpy()[:, 0], [2, 0, 1, 0, 0])


def test_activation_modules_match_numpy():
    x = engine.tensor([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    X = x.numpy().astype(np.float64)
    cases = [
        (nn.ReLU(), np.maximum(X, 0)),
        (nn.Tanh(), np.tanh(X)),
        (nn.Sigmoid(), 1 / (1 + np.exp(-X))),
        (nn.SiLU(), X / (1 + np.exp(-X))),
        (nn.GELU(), 0.5 * X * (1 + np.vectorize(math.erf)(X / math.sqrt(2)))),
        (nn.GELU("tanh"), 0.5 * X * (1 + np.tanh(math.sqrt(2 / math.pi) * (X + 0.044715 * X**3)))),
        (nn.Softmax(dim=1), np.exp(X) / np.exp(X).sum(1, keepdims=True)),
        (nn.LogSoftmax(dim=-1), X - np.log(np.exp(X).sum(-1, keepdims=True))),
        (nn.Identity(), X),
    ]
    for module, ref in cases:
        np.testing.assert_allclose(module(x).numpy(), ref, rtol=1e-5, atol=1e-6,
                                   err_msg=repr(module))
    assert nn.Flatten()(engine.ones(2, 3, 4)).shape == (2, 12)
    assert nn.Flatten(0, 1)(engine.ones(2, 3, 4)).shape == (6, 4)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        nn.Softmax()(engine.ones(2, 3))


def test_loss_modules_match_hand_computation():
    logits = engine.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    target = engine.tensor([0, 2])
    L = logits.numpy().astype(np.float64)
    logp = L - np.log(np.exp(L).sum(1, keepdims=True))
    expected = -(logp[0, 0] + logp[1, 2]) / 2
    assert nn.CrossEntropyLoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)
    per = nn.CrossEntropyLoss(reduction="none")(logits, target).numpy()
    np.testing.assert_allclose(per, [-logp[0, 0], -logp[1, 2]], rtol=1e-5)
    a, b = engine.tensor([1.0, 2.0, 4.0]), engine.tensor([0.0, 2.0, 1.0])
    assert nn.MSELoss()(a, b).item() == pytest.approx((1 + 0 + 9) / 3)
    assert nn.MSELoss(reduction="sum")(a, b).item() == pytest.approx(10.0)


# ---------------------------------------------------------------- init

def test_linear_default_init_bounds():
    m = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)
    for p in (m.weight, m.bias):
        v = p.numpy()
        assert np.abs(v).max() <= bound
        assert np.abs(v).max() > 0.95 * bound  # actually fills the interval
    # U(-b, b) has std b / sqrt(3)
    assert m.weight.numpy().std() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_kaiming_and_xavier_statistics_on_a_large_tensor():
    w = engine.empty(500, 2000)  # fan_in 2000, fan_out 500
    init.kaiming_uniform_(w, nonlinearity="relu")
    bound = math.sqrt(2.0) * math.sqrt(3.0 / 2000)
    assert np.abs(w.numpy()).max() <= bound
    assert w.numpy().std() == pytest.approx(math.sqrt(2.0 / 2000), rel=0.01)
    init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    assert w.numpy().std() == pytest.approx(math.sqrt(2.0 / 500), rel=0.01)
    assert abs(w.numpy().mean()) < 0.01 * math.sqrt(2.0 / 500) * 5
    init.xavier_uniform_(w, gain=2.0)
    a = 2.0 * math.sqrt(6.0 / 2500)
    assert np.abs(w.numpy()).max() <= a
    assert w.numpy().std() == pytest.approx(a / math.sqrt(3), rel=0.01)
    init.xavier_normal_(w)
    assert w.numpy().std() == pytest.approx(math.sqrt(2.0 / 2500), rel=0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_trunc_normal_bounds_and_moments(device):
    w = engine.empty(1000, 1000, device=device)
    init.trunc_normal_(w, mean=0.0, std=1.0, a=-2.0, b=2.0)
    v = w.numpy()
    assert v.min() >= -2.0 and v.max() <= 2.0
    # variance of a standard normal truncated to [-2, 2]: 1 - 2 * 2 phi(2) / (Phi(2) - Phi(-2))
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    assert v.std() == pytest.approx(math.sqrt(1 - 4 * phi / mass), rel=0.01)
    init.trunc_normal_(w, mean=1.0, std=0.5, a=0.9, b=1.0)  # a narrow window still fills
    assert w.numpy().min() >= 0.9 and w.numpy().max() <= 1.0
    # An asymmetric window: with alpha, beta the bounds in std units and Z = Phi(beta) -
    # Phi(alpha), the mean is mu + sigma (phi(alpha) - phi(beta)) / Z and the variance
    # sigma^2 (1 + (alpha phi(alpha) - beta phi(beta)) / Z - ((phi(alpha) - phi(beta)) / Z)^2).
    mu, sigma, lo, hi = 0.5, 2.0, -1.0, 2.0
    al, be = (lo - mu) / sigma, (hi - mu) / sigma
    pdf = [math.exp(-t * t / 2) / math.sqrt(2 * math.pi) for t in (al, be)]
    z = 0.5 * (math.erf(be / math.sqrt(2)) - math.erf(al / math.sqrt(2)))
    shift = (pdf[0] - pdf[1]) / z
    init.trunc_normal_(w, mean=mu, std=sigma, a=lo, b=hi)
    v = w.numpy().astype(np.float64)
    assert v.min() >= lo and v.max() <= hi and w.device == device
    assert v.mean() == pytest.approx(mu + sigma * shift, abs=0.005)  # 1e6 draws: se ~ 8e-4
    assert v.std() == pytest.approx(
        sigma * math.sqrt(1 + (al * pdf[0] - be * pdf[1]) / z - shift ** 2), rel=0.01)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", [lambda w: init.trunc_normal_(w, std=0.5, a=-0.4, b=0.6),
                                  init.orthogonal_], ids=["trunc_normal_", "orthogonal_"])
def test_trunc_normal_and_orthogonal_draw_on_the_tensors_device(device, fill):
    def draw() -> list:
        w = engine.empty(5, 8, device=device)
        fill(w)
        assert w.device == device
        return w.tolist()

    engine.manual_seed(3)
    host_before = backend.generator().bit_generator.state
    first = draw()
    engine.manual_seed(3)
    assert draw() == first  # the same seed, the same draws on the device
    assert draw() != first  # and the stream moves on
    if device != "cpu":  # drawn by the device's generator, not the host's and then moved
        assert backend.generator().bit_generator.state == host_before
        assert engine.get_rng_state()["devices"]["draws"][device] > 0
        engine.manual_seed(3)
        w = engine.empty(5, 8)
        fill(w)
        assert w.tolist() != first


def test_uniform_normal_constant_and_versions():
    w = engine.empty(200, 200)
    v0 = w._version[0]
    assert init.uniform_(w, -3.0, -1.0) is w
    assert w._version[0] == v0 + 1
    assert -3.0 <= w.numpy().min() and w.numpy().max() <= -1.0
    assert w.numpy().mean() == pytest.approx(-2.0, abs=0.02)
    init.normal_(w, mean=5.0, std=0.5)
    assert w.numpy().mean() == pytest.approx(5.0, abs=0.01)
    assert w.numpy().std() == pytest.approx(0.5, rel=0.02)
    init.constant_(w, 0.3)
    assert np.all(w.numpy() == np.float32(0.3))
    init.zeros_(w)
    assert not w.numpy().any()
    init.ones_(w)
    assert np.all(w.numpy() == 1)
    init.eye_(w)
    np.testing.assert_array_equal(w.numpy(), np.eye(200))


@pytest.mark.parametrize("device", DEVICES)
def test_orthogonal_gives_orthonormal_rows_or_columns(device):
    tall, wide = engine.empty(6, 3, device=device), engine.empty(3, 6, device=device)
    init.orthogonal_(tall)
    init.orthogonal_(wide, gain=2.0)
    np.testing.assert_allclose(tall.numpy().T @ tall.numpy(), np.eye(3), atol=1e-5)
    np.testing.assert_allclose(wide.numpy() @ wide.numpy().T, 4 * np.eye(3), atol=1e-5)


def test_calculate_gain_and_fans():
    assert init.calculate_gain("linear") == 1
    assert init.calculate_gain("sigmoid") == 1
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("leaky_relu") == pytest.approx(math.sqrt(2 / (1 + 0.01**2)))
    assert init.calculate_gain("leaky_relu", math.sqrt(5)) == pytest.approx(math.sqrt(1 / 3))
    assert init.calculate_gain("selu") == 0.75
    with pytest.raises(ValueError):
        init.calculate_gain("swish")
    assert init._calculate_fan_in_and_fan_out(engine.empty(16, 8, 3, 3)) == (72, 144)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init._calculate_fan_in_and_fan_out(engine.empty(5))


def test_manual_seed_makes_init_reproducible():
    engine.manual_seed(7)
    a = nn.Sequential(nn.Linear(4, 4), nn.Embedding(3, 2))
    engine.manual_seed(7)
    b = nn.Sequential(nn.Linear(4, 4), nn.Embedding(3, 2))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())
    c = nn.Sequential(nn.Linear(4, 4), nn.Embedding(3, 2))
    assert not np.array_equal(a[0].weight.numpy(), c[0].weight.numpy())


# ---------------------------------------------------------------- clipping and vectors

def _with_grads(*grads):
    params = []
    for g in grads:
        p = nn.Parameter(engine.zeros(*np.shape(g)))
        p.grad = engine.tensor(np.asarray(g, dtype=np.float32))
        params.append(p)
    return params


def test_clip_grad_norm_scales_to_max_norm():
    params = _with_grads([3.0, 0.0], [[4.0], [0.0]], [0.0])  # joint 2-norm 5
    params.append(nn.Parameter(engine.ones(2)))  # no grad: skipped
    total = clip_grad_norm_(iter(params), max_norm=1.0)
    assert isinstance(total, engine.Tensor) and total.item() == pytest.approx(5.0)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(params[0].grad.numpy(), [3 * coef, 0], rtol=1e-6)
    np.testing.assert_allclose(params[1].grad.numpy(), [[4 * coef], [0]], rtol=1e-6)


def test_clip_grad_norm_leaves_small_gradients_and_supports_inf_and_p():
    params = _with_grads([0.3, -0.4])
    assert clip_grad_norm_(params, 1.0).item() == pytest.approx(0.5)
    np.testing.assert_array_equal(params[0].grad.numpy(), np.float32([0.3, -0.4]))
    params = _with_grads([1.0, -6.0], [2.0])
    assert clip_grad_norm_(params, 3.0, norm_type=float("inf")).item() == 6.0
    np.testing.assert_allclose(params[0].grad.numpy(), [0.5, -3.0], rtol=1e-6)
    params = _with_grads([1.0, -2.0], [3.0])
    assert clip_grad_norm_(params, 10.0, norm_type=1).item() == pytest.approx(6.0)
    assert clip_grad_norm_([], 1.0).item() == 0.0


def test_clip_grad_norm_nonfinite():
    params = _with_grads([np.inf, 1.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_clip_grad_value():
    params = _with_grads([-3.0, 0.5, 2.0])
    clip_grad_value_(params, 1.0)
    assert params[0].grad.tolist() == [-1.0, 0.5, 1.0]


def test_parameters_to_vector_and_back():
    m = nn.Linear(3, 2)
    vec = parameters_to_vector(m.parameters())
    np.testing.assert_array_equal(
        vec.numpy(), np.concatenate([m.weight.numpy().ravel(), m.bias.numpy()]))
    (vec * engine.arange(8, dtype=engine.float32)).sum().backward()  # differentiable
    np.testing.assert_array_equal(m.weight.grad.numpy(), np.arange(6).reshape(2, 3))
    array = m.weight.data
    vector_to_parameters(engine.arange(8, dtype=engine.float32), m.parameters())
    assert m.weight.data is array
    assert m.weight.tolist() == [[0, 1, 2], [3, 4, 5]] and m.bias.tolist() == [6, 7]
    with pytest.raises(ValueError):
        vector_to_parameters(engine.zeros(3), m.parameters())


# ---------------------------------------------------------------- repr

def test_parameter_repr_and_construction():
    p = nn.Parameter(engine.tensor([1.0, 2.0]))
    assert repr(p) == "Parameter containing:\ntensor([1., 2.], requires_grad=True)"
    assert repr(nn.Parameter(np.zeros(1, np.float32), requires_grad=False)) == (
        "Parameter containing:\ntensor([0.])")
    t = engine.ones(2)
    assert nn.Parameter(t).data is t.data and nn.Parameter(t).is_leaf
    with pytest.raises(TypeError):
        nn.Parameter([1.0, 2.0])


def test_nested_module_repr():
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.GELU(approximate="tanh"),
        nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Dropout(0.1)]),
        nn.ModuleDict({"norm": nn.LayerNorm(8)}), nn.Embedding(10, 3, padding_idx=0),
        nn.Softmax(dim=-1), nn.Flatten(), nn.CrossEntropyLoss())
    assert repr(model) == """Sequential(
  (0): Linear(in_features=784, out_features=1024, bias=True)
  (1): GELU(approximate='tanh')
  (2): ModuleList(
    (0-1): 2 x Linear(in_features=8, out_features=8, bias=True)
    (2): Dropout(p=0.1, inplace=False)
  )
  (3): ModuleDict(
    (norm): LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=True)
  )
  (4): Embedding(10, 3, padding_idx=0)
  (5): Softmax(dim=-1)
  (6): Flatten(start_dim=1, end_dim=-1)
  (7): CrossEntropyLoss()
)"""
    assert repr(nn.Linear(2, 3, bias=False)) == (
        "Linear(in_features=2, out_features=3, bias=False)")
    assert repr(nn.ModuleList()) == "ModuleList()"


# ---------------------------------------------------------------- against PyTorch, if present

def test_names_and_repr_agree_with_pytorch():
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    def build(lib):
        class TBlock(lib.Module):
            def __init__(self):
                super().__init__()
                self.encoder = lib.Sequential(lib.Linear(4, 8), lib.ReLU(), lib.Linear(8, 8))
                self.layers = lib.ModuleList([lib.Linear(8, 8), lib.LayerNorm(8)])
                self.heads = lib.ModuleDict({"cls": lib.Linear(8, 3)})
        return TBlock()

    ours, theirs = build(nn), build(tnn)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert repr(ours).replace("TBlock", "X") == repr(theirs).replace("TBlock", "X")


def test_clip_grad_norm_agrees_with_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (5,), (2, 2, 2))]
    for norm_type in (2.0, 1.0, 3.0, float("inf")):
        ours = _with_grads(*grads)
        theirs = [torch.zeros(g.shape, requires_grad=True) for g in grads]
        for t, g in zip(theirs, grads, strict=True):
            t.grad = torch.tensor(g)
        a = clip_grad_norm_(ours, 0.5, norm_type).item()
        b = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type).item()
        assert a == pytest.approx(b, rel=1e-5)
        for p, t in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=1e-5)
