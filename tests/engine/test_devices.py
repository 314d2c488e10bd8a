"""Devices: ``Device`` parsing, ``Tensor.to``/``Module.to``, factories and the seed on a device,
and the strict device's refusals that stand in for CuPy's in CI (no GPU here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dptrain import engine
from dptrain.engine import backend, nn


def test_device_parses_cpu_cuda_and_strict():
    assert (engine.Device("cuda:1").type, engine.Device("cuda:1").index) == ("cuda", 1)
    assert engine.Device("cuda").index == 0
    assert str(engine.Device("strict")) == "strict"
    assert engine.Device("cpu") == "cpu"
    for bad, rule in ((r"tpu", r"'cpu', 'cuda\[:N\]' or 'strict', got 'tpu'"),
                      ("cpu:0", "takes no index"), ("cuda:x", "non-negative int")):
        with pytest.raises(ValueError, match=rule):
            engine.Device(bad)


def test_strict_array_refuses_numpy_functions_host_arrays_and_unsorted_scatter():
    x = engine.ones(3, device="strict").data
    with pytest.raises(TypeError, match="numpy.sum on a strict-device array"):
        np.sum(x)
    with pytest.raises(TypeError, match="numpy.add: a numpy .host. array mixed"):
        x + np.ones(3)
    with pytest.raises(TypeError, match="add.at"):
        np.add.at(x, [0], 1.0)
    with pytest.raises(TypeError, match="implicit conversion"):
        x.__array__()
    xp = backend.get_array_module(x)
    with pytest.raises(TypeError, match="strict.where: a numpy .host. array mixed"):
        xp.where(np.ones(3, bool), x, x)
    with pytest.raises(TypeError, match="numpy.random"):
        xp.random  # noqa: B018
    # What the device path may do keeps results on the device, 0-d arrays included (as CuPy).
    for out in (x + 1.0, xp.exp(x), x.sum(), xp.maximum.reduce(x), x[np.array([0, 0])]):
        assert backend.get_device(out) == "strict"


def test_scatter_add_accumulates_repeated_indices_on_every_device():
    for device in ("cpu", "strict"):
        xp = engine.Device(device).xp
        acc = xp.zeros(4)
        backend.scatter_add(xp, acc, xp.asarray(np.array([1, 1, 3])), xp.asarray([1.0, 2.0, 5.0]))
        assert backend.get_device(acc) == device
        assert engine.tensor(acc).tolist() == [0.0, 3.0, 0.0, 5.0]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_sum_matrix_matches_float64_sums_on_every_device(dtype):
    """Column and row sums of a matrix (a product with ones for float32/64, numpy's sum for
    float16) against sums in float64, within the rounding of the dtype's accumulation."""
    a = np.random.default_rng(2).standard_normal((300, 70)).astype(dtype)
    tol = {"float16": 2e-2, "float32": 2e-5, "float64": 1e-12}[dtype]
    for device in ("cpu", "strict"):
        xp = engine.Device(device).xp
        for axis in (0, 1):
            got = backend.sum_matrix(xp, xp.asarray(a), axis)
            assert backend.get_device(got) == device and got.dtype == a.dtype
            want = a.astype(np.float64).sum(axis=axis)
            np.testing.assert_allclose(engine.tensor(got).numpy().astype(np.float64), want,
                                       rtol=tol, atol=tol * np.abs(a).sum(axis=axis).max())


@pytest.mark.parametrize("index", [
    pytest.param(np.array([[3, 0, 3], [3, 1, 0]]), id="repeated_2d"),
    pytest.param(np.array([-1, 4, 0, -5, 2, 2]), id="negative_aliases"),
    pytest.param(np.array([2]), id="one_row"),
    pytest.param(np.zeros((0,), np.int64), id="empty"),
    pytest.param(np.array([1, 1, 1], np.uint8), id="unsigned"),
])
@pytest.mark.parametrize("row_shape", [(3,), (2, 2)])
def test_scatter_add_of_whole_rows_matches_numpy_add_at(index, row_shape):
    """Whole rows (an embedding's gradient) take a sort-and-sum path; numpy's add.at is the
    reference. Small integers sum exactly in any order, so the results must be equal."""
    rng = np.random.default_rng(0)
    start = rng.integers(-4, 5, (5,) + row_shape).astype(np.float32)
    values = rng.integers(-4, 5, index.shape + row_shape).astype(np.float32)
    expected = start.copy()
    np.add.at(expected, index, values)
    for key in (index, (index,)):
        acc = start.copy()
        backend.scatter_add(np, acc, key, values)
        np.testing.assert_array_equal(acc, expected)


def test_scatter_add_of_whole_rows_keeps_float_sums_close_to_numpy_add_at():
    rng = np.random.default_rng(1)
    index = rng.integers(0, 50, (16, 128))
    values = rng.standard_normal((16, 128, 8))
    acc, expected = np.ones((50, 8)), np.ones((50, 8))
    np.add.at(expected, index, values)
    backend.scatter_add(np, acc, index, values)
    np.testing.assert_allclose(acc, expected, rtol=1e-13, atol=1e-13)


def test_tensor_to_moves_values_and_gradients_flow_back_to_the_source_device():
    x = engine.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = x.to("strict")
    assert (x.device, y.device) == ("cpu", "strict")
    loss = (y * y * 3.0).sum()
    assert loss.device == "strict"
    loss.backward()
    assert x.grad.device == "cpu"
    assert x.grad.tolist() == [6.0, -12.0, 18.0]  # d(3x²)/dx = 6x
    assert engine.tensor(y.data).device == "strict"  # a device array stays on its device
    assert engine.tensor(y.data, device="cpu").device == "cpu"


