"""Every Communicator collective on every rank; rank 0 prints what each rank saw as JSON.

Rank r contributes values built from r, so the test checks the results against sums it
computes by hand.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from _common import error_of, report

from dptrain.worker import DistributedSampler
from dptrain.worker.comm import SPIN_S, Communicator

comm = Communicator()
r, n = comm.rank, comm.size
out: dict = {"rank": r, "size": n}

a = np.arange(1, 5, dtype=np.float64) * (r + 1)
returned = comm.allreduce_(a)
out["sum_f64"] = a.tolist()
out["in_place"] = returned is a

b = np.arange(1, 5, dtype=np.float32) * (r + 1)
comm.allreduce_(b, op="mean")
out["mean_f32"] = b.tolist()
out["mean_dtype"] = str(b.dtype)

c = np.array([r, -r, 10 * r + 1], dtype=np.int64)
comm.allreduce_(c, op="sum")
out["sum_i64"] = c.tolist()
mx = np.array([r, -r], dtype=np.int32)
comm.allreduce_(mx, op="max")
mn = np.array([r, -r], dtype=np.float32)
comm.allreduce_(mn, op="min")
out["max"], out["min"] = mx.tolist(), mn.tolist()

# A 2-D array and a float16 one: buffers are reduced whole, whatever their shape.
m = np.full((3, 2), r + 1, dtype=np.float16)
comm.allreduce_(m, op="sum")
out["sum_2d_f16"] = m.tolist()

# Non-blocking: two requests in flight at once, driven by test(), then waited for.
big = np.full(200_000, r + 1, dtype=np.float32)
small = np.full(3, 2.0 * (r + 1), dtype=np.float64)
req_big = comm.iallreduce_(big, op="sum")
req_small = comm.iallreduce_(small, op="mean")
tests = 0
while not req_big.test():
    tests += 1
req_small.wait()
req_small.wait()  # idempotent
out["iallreduce_big"] = [float(big.min()), float(big.max())]
out["iallreduce_mean"] = small.tolist()
out["requests_done"] = [req_big.done, req_small.done]

# A partner far later than Request.wait's busy-poll budget: the waiting ranks go on polling
# between sleeps, and every rank still gets the sum. The last rank joins 0.2 s late.
late = np.full(1 << 20, float(r + 1), dtype=np.float32)
if r == n - 1:
    time.sleep(200 * SPIN_S)
comm.iallreduce_(late).wait()
out["late_partner_sum"] = [float(late.min()), float(late.max())]
# Ibarrier: no rank gets past it before the late rank has arrived, which writes a file first.
marker = comm.broadcast_object(
    os.path.join(tempfile.gettempdir(), f"ibarrier-{os.getpid()}-{time.time_ns()}") if r == 0
    else None)
if r == n - 1:
    time.sleep(200 * SPIN_S)
    open(marker, "w").close()
barrier = comm.ibarrier()
barrier.wait()
out["ibarrier_after_late_rank"] = [barrier.done, os.path.exists(marker)]
comm.barrier()
if r == n - 1:
    os.unlink(marker)
# Non-blocking reduce onto a root and broadcast from it (the hierarchical hook's stages).
part = np.full(4, float(r + 1))
comm.ireduce_(part, root=n - 1).wait()
out["ireduce_root"] = part.tolist() if r == n - 1 else None
out["ireduce_others_unchanged"] = part.tolist() == [float(r + 1)] * 4 if r != n - 1 else True
comm.ibroadcast_(part, root=n - 1).wait()
out["ibroadcast"] = part.tolist()

root = n - 1
x = np.full(5, float(r), dtype=np.float32)
comm.broadcast_(x, root=root)
out["broadcast"] = x.tolist()
out["allgather"] = comm.allgather_object({"rank": r, "name": f"r{r}"})
out["bcast_object"] = comm.broadcast_object({"from": r, "list": [r, r]} if r == 0 else None)
comm.barrier()

strided = np.zeros((4, 4), dtype=np.float32)[:, 0]
readonly = np.zeros(3, dtype=np.float32)
readonly.flags.writeable = False
out["errors"] = {
    "non_contiguous": error_of(lambda: comm.allreduce_(strided)),
    "bad_op": error_of(lambda: comm.allreduce_(np.zeros(2), op="avg")),
    "bool": error_of(lambda: comm.allreduce_(np.zeros(2, dtype=bool))),
    "int_mean": error_of(lambda: comm.allreduce_(np.zeros(2, dtype=np.int64), op="mean")),
    "read_only": error_of(lambda: comm.broadcast_(readonly)),
    "bad_root": error_of(lambda: comm.broadcast_(np.zeros(2), root=n)),
    "not_array": error_of(lambda: comm.allreduce_([1.0, 2.0])),
}
sampler = DistributedSampler(10)  # num_replicas and rank from the world
out["sampler_default"] = [sampler.num_replicas, sampler.rank, list(sampler)]
report(comm, out)
