"""Optimizers and LR schedulers against hand-computed values and independent numpy formulas."""

import copy
import math

import numpy as np
import pytest

import dptrain.engine.optim.optimizer as optimizer_module
from dptrain.engine.optim import SGD, Adam, AdamW, Optimizer
from dptrain.engine.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, StepLR
from dptrain.engine.tensor import Tensor, is_grad_enabled, no_grad


def param(values, dtype=np.float64):
    return Tensor(np.array(values, dtype=dtype), requires_grad=True)


def set_grad(p, values):
    p.grad = Tensor(np.array(values, dtype=p.data.dtype))


def run(opt, params, grads_per_step):
    """Step `opt` once per entry of `grads_per_step` (one gradient per param); return the
    parameter values after every step."""
    history = []
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            set_grad(p, g)
        opt.step()
        history.append([p.data.copy() for p in params])
    return history


# ---------------------------------------------------------------- independent references

def reference_sgd(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False):
    p, buf, out = np.array(p, dtype=np.float64), None, []
    for g in np.asarray(grads, dtype=np.float64):
        g = -g if maximize else g
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
        out.append(p)
    return out


def reference_adam(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   amsgrad=False, maximize=False, decoupled=False):
    p = np.array(p, dtype=np.float64)
    m, v, vmax, out = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p), []
    b1, b2 = betas
    for t, g in enumerate(np.asarray(grads, dtype=np.float64), start=1):
        g = -g if maximize else g
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        m_hat = m / (1 - b1 ** t)
        v_hat = (vmax if amsgrad else v) / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


P0 = [1.0, -2.0, 0.5]
GRADS = [[0.3, -1.0, 2.0], [-0.5, 0.25, 1.5], [1.0, 1.0, -3.0]]


# ---------------------------------------------------------------- SGD

def test_sgd_hand_computed_momentum_with_dampening():
    # p0 = 1, grads 1, 2, 3, lr 0.1, momentum 0.9, dampening 0.5:
    # buf 1 -> p 0.9; buf 0.9*1 + 0.5*2 = 1.9 -> p 0.71; buf 0.9*1.9 + 0.5*3 = 3.21 -> p 0.389
    p = param([1.0])
    opt = SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    history = run(opt, [p], [[[1.0]], [[2.0]], [[3.0]]])
    np.testing.assert_allclose([h[0][0] for h in history], [0.9, 0.71, 0.389], rtol=1e-14)
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"].data, [3.21], rtol=1e-14)


def test_sgd_hand_computed_nesterov_with_weight_decay():
    # step 1: g = 1 + 0.1*1 = 1.1, buf 1.1, g = 1.1 + 0.5*1.1 = 1.65, p = 1 - 0.165 = 0.835
    # step 2: g = 1 + 0.0835 = 1.0835, buf = 0.55 + 1.0835 = 1.6335,
    #         g = 1.0835 + 0.81675 = 1.90025, p = 0.835 - 0.190025 = 0.644975
    p = param([1.0])
    history = run(SGD([p], lr=0.1, momentum=0.5, weight_decay=0.1, nesterov=True), [p],
                  [[[1.0]], [[1.0]]])
    np.testing.assert_allclose([h[0][0] for h in history], [0.835, 0.644975], rtol=1e-14)


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.8, dampening=0.3),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.2),
    dict(lr=0.1, momentum=0.7, weight_decay=0.2, maximize=True),
    dict(lr=0.1, momentum=0.6, nesterov=True, weight_decay=0.05, maximize=True),
])
def test_sgd_matches_reference(kwargs):
    p = param(P0)
    history = run(SGD([p], **kwargs), [p], [[g] for g in GRADS])
    expected = reference_sgd(P0, GRADS, **kwargs)
    for got, want in zip(history, expected, strict=True):
        np.testing.assert_allclose(got[0], want, rtol=1e-13, atol=1e-15)


def test_sgd_maximize_ascends():
    p = param([1.0])
    run(SGD([p], lr=0.5, maximize=True), [p], [[[2.0]]])
    assert p.data[0] == 2.0


