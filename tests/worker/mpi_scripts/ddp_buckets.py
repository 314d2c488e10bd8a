"""Bucketed reduction equals per-tensor reduction, whatever the bucket size and hook order.

A float64 model with two branches of identical shapes; even ranks add them as ``a + b``, odd
ranks as ``b + a``, so backward produces their gradients in a different order on different
ranks (the script records the order). One backward on each rank's shard, through DDP with
many tiny buckets, a few small ones and one huge one, is compared with a plain copy of the
model whose gradients are all-reduced one tensor at a time.
"""

from __future__ import annotations

import numpy as np
from _common import grads_hash, report

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import DistributedDataParallel
from dptrain.worker.comm import Communicator


class Branchy(nn.Module):
    def __init__(self, swap: bool):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.swap = swap

    def forward(self, x):
        h = self.inp(x).tanh()
        a, b = self.a(h), self.b(h * 2.0)
        return self.head((b + a) if self.swap else (a + b))


def build(swap: bool) -> Branchy:
    engine.manual_seed(7)
    return Branchy(swap).double()


def local_backward(model, x, y, order: list | None = None) -> None:
    if order is not None:
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda t, name=name: order.append(name))
    F.cross_entropy(model(engine.from_numpy(x)), engine.from_numpy(y)).backward()


comm = Communicator()
r = comm.rank
rng = np.random.default_rng(99)
x_all = rng.standard_normal((4 * comm.size, 6))
y_all = rng.integers(0, 3, 4 * comm.size)
x, y = x_all[4 * r:4 * r + 4], y_all[4 * r:4 * r + 4]
swap = r % 2 == 1

reference = build(swap)
local_backward(reference, x, y)
for p in reference.parameters():
    comm.allreduce_(p.grad.data, op="mean")
ref = {n: p.grad.numpy() for n, p in reference.named_parameters()}

result = {"rank": r, "max_abs_diff": {}, "buckets": {}, "grad_hash": {}}
for label, cap in (("tiny", 1e-6), ("small", 0.0008), ("huge", 1000.0)):
    ddp = DistributedDataParallel(build(swap), comm=comm, bucket_cap_mb=cap)
    order: list = []
    local_backward(ddp, x, y, order)
    result["hook_order"] = order
    result["buckets"][label] = ddp.bucket_assignment
    result["max_abs_diff"][label] = max(
        float(np.abs(p.grad.numpy() - ref[n]).max()) for n, p in ddp.named_parameters())
    result["grad_hash"][label] = grads_hash(ddp.module)
result["registration_order"] = [n for n, _ in reference.named_parameters()]
result["max_abs_grad"] = max(float(np.abs(g).max()) for g in ref.values())
report(comm, result)
