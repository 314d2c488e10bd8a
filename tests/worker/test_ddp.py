"""DistributedDataParallel: N real MPI ranks against one process, bucketing, accumulation,
unused parameters and mismatched models; API details in-process with a stand-in communicator."""

from __future__ import annotations

import numpy as np
import pytest

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import DistributedDataParallel


def _run(run_mpi, mpi_json, script, n: int, *args) -> dict:
    result = run_mpi(n, script, *args)
    assert result.returncode == 0, result.stderr
    (report,) = mpi_json(result.stdout)
    assert report["size"] == n
    return report


# ---------------------------------------------------------------- real MPI

@pytest.mark.mpi
@pytest.mark.parametrize("n, cap", [(1, 25), (2, 25), (3, 25), (3, 0.0005)])
def test_n_ranks_train_the_model_one_process_trains(run_mpi, mpi_json, mpi_scripts, n, cap):
    report = _run(run_mpi, mpi_json, mpi_scripts / "ddp_equivalence.py", n, str(cap))
    ranks = report["ranks"]
    assert len({r["hash"] for r in ranks}) == 1, "ranks ended with different parameters"
    assert all(r["marker"] == [0.0, 0.0, 0.0] for r in ranks), "buffers not from rank 0"
    rank0 = ranks[0]
    assert rank0["moved"] > 1e-2  # training changed the parameters: the comparison means something
    worst = max(rank0["max_abs_diff"].values())
    if n == 1:
        assert worst == 0.0
    else:
        assert worst < 1e-5 * max(1.0, rank0["max_abs_param"])
    assert (rank0["buckets"] > 1) == (cap < 1)


# The float32 gradient bytes of ddp_equivalence.py's MLP (8 -> 16 -> 16 -> 3).
EQUIVALENCE_GRAD_BYTES = 4 * (8 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3)
DEVICE_PATHS = ("host", "cuda_aware", "nccl")
HOOKS = {"host": "PinnedStagingAllreduce", "cuda_aware": "CudaAwareAllreduce",
         "nccl": "NcclAllreduce", "shared_memory": "SharedMemoryAllreduce"}


@pytest.mark.mpi
@pytest.mark.parametrize("n, cap", [(1, 25), (2, 25), (2, 0.0005), (3, 0.0005)])
def test_n_ranks_train_as_one_with_buckets_in_shared_memory(run_mpi, mpi_json, mpi_scripts,
                                                            n, cap):
    # The SharedMemoryAllreduce comm hook (buckets in an MPI-3 shared window): float32 sums
    # in another order than one process's, so the same tolerance as the plain all-reduce.
    report = _run(run_mpi, mpi_json, mpi_scripts / "ddp_equivalence.py", n, str(cap),
                  "shared_memory")
    ranks = report["ranks"]
    # One rank reduces nothing: no window, as on every path.
    assert {(r["hook"], r["allreduce"]) for r in ranks} == (
        {("function", None)} if n == 1 else {("SharedMemoryAllreduce", "shared_memory")})
    assert len({r["hash"] for r in ranks}) == 1, "ranks ended with different parameters"
    assert all(r["marker"] == [0.0, 0.0, 0.0] for r in ranks), "buffers not from rank 0"
    rank0 = ranks[0]
    assert rank0["moved"] > 1e-2 and (rank0["buckets"] > 1) == (cap < 1)
    worst = max(rank0["max_abs_diff"].values())
    assert worst == 0.0 if n == 1 else worst < 1e-5 * max(1.0, rank0["max_abs_param"])