# ---------------------------------------------------------------- Adam and AdamW

def test_adam_first_step_moves_by_lr_times_sign():
    # After one step m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps).
    p = param([1.0, 2.0, -3.0])
    run(Adam([p], lr=0.1, eps=0.0), [p], [[[0.5, -4.0, 1e-3]]])
    np.testing.assert_allclose(p.data, [0.9, 2.1, -3.1], rtol=1e-14)


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1),
    dict(lr=0.01, betas=(0.5, 0.9), eps=1e-6),
    dict(lr=0.01, betas=(0.3, 0.8)),  # beta1 < 0.5: torch's other lerp form
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.1, amsgrad=True),
    dict(lr=0.1, maximize=True, weight_decay=0.1),
    dict(lr=0.1, amsgrad=True, maximize=True, weight_decay=0.3),
])
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_matches_reference(cls, kwargs):
    p = param(P0)
    history = run(cls([p], **kwargs), [p], [[g] for g in GRADS])
    expected = reference_adam(P0, GRADS, decoupled=cls is AdamW,
                              **{"weight_decay": 1e-2 if cls is AdamW else 0.0, **kwargs})
    for got, want in zip(history, expected, strict=True):
        np.testing.assert_allclose(got[0], want, rtol=1e-12, atol=1e-15)


def test_amsgrad_uses_the_largest_second_moment():
    # A large first gradient then small ones: AMSGrad keeps the large v, so it moves less.
    grads = [[[3.0]], [[0.1]], [[0.1]]]
    plain, ams = param([0.0]), param([0.0])
    run(Adam([plain], lr=0.1, betas=(0.9, 0.5)), [plain], grads)
    run(Adam([ams], lr=0.1, betas=(0.9, 0.5), amsgrad=True), [ams], grads)
    want = reference_adam([0.0], [g[0] for g in grads], lr=0.1, betas=(0.9, 0.5),
                          amsgrad=True)[-1]
    np.testing.assert_allclose(ams.data, want, rtol=1e-12)
    assert abs(ams.data[0]) < abs(plain.data[0])


def test_adamw_decays_weights_directly():
    # A zero gradient leaves m = v = 0: only the decoupled decay moves the weight.
    p = param([2.0])
    run(AdamW([p], lr=0.1, weight_decay=0.5), [p], [[[0.0]], [[0.0]]])
    np.testing.assert_allclose(p.data, [2.0 * 0.95 * 0.95], rtol=1e-14)
    assert AdamW([param([1.0])]).defaults["weight_decay"] == 1e-2


def test_adam_step_is_counted_per_parameter():
    a, b = param([1.0]), param([1.0])
    opt = Adam([a, b], lr=0.1, eps=0.0)
    set_grad(a, [1.0])
    opt.step()
    set_grad(b, [1.0])
    opt.step()  # a's second step, b's first: b gets a first-step (bias corrected) update
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1
    np.testing.assert_allclose(b.data, [0.9], rtol=1e-12)


# ---------------------------------------------------------------- common behaviour

@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda ps: Adam(ps, lr=0.1, amsgrad=True, weight_decay=0.01),
    lambda ps: AdamW(ps, lr=0.1, maximize=True),
], ids=["sgd", "adam", "adamw"])
def test_float32_stays_float32_and_is_accurate(make):
    p = param(P0, dtype=np.float32)
    ref = param(P0, dtype=np.float64)
    opt = make([p])
    h32 = run(opt, [p], [[g] for g in GRADS])
    h64 = run(make([ref]), [ref], [[g] for g in GRADS])
    assert p.data.dtype == np.float32
    states = [v for v in opt.state[p].values() if isinstance(v, Tensor)]
    assert states and all(v.data.dtype == np.float32 for v in states)
    np.testing.assert_allclose(h32[-1][0], h64[-1][0], rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    lambda ps: SGD(ps, lr=0.1),
    lambda ps: Adam(ps, lr=0.1, amsgrad=True, weight_decay=0.01),
    lambda ps: AdamW(ps, lr=0.1),
], ids=["sgd-momentum", "sgd", "adam", "adamw"])
def test_blockwise_update_is_bit_identical(monkeypatch, make):
    rng = np.random.default_rng(0)
    start = rng.standard_normal((5, 7)).astype(np.float32)
    grads = [[rng.standard_normal((5, 7)).astype(np.float32)] for _ in range(3)]
    whole = param(start, np.float32)
    run(make([whole]), [whole], grads)
    monkeypatch.setattr(optimizer_module, "BLOCK", 4)  # 35 elements: 8 full blocks and a tail
    blocked = param(start, np.float32)
    run(make([blocked]), [blocked], grads)
    assert np.array_equal(whole.data, blocked.data)