def test_mixing_devices_in_one_op_names_the_op_and_both_devices():
    a, b = engine.ones(2, device="strict"), engine.ones(2)
    with pytest.raises(RuntimeError, match="mul: expected all tensors on one device, got strict "
                                           "and cpu"):
        a * b
    with pytest.raises(RuntimeError, match="matmul: .* got cpu and strict"):
        engine.ones(2, 2) @ engine.ones(2, 2, device="strict")


def _draws(device: str) -> list:
    t = (engine.randn(3, device=device), engine.rand(2, device=device),
         engine.randint(0, 9, (4,), device=device), engine.randperm(5, device=device),
         engine.zeros(2, device=device), engine.arange(3, device=device),
         engine.eye(2, device=device))
    assert {x.device for x in t} == {engine.Device(device)}
    return [x.tolist() for x in t]


def _philox(seed: int, draw: int) -> np.random.Generator:
    """The generator of draw number `draw` on a device after ``manual_seed(seed)``."""
    key = np.random.SeedSequence([seed, draw]).generate_state(1, np.uint64)[0]
    return np.random.Generator(np.random.Philox(key=int(key)))


def test_the_seed_gives_the_same_draws_again_on_each_device():
    for device in ("cpu", "strict"):
        engine.manual_seed(7)
        first = _draws(device)
        engine.manual_seed(7)
        assert _draws(device) == first, device
        engine.manual_seed(8)
        assert _draws(device)[:4] != first[:4], device


def test_a_device_draws_from_its_own_generator_seeded_from_the_one_seed():
    # As in PyTorch, the CPU and the device draw different numbers from one seed. The strict
    # device's draw n is Philox keyed by (seed, n), apart from the host's PCG64 and from
    # numpy's global state: draws on the host in between do not move it.
    engine.manual_seed(7)
    engine.randn(100)
    np.random.seed(1)
    got = engine.randn(3, device="strict")
    expected = _philox(7, 0).standard_normal(3)
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))
    engine.manual_seed(7)
    assert engine.randn(3).tolist() == np.random.Generator(np.random.PCG64(7)).standard_normal(
        3).astype(np.float32).tolist()


def test_dropout_and_init_draw_on_the_device():
    engine.manual_seed(4)
    x = engine.ones(4, 6, device="strict")
    y = engine.functional.dropout(x, p=0.25)
    keep = _philox(4, 0).random((4, 6), dtype=np.float32) >= 0.25
    assert y.device == "strict"
    np.testing.assert_allclose(y.numpy(), keep / 0.75, rtol=1e-7)
    w = engine.zeros(3, 5, device="strict")
    nn.init.uniform_(w, -2.0, 3.0)
    np.testing.assert_array_equal(w.numpy(),
                                  _philox(4, 1).uniform(-2.0, 3.0, (3, 5)).astype(np.float32))
    assert w.device == "strict"


def test_copy_moves_values_across_devices_in_place():
    on_device = engine.zeros(3, device="strict")
    on_device.copy_(engine.tensor([1.0, 2.0, 3.0]))
    assert on_device.device == "strict" and on_device.tolist() == [1.0, 2.0, 3.0]
    on_host = engine.zeros(2)
    on_host.copy_(engine.tensor([4.0, 5.0], device="strict"))
    assert on_host.device == "cpu" and on_host.tolist() == [4.0, 5.0]


def test_module_to_moves_parameters_and_gives_the_cpu_outputs():
    engine.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = engine.randn(5, 3)
    expected = model(x).tolist()
    model.to("strict")
    assert {p.device for p in model.parameters()} == {engine.Device("strict")}
    np.testing.assert_allclose(model(x.to("strict")).numpy(), expected, rtol=1e-6)


@pytest.mark.skipif(backend.cupy_available(), reason="needs no GPU: CuPy sees one here")
def test_cuda_without_cupy_says_which_extra_to_install_or_that_no_gpu_is_visible():
    with pytest.raises(RuntimeError, match=r"cuda12.*cuda13|no GPU is visible"):
        engine.zeros(2, device="cuda")
    with pytest.raises(RuntimeError, match=r"device cuda:1 requested"):
        engine.ones(2).to("cuda:1")


def test_the_rng_state_holds_each_devices_generator_through_json():
    # A checkpoint's manifest is JSON: the state restored from it continues every stream.
    engine.manual_seed(9)
    engine.randn(4, device="strict")
    engine.functional.dropout(engine.ones(5, device="strict"), p=0.5)
    engine.randn(3)
    state = json.loads(json.dumps(engine.get_rng_state()))
    assert state["devices"] == {"seed": 9, "draws": {"strict": 2}}
    host, device = engine.randn(3).tolist(), engine.randn(6, device="strict").tolist()
    engine.manual_seed(1)
    engine.randn(2, device="strict")
    engine.set_rng_state(state)
    assert engine.randn(3).tolist() == host
    assert engine.randn(6, device="strict").tolist() == device
    np.testing.assert_array_equal(device, _philox(9, 2).standard_normal(6).astype(np.float32))


def test_an_rng_state_without_devices_restores_the_host_and_keeps_the_devices_streams():
    # Checkpoints written before device generators were saved hold the host's state alone.
    engine.manual_seed(9)
    old = backend.generator().bit_generator.state
    host = engine.randn(3).tolist()
    engine.manual_seed(4)
    engine.randn(2, device="strict")
    engine.set_rng_state(old)
    assert engine.randn(3).tolist() == host
    np.testing.assert_array_equal(engine.randn(2, device="strict").numpy(),
                                  _philox(4, 1).standard_normal(2).astype(np.float32))
