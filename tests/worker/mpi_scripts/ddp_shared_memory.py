"""`SharedMemoryAllreduce` under real MPI, against sums computed here by a second route.

Each rank computes, with a plain copy of the model, its own bucket contents c_i (its shard's
gradient divided by the world size) and gathers everyone's with ``allgather_object``; the
hook promises every element summed in rank order, ``((c_0 + c_1) + c_2) + ...`` in float32,
so DDP's gradients must equal that fold bit for bit, on every rank. Also: the buckets (so the
gradients after a step) live in the hook's shared windows; registering the hook after a step
keeps the gradients; gradients zeroed in place accumulate into the shared views; buckets
reduced without DDP; arrays the hook did not allocate raise. And the default wrapper: the
window on one node with the same bits, the memory this process maps from /dev/shm (read from
/proc/self/maps) back where it was after ``close`` or a ``with`` block, and MPI's all-reduce
with one warning when the room check fails (a reserve larger than any /dev/shm, set through
its environment variable).
"""

from __future__ import annotations

import gc
import os
from functools import reduce

import numpy as np
from _common import error_of, report

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import DistributedDataParallel
from dptrain.worker.comm import Communicator
from dptrain.worker.comm_hooks import SHM_RESERVE_ENV, SharedMemoryAllreduce

comm = Communicator()
r, size = comm.rank, comm.size
rng = np.random.default_rng(11)
x_all = rng.standard_normal((4 * size, 6)).astype(np.float32)
y_all = rng.integers(0, 3, 4 * size)
x, y = x_all[4 * r:4 * r + 4], y_all[4 * r:4 * r + 4]


def mlp() -> nn.Module:
    engine.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(),
                         nn.Linear(17, 3))


def backward(model, xs, ys, set_to_none: bool = True) -> None:
    model.zero_grad(set_to_none=set_to_none)
    F.cross_entropy(model(engine.from_numpy(xs)), engine.from_numpy(ys)).backward()


def grads(model) -> dict:
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def folded() -> dict:
    """The hook's promise: every rank's c_i, summed in rank order in float32."""
    local = mlp()
    backward(local, x, y)
    c = {n: np.multiply(g, 1.0 / size) for n, g in grads(local).items()}
    gathered = comm.allgather_object(c)
    return {n: reduce(np.add, [gi[n] for gi in gathered]) for n in c}


def worst(a: dict, b: dict) -> float:
    return max(float(np.abs(a[n] - b[n]).max()) for n in a)


def in_windows(model, hook) -> bool:
    windows = [s.shared.local for s in hook._buckets.values()]
    return all(any(np.shares_memory(p.grad.data, w) for w in windows)
               for p in model.parameters())


result: dict = {"rank": r}
reference = folded()
single = mlp()
backward(single, x_all, y_all)

for label, caps in (("one_bucket", {}),
                    ("tiny_buckets", {"bucket_cap_mb": 1e-6, "first_bucket_cap_mb": 1e-6}),
                    ("small_first", {"bucket_cap_mb": 0.003, "first_bucket_cap_mb": 1e-4})):
    ddp = DistributedDataParallel(mlp(), comm=comm, **caps)
    hook = SharedMemoryAllreduce(ddp.comm)
    ddp.register_comm_hook(hook)
    out = {"buckets": len(ddp.bucket_assignment), "steps": []}
    for _ in range(3):  # the windows are reused step after step
        backward(ddp, x, y)
        g = grads(ddp)
        out["steps"].append({"vs_fold": worst(g, reference),
                             "vs_single": worst(g, grads(single)),
                             "bits": {n: v.tobytes().hex() for n, v in g.items()}})
    out["in_windows"] = in_windows(ddp, hook)
    out["windows"] = len(hook._buckets)
    result[label] = out

# Registered after a plain step: the gradients (views of the old buckets) move along.
ddp = DistributedDataParallel(mlp(), comm=comm)
backward(ddp, x, y)
before = grads(ddp)
hook = SharedMemoryAllreduce(ddp.comm)
ddp.register_comm_hook(hook)
result["late"] = {"kept": worst(grads(ddp), before), "in_windows": in_windows(ddp, hook)}
backward(ddp, x, y, set_to_none=False)  # accumulates into the shared views, then reduces
result["late"]["in_place_vs_fold"] = worst(grads(ddp), reference)
result["late"]["in_windows_after"] = in_windows(ddp, hook)

