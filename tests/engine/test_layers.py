"""engine.nn layers for real models: convolution, pooling, batch norm, attention, recurrence.

References are independent of the code under test: forwards written out in numpy in this file
(loops over windows, gate formulas step by step), hand-computed running statistics, hand-written
state-dict key lists (PyTorch's names), and finite differences (`engine.gradcheck`) for backprop
through time and attention. Where PyTorch is installed, tests also load the same weights into
PyTorch's layer and compare outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain import engine
from dptrain.engine import nn

F64 = engine.float64


@pytest.fixture(autouse=True)
def _seed():
    engine.manual_seed(0)


def _np(t: engine.Tensor) -> np.ndarray:
    return np.asarray(t.numpy())


def _rand(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _t(a, requires_grad: bool = False) -> engine.Tensor:
    return engine.tensor(np.asarray(a), dtype=F64 if np.asarray(a).dtype.kind == "f" else None,
                         requires_grad=requires_grad)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _params(m: nn.Module) -> dict[str, np.ndarray]:
    return {k: _np(v) for k, v in m.state_dict().items()}


def _to_torch(torch, module, state: dict) -> None:
    """Load our state dict into a PyTorch module (key for key) in float64."""
    module.double()
    module.load_state_dict({k: torch.from_numpy(_np(v).copy()) for k, v in state.items()})


# ================================================================ convolution and pooling

def _np_conv2d(x, w, b, stride, padding, dilation, groups):
    """Cross-correlation by explicit loops over output pixels: (N, C, H, W) * (O, C/g, kh, kw)."""
    (sh, sw), (dh, dw) = stride, dilation
    (pt, pb), (pl, pr) = padding
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((N, O, Ho, Wo))
    for o in range(O):
        g = o // (O // groups)
        for i in range(Ho):
            for j in range(Wo):
                patch = x[:, g * Cg:(g + 1) * Cg, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                          j * sw:j * sw + dw * (kw - 1) + 1:dw]
                out[:, o, i, j] = (patch * w[o]).sum(axis=(1, 2, 3)) + b[o]
    return out


def test_conv2d_matches_numpy_loops_with_every_option():
    m = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                  dtype=F64)
    x = _rand(2, 4, 7, 6)
    p = _params(m)
    expected = _np_conv2d(x, p["weight"], p["bias"], (2, 1), ((1, 1), (2, 2)), (1, 2), 2)
    np.testing.assert_allclose(_np(m(_t(x))), expected, rtol=1e-10, atol=1e-12)


def test_conv2d_same_padding_keeps_the_size_even_for_an_even_kernel():
    m = nn.Conv2d(2, 3, 4, padding="same", dtype=F64)
    x = _rand(1, 2, 5, 6)
    p = _params(m)
    # total padding 3 per dim: 1 before, 2 after (PyTorch puts the extra one at the end)
    expected = _np_conv2d(x, p["weight"], p["bias"], (1, 1), ((1, 2), (1, 2)), (1, 1), 1)
    out = m(_t(x))
    assert out.shape == (1, 3, 5, 6)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-12)


def test_conv1d_is_a_conv2d_over_one_row():
    m = nn.Conv1d(3, 4, 3, stride=2, padding=1, dtype=F64)
    x = _rand(2, 3, 9)
    p = _params(m)
    expected = _np_conv2d(x[:, :, None], p["weight"][:, :, None], p["bias"], (1, 2),
                          ((0, 0), (1, 1)), (1, 1), 1)[:, :, 0]
    np.testing.assert_allclose(_np(m(_t(x))), expected, rtol=1e-10, atol=1e-12)
    assert m(_t(x[0])).shape == (4, 5)  # unbatched


def test_conv2d_gradients_match_finite_differences():
    m = nn.Conv2d(2, 2, 3, stride=2, padding=1, dtype=F64)
    x = _t(_rand(2, 2, 5, 5), True)
    assert engine.gradcheck(lambda x, *ps: m(x), [x, *m.parameters()])


def test_conv_parameters_names_shapes_and_default_init():
    m = nn.Conv2d(6, 8, (3, 5), groups=2)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert m.weight.shape == (8, 3, 3, 5) and m.bias.shape == (8,)
    bound = 1 / math.sqrt(3 * 3 * 5)  # kaiming_uniform(a=sqrt(5)): 1 / sqrt(fan_in)
    assert np.abs(_np(m.weight)).max() <= bound and np.abs(_np(m.bias)).max() <= bound
    assert np.abs(_np(m.weight)).max() > 0.9 * bound
    assert list(nn.Conv1d(2, 2, 3, bias=False).state_dict()) == ["weight"]
    assert repr(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)) == (
        "Conv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)")


def _np_pool(x, k, s, p, reduce, pad_value):
    x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=pad_value)
    Ho, Wo = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
    out = np.empty(x.shape[:2] + (Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            out[:, :, i, j] = reduce(x[:, :, i * s:i * s + k, j * s:j * s + k], axis=(2, 3))
    return out


def test_pooling_layers_match_numpy():
    x = _rand(2, 3, 7, 6)
    np.testing.assert_allclose(_np(nn.MaxPool2d(3, 2, 1)(_t(x))),
                               _np_pool(x, 3, 2, 1, np.max, -np.inf), rtol=1e-12)
    np.testing.assert_allclose(_np(nn.AvgPool2d(2, padding=1)(_t(x))),
                               _np_pool(x, 2, 2, 1, np.mean, 0.0), rtol=1e-12)
    out = _np(nn.AdaptiveAvgPool2d((2, 3))(_t(x)))
    rows, cols = [(0, 4), (3, 7)], [(0, 2), (2, 4), (4, 6)]  # floor(i*n/o) .. ceil((i+1)*n/o)
    expected = np.array([[x[:, :, r0:r1, c0:c1].mean(axis=(2, 3)) for c0, c1 in cols]
                         for r0, r1 in rows]).transpose(2, 3, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(_np(nn.AdaptiveAvgPool2d(1)(_t(x)))[..., 0, 0],
                               x.mean(axis=(2, 3)), rtol=1e-12)


@pytest.mark.parametrize(("layer", "x", "match"), [
    (lambda: nn.Conv2d(3, 8, 3), engine.randn(8, 8), r"3-D .*or 4-D .*got a 2-D input"),
    (lambda: nn.Conv2d(3, 8, 3), engine.randn(2, 1, 8, 8),
     r"input of shape \(2, 1, 8, 8\) has 1 channels.* expects 3"),
    (lambda: nn.Conv2d(1, 8, 5, padding=1), engine.randn(2, 1, 2, 2),
     r"kernel size \(5, 5\) is larger than the padded input size \(4, 4\)"),
    (lambda: nn.Conv1d(2, 4, 3), engine.randn(2, 2, 5, 5), r"3-D .*got a 4-D input"),
    (lambda: nn.MaxPool2d(4), engine.randn(1, 1, 3, 3),
     r"kernel size \(4, 4\) is larger than the padded input size \(3, 3\)"),
    (lambda: nn.AvgPool2d(2), engine.randn(4, 4), r"3-D \(C, H, W\) or 4-D .*got a 2-D input"),
])
def test_conv_and_pool_bad_input_names_expected_and_got(layer, x, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        layer()(x)


def test_conv_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"in_channels \(3\) and out_channels \(8\) must both "
                       r"be divisible by groups \(2\)"):
        nn.Conv2d(3, 8, 3, groups=2)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1 or 2 such ints, got 0"):
        nn.Conv2d(3, 8, 0)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        nn.Conv2d(3, 8, 3, stride=2, padding="same")


def test_conv_and_pool_match_pytorch():
    torch = pytest.importorskip("torch")
    ours = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.MaxPool2d(2, 1),
                         nn.Conv2d(4, 4, (2, 3), groups=2, dilation=(2, 1)), nn.AvgPool2d(2),
                         nn.AdaptiveAvgPool2d((3, 2)))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                 torch.nn.MaxPool2d(2, 1),
                                 torch.nn.Conv2d(4, 4, (2, 3), groups=2, dilation=(2, 1)),
                                 torch.nn.AvgPool2d(2), torch.nn.AdaptiveAvgPool2d((3, 2)))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _to_torch(torch, theirs, ours.state_dict())
    ours.double()
    x = _rand(2, 3, 21, 19)
    xe, tx = _t(x, True), torch.from_numpy(x.copy()).requires_grad_()
    out, tout = ours(xe), theirs(tx)
    np.testing.assert_allclose(_np(out), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    (out * out).sum().backward()
    (tout * tout).sum().backward()
    np.testing.assert_allclose(_np(xe.grad), tx.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(_np(ours[2].weight.grad), theirs[2].weight.grad.numpy(),
                               rtol=1e-8, atol=1e-12)


# ================================================================ batch norm

def test_batch_norm_training_normalises_with_batch_statistics():
    bn = nn.BatchNorm2d(3, dtype=F64)
    with engine.no_grad():
        bn.weight.copy_(engine.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(engine.tensor([0.0, -1.0, 3.0]))
    x = _rand(4, 3, 2, 5)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)  # biased, for normalising
    expected = (x - mean) / np.sqrt(var + 1e-5) * np.array([1.0, 2.0, 0.5])[:, None, None] + \
        np.array([0.0, -1.0, 3.0])[:, None, None]
    np.testing.assert_allclose(_np(bn(_t(x))), expected, rtol=1e-10, atol=1e-12)


def test_batch_norm_running_statistics_by_hand():
    bn = nn.BatchNorm1d(2, momentum=0.1, dtype=F64)
    a = np.array([[1.0, 10.0], [3.0, 14.0]])
    b = np.array([[0.0, 2.0], [4.0, 2.0], [8.0, 5.0]])
    bn(_t(a))
    bn(_t(b))
    # running = 0.9 * running + 0.1 * batch, with the unbiased variance of the batch
    mean_a, mean_b = np.array([2.0, 12.0]), np.array([4.0, 3.0])
    var_a, var_b = np.array([2.0, 8.0]), np.array([16.0, 3.0])
    np.testing.assert_allclose(_np(bn.running_mean), 0.9 * 0.1 * mean_a + 0.1 * mean_b)
    np.testing.assert_allclose(_np(bn.running_var), 0.9 * (0.9 + 0.1 * var_a) + 0.1 * var_b)
    assert bn.num_batches_tracked.item() == 2 and bn.num_batches_tracked.dtype == np.int64
    bn.eval()
    x = np.array([[1.0, 1.0]])
    expected = (x - _np(bn.running_mean)) / np.sqrt(_np(bn.running_var) + 1e-5)
    np.testing.assert_allclose(_np(bn(_t(x))), expected, rtol=1e-12)
    assert bn.num_batches_tracked.item() == 2  # evaluation leaves the statistics alone


def test_batch_norm_cumulative_average_and_untracked_statistics():
    bn = nn.BatchNorm1d(1, momentum=None, dtype=F64)
    for batch in ([[1.0], [3.0]], [[5.0], [9.0]], [[0.0], [0.0]]):
        bn(_t(batch))
    np.testing.assert_allclose(_np(bn.running_mean), [(2.0 + 7.0 + 0.0) / 3])
    np.testing.assert_allclose(_np(bn.running_var), [(2.0 + 8.0 + 0.0) / 3])
    free = nn.BatchNorm2d(2, track_running_stats=False, affine=False)
    assert list(free.state_dict()) == [] and free.running_mean is None
    free.eval()
    x = engine.randn(3, 2, 2, 2) * 5 + 1
    out = _np(free(x))  # batch statistics even in evaluation
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)


def test_batch_norm_1d_over_sequences_and_its_gradient():
    bn = nn.BatchNorm1d(3, dtype=F64)
    x = _rand(4, 3, 5)
    expected = (x - x.mean(axis=(0, 2), keepdims=True)) / np.sqrt(
        x.var(axis=(0, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(_np(bn(_t(x))), expected, rtol=1e-10, atol=1e-12)
    with engine.no_grad():
        bn.weight.copy_(engine.tensor([0.5, 1.5, -1.0]))
    xt = _t(x[:3, :, :2], True)
    assert engine.gradcheck(lambda x, *ps: bn(x), [xt, *bn.parameters()])


def test_batch_norm_state_dict_names():
    assert list(nn.BatchNorm2d(4).state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert repr(nn.BatchNorm2d(4)) == (
        "BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)")


@pytest.mark.parametrize(("layer", "x", "match"), [
    (lambda: nn.BatchNorm2d(3), engine.randn(2, 3, 4), r"expected a 4-D input \(N, C, H, W\), "
     r"got a 3-D input of shape \(2, 3, 4\)"),
    (lambda: nn.BatchNorm1d(3), engine.randn(2, 3, 4, 4), r"2-D or 3-D input"),
    (lambda: nn.BatchNorm1d(3), engine.randn(8, 5), r"expected input with 3 channels "
     r"\(num_features\) in dim 1, got 5"),
    (lambda: nn.BatchNorm1d(3), engine.randn(1, 3), "more than 1 value per channel"),
])
def test_batch_norm_bad_input_names_expected_and_got(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer()(x)


def test_batch_norm_matches_pytorch_over_training_steps():
    torch = pytest.importorskip("torch")
    ours, theirs = nn.BatchNorm2d(3, momentum=0.2), torch.nn.BatchNorm2d(3, momentum=0.2)
    _to_torch(torch, theirs, ours.state_dict())
    ours.double()
    for seed in range(3):
        x = _rand(4, 3, 5, 5, seed=seed) * (seed + 1) + seed
        np.testing.assert_allclose(_np(ours(_t(x))), theirs(torch.from_numpy(x)).detach(),
                                   rtol=1e-10, atol=1e-12)
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(_np(ours.state_dict()[k]), v.numpy(), rtol=1e-12)
    ours.eval()
    theirs.eval()
    x = _rand(2, 3, 5, 5, seed=7)
    np.testing.assert_allclose(_np(ours(_t(x))), theirs(torch.from_numpy(x)).detach(),
                               rtol=1e-10, atol=1e-12)


# ================================================================ recurrent layers

def _np_cell(mode, x, state, w_ih, w_hh, b_ih, b_hh):
    """One step, written from the formulas in PyTorch's documentation."""
    H = w_hh.shape[1]
    if mode == "LSTM":
        h, c = state
        gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f = _sigmoid(gates[:, :H]), _sigmoid(gates[:, H:2 * H])
        g, o = np.tanh(gates[:, 2 * H:3 * H]), _sigmoid(gates[:, 3 * H:])
        c = f * c + i * g
        return o * np.tanh(c), c
    if mode == "GRU":
        gi, gh = x @ w_ih.T + b_ih, state @ w_hh.T + b_hh
        r = _sigmoid(gi[:, :H] + gh[:, :H])
        z = _sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        return (1 - z) * n + z * state
    pre = x @ w_ih.T + b_ih + state @ w_hh.T + b_hh
    return np.tanh(pre) if mode == "tanh" else np.maximum(pre, 0)


