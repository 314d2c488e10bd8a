"""Gradient accumulation under ``no_sync`` and parameters that get no gradient.

Part 1: three micro-batches per rank, the first two under ``no_sync``, each loss divided by 3;
the result must equal one process's gradient on all ``3 * size`` micro-batches at once. The
gradients after the ``no_sync`` backwards must still be local (they differ across ranks).

Part 2: a model whose branch ``a`` only even ranks use, ``b`` only odd ranks use and ``never``
no rank uses, for three SGD steps with one-parameter buckets. Expected gradient: the mean over
ranks of each rank's local gradient with zeros where it had none, computed here from plain
copies of the model and gathered with ``allgather_object``.

    mpiexec -n N python ddp_no_sync_unused.py [PATH]

PATH is an all-reduce path of ``_paths.py`` (default ``cpu``); the others train on the strict
device.
"""

from __future__ import annotations

import sys

import numpy as np
from _common import grads_hash, params_hash, report
from _paths import device_for, path_report, wrap

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker.comm import Communicator

comm = Communicator()
r, n = comm.rank, comm.size
path = sys.argv[1] if len(sys.argv) > 1 else "cpu"
device = device_for(path, comm)
rng = np.random.default_rng(5)
result: dict = {"rank": r}

# ---------------------------------------------------------------- part 1: no_sync
MICRO, PER = 3, 2
x_all = rng.standard_normal((MICRO * n * PER, 5))
y_all = rng.standard_normal((MICRO * n * PER, 2))


def mlp() -> nn.Module:
    engine.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()


ddp = wrap(mlp().to(device), comm, path, bucket_cap_mb=0.0005)
mine = [slice((r * MICRO + k) * PER, (r * MICRO + k + 1) * PER) for k in range(MICRO)]
with ddp.no_sync():
    for k in range(MICRO - 1):
        loss = F.mse_loss(ddp(engine.tensor(x_all[mine[k]], device=device)),
                          engine.tensor(y_all[mine[k]], device=device)) / MICRO
        loss.backward()
result["hash_inside_no_sync"] = grads_hash(ddp.module)
loss = F.mse_loss(ddp(engine.tensor(x_all[mine[-1]], device=device)),
                  engine.tensor(y_all[mine[-1]], device=device)) / MICRO
loss.backward()
reference = mlp()
F.mse_loss(reference(engine.from_numpy(x_all)), engine.from_numpy(y_all)).backward()
ours = dict(ddp.named_parameters())
result["no_sync_max_abs_diff"] = max(float(np.abs(ours[k].grad.numpy() - p.grad.numpy()).max())
                                     for k, p in reference.named_parameters())
result["no_sync_hash_after"] = grads_hash(ddp.module)
result["no_sync_path"] = path_report(ddp, comm)


# ---------------------------------------------------------------- part 2: unused parameters
class Forked(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2)
        self.never = nn.Linear(4, 2)
        self.use_a = True

    def forward(self, x):
        h = self.trunk(x).tanh()
        return self.a(h) if self.use_a else self.b(h)


def forked() -> Forked:
    engine.manual_seed(11)
    return Forked().double()


for find_unused in (False, True):
    key = "find_unused" if find_unused else "default"
    ddp = wrap(forked().to(device), comm, path, bucket_cap_mb=1e-6,
               find_unused_parameters=find_unused)
    plain = forked()
    opt = engine.optim.SGD(ddp.parameters(), lr=0.5)
    steps = []
    for step in range(3):
        x = engine.from_numpy(rng.standard_normal((3, 4)))
        y = engine.from_numpy(rng.standard_normal((3, 2)))
        use_a = (r + step) % 2 == 0
        ddp.module.use_a = plain.use_a = use_a
        plain.load_state_dict(ddp.state_dict())
        plain.zero_grad()
        F.mse_loss(plain(x), y).backward()
        local = {k: None if p.grad is None else p.grad.numpy().tolist()
                 for k, p in plain.named_parameters()}
        everyone = comm.allgather_object(local)
        opt.zero_grad()
        F.mse_loss(ddp(x.to(device)), y.to(device)).backward()
        diffs, nones = {}, []
        for k, p in ddp.named_parameters():
            got = [g[k] for g in everyone]
            if p.grad is None:
                nones.append(k)
                continue
            shape = p.shape
            expected = sum(np.zeros(shape) if g is None else np.asarray(g) for g in got) / n
            diffs[k] = float(np.abs(p.grad.numpy() - expected).max())
        steps.append({"max_abs_diff": max(diffs.values()), "none": nones,
                      "grad_hash": grads_hash(ddp.module),
                      "never_grad_zero": bool(ddp.module.never.weight.grad is not None
                                              and not ddp.module.never.weight.grad.numpy().any())})
        opt.step()
    result[key] = {"steps": steps, "params_hash": params_hash(ddp.module),
                   "devices": sorted({str(p.device) for p in ddp.module.parameters()}),
                   **path_report(ddp, comm)}
report(comm, result)