@pytest.mark.mpi
@pytest.mark.parametrize("path", DEVICE_PATHS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_ranks_on_a_device_train_as_one_on_every_allreduce_path(run_mpi, mpi_json, mpi_scripts,
                                                                   n, path):
    # The strict device stands in for a GPU: "host" stages buckets through (pinned) host
    # buffers as with the mpich wheel, "cuda_aware" hands MPI the device buffers, "nccl" runs
    # NCCL's calls through a test double of cupy.cuda.nccl (the GPU boundary).
    report = _run(run_mpi, mpi_json, mpi_scripts / "ddp_equivalence.py", n, "0.0005", path)
    ranks = report["ranks"]
    assert all(r["devices"] == ["strict"] for r in ranks)
    assert len({r["hash"] for r in ranks}) == 1, "ranks ended with different parameters"
    assert all(r["marker"] == [0.0, 0.0, 0.0] for r in ranks), "buffers not from rank 0"
    rank0 = ranks[0]
    buckets = rank0["buckets"]
    assert buckets > 1 and rank0["moved"] > 1e-2
    worst = max(rank0["max_abs_diff"].values())
    assert worst == 0.0 if n == 1 else worst < 1e-5 * max(1.0, rank0["max_abs_param"])
    if n == 1:  # one rank communicates nothing
        assert all(r["staged_bytes"] == 0 and r["allreduce"] is None for r in ranks)
        return
    assert {r["hook"] for r in ranks} == {HOOKS[path]}
    # Bytes through the host, by hand. The host path stages everything: the parameters and
    # the 3-float marker broadcast at wrapping, the marker before each of the 20 forwards and
    # 20 steps of every gradient. The others keep it all on the device (nccl's wrapping goes
    # through host before the double is put in, _paths.wrap).
    staged = {"host": (EQUIVALENCE_GRAD_BYTES + 12) + 20 * 12 + 20 * EQUIVALENCE_GRAD_BYTES,
              "cuda_aware": 0, "nccl": EQUIVALENCE_GRAD_BYTES + 12}[path]
    assert [r["staged_bytes"] for r in ranks] == [staged] * n
    if path == "host":  # one pinned buffer per bucket and per broadcast buffer, reused
        assert [r["pinned_buffers"] for r in ranks] == [buckets + 2] * n
    if path == "nccl":
        for r in ranks:
            calls = r["nccl_calls"]
            head = [["get_unique_id"]] if r["rank"] == 0 else []
            assert calls[:len(head)] == head  # only rank 0 makes the id; MPI broadcasts it
            joined = calls[len(head)]
            assert joined[:3] == ["NcclCommunicator", n, r["rank"]]
            assert joined[3] == ranks[0]["nccl_calls"][1][3]  # the same id on every rank
            reduces = [c for c in calls[len(head) + 1:] if c[0] == "allReduce"]
            bcasts = [c for c in calls[len(head) + 1:] if c[0] == "bcast"]
            assert len(reduces) == 20 * buckets
            # broadcast_parameters (parameters and marker in one), then the marker before
            # each forward: float32 from root 0 on the default stream
            assert bcasts == [["bcast", EQUIVALENCE_GRAD_BYTES // 4 + 3, 7, 0, 0]] + [
                ["bcast", 3, 7, 0, 0]] * 20
            # float32 (ncclFloat32 = 7), sum (ncclSum = 0), in place, the default stream
            assert {tuple(c[2:]) for c in reduces} == {(7, 0, 0, True)}
            assert sum(c[1] for c in reduces[:buckets]) * 4 == EQUIVALENCE_GRAD_BYTES


@pytest.mark.mpi
@pytest.mark.parametrize("path", DEVICE_PATHS)
@pytest.mark.parametrize("n", [2, 3])
def test_broadcasts_of_device_arrays_go_through_the_allreduce_path(run_mpi, mpi_json,
                                                                   mpi_scripts, n, path):
    ranks = _run(run_mpi, mpi_json, mpi_scripts / "device_broadcast.py", n, path)["ranks"]
    root = n - 1
    for r in ranks:  # the last rank's arange(5) * (10 * rank + round), on every rank
        assert r["seen"] == [[float(i * 10 * root) for i in range(5)],
                             [float(i * (10 * root + 1)) for i in range(5)]]
        # Rank 0's parameters and buffer back on every rank, still on the device.
        assert r["same_as_rank0"] and r["marker"] == [7.0, 7.0] and r["device"] == "strict"
    # By hand: the 5 float64 twice, then the 26 + 2 float32 of the model and its buffer at
    # wrapping and again by broadcast_parameters; nothing staged on the device paths (nccl's
    # wrapping goes through host before the double is put in, _paths.wrap).
    staged = {"host": 2 * 40 + 2 * 112, "cuda_aware": 0, "nccl": 112}[path]
    assert [r["staged_bytes"] for r in ranks] == [staged] * n
    if path == "host":  # one pinned buffer for both broadcasts of one shape
        assert [r["pinned_buffers"] for r in ranks] == [1] * n
    if path == "nccl":  # its own broadcasts twice, wrap's and ours broadcast_parameters
        for r in ranks:
            assert [c for c in r["nccl_calls"] if c == "bcast"] == ["bcast"] * 4
            assert "allReduce" not in r["nccl_calls"]


@pytest.mark.mpi
@pytest.mark.parametrize("path", ("cpu", "shared_memory") + DEVICE_PATHS)
@pytest.mark.parametrize("n", [2, 3])
def test_bucketed_reduction_equals_per_tensor_reduction(run_mpi, mpi_json, mpi_scripts, n, path):
    ranks = _run(run_mpi, mpi_json, mpi_scripts / "ddp_buckets.py", n, path)["ranks"]
    assert {r["path"]["hook"] for r in ranks} == {HOOKS.get(path, "function")}
    # Odd ranks produce the two branches' gradients in the other order: the hard case.
    assert ranks[0]["hook_order"] != ranks[1]["hook_order"]
    names = ranks[0]["registration_order"]
    for r in ranks:
        for label in ("tiny", "small", "huge"):
            assert r["max_abs_diff"][label] <= 1e-14 * max(1.0, r["max_abs_grad"]), label
        assert r["buckets"]["tiny"] == [[name] for name in reversed(names)]
        assert r["buckets"]["huge"] == [list(reversed(names))]
        assert 1 < len(r["buckets"]["small"]) < len(names)
        assert sum(r["buckets"]["small"], []) == list(reversed(names))
    for label in ("tiny", "small", "huge"):
        assert len({r["grad_hash"][label] for r in ranks}) == 1, label


@pytest.fixture(scope="module", params=[(2, "cpu"), (3, "cpu")]
                + [(n, path) for path in ("shared_memory",) + DEVICE_PATHS for n in (2, 3)],
                ids=lambda p: f"ranks{p[0]}-{p[1]}")
def accumulation(request, run_mpi, mpi_json, mpi_scripts):
    n, path = request.param
    report = _run(run_mpi, mpi_json, mpi_scripts / "ddp_no_sync_unused.py", n, path)
    if path != "cpu":  # the run really took the path
        for r in report["ranks"]:
            assert r["no_sync_path"]["hook"] == HOOKS[path]
            devices = ["cpu"] if path == "shared_memory" else ["strict"]
            assert r["default"]["devices"] == r["find_unused"]["devices"] == devices
    return report


@pytest.mark.mpi
def test_no_sync_accumulates_locally_then_reduces_the_total(accumulation):
    ranks = accumulation["ranks"]
    assert len({r["hash_inside_no_sync"] for r in ranks}) == len(ranks), "no_sync communicated"
    assert len({r["no_sync_hash_after"] for r in ranks}) == 1
    assert all(r["no_sync_max_abs_diff"] < 1e-12 for r in ranks)


@pytest.mark.mpi
def test_unused_parameters_do_not_hang_and_agree_everywhere(accumulation):
    ranks = accumulation["ranks"]
    for key, never_none in (("default", False), ("find_unused", True)):
        assert len({r[key]["params_hash"] for r in ranks}) == 1, key
        for step in range(3):
            steps = [r[key]["steps"][step] for r in ranks]
            assert len({s["grad_hash"] for s in steps}) == 1, (key, step)
            for s in steps:
                assert s["max_abs_diff"] < 1e-12, (key, step)
                # a and b are each used by some rank: they get the mean with zeros elsewhere;
                # `never` is used by no rank: zero gradient, or None with find_unused_parameters
                assert s["none"] == (["never.weight", "never.bias"] if never_none else [])
                assert s["never_grad_zero"] == (not never_none)


@pytest.mark.mpi
def test_a_rank_whose_loss_ignores_the_model_still_joins_the_reduction(run_mpi, mpi_json,
                                                                       mpi_scripts):
    # Before the fix rank 1's backward fired no hook and rank 0 waited for it forever.
    ranks = _run(run_mpi, mpi_json, mpi_scripts / "ddp_disconnected_loss.py", 2)["ranks"]
    for r in ranks:
        for key in ("default", "find_unused"):
            # Step 1 is rank 0's hand-computed gradient over 2 (rank 1 contributes zeros),
            # step 2 the mean of both ranks' gradients: the ranks are still in step.
            for step, diffs in enumerate(r[key]):
                assert diffs[0] is not None and diffs[1] is not None, (r["rank"], key, step)
                assert max(diffs) < 1e-12, (r["rank"], key, step)


@pytest.mark.mpi
def test_different_models_raise_on_every_rank_instead_of_hanging(run_mpi, mpi_json, mpi_scripts):
    ranks = _run(run_mpi, mpi_json, mpi_scripts / "ddp_mismatch.py", 3)["ranks"]
    for r in ranks:
        kind, message = r["architecture"]
        assert kind == "RuntimeError"
        assert "rank 1 has parameter '0.weight' of shape (9, 4)" in message
        assert "rank 0 has parameter '0.weight' of shape (8, 4)" in message
        assert "rank 2 has parameter '3.weight' of shape (2, 2)" in message
        assert "where rank 0 has nothing" in message
        kind, message = r["setting"]
        assert kind == "RuntimeError" and "bucket_cap_mb=1" in message
        assert "rank 2" not in message
        assert r["same"] is None  # the communicator is still usable


# ---------------------------------------------------------------- in-process, no MPI

class _DoneRequest:
    def test(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class StandInComm:
    """A communicator of `size` ranks where every other rank holds exactly this rank's values:
    a sum multiplies by the size, a broadcast changes nothing. Records every call."""

    def __init__(self, size: int = 1):
        self.rank, self.size = 0, size
        self.calls: list[tuple] = []

    def allgather_object(self, obj):
        self.calls.append(("allgather_object",))
        return [obj] * self.size

    def broadcast_(self, array, root: int = 0):
        self.calls.append(("broadcast_", array.size))
        return array

    def allreduce_(self, array, op: str = "sum"):
        self.iallreduce_(array, op).wait()
        return array

    def iallreduce_(self, array, op: str = "sum"):
        self.calls.append(("iallreduce_", array.size, op))
        array *= self.size if op == "sum" else 1
        return _DoneRequest()


def _mlp(seed: int = 0) -> nn.Module:
    engine.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _backward(model, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    x = engine.from_numpy(rng.standard_normal((5, 3)).astype(np.float32))
    y = engine.from_numpy(rng.standard_normal((5, 2)).astype(np.float32))
    F.mse_loss(model(x), y).backward()


@pytest.mark.parametrize("size", [1, 2, 4])
def test_gradients_are_the_mean_over_ranks(size):
    plain, wrapped = _mlp(), DistributedDataParallel(_mlp(), comm=StandInComm(size))
    _backward(plain)
    _backward(wrapped)
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        np.testing.assert_allclose(q.grad.numpy(), p.grad.numpy(), rtol=1e-6, err_msg=name)


def test_grads_become_bucket_views_and_later_backwards_accumulate_into_them():
    comm = StandInComm(2)
    ddp = DistributedDataParallel(_mlp(), comm=comm, bucket_cap_mb=1e-6)
    plain = _mlp()
    for seed in (1, 2):  # no zero_grad in between: the second gradient adds to the first
        _backward(ddp, seed)
        _backward(plain, seed)
    for p, q in zip(plain.parameters(), ddp.parameters()):
        np.testing.assert_allclose(q.grad.numpy(), p.grad.numpy(), rtol=1e-6)
    reductions = [c for c in comm.calls if c[0] == "iallreduce_"]
    assert [c[1] for c in reductions] == [2, 8, 4, 12] * 2  # reverse order, one per bucket


def test_fresh_gradients_live_until_the_next_forward_that_records_a_graph():
    # As a single process holds its .grad until zero_grad() just before its forward, so that
    # the allocator keeps that memory for the step instead of giving it back to the system;
    # held no longer, so that the forward's peak does not carry them.
    import weakref

    model = _mlp()
    fresh = []
    for p in model.parameters():  # registered first: sees backward's own array
        p.register_post_accumulate_grad_hook(lambda p: fresh.append(weakref.ref(p.grad.data)))
    ddp = DistributedDataParallel(model, comm=StandInComm(2))
    _backward(ddp)
    assert len(fresh) == 4 and all(ref() is not None for ref in fresh)
    assert not any(p.grad.data is ref() for p in model.parameters() for ref in fresh)  # views
    first = list(fresh)
    for p in model.parameters():
        p.grad = None  # zero_grad()
    assert all(ref() is not None for ref in first)
    x = engine.from_numpy(np.ones((5, 3), np.float32))
    with engine.no_grad():
        ddp(x)  # records no graph: not a training step's forward
    assert all(ref() is not None for ref in first)
    out = ddp(x)
    assert not any(ref() is not None for ref in first)
    out.sum().backward()
    assert len(fresh) == 8 and all(ref() is not None for ref in fresh[4:])


def test_delegates_to_the_module():
    module = _mlp()
    ddp = DistributedDataParallel(module, comm=StandInComm())
    assert ddp.module is module
    assert list(ddp.parameters()) == list(module.parameters())
    assert [n for n, _ in ddp.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(ddp.state_dict()) == list(module.state_dict())  # no "module." prefix
    ddp.load_state_dict(_mlp(seed=5).state_dict())
    np.testing.assert_array_equal(module[0].weight.numpy(), _mlp(seed=5)[0].weight.numpy())
    assert ddp.eval() is ddp and not module.training
    assert ddp.train() is ddp and module.training
    assert list(ddp.children()) == list(module.children())  # the rest: via __getattr__
    x = engine.randn(2, 3)
    np.testing.assert_array_equal(ddp(x).numpy(), module(x).numpy())


def test_buffers_are_broadcast_only_before_forwards_that_record_a_graph():
    module = _mlp()
    module.register_buffer("running", engine.zeros(4))
    comm = StandInComm(2)
    ddp = DistributedDataParallel(module, comm=comm)
    x = engine.randn(2, 3)

    def broadcasts() -> int:
        return sum(c[0] == "broadcast_" for c in comm.calls)

    at_wrap = broadcasts()
    assert at_wrap == 1  # parameters and the buffer: one float32 group
    ddp(x)
    assert broadcasts() == at_wrap + 1
    with engine.no_grad():
        ddp(x)  # evaluation: ranks may run different numbers of batches
    with ddp.no_sync():
        ddp(x)
    assert broadcasts() == at_wrap + 1
    DistributedDataParallel(_mlp(), comm=comm, broadcast_buffers=False)(x)


def test_comm_hook_plugs_in_a_reduction():
    seen = []

    def hook(comm, bucket):
        seen.append(bucket.size)
        return comm.iallreduce_(bucket, op="sum")

    ddp = DistributedDataParallel(_mlp(), comm=StandInComm(2), bucket_cap_mb=1e-6)
    ddp.register_comm_hook(hook)
    _backward(ddp)
    assert seen == [2, 8, 4, 12]
    with pytest.raises(TypeError):
        ddp.register_comm_hook("not callable")


def test_a_backward_that_failed_mid_reduction_stops_the_next_forward():
    ddp = DistributedDataParallel(_mlp(), comm=StandInComm(2), bucket_cap_mb=1e-6)

    def broken(comm, bucket):
        raise OSError("network down")

    ddp.register_comm_hook(broken)
    with pytest.raises(OSError, match="network down"):
        _backward(ddp)
    with pytest.raises(RuntimeError, match="previous backward pass ended"):
        ddp(engine.randn(2, 3))


def test_a_backward_that_reaches_no_parameter_reduces_every_bucket_with_zeros():
    comm = StandInComm(2)
    ddp = DistributedDataParallel(_mlp(), comm=comm, bucket_cap_mb=1e-6)
    ddp(engine.randn(5, 3))
    unrelated = engine.ones(3, requires_grad=True)
    (unrelated * 2).sum().backward()
    reductions = [c[1] for c in comm.calls if c[0] == "iallreduce_"]
    assert reductions == [2, 8, 4, 12]  # every bucket, as the ranks that used the model do
    assert all(p.grad is not None and not p.grad.numpy().any() for p in ddp.parameters())
    np.testing.assert_array_equal(unrelated.grad.numpy(), [2, 2, 2])
    # Without a forward through the wrapper since, a backward is none of its business.
    (engine.ones(3, requires_grad=True) * 2).sum().backward()
    assert len([c for c in comm.calls if c[0] == "iallreduce_"]) == 4


def test_a_dropped_wrapper_leaves_no_backward_pass_hook():
    import gc
    import weakref

    from dptrain.engine.tensor import _pass_hooks

    gc.collect()  # wrappers earlier tests dropped
    before = len(_pass_hooks)
    ddp = DistributedDataParallel(_mlp(), comm=StandInComm(2))
    alive = weakref.ref(ddp)
    assert len(_pass_hooks) == before + 1
    del ddp
    gc.collect()
    assert alive() is None and len(_pass_hooks) == before


def test_no_sync_leaves_local_gradients():
    comm = StandInComm(2)
    ddp = DistributedDataParallel(_mlp(), comm=comm)
    with ddp.no_sync():
        _backward(ddp)
    assert not any(c[0] == "iallreduce_" for c in comm.calls)
    plain = _mlp()
    _backward(plain)
    for p, q in zip(plain.parameters(), ddp.parameters()):
        np.testing.assert_array_equal(q.grad.numpy(), p.grad.numpy())


def test_frozen_parameters_get_no_bucket():
    module = _mlp()
    module[0].weight.requires_grad_(False)
    ddp = DistributedDataParallel(module, comm=StandInComm(2))
    assert ddp.bucket_assignment == [["2.bias", "2.weight", "0.bias"]]
    _backward(ddp)
    assert module[0].weight.grad is None


def test_the_first_bucket_has_its_own_smaller_cap():
    # Reverse order: 2.bias 8 B, 2.weight 32 B, 0.bias 16 B, 0.weight 48 B (float32).
    mib = 1024 * 1024
    ddp = DistributedDataParallel(_mlp(), comm=StandInComm(2), bucket_cap_mb=1000 / mib,
                                  first_bucket_cap_mb=40 / mib)
    assert ddp.bucket_assignment == [["2.bias", "2.weight"], ["0.bias", "0.weight"]]
    # By default the first bucket is bucket_cap_mb too.
    assert DistributedDataParallel(_mlp(), comm=StandInComm(2),
                                   bucket_cap_mb=40 / mib).bucket_assignment == [
        ["2.bias", "2.weight"], ["0.bias"], ["0.weight"]]


def test_bad_arguments():
    with pytest.raises(TypeError, match="engine.nn.Module"):
        DistributedDataParallel(lambda x: x, comm=StandInComm())
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        DistributedDataParallel(_mlp(), comm=StandInComm(), bucket_cap_mb=0)
    with pytest.raises(ValueError, match="first_bucket_cap_mb must be positive, got -1"):
        DistributedDataParallel(_mlp(), comm=StandInComm(), first_bucket_cap_mb=-1)


def test_casting_the_module_after_wrapping_is_an_error():
    ddp = DistributedDataParallel(_mlp(), comm=StandInComm(2))
    ddp.module.double()
    rng = np.random.default_rng(0)
    x, y = (engine.from_numpy(rng.standard_normal(s)) for s in ((5, 3), (5, 2)))
    with pytest.raises(RuntimeError, match="changed dtype or device after wrapping"):
        F.mse_loss(ddp(x), y).backward()
