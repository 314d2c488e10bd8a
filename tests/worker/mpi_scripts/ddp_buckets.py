"""Bucketed reduction equals per-tensor reduction, whatever the bucket size and hook order.

A float64 model with two branches of identical shapes; even ranks add them as ``a + b``, odd
ranks as ``b + a``, so backward produces their gradients in a different order on different
ranks (the script records the order). One backward on each rank's shard, through DDP with
many tiny buckets, a few small ones and one huge one, is compared with a plain copy of the
model whose gradients are all-reduced one tensor at a time.

    mpiexec -n N python ddp_buckets.py [PATH]

PATH is an all-reduce path of ``_paths.py`` (default ``cpu``); the others run DDP's model on
the strict device.
"""

from __future__ import annotations

import sys

import numpy as np
from _common import grads_hash, report
from _paths import device_for, path_report, wrap

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
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


def local_backward(model, x, y, order: list | None = None, device: str = "cpu") -> None:
    if order is not None:
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda t, name=name: order.append(name))
    F.cross_entropy(model(engine.tensor(x, device=device)),
                    engine.tensor(y, device=device)).backward()


comm = Communicator()
r = comm.rank
path = sys.argv[1] if len(sys.argv) > 1 else "cpu"
device = device_for(path, comm)
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
    ddp = wrap(build(swap).to(device), comm, path, bucket_cap_mb=cap)
    order: list = []
    local_backward(ddp, x, y, order, device)
    result["hook_order"] = order
    result["buckets"][label] = ddp.bucket_assignment
    result["max_abs_diff"][label] = max(
        float(np.abs(p.grad.numpy() - ref[n]).max()) for n, p in ddp.named_parameters())
    result["grad_hash"][label] = grads_hash(ddp.module)
    result["path"] = path_report(ddp, comm)
result["registration_order"] = [n for n, _ in reference.named_parameters()]
result["max_abs_grad"] = max(float(np.abs(g).max()) for g in ref.values())
report(comm, result)
