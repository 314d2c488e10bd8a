"""Comm hooks under real MPI: N ranks against one process on the whole batch.

Every rank trains on its shard of one global batch through DDP with many small buckets (so
several reductions are in flight at once) and a comm hook; it also computes, with a plain copy
of the model, its own bucket contents c_i (its shard's gradient divided by the world size),
gathers everyone's, and sums them in float64: the exact reduction the hook approximates. The
one-process gradient on the whole batch checks that this sum is the single-process gradient.
"""

from __future__ import annotations

import numpy as np
from _common import error_of, report

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import DistributedDataParallel
from dptrain.worker.comm import Communicator
from dptrain.worker.comm_hooks import CompressedAllreduce, HierarchicalAllreduce

comm = Communicator()
r, size = comm.rank, comm.size
rng = np.random.default_rng(5)
x_all = rng.standard_normal((4 * size, 6))
y_all = rng.integers(0, 3, 4 * size)


def mlp(dtype: str) -> nn.Module:
    engine.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(),
                          nn.Linear(32, 3))
    return model.double() if dtype == "float64" else model


def grads(model, x, y) -> dict:
    model.zero_grad()
    xt = engine.from_numpy(x.astype(next(model.parameters()).dtype))
    F.cross_entropy(model(xt), engine.from_numpy(y)).backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def shard():
    return x_all[4 * r:4 * r + 4], y_all[4 * r:4 * r + 4]


def run(hook_factory, dtype: str, steps: int = 1) -> dict:
    """The sum of `steps` hooked results, the exact sum of the buckets, Σ|c_i|, and the
    one-process gradient."""
    ddp = DistributedDataParallel(mlp(dtype), comm=comm, bucket_cap_mb=1e-6,
                                  first_bucket_cap_mb=1e-6)
    ddp.register_comm_hook(hook_factory())
    x, y = shard()
    total = None
    for _ in range(steps):
        g = grads(ddp, x, y)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    local = grads(mlp(dtype), x, y)
    scale = 1.0 / size
    c = {n: np.multiply(v, scale) for n, v in local.items()}  # what DDP puts in the bucket
    gathered = comm.allgather_object(c)
    exact = {n: sum(gi[n].astype(np.float64) for gi in gathered) for n in c}
    abs_sum = {n: sum(np.abs(gi[n].astype(np.float64)) for gi in gathered) for n in c}
    single = grads(mlp(dtype), x_all, y_all)
    return {"total": total, "exact": exact, "abs_sum": abs_sum, "single": single,
            "steps": steps}


def summary(out: dict, u: float | None = None, eta: float | None = None,
            sums: int | None = None) -> dict:
    """Worst |result - exact| relative to the tolerance, and the one-process agreement.
    `sums`: how many float32 additions a result went through (default: the world size)."""
    steps = out["steps"]
    worst_exact, worst_bound = 0.0, 0.0
    for n, exact in out["exact"].items():
        err = np.abs(out["total"][n] - steps * exact)
        if u is None:
            worst_exact = max(worst_exact, float((err / (1 + out["abs_sum"][n])).max()))
        else:
            p = size if sums is None else sums
            bound = ((2 * u + u * u + p * 2.0 ** -24 * (1 + u)) * out["abs_sum"][n]
                     + (p + 1) * eta)
            worst_bound = max(worst_bound, float((err / bound).max()))
    single = max(float((np.abs(out["exact"][n] - out["single"][n])
                        / (1 + np.abs(out["single"][n]))).max()) for n in out["exact"])
    return {"rel_to_exact": worst_exact, "err_over_bound": worst_bound,
            "exact_vs_single": single}


result = {"rank": r}
result["hier_shared"] = summary(run(lambda: HierarchicalAllreduce(comm), "float64"))
result["hier_2_per_node"] = summary(
    run(lambda: HierarchicalAllreduce(comm, ranks_per_node=2), "float64"))
probe = HierarchicalAllreduce(comm, ranks_per_node=2)
result["nodes_2_per_node"] = comm.allgather_object(
    None if probe.leaders is None else probe.leaders.size)[0]
result["node_size_2_per_node"] = probe.node.size
for fmt in ("float16", "bfloat16"):
    u, eta = {"float16": (2.0 ** -11, 2.0 ** -25), "bfloat16": (2.0 ** -8, 2.0 ** -134)}[fmt]
    result[fmt] = summary(run(lambda fmt=fmt: CompressedAllreduce(comm, fmt), "float32"), u, eta)
    result[f"{fmt}_ef_8_steps"] = summary(
        run(lambda fmt=fmt: CompressedAllreduce(comm, fmt), "float32", steps=8), u, eta)
    result[f"{fmt}_no_ef_8_steps"] = summary(
        run(lambda fmt=fmt: CompressedAllreduce(comm, fmt, error_feedback=False), "float32",
            steps=8), u, eta)
# float32 sums within a node (2 ranks), then bfloat16 across the nodes' leaders: the bound
# of the formats with the node's additions counted too; rounding happens among nodes only.
nodes = -(-size // 2)
result["hier_bf16"] = summary(
    run(lambda: HierarchicalAllreduce(comm, 2, lambda leaders: CompressedAllreduce(leaders)),
        "float32"), 2.0 ** -8, 2.0 ** -134, sums=nodes + 2)
result["errors"] = {
    "dtype": error_of(lambda: CompressedAllreduce(comm, "int8")),
    "ranks_per_node": error_of(lambda: HierarchicalAllreduce(comm, ranks_per_node=0)),
    "float64_bucket": error_of(lambda: CompressedAllreduce(comm)(comm, np.zeros(3))),
}
report(comm, result)
