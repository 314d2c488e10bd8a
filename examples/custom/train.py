"""Your own training loop, as under torchrun: every rank runs this script.

    dptrain run examples/custom/train.py -n 2 --checkpoint-dir /tmp/own -- --epochs 3
    mpiexec -n 2 python examples/custom/train.py --epochs 3      (reports on stdout)
    dptrain submit examples/custom/own_loop.yaml                  (through a coordinator)

The model, loss and data come from the modules beside it. ``ctx`` gives the rank, the
communicator, the checkpoint to resume from, reporting and checkpoints in dptrain's format.
"""

import argparse

import numpy as np
from mydata import digit_images
from mylosses import focal
from mymodels import small_cnn

import dptrain.worker
from dptrain import engine
from dptrain.worker import DistributedDataParallel, DistributedSampler

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--batch-size", type=int, default=64, help="global, split over the ranks")
args = parser.parse_args()

ctx = dptrain.worker.init()
engine.manual_seed(0)  # the same initial parameters on every rank (DDP checks)
model = DistributedDataParallel(small_cnn(), ctx.comm)
optimizer = engine.optim.Adam(model.parameters(), lr=args.lr)
step = 0
state = ctx.load_checkpoint()  # None on a fresh start
if state is not None:
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = state["step"]

x, y = digit_images()
sampler = DistributedSampler(len(x), seed=0, drop_last=True)
local = args.batch_size // ctx.world_size
for epoch in ctx.epochs(args.epochs, sampler):
    indices = sampler.indices()
    for start in range(0, len(indices) - local + 1, local):
        batch = np.sort(indices[start:start + local])
        loss = focal(model(engine.from_numpy(x[batch])), engine.from_numpy(y[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 10 == 0:
            ctx.report(step, loss=loss.item(), epoch=epoch)
    ctx.save_checkpoint({"model": model.module, "optimizer": optimizer}, step)