def test_non_contiguous_parameter_is_updated(monkeypatch):
    monkeypatch.setattr(optimizer_module, "BLOCK", 2)
    base = np.arange(12.0).reshape(3, 4)
    p = Tensor(base.T, requires_grad=True)  # a transposed view: not C-contiguous
    run(Adam([p], lr=0.1, eps=0.0), [p], [[np.ones((4, 3))]])
    np.testing.assert_allclose(base, np.arange(12.0).reshape(3, 4) - 0.1, rtol=1e-12)


def test_parameters_without_grad_are_skipped():
    a, b = param([1.0]), param([1.0])
    for opt in (SGD([a, b], lr=0.1, momentum=0.9), Adam([a, b], lr=0.1)):
        set_grad(a, [1.0])
        opt.step()
        assert b.data[0] == 1.0 and b not in opt.state


def test_step_bumps_the_version_counter():
    p = param([1.0])
    set_grad(p, [1.0])
    before = p._version[0]
    SGD([p], lr=0.1).step()
    assert p._version[0] == before + 1


def test_param_groups_with_their_own_options():
    a, b = param([1.0]), param([1.0])
    opt = SGD([{"params": [a]}, {"params": b, "lr": 0.5, "momentum": 0.9}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert opt.param_groups[0]["momentum"] == 0.0 and opt.param_groups[1]["params"] == [b]
    run(opt, [a, b], [[[1.0], [1.0]], [[1.0], [1.0]]])
    np.testing.assert_allclose(a.data, [0.8], rtol=1e-14)
    np.testing.assert_allclose(b.data, [1.0 - 0.5 - 0.5 * 1.9], rtol=1e-14)


def test_add_param_group_and_duplicate_parameters():
    a, b = param([1.0]), param([2.0])
    opt = Adam([a], lr=0.1)
    opt.add_param_group({"params": [b], "betas": (0.5, 0.6)})
    assert opt.param_groups[1]["betas"] == (0.5, 0.6) and opt.param_groups[1]["lr"] == 0.1
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="twice"):
        SGD([a, a])
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        opt.add_param_group({"params": [param([0.0])], "lr": -1})


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    p, q = param([1.0, 2.0]), param([3.0])
    set_grad(p, [5.0, 6.0])
    grad = p.grad
    version = grad._version[0]
    SGD([p, q]).zero_grad(set_to_none=set_to_none)
    assert q.grad is None
    if set_to_none:
        assert p.grad is None
    else:
        assert p.grad is grad and p.grad.data.tolist() == [0.0, 0.0]
        assert grad._version[0] == version + 1


def test_step_runs_the_closure_with_grad_enabled():
    p = param([1.0])
    opt = SGD([p], lr=0.1)
    seen = []

    def closure():
        seen.append(is_grad_enabled())
        set_grad(p, [2.0])
        return 42.0

    with no_grad():
        assert opt.step(closure) == 42.0
    assert seen == [True] and p.data[0] == pytest.approx(0.8)
    assert opt.step() is None


@pytest.mark.parametrize("cls, kwargs, error, message", [
    (SGD, dict(lr=-0.1), ValueError, r"lr must be >= 0, got -0\.1"),
    (SGD, dict(lr=float("nan")), ValueError, r"lr must be >= 0, got nan"),
    (SGD, dict(lr="0.1"), TypeError, r"lr must be a real number, got '0\.1'"),
    (SGD, dict(momentum=-0.5), ValueError, r"momentum must be >= 0, got -0\.5"),
    (SGD, dict(weight_decay=-1e-4), ValueError, r"weight_decay must be >= 0, got -0\.0001"),
    (SGD, dict(nesterov=True), ValueError, r"nesterov requires momentum > 0 and dampening = 0"),
    (SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
     r"nesterov requires .* dampening=0\.1"),
    (Adam, dict(lr=-1.0), ValueError, r"lr must be >= 0, got -1\.0"),
    (Adam, dict(eps=-1e-8), ValueError, r"eps must be >= 0, got -1e-08"),
    (Adam, dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\), got 1\.0"),
    (Adam, dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\), got -0\.1"),
    (Adam, dict(betas=0.9), ValueError, r"betas must be a pair"),
    (AdamW, dict(weight_decay=-0.01), ValueError, r"weight_decay must be >= 0, got -0\.01"),
])
def test_bad_hyperparameters_name_the_argument(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls([param([1.0])], **kwargs)


def test_bad_params():
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([])
    with pytest.raises(TypeError, match="got a Tensor"):
        SGD(param([1.0]))
    with pytest.raises(TypeError, match="not a set"):
        SGD({param([1.0])})
    with pytest.raises(TypeError, match=r"params\[1\] is a list"):
        SGD([param([1.0]), [1.0]])
    with pytest.raises(TypeError, match="floating point"):
        SGD([Tensor(np.array([1, 2]))])


# ---------------------------------------------------------------- state_dict

def make_two_group_adam(values=None):
    values = values or ([1.0, -2.0], [[0.5]])
    a, b = param(values[0]), param(values[1])
    opt = Adam([{"params": [a]}, {"params": [b], "lr": 0.05, "amsgrad": True}], lr=0.1)
    return opt, [a, b]


def test_state_dict_layout():
    opt, (a, b) = make_two_group_adam()
    run(opt, [a, b], [[[1.0, 1.0], [[2.0]]]])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    assert sd["param_groups"][1]["lr"] == 0.05 and sd["param_groups"][1]["amsgrad"] is True
    assert set(sd["state"]) == {0, 1}
    assert set(sd["state"][1]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"] == 1 and isinstance(sd["state"][0]["exp_avg"], Tensor)
    np.testing.assert_allclose(sd["state"][0]["exp_avg"].data, [0.1, 0.1], rtol=1e-14)


@pytest.mark.parametrize("make", [
    lambda ps: SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.02}], lr=0.1, momentum=0.9,
                   dampening=0.2),
    lambda ps: Adam([{"params": ps[:1]}, {"params": ps[1:], "amsgrad": True}], lr=0.1),
    lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
], ids=["sgd", "adam", "adamw"])
def test_state_dict_round_trip_is_bit_identical(make):
    rng = np.random.default_rng(1)
    shapes = [(3,), (2, 2)]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(6)]
    params = [param(rng.standard_normal(s)) for s in shapes]
    opt = make(params)
    run(opt, params, grads[:3])
    snapshot = copy.deepcopy(opt.state_dict())
    saved_params = [p.data.copy() for p in params]
    run(opt, params, grads[3:])

    fresh = [param(v) for v in saved_params]
    resumed = make(fresh)
    resumed.load_state_dict(snapshot)
    run(resumed, fresh, grads[3:])
    for p, q in zip(params, fresh, strict=True):
        assert np.array_equal(p.data, q.data)
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            if isinstance(value, Tensor):
                assert np.array_equal(value.data, other.data)
            else:
                assert value == other