# Buckets allocated by the hook but reduced without DDP, two in flight at once, reused.
hook = SharedMemoryAllreduce(comm)
arrays = [hook.allocate_bucket(n, np.float64) for n in (1, 5, 1000)]
direct = []
for step in range(2):
    for a in arrays:
        a[...] = (r + 1) * (step + 1)
    requests = [hook(comm, a) for a in arrays]
    for q in reversed(requests):
        q.wait()
    direct.append([sorted(set(a.tolist())) for a in arrays])
result["direct"] = direct
result["errors"] = {
    "not_allocated": error_of(lambda: hook(comm, np.zeros(3))),
    "other_world": error_of(lambda: hook(Communicator(comm.split(r)), arrays[0])),
}


def shm_mapped() -> int:
    """Bytes of /dev/shm files this process has mapped."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/dev/shm/"):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                total += end - start
    return total


def settle() -> None:
    """Free the windows of the hooks above that nothing holds any more (a new hook does), so
    that what follows is measured from a fixed point."""
    gc.collect()
    SharedMemoryAllreduce(comm).close()


def wrapped_step(**kwargs) -> tuple[DistributedDataParallel, dict]:
    """A wrapper and what it took: its path, its hook, the /dev/shm it mapped, one step's
    gradients against the fold."""
    settle()
    before = shm_mapped()
    ddp = DistributedDataParallel(mlp(), comm=comm, **kwargs)
    out = {"allreduce": ddp.allreduce, "hook": type(ddp._comm_hook).__name__,
           "mapped": shm_mapped() - before, "before": before}
    backward(ddp, x, y)
    out["vs_fold"], out["vs_single"] = worst(grads(ddp), reference), worst(grads(ddp),
                                                                            grads(single))
    return ddp, out


ddp, default = wrapped_step()
stepped = grads(ddp)
ddp.close()
default["after_close"] = shm_mapped() - default["before"]
default["kept"] = worst(grads(ddp), stepped)
default["allreduce_closed"] = ddp.allreduce
backward(ddp, x, y)  # on, through MPI's all-reduce
default["closed_vs_single"] = worst(grads(ddp), grads(single))
ddp.close()  # again: nothing left to free
before = shm_mapped()
with DistributedDataParallel(mlp(), comm=comm) as scoped:
    backward(scoped, x, y)
    default["in_with"] = shm_mapped() - before
default["after_with"] = shm_mapped() - before
result["default"] = default

# Dropped without close (the wrapper and its model: the model's gradient hooks hold the
# wrapper): the windows stay while a gradient is a view of them, and the next hook built on
# these ranks frees them once none is.
ddp, dropped = wrapped_step()
held = next(ddp.parameters()).grad  # a view of the first wrapper's window
del ddp
gc.collect()
second = DistributedDataParallel(mlp(), comm=comm)
dropped["both"] = shm_mapped() - dropped["before"]
del held  # the last view of the dropped windows goes
gc.collect()
second.close()
dropped["second_closed"] = shm_mapped() - dropped["before"]
third = DistributedDataParallel(mlp(), comm=comm)  # frees the dropped windows first
dropped["third"] = shm_mapped() - dropped["before"]
third.close()
dropped["end"] = shm_mapped() - dropped["before"]
result["dropped"] = dropped
result["gradient_bytes"] = 4 * sum(p.numel() for p in mlp().parameters())

os.environ[SHM_RESERVE_ENV] = str(2**40)  # 1 EiB: no /dev/shm has room for that reserve
result["fallback"] = {kind: wrapped_step(**kwargs)[1] for kind, kwargs in
                      (("auto", {}), ("shared_memory", {"allreduce": "shared_memory"}))}
os.environ[SHM_RESERVE_ENV] = "lots"
result["errors"]["reserve"] = error_of(lambda: DistributedDataParallel(mlp(), comm=comm))
del os.environ[SHM_RESERVE_ENV]
result["mpi"] = wrapped_step(allreduce="mpi")[1]
report(comm, result)
