"""An own training loop on a device (the strict one, or ``cuda`` in bench/gpu_check.sh) with
dropout, checkpointing every epoch: run straight and in two halves (the second resumed), it must
end with the same parameters, which needs the device generator's state in the checkpoint (the
masks are drawn on the device).

    dptrain run device_dropout_loop.py -n 2 --checkpoint-dir DIR [--resume] -- --epochs N
        [--device cuda]
"""

import argparse

import numpy as np

import dptrain.worker
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker import DistributedDataParallel, DistributedSampler

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--device", default="strict", help="strict, or cuda: the rank's GPU")
args = parser.parse_args()

ctx = dptrain.worker.init()
engine.manual_seed(0)  # the same initial parameters on every rank
module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
device = ctx.device if args.device == "cuda" else args.device
model = DistributedDataParallel(module.to(device), ctx.comm)
optimizer = engine.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
step = 0
state = ctx.load_checkpoint()
if state is not None:
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = state["step"]

data = np.random.default_rng(3)
x = data.standard_normal((64, 8)).astype(np.float32)
y = x @ data.standard_normal((8, 1)).astype(np.float32)
sampler = DistributedSampler(len(x), seed=0, drop_last=True)
local = 16 // ctx.world_size
for epoch in ctx.epochs(args.epochs, sampler):
    indices = sampler.indices()
    for start in range(0, len(indices) - local + 1, local):
        batch = np.sort(indices[start:start + local])
        out = model(engine.tensor(x[batch], device=device))
        loss = engine.functional.mse_loss(out, engine.tensor(y[batch], device=device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    ctx.report(step, loss=loss.item(), epoch=epoch)
    ctx.save_checkpoint({"model": model.module, "optimizer": optimizer}, step)