def test_load_state_dict_copies_and_casts_to_the_parameter_dtype():
    opt, params = make_two_group_adam()
    run(opt, params, [[[1.0, 1.0], [[2.0]]]])
    sd = opt.state_dict()
    opt32, params32 = make_two_group_adam()
    for p in params32:
        p.data = p.data.astype(np.float32)
    opt32.load_state_dict(sd)
    m = opt32.state[params32[0]]["exp_avg"]
    assert m.data.dtype == np.float32 and m.data is not sd["state"][0]["exp_avg"].data
    assert opt32.state[params32[0]]["step"] == 1
    assert opt32.param_groups[1]["lr"] == 0.05 and opt32.param_groups[1]["params"] == [
        params32[1]]


def test_load_state_dict_rejects_a_different_layout():
    opt, _ = make_two_group_adam()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="2 parameter groups, but the optimizer has 1"):
        Adam([param([1.0])]).load_state_dict(sd)
    with pytest.raises(ValueError, match="group 0 has 1 parameters, but the optimizer's has 2"):
        Adam([{"params": [param([1.0]), param([1.0])]}, {"params": [param([1.0])]}]
             ).load_state_dict(sd)


# ---------------------------------------------------------------- LR schedulers

def two_group_sgd():
    return SGD([{"params": [param([1.0])]}, {"params": [param([1.0])], "lr": 0.01}], lr=0.1)


