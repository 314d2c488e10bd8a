"""N ranks with DistributedDataParallel train the model 1 process trains on the whole batch.

Every rank builds the MLP from a different seed (so the broadcast from rank 0 is exercised),
then takes 20 SGD-with-momentum steps, each on its contiguous shard of the same global batch.
Rank 0 also trains the single-process reference: the model built from rank 0's seed, on every
global batch whole, without DDP. Rank 0 prints each parameter's largest difference from the
reference, and every rank's parameter digest. On an all-reduce path other than ``cpu`` the
model lives on the strict device, which stands in for a GPU, and DDP's buckets are device
arrays reduced by that path (``_paths.py``); DEVICE ``cuda`` puts each rank on its GPU as a
job's ``device: cuda`` does (bench/gpu_check.sh).

    mpiexec -n N python ddp_equivalence.py [BUCKET_CAP_MB [PATH [DEVICE]]]
"""

from __future__ import annotations

import sys

import numpy as np
from _common import params_hash, report
from _paths import device_for, path_report, wrap

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine import nn
from dptrain.worker.comm import Communicator

STEPS, GLOBAL_BATCH, FEATURES, CLASSES = 20, 12, 8, 3


def build(seed: int) -> nn.Module:
    engine.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, CLASSES)).to(device)


def train(model, batches, shard=slice(None)) -> list[float]:
    opt = engine.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(engine.tensor(x[shard], device=device)),
                               engine.tensor(y[shard], device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


comm = Communicator()
cap = float(sys.argv[1]) if len(sys.argv) > 1 else 25.0
path = sys.argv[2] if len(sys.argv) > 2 else "cpu"
device = device_for(path, comm, *sys.argv[3:4])
rng = np.random.default_rng(1234)
batches = [(rng.standard_normal((GLOBAL_BATCH, FEATURES)).astype(np.float32),
            rng.integers(0, CLASSES, GLOBAL_BATCH)) for _ in range(STEPS)]
per_rank = GLOBAL_BATCH // comm.size
shard = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)

model = build(seed=100 + comm.rank)
model.register_buffer("marker", engine.full((3,), float(comm.rank), device=device))  # rank 0's
ddp = wrap(model, comm, path, bucket_cap_mb=cap)
train(ddp, batches, shard)
result = {"rank": comm.rank, "hash": params_hash(ddp.module),
          "buckets": len(ddp.bucket_assignment), "marker": model.marker.tolist(),
          "devices": sorted({str(p.device) for p in ddp.module.parameters()}),
          **path_report(ddp, comm)}
if comm.rank == 0:
    reference = build(seed=100)
    train(reference, batches)
    ours = dict(ddp.module.named_parameters())
    result["max_abs_diff"] = {
        name: float(np.abs(ours[name].numpy() - p.numpy()).max())
        for name, p in reference.named_parameters()}
    result["max_abs_param"] = max(float(np.abs(p.numpy()).max())
                                  for p in reference.parameters())
    result["moved"] = float(np.abs(reference[0].weight.numpy()
                                   - build(seed=100)[0].weight.numpy()).max())
report(comm, result)