def _np_sequence(mode, p, x, layers, directions, h0=None, c0=None):
    """A multi-layer (bidirectional) sequence model over time-major x (L, N, in)."""
    L, N, _ = x.shape
    H = p["weight_hh_l0"].shape[1]
    hs, cs = [], []
    for layer in range(layers):
        outs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [p[k + sfx] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            k = layer * directions + d
            h = np.zeros((N, H)) if h0 is None else h0[k]
            state = (h, np.zeros((N, H)) if c0 is None else c0[k]) if mode == "LSTM" else h
            ys = [None] * L
            for t in (reversed(range(L)) if d else range(L)):
                state = _np_cell(mode, x[t], state, *w)
                ys[t] = state[0] if mode == "LSTM" else state
            outs.append(np.stack(ys))
            hs.append(state[0] if mode == "LSTM" else state)
            if mode == "LSTM":
                cs.append(state[1])
        x = np.concatenate(outs, -1)
    return x, np.stack(hs), (np.stack(cs) if mode == "LSTM" else None)


def _make(mode: str, *args, **kwargs) -> nn.Module:
    if mode in ("tanh", "relu"):
        return nn.RNN(*args, nonlinearity=mode, dtype=F64, **kwargs)
    return {"LSTM": nn.LSTM, "GRU": nn.GRU}[mode](*args, dtype=F64, **kwargs)


@pytest.mark.parametrize("mode", ["tanh", "relu", "LSTM", "GRU"])
def test_one_step_cell_matches_the_documented_formulas(mode):
    m = _make(mode, 3, 4)
    x, h0, c0 = _rand(1, 2, 3), _rand(1, 2, 4, seed=1), _rand(1, 2, 4, seed=2)
    p = _params(m)
    w = [p[k + "_l0"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if mode == "LSTM":
        out, (h, c) = m(_t(x), (_t(h0), _t(c0)))
        eh, ec = _np_cell(mode, x[0], (h0[0], c0[0]), *w)
        np.testing.assert_allclose(_np(c)[0], ec, rtol=1e-12)
    else:
        out, h = m(_t(x), _t(h0))
        eh = _np_cell(mode, x[0], h0[0], *w)
    np.testing.assert_allclose(_np(out)[0], eh, rtol=1e-12)
    np.testing.assert_allclose(_np(h)[0], eh, rtol=1e-12)


@pytest.mark.parametrize("mode", ["tanh", "LSTM", "GRU"])
def test_two_layer_bidirectional_sequence_matches_numpy(mode):
    m = _make(mode, 3, 4, num_layers=2, bidirectional=True)
    x = _rand(5, 2, 3)
    out, state = m(_t(x))
    ex, eh, ec = _np_sequence(mode, _params(m), x, layers=2, directions=2)
    assert out.shape == (5, 2, 8)
    np.testing.assert_allclose(_np(out), ex, rtol=1e-10, atol=1e-12)
    h = state[0] if mode == "LSTM" else state
    np.testing.assert_allclose(_np(h), eh, rtol=1e-10, atol=1e-12)
    if mode == "LSTM":
        np.testing.assert_allclose(_np(state[1]), ec, rtol=1e-10, atol=1e-12)


def test_lstm_initial_state_and_batch_first():
    m = _make("LSTM", 3, 4, num_layers=2, batch_first=True)
    x, h0, c0 = _rand(2, 5, 3), _rand(2, 2, 4, seed=1), _rand(2, 2, 4, seed=2)
    out, (h, c) = m(_t(x), (_t(h0), _t(c0)))
    ex, eh, ec = _np_sequence("LSTM", _params(m), x.transpose(1, 0, 2), 2, 1, h0, c0)
    np.testing.assert_allclose(_np(out), ex.transpose(1, 0, 2), rtol=1e-10)
    np.testing.assert_allclose(_np(h), eh, rtol=1e-10)
    np.testing.assert_allclose(_np(c), ec, rtol=1e-10)


def test_unbatched_input_is_a_batch_of_one():
    m = _make("GRU", 3, 4, num_layers=2)
    x, h0 = _rand(5, 3), _rand(2, 4, seed=1)
    out, h = m(_t(x), _t(h0))
    bout, bh = m(_t(x[:, None]), _t(h0[:, None]))
    assert out.shape == (5, 4) and h.shape == (2, 4)
    np.testing.assert_allclose(_np(out), _np(bout)[:, 0], rtol=1e-12)
    np.testing.assert_allclose(_np(h), _np(bh)[:, 0], rtol=1e-12)


@pytest.mark.parametrize("mode", ["tanh", "LSTM", "GRU"])
def test_backprop_through_time_matches_finite_differences(mode):
    # two layers (LSTM, RNN) or one bidirectional layer (GRU): every path between steps
    gru = mode == "GRU"
    m = _make(mode, 2, 3, num_layers=1 if gru else 2, bidirectional=gru)
    x, h0 = _t(_rand(4, 2, 2) * 0.5, True), _t(_rand(2, 2, 3, seed=1) * 0.5, True)
    params = list(m.parameters())
    if mode == "LSTM":
        c0 = _t(_rand(2, 2, 3, seed=2) * 0.5, True)
        assert engine.gradcheck(lambda x, h, c, *ps: m(x, (h, c))[0], [x, h0, c0, *params])
        assert engine.gradcheck(lambda x, h, c, *ps: m(x, (h, c))[1][1], [x, h0, c0, *params])
    else:
        assert engine.gradcheck(lambda x, h, *ps: m(x, h)[0], [x, h0, *params])


def test_weights_shared_over_time_accumulate_every_step():
    """The gradient of a weight used at every step is the sum over steps: with W_hh zero and
    a linear loss, d(sum h_t)/d(b_ih) of a relu RNN over L steps of positive input is L."""
    m = _make("relu", 1, 1)
    with engine.no_grad():
        m.weight_ih_l0.fill_(1.0)
        m.weight_hh_l0.fill_(0.0)
        m.bias_ih_l0.fill_(0.0)
        m.bias_hh_l0.fill_(0.0)
    out, _ = m(_t(np.ones((7, 1, 1))))
    out.sum().backward()
    assert m.bias_ih_l0.grad.tolist() == [7.0]
    assert m.weight_ih_l0.grad.tolist() == [[7.0]]


def test_recurrent_state_dict_has_pytorch_names_and_shapes():
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    expected = []
    for layer in range(2):
        for sfx in ("", "_reverse"):
            expected += [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}",
                         f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"]
    sd = m.state_dict()
    assert list(sd) == expected
    assert sd["weight_ih_l0"].shape == (16, 3) and sd["weight_ih_l1"].shape == (16, 8)
    assert sd["weight_hh_l1_reverse"].shape == (16, 4) and sd["bias_ih_l0"].shape == (16,)
    assert list(nn.GRU(3, 5, bias=False).state_dict()) == ["weight_ih_l0", "weight_hh_l0"]
    assert nn.GRU(3, 5).weight_ih_l0.shape == (15, 3)
    assert list(nn.LSTMCell(3, 4).state_dict()) == ["weight_ih", "weight_hh", "bias_ih",
                                                    "bias_hh"]


def test_recurrent_init_is_uniform_within_one_over_sqrt_hidden():
    m = nn.LSTM(50, 64)
    bound = 1 / math.sqrt(64)
    w = _np(m.weight_hh_l0)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.mean()) < 0.01 and abs(w.var() - bound ** 2 / 3) < 0.1 * bound ** 2 / 3


def test_cells_step_like_one_layer_of_the_sequence_model():
    for mode, cell_cls in (("LSTM", nn.LSTMCell), ("GRU", nn.GRUCell), ("tanh", nn.RNNCell)):
        cell = cell_cls(3, 4, dtype=F64)
        x, h = _rand(2, 3), _rand(2, 4, seed=1)
        p = {k: _np(v) for k, v in cell.state_dict().items()}
        w = [p[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if mode == "LSTM":
            c = _rand(2, 4, seed=2)
            got = cell(_t(x), (_t(h), _t(c)))
            expected = _np_cell(mode, x, (h, c), *w)
            for g, e in zip(got, expected):
                np.testing.assert_allclose(_np(g), e, rtol=1e-12)
        else:
            np.testing.assert_allclose(_np(cell(_t(x), _t(h))), _np_cell(mode, x, h, *w),
                                       rtol=1e-12)


def test_dropout_between_layers_only_in_training():
    m = _make("LSTM", 3, 4, num_layers=2, dropout=0.5)
    x = _t(_rand(6, 2, 3))
    m.eval()
    a, b = m(x)[0], m(x)[0]
    np.testing.assert_array_equal(_np(a), _np(b))
    ex, _, _ = _np_sequence("LSTM", _params(m), _np(x), 2, 1)
    np.testing.assert_allclose(_np(a), ex, rtol=1e-10)
    m.train()
    assert not np.allclose(_np(m(x)[0]), ex)
    with pytest.warns(UserWarning, match="num_layers=1"):
        nn.LSTM(3, 4, dropout=0.2)


@pytest.mark.parametrize(("make", "call", "match"), [
    (lambda: nn.LSTM(3, 4), lambda m: m(engine.randn(2, 3, 4, 3)), r"3 dims .*got 4 dims"),
    (lambda: nn.GRU(3, 4), lambda m: m(engine.randn(5, 2, 7)),
     r"input_size = 3, got input of shape \(5, 2, 7\)"),
    (lambda: nn.RNN(3, 4, num_layers=2), lambda m: m(engine.randn(5, 2, 3), engine.zeros(1, 2, 4)),
     r"expected hx of shape \(2, 2, 4\), got \(1, 2, 4\)"),
    (lambda: nn.LSTM(3, 4), lambda m: m(engine.randn(5, 2, 3), engine.zeros(1, 2, 4)),
     r"pair \(h_0, c_0\)"),
    (lambda: nn.LSTM(3, 4), lambda m: m(engine.randn(0, 2, 3)), "empty"),
    (lambda: nn.LSTMCell(3, 4), lambda m: m(engine.randn(2, 5)), r"\(N, 3\).*got \(2, 5\)"),
])
def test_recurrent_bad_input_names_expected_and_got(make, call, match):
    m = make()
    with pytest.raises((ValueError, TypeError), match=match):
        call(m)


def test_recurrent_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer, got 0"):
        nn.LSTM(3, 0)
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        nn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\], got 1.5"):
        nn.GRU(3, 4, num_layers=2, dropout=1.5)


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_recurrent_matches_pytorch_after_loading_the_same_weights(name):
    torch = pytest.importorskip("torch")
    kwargs = dict(num_layers=2, batch_first=True, bidirectional=True)
    ours, theirs = getattr(nn, name)(3, 4, **kwargs), getattr(torch.nn, name)(3, 4, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _to_torch(torch, theirs, ours.state_dict())
    ours.double()
    x = _rand(2, 5, 3)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    xe = _t(x, True)
    out, state = ours(xe)
    tout, tstate = theirs(tx)
    np.testing.assert_allclose(_np(out), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    h, th = (state[0], tstate[0]) if name == "LSTM" else (state, tstate)
    np.testing.assert_allclose(_np(h), th.detach().numpy(), rtol=1e-10, atol=1e-12)
    (out * out).sum().backward()
    (tout * tout).sum().backward()
    np.testing.assert_allclose(_np(xe.grad), tx.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(_np(ours.weight_hh_l1_reverse.grad),
                               theirs.weight_hh_l1_reverse.grad.numpy(), rtol=1e-8, atol=1e-12)


# ================================================================ attention

def _np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_mha(p, q_in, k_in, v_in, heads, mask=None, prefix=""):
    """Multi-head attention on batch-first arrays, written from the paper's formulas."""
    W, b = p[prefix + "in_proj_weight"], p[prefix + "in_proj_bias"]
    N, L, E = q_in.shape
    hd = E // heads
    q, k, v = (x @ W[i * E:(i + 1) * E].T + b[i * E:(i + 1) * E]
               for i, x in enumerate((q_in, k_in, v_in)))

    def heads_of(x):
        return x.reshape(N, -1, heads, hd).transpose(0, 2, 1, 3)

    scores = heads_of(q) @ heads_of(k).transpose(0, 1, 3, 2) / math.sqrt(hd)
    if mask is not None:
        scores = scores + mask
    w = _np_softmax(scores)
    out = (w @ heads_of(v)).transpose(0, 2, 1, 3).reshape(N, L, E)
    return out @ p[prefix + "out_proj.weight"].T + p[prefix + "out_proj.bias"], w


def _mha(embed=8, heads=2, **kwargs) -> nn.MultiheadAttention:
    m = nn.MultiheadAttention(embed, heads, dtype=F64, **kwargs)
    with engine.no_grad():  # non-zero biases, so that a wrong bias slice shows
        m.in_proj_bias.copy_(engine.tensor(_rand(3 * embed, seed=9) * 0.1))
        m.out_proj.bias.copy_(engine.tensor(_rand(embed, seed=8) * 0.1))
    return m


def test_self_attention_matches_numpy_with_weights_per_head_and_averaged():
    m = _mha(batch_first=True)
    x = _rand(2, 5, 8)
    out, w = m(_t(x), _t(x), _t(x))
    eo, ew = _np_mha(_params(m), x, x, x, 2)
    np.testing.assert_allclose(_np(out), eo, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(w), ew.mean(1), rtol=1e-10, atol=1e-12)
    _, w = m(_t(x), _t(x), _t(x), average_attn_weights=False)
    np.testing.assert_allclose(_np(w), ew, rtol=1e-10, atol=1e-12)
    out, w = m(_t(x), _t(x), _t(x), need_weights=False)
    assert w is None
    np.testing.assert_allclose(_np(out), eo, rtol=1e-10, atol=1e-12)


def test_cross_attention_sequence_first_and_unbatched():
    m = _mha()
    q, kv = _rand(4, 2, 8), _rand(6, 2, 8, seed=1)  # (L, N, E) and (S, N, E)
    out, w = m(_t(q), _t(kv), _t(kv))
    eo, ew = _np_mha(_params(m), q.transpose(1, 0, 2), kv.transpose(1, 0, 2),
                     kv.transpose(1, 0, 2), 2)
    assert out.shape == (4, 2, 8) and w.shape == (2, 4, 6)
    np.testing.assert_allclose(_np(out), eo.transpose(1, 0, 2), rtol=1e-10, atol=1e-12)
    out1, w1 = m(_t(q[:, 0]), _t(kv[:, 0]), _t(kv[:, 0]))
    assert out1.shape == (4, 8) and w1.shape == (4, 6)
    np.testing.assert_allclose(_np(out1), eo[0], rtol=1e-10, atol=1e-12)


def test_masks_bool_float_padding_and_causal():
    m = _mha(batch_first=True)
    x = _rand(2, 5, 8)
    p = _params(m)
    causal = np.triu(np.ones((5, 5), bool), 1)
    pad = np.zeros((2, 5), bool)
    pad[1, 3:] = True
    additive = np.where(causal, -np.inf, 0.0)[None, None] + np.where(pad, -np.inf, 0.0)[
        :, None, None]
    eo, ew = _np_mha(p, x, x, x, 2, additive)
    for kwargs in ({"attn_mask": _t(causal), "key_padding_mask": _t(pad)},
                   {"attn_mask": _t(np.where(causal, -np.inf, 0.0)), "key_padding_mask": _t(pad)},
                   {"is_causal": True, "key_padding_mask": _t(pad)}):
        for need_weights in (True, False):
            out, _ = m(_t(x), _t(x), _t(x), need_weights=need_weights, **kwargs)
            np.testing.assert_allclose(_np(out), eo, rtol=1e-10, atol=1e-12)
    # a per-head float mask of shape (N * heads, L, S)
    per_head = _rand(4, 5, 5, seed=3)
    out, _ = m(_t(x), _t(x), _t(x), attn_mask=_t(per_head))
    np.testing.assert_allclose(_np(out), _np_mha(p, x, x, x, 2, per_head.reshape(2, 2, 5, 5))[0],
                               rtol=1e-10, atol=1e-12)


def test_causal_attention_output_ignores_later_positions():
    m = _mha(batch_first=True)
    x = _rand(1, 6, 8)
    y = x.copy()
    y[:, 4:] += 5.0
    a = _np(m(_t(x), _t(x), _t(x), is_causal=True, need_weights=False)[0])
    b = _np(m(_t(y), _t(y), _t(y), is_causal=True, need_weights=False)[0])
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-12)
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_attention_gradients_match_finite_differences():
    m = _mha(4, 2, batch_first=True)
    x, kv = _t(_rand(2, 3, 4), True), _t(_rand(2, 2, 4, seed=1), True)
    params = list(m.parameters())
    pad = _t(np.array([[False, False], [False, True]]))
    assert engine.gradcheck(lambda x, *ps: m(x, x, x, is_causal=True)[0], [x, *params])
    assert engine.gradcheck(lambda x, kv, *ps: m(x, kv, kv, key_padding_mask=pad,
                                                need_weights=False)[0], [x, kv, *params])


def test_attention_dropout_only_in_training():
    m = _mha(batch_first=True, dropout=0.5)
    x = _t(_rand(2, 5, 8))
    m.eval()
    a, b = m(x, x, x, average_attn_weights=False)[1], m(x, x, x)[1]
    np.testing.assert_array_equal(_np(a).mean(1), _np(b))
    m.train()
    w = _np(m(x, x, x, average_attn_weights=False)[1])
    kept = w != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(w[kept], 2 * _np(a)[kept], rtol=1e-12)  # scaled by 1 / (1 - p)


def test_attention_state_dict_keys_and_init():
    m = nn.MultiheadAttention(16, 4)
    assert list(m.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                    "out_proj.bias"]
    assert m.in_proj_weight.shape == (48, 16) and m.out_proj.weight.shape == (16, 16)
    bound = math.sqrt(6 / (48 + 16))  # Xavier uniform over the (3E, E) matrix
    assert np.abs(_np(m.in_proj_weight)).max() <= bound
    assert not _np(m.in_proj_bias).any() and not _np(m.out_proj.bias).any()
    assert list(nn.MultiheadAttention(16, 4, bias=False).state_dict()) == [
        "in_proj_weight", "out_proj.weight"]


def _np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_matches_numpy(norm_first):
    m = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                   norm_first=norm_first, dtype=F64)
    assert list(m.state_dict()) == [
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
        "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
        "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
    with engine.no_grad():
        for name in ("norm1", "norm2"):
            getattr(m, name).weight.copy_(engine.tensor(1 + 0.1 * _rand(8, seed=4)))
            getattr(m, name).bias.copy_(engine.tensor(0.1 * _rand(8, seed=5)))
    p = _params(m)
    x = _rand(2, 5, 8)

    def sa(h):
        return _np_mha(p, h, h, h, 2, prefix="self_attn.")[0]

    def ff(h):
        return np.maximum(h @ p["linear1.weight"].T + p["linear1.bias"], 0) @ \
            p["linear2.weight"].T + p["linear2.bias"]

    def ln(h, i):
        return _np_layer_norm(h, p[f"norm{i}.weight"], p[f"norm{i}.bias"])

    if norm_first:
        h = x + sa(ln(x, 1))
        expected = h + ff(ln(h, 2))
    else:
        h = ln(x + sa(x), 1)
        expected = ln(h + ff(h), 2)
    np.testing.assert_allclose(_np(m(_t(x))), expected, rtol=1e-10, atol=1e-12)


def test_transformer_encoder_stacks_independent_copies():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8))
    keys = list(enc.state_dict())
    assert keys[0] == "layers.0.self_attn.in_proj_weight" and keys[-1] == "norm.bias"
    assert len(keys) == 2 * 12 + 2
    assert enc.layers[0].linear1.weight is not enc.layers[1].linear1.weight
    x = engine.randn(5, 2, 8)
    np.testing.assert_allclose(_np(enc(x)), _np(enc.norm(enc.layers[1](enc.layers[0](x)))),
                               rtol=1e-6)


@pytest.mark.parametrize(("call", "match"), [
    (lambda m, x: m(x, x, x, attn_mask=engine.zeros(4, 4, dtype=engine.bool)),
     r"attn_mask of shape \(4, 4\).*expected \(L, S\) = \(5, 5\) or \(N \* num_heads, L, S\) "
     r"= \(4, 5, 5\)"),
    (lambda m, x: m(x, x, x, key_padding_mask=engine.zeros(5, 2, dtype=engine.bool)),
     r"key_padding_mask of shape \(5, 2\).*expected \(N, S\) = \(2, 5\)"),
    (lambda m, x: m(x[..., :6], x[..., :6], x[..., :6]),
     r"8 features \(embed_dim\).*got shape \(2, 5, 6\)"),
    (lambda m, x: m(x[0, 0], x[0, 0], x[0, 0]), r"3 dims .*got shape \(8,\)"),
    (lambda m, x: m(x, x[:, :3], x), "key and value must have the same shape"),
    (lambda m, x: m(x, x, x, attn_mask=engine.zeros(5, 5, dtype=engine.int64)),
     "bool or float"),
])
def test_attention_bad_input_names_expected_and_got(call, match):
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises((ValueError, TypeError), match=match):
        call(m, engine.randn(2, 5, 8))


def test_attention_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(4\)"):
        nn.MultiheadAttention(10, 4)
    with pytest.raises(ValueError, match="activation must be 'relu', 'gelu' or a callable"):
        nn.TransformerEncoderLayer(8, 2, activation="swish")


def _graph_ops(t: engine.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen or not hasattr(n, "parents"):
            continue
        seen.add(id(n))
        names.add(n.name())
        stack.extend(n.parents)
    return names


def test_encoder_layer_gradients_match_pytorch_with_the_folded_feed_forward():
    """The GELU feed-forward runs as one op (`gelu_linear`: keeps the hidden activation once);
    the layer's gradients, input and every parameter, against PyTorch's in float64."""
    torch = pytest.importorskip("torch")
    ours = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True, dtype=F64)
    theirs = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu",
                                              batch_first=True, norm_first=True)
    _to_torch(torch, theirs, ours.state_dict())
    x, g = _rand(2, 5, 8), _rand(2, 5, 8, seed=7)
    xt = _t(x, requires_grad=True)
    out = ours(xt, is_causal=True)
    assert "GeluLinearBackward" in _graph_ops(out) and "GeluBackward" not in _graph_ops(out)
    (out * _t(g)).sum().backward()
    tx = torch.from_numpy(x).requires_grad_()
    tout = theirs(tx, src_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1),
                  is_causal=True)
    (tout * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(_np(out), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(xt.grad), tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    theirs_p = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(_np(p.grad), theirs_p[name].grad.numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=name)


def test_encoder_layer_keeps_separate_ops_where_folding_would_skip_something():
    # Dropout active in training, or a hook on linear2, must see the separate ops run.
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, activation="gelu",
                                       batch_first=True, dtype=F64)
    x = _t(_rand(2, 5, 8), requires_grad=True)
    assert "GeluBackward" in _graph_ops(layer(x))
    layer.eval()
    assert "GeluLinearBackward" in _graph_ops(layer(x))
    seen = []
    layer.linear2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert "GeluBackward" in _graph_ops(layer(x)) and seen == [(2, 5, 8)]


def test_attention_and_encoder_layer_match_pytorch():
    torch = pytest.importorskip("torch")
    ours = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True)
    theirs = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu",
                                              batch_first=True, norm_first=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _to_torch(torch, theirs, ours.state_dict())
    ours.double()
    x = _rand(2, 5, 8)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    pad = np.zeros((2, 5), bool)
    pad[0, 4] = True
    out = ours(_t(x), src_key_padding_mask=_t(pad), is_causal=True)
    tout = theirs(torch.from_numpy(x), src_mask=mask, src_key_padding_mask=torch.from_numpy(pad),
                  is_causal=True)
    np.testing.assert_allclose(_np(out), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    mha, tmha = ours.self_attn, theirs.self_attn
    q, kv = _rand(2, 3, 8), _rand(2, 4, 8, seed=1)
    o, w = mha(_t(q), _t(kv), _t(kv), average_attn_weights=False)
    to, tw = tmha(*(torch.from_numpy(a) for a in (q, kv, kv)), average_attn_weights=False)
    np.testing.assert_allclose(_np(o), to.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(w), tw.detach().numpy(), rtol=1e-10, atol=1e-12)