def lrs_over(scheduler, epochs):
    values = [scheduler.get_last_lr()]
    for _ in range(epochs - 1):
        scheduler.optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr())
    return values


def test_scheduler_records_initial_lr_and_sets_the_groups():
    opt = two_group_sgd()
    sched = LinearLR(opt, start_factor=0.5, total_iters=2)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert sched.last_epoch == 0 and sched.base_lrs == [0.1, 0.01]
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr() == [0.05, 0.005]


def test_step_lr():
    values = lrs_over(StepLR(two_group_sgd(), step_size=3, gamma=0.5), 10)
    expected = [0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.0125]
    np.testing.assert_allclose([v[0] for v in values], expected, rtol=1e-15)
    np.testing.assert_allclose([v[1] for v in values], [e / 10 for e in expected], rtol=1e-14)


def test_cosine_annealing_lr():
    sched = CosineAnnealingLR(two_group_sgd(), T_max=8, eta_min=0.001)
    values = [v[0] for v in lrs_over(sched, 11)]
    expected = [0.001 + 0.099 * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(11)]
    np.testing.assert_allclose(values, expected, rtol=1e-14)
    assert values[0] == pytest.approx(0.1) and values[4] == pytest.approx(0.0505)
    assert values[8] == pytest.approx(0.001) and values[10] > values[8]  # the cosine goes on


def test_linear_lr():
    values = lrs_over(LinearLR(two_group_sgd(), start_factor=0.25, total_iters=4), 8)
    expected = [0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1, 0.1, 0.1]
    np.testing.assert_allclose([v[0] for v in values], expected, rtol=1e-14)
    decay = lrs_over(LinearLR(two_group_sgd(), start_factor=1.0, end_factor=0.0,
                              total_iters=2), 4)
    np.testing.assert_allclose([v[1] for v in decay], [0.01, 0.005, 0.0, 0.0], atol=1e-18)


def test_lambda_lr_with_one_function_per_group():
    sched = LambdaLR(two_group_sgd(), [lambda e: 0.5 ** e, lambda e: e + 1])
    values = lrs_over(sched, 4)
    np.testing.assert_allclose(values, [[0.1, 0.01], [0.05, 0.02], [0.025, 0.03],
                                        [0.0125, 0.04]], rtol=1e-14)
    shared = LambdaLR(two_group_sgd(), lambda e: 1 / (e + 1))
    np.testing.assert_allclose(lrs_over(shared, 2)[1], [0.05, 0.005], rtol=1e-14)


def test_scheduler_resumes_from_last_epoch():
    opt = two_group_sgd()
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    sched = StepLR(opt, step_size=2, gamma=0.1, last_epoch=3)
    assert sched.last_epoch == 4 and sched.get_last_lr() == pytest.approx([0.001, 0.0001])
    with pytest.raises(KeyError, match="initial_lr"):
        StepLR(two_group_sgd(), step_size=2, last_epoch=3)


