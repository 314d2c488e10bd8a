"""Each GPU path's broadcast on the strict device: a device array from the last rank, twice
(the pinned buffer is reused), and `DistributedDataParallel.broadcast_parameters` after every
rank but 0 has changed its parameters and buffer. Every rank reports what it holds.

    mpiexec -n N python device_broadcast.py PATH
"""

from __future__ import annotations

import sys

from _common import params_hash, report
from _paths import nccl_double, wrap

from dptrain import engine
from dptrain.engine import nn
from dptrain.worker.comm import Communicator
from dptrain.worker.comm_device import NcclAllreduce, device_allreduce_hook

comm = Communicator()
path = sys.argv[1]
root = comm.size - 1
# nccl through the double of cupy.cuda.nccl: the GPU boundary, which CI cannot run
hook = (NcclAllreduce(comm, "strict", nccl=nccl_double) if path == "nccl"
        else device_allreduce_hook(path, comm, "strict"))
seen = []
for round_ in range(2):
    x = engine.arange(5, dtype=engine.float64, device="strict") * (10 * comm.rank + round_)
    hook.broadcast_(comm, x.data, root)
    seen.append(x.tolist())

engine.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to("strict")
model.register_buffer("marker", engine.full((2,), 7.0, device="strict"))
ddp = wrap(model, comm, path)
reference = params_hash(model)
if comm.rank != 0:
    with engine.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        model.marker.fill_(float(comm.rank))
ddp.broadcast_parameters()
report(comm, {"rank": comm.rank, "seen": seen, "same_as_rank0": params_hash(model) == reference,
              "marker": model.marker.tolist(), "device": str(model.marker.device),
              "pinned_buffers": getattr(hook, "pinned_buffers", None),
              "staged_bytes": comm.staged_bytes,
              "nccl_calls": [c[0] for c in nccl_double.calls]})
