"""A rank whose backward reaches no parameter still joins the gradient reduction.

Rank 0 trains a float64 ``Linear(3, 2)`` on an MSE loss; rank 1 runs the same forward but then
backpropagates a loss built from a tensor that is not connected to the model, so its backward
fires no parameter hook. Every rank must still finish backward, holding rank 0's gradient
averaged with zeros from rank 1; the reference is the linear layer's gradient written out by
hand in numpy. A second step, where both ranks use the model, checks that the ranks are still
in step afterwards. Run once with each ``find_unused_parameters`` setting.
"""

from __future__ import annotations

import numpy as np
from _common import report

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import DistributedDataParallel
from dptrain.worker.comm import Communicator

comm = Communicator()
r, n = comm.rank, comm.size
rng = np.random.default_rng(2)
x = rng.standard_normal((n, 4, 3))
y = rng.standard_normal((n, 4, 2))


def mse_grads(w: np.ndarray, b: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> list:
    """d mean((xs @ w.T + b - ys)**2) / d(w, b), by hand."""
    dout = 2 * (xs @ w.T + b - ys) / ys.size
    return [dout.T @ xs, dout.sum(axis=0)]


result: dict = {"rank": r}
for find_unused in (False, True):
    engine.manual_seed(4)
    ddp = DistributedDataParallel(nn.Linear(3, 2).double(), comm=comm,
                                  find_unused_parameters=find_unused)
    w, b = ddp.module.weight.numpy().copy(), ddp.module.bias.numpy().copy()
    steps = []
    # Step 1: only rank 0's loss depends on the model.
    out = ddp(engine.from_numpy(x[r]))
    if r == 0:
        loss = F.mse_loss(out, engine.from_numpy(y[0]))
    else:
        constant = engine.ones(3, dtype=engine.float64, requires_grad=True)
        loss = (constant * 0).sum()
    loss.backward()
    expected = [g / n for g in mse_grads(w, b, x[0], y[0])]
    steps.append([float(np.abs(p.grad.numpy() - e).max()) if p.grad is not None else None
                  for p, e in zip((ddp.module.weight, ddp.module.bias), expected)])
    # Step 2: every rank's loss depends on the model again.
    for p in ddp.parameters():
        p.grad = None
    F.mse_loss(ddp(engine.from_numpy(x[r])), engine.from_numpy(y[r])).backward()
    expected = [sum(g) / n for g in zip(*(mse_grads(w, b, x[k], y[k]) for k in range(n)))]
    steps.append([float(np.abs(p.grad.numpy() - e).max())
                  for p, e in zip((ddp.module.weight, ddp.module.bias), expected)])
    result["find_unused" if find_unused else "default"] = steps
report(comm, result)