class Warmup:
    """A callable object: its attributes travel in LambdaLR's state_dict."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, epoch):
        return min(1.0, (epoch + 1) / self.steps)


@pytest.mark.parametrize("make", [
    lambda opt: StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: CosineAnnealingLR(opt, T_max=6, eta_min=0.01),
    lambda opt: LinearLR(opt, start_factor=0.1, total_iters=5),
    lambda opt: LambdaLR(opt, [Warmup(4), lambda e: 0.9 ** e]),
], ids=["step", "cosine", "linear", "lambda"])
def test_scheduler_state_dict_round_trip(make):
    opt_a = two_group_sgd()
    sched_a = make(opt_a)
    lrs_over(sched_a, 4)
    state = copy.deepcopy(sched_a.state_dict())
    assert "optimizer" not in state
    opt_b = two_group_sgd()
    sched_b = make(opt_b)
    if isinstance(sched_b, LambdaLR):
        sched_b.lr_lambdas[0].steps = 99  # restored from the state below
    sched_b.load_state_dict(state)
    assert sched_b.last_epoch == sched_a.last_epoch == 3
    assert sched_b.get_last_lr() == sched_a.get_last_lr()
    for _ in range(5):
        sched_a.step()
        sched_b.step()
        assert sched_b.get_last_lr() == sched_a.get_last_lr()
        assert [g["lr"] for g in opt_b.param_groups] == sched_b.get_last_lr()


@pytest.mark.parametrize("make, error, message", [
    (lambda o: StepLR(o, step_size=0), ValueError, "step_size must be a positive int, got 0"),
    (lambda o: CosineAnnealingLR(o, T_max=0), ValueError, "T_max must be a positive int"),
    (lambda o: LinearLR(o, start_factor=0.0), ValueError, r"start_factor must be in \(0, 1\]"),
    (lambda o: LinearLR(o, end_factor=1.5), ValueError, r"end_factor must be in \[0, 1\]"),
    (lambda o: LinearLR(o, total_iters=0), ValueError, "total_iters must be a positive int"),
    (lambda o: LambdaLR(o, [lambda e: 1.0]), ValueError, "a list of 2"),
    (lambda o: LambdaLR(o, 0.5), TypeError, "lr_lambda must be callable"),
    (lambda o: StepLR(object(), step_size=1), TypeError, "optimizer must be an Optimizer"),
])
def test_scheduler_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make(two_group_sgd())


def test_optimizer_base_class_is_abstract():
    opt = Optimizer([param([1.0])], {})
    with pytest.raises(NotImplementedError):
        opt.step()


# ---------------------------------------------------------------- against PyTorch

@pytest.mark.parametrize("ours, name, kwargs", [
    (SGD, "SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (SGD, "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    (Adam, "Adam", dict(lr=0.05, weight_decay=0.01, amsgrad=True)),
    (Adam, "Adam", dict(lr=0.05, betas=(0.4, 0.9), maximize=True)),
    (AdamW, "AdamW", dict(lr=0.05, weight_decay=0.1)),
])
def test_trajectories_match_torch(ours, name, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    start = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(5)]
    p = param(start)
    ours_history = run(ours([p], **kwargs), [p], [[g] for g in grads])
    tp = torch.tensor(start, requires_grad=True)
    topt = getattr(torch.optim, name)([tp], foreach=False, **kwargs)
    for g, got in zip(grads, ours_history, strict=True):
        tp.grad = torch.tensor(g)
        topt.step()
        np.testing.assert_allclose(got[0], tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    makers = [
        (lambda o, m: m.StepLR(o, step_size=3, gamma=0.3)),
        (lambda o, m: m.CosineAnnealingLR(o, T_max=7, eta_min=0.002)),
        (lambda o, m: m.LinearLR(o, start_factor=0.2, end_factor=0.9, total_iters=6)),
    ]
    from dptrain.engine.optim import lr_scheduler
    for make in makers:
        ours = make(two_group_sgd(), lr_scheduler)
        topt = torch.optim.SGD([{"params": [torch.zeros(1)]},
                                {"params": [torch.zeros(1)], "lr": 0.01}], lr=0.1)
        theirs = make(topt, torch.optim.lr_scheduler)
        for _ in range(12):
            np.testing.assert_allclose(ours.get_last_lr(), theirs.get_last_lr(), rtol=1e-9)
            topt.step()
            ours.step()
            theirs.step()
