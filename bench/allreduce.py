"""Gradient synchronisation benchmark: DistributedDataParallel against raw MPI and gloo.

Run it under MPI with one BLAS thread per rank:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        .venv/bin/mpiexec -n 2 .venv/bin/python bench/allreduce.py

Rank 0 prints two markdown tables; every row is measured in this one run, its repetitions
interleaved with the other rows', and each time is the median over repetitions of the slowest
rank's time.

1. Synchronising 25.2M float32 gradients (24 layers of 1024 x 1024 plus bias, 100.8 MB):
   - one raw mpi4py ``Allreduce(MPI.IN_PLACE, buf)`` of the same bytes in one flat array: the
     peer the goal (DDP <= 1.1x) is stated against;
   - raw ``Allreduce`` of the same array cut into pieces the size of DDP's buckets, one after
     another: the floor for DDP (on a 32 MB-L3 machine MPICH reduces four 25 MB pieces much
     faster than one 100 MB array, so this is the fairer peer);
   - `Communicator.allreduce_` of that array (our thin wrapper);
   - DistributedDataParallel: the time of ``loss.backward()`` with DDP minus the same backward
     under ``ddp.no_sync()`` (no communication), on a graph whose backward does nothing but
     hand every parameter its gradient (``loss = sum(p.sum())``). The difference is everything
     DDP adds with MPI's all-reduce (``allreduce="mpi"``; the CPU default on one node is the
     shared window of part 3): hooks, copying (pre-scaled) gradients into buckets, the bucket
     all-reduces and
     making ``.grad`` a view of the result. Two variants: fresh gradients every step
     (``zero_grad()``, the default set_to_none=True: each gradient is copied into its bucket)
     and gradients zeroed in place (``zero_grad(set_to_none=False)``: backward accumulates
     straight into the bucket views, no copy);
   - ``torch.distributed.all_reduce`` with the gloo backend (loopback), if torch is installed;
   - mpi4py's pickling lower-case ``allreduce`` of the array, which dptrain never uses.
2. One training step of an MLP (784-1024-1024-10, 128 samples per rank, SGD): the step with DDP
   minus the step under ``no_sync()`` is the communication that backward did not hide, with
   MPI's all-reduce and with the `SharedMemoryAllreduce` comm hook (the default on one node).
3. An all-reduce of the MLP's 7.5 MB (and of one 25 MB bucket) among ranks on one node:
   MPICH's ``Allreduce`` and ``Iallreduce`` + `Request.wait` (DDP's ``allreduce="mpi"``) against the
   `SharedMemoryAllreduce` hook (buckets in an MPI-3 shared window, rank r sums slice r of
   every bucket in place) and the same algorithm with blocking ``MPI_Barrier`` calls instead of
   the hook's polled ``Ibarrier`` calls (the raw shared-window floor).
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dptrain.engine.functional as F  # noqa: E402
from dptrain import engine  # noqa: E402
from dptrain.engine import nn  # noqa: E402
from dptrain.worker import DistributedDataParallel  # noqa: E402
from dptrain.worker.comm import Communicator  # noqa: E402
from dptrain.worker.comm_hooks import SharedMemoryAllreduce, sum_slices  # noqa: E402

LAYERS, WIDTH = 24, 1024


def timed(comm: Communicator, fn) -> float:
    """Seconds the slowest rank spends in ``fn()``, the ranks starting together."""
    comm.barrier()
    t = time.perf_counter()
    fn()
    elapsed = np.array([time.perf_counter() - t])
    comm.allreduce_(elapsed, op="max")
    return float(elapsed[0])


def interleaved(comm: Communicator, contenders: dict, samples: dict, repeat: int) -> None:
    """Time every contender `repeat` times, round-robin, in an order shuffled anew each round
    (the same on every rank), so that drift in the machine's load and order effects hit every
    row alike: with a fixed cyclic order, a DDP step that always followed a step of another
    model ran ~15% slower than the same step following a DDP step."""
    names = list(contenders)
    for fn in contenders.values():  # warm-up
        fn()
    for i in range(repeat):
        order = list(names)
        random.Random(i).shuffle(order)
        for name in order:
            samples.setdefault(name, []).append(timed(comm, contenders[name]))


class Row:
    """A table row: a median and a best time, or the difference of two contenders'."""

    def __init__(self, name: str, samples: list[float], minus: list[float] | None = None):
        self.name = name
        self.median = 1e3 * statistics.median(samples)
        self.best = 1e3 * min(samples)
        if minus is not None:
            self.median -= 1e3 * statistics.median(minus)
            self.best -= 1e3 * min(minus)


def machine(comm: Communicator) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from mpi4py import MPI

    mpi = " ".join(MPI.Get_library_version().splitlines()[0].replace("Version:", "").split())
    return (f"{cpu}, {os.cpu_count()} cores; {comm.size} ranks; {mpi}; "
            f"numpy {np.__version__}; Python {platform.python_version()}")


# ---------------------------------------------------------------- 25M-parameter sync

def gradient_sync_rows(comm: Communicator, repeat: int) -> tuple[list[Row], str]:
    from mpi4py import MPI  # the raw peer, called directly

    engine.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    flat = np.ones(numel, dtype=np.float32)
    scratch = np.ones(numel, dtype=np.float32)
    ddp = DistributedDataParallel(model, comm=comm, allreduce="mpi")  # 25 MB buckets

    def fresh() -> None:  # zero_grad() is timed too: freeing the old gradients is part of it
        model.zero_grad(set_to_none=True)
        sum(p.sum() for p in params).backward()

    def in_place() -> None:
        model.zero_grad(set_to_none=False)
        sum(p.sum() for p in params).backward()

    def fresh_no_sync() -> None:
        with ddp.no_sync():
            fresh()

    def in_place_no_sync() -> None:
        with ddp.no_sync():
            in_place()

    torch_allreduce = _gloo_allreduce(comm, numel)
    samples: dict[str, list[float]] = {}
    # The same bytes cut like DDP's buckets: MPICH reduces 25 MB pieces faster than 100 MB.
    sizes = dict(model.named_parameters())
    pieces, offset = [], 0
    for names in ddp.bucket_assignment:
        n = sum(sizes[name].numel() for name in names)
        pieces.append(flat[offset:offset + n])
        offset += n

    def raw_pieces() -> None:
        for piece in pieces:
            comm.mpi_comm.Allreduce(MPI.IN_PLACE, piece)

    contenders = {
        "raw": lambda: comm.mpi_comm.Allreduce(MPI.IN_PLACE, flat),
        "raw_pieces": raw_pieces,
        "comm": lambda: comm.allreduce_(flat),
        "ddp_fresh": fresh, "base_fresh": fresh_no_sync,
        "ddp_inplace": in_place, "base_inplace": in_place_no_sync,
        "scale": lambda: np.multiply(scratch, 1.0 / comm.size, out=flat),
    }
    if torch_allreduce is not None:
        contenders["gloo"] = torch_allreduce
    interleaved(comm, contenders, samples, repeat)
    samples["pickled"] = [timed(comm, lambda: comm.mpi_comm.allreduce(flat)) for _ in range(3)]

    mb = flat.nbytes / 1e6
    rows = [
        Row(f"raw mpi4py `Allreduce(IN_PLACE)`, one {mb:.1f} MB array", samples["raw"]),
        Row(f"raw mpi4py `Allreduce(IN_PLACE)`, the same bytes in {len(pieces)} bucket-sized "
            "pieces", samples["raw_pieces"]),
        Row("`Communicator.allreduce_`, one array", samples["comm"]),
        Row("DistributedDataParallel sync, fresh grads (`zero_grad()`)",
            samples["ddp_fresh"], minus=samples["base_fresh"]),
        Row("DistributedDataParallel sync, grads zeroed in place",
            samples["ddp_inplace"], minus=samples["base_inplace"]),
        Row("one numpy pass over the same bytes (the division by the world size)",
            samples["scale"]),
    ]
    if torch_allreduce is not None:
        rows.append(Row("torch.distributed gloo `all_reduce`, same bytes", samples["gloo"]))
    rows.append(Row("mpi4py pickling `allreduce`, same array (3 runs)", samples["pickled"]))
    context = (f"{numel / 1e6:.1f}M float32 parameters in {len(params)} tensors, "
               f"{len(ddp.bucket_assignment)} buckets of <= 25 MB; zero_grad + backward alone "
               f"(under no_sync), median: {Row('', samples['base_fresh']).median:.1f} ms fresh, "
               f"{Row('', samples['base_inplace']).median:.1f} ms in place"
               + ("" if torch_allreduce else "; torch not installed: no gloo row"))
    return rows, context


def init_gloo(comm: Communicator) -> None:
    """Start torch.distributed's gloo process group over loopback on the ranks of `comm`
    (torch must be importable); it is destroyed at exit."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    path = comm.broadcast_object(
        os.path.join(tempfile.gettempdir(), f"dptrain-gloo-{os.getpid()}-{time.time_ns()}")
        if comm.rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=comm.rank,
                            world_size=comm.size)

    def close() -> None:
        dist.destroy_process_group()
        if comm.rank == 0 and os.path.exists(path):
            os.unlink(path)

    atexit.register(close)


def _gloo_allreduce(comm: Communicator, numel: int):
    """A function all-reducing a `numel` float32 torch tensor over gloo, or None."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # torch is a peer for comparison only, never a dependency
        return None
    torch.set_num_threads(1)
    init_gloo(comm)
    tensor = torch.ones(numel, dtype=torch.float32)
    return lambda: dist.all_reduce(tensor)


# ---------------------------------------------------------------- MLP step

def mlp_step_rows(comm: Communicator, repeat: int) -> tuple[list[Row], str]:
    from mpi4py import MPI

    def mlp() -> nn.Module:
        engine.manual_seed(1)
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))

    ddp = DistributedDataParallel(mlp(), comm=comm, allreduce="mpi")
    small = DistributedDataParallel(mlp(), comm=comm, bucket_cap_mb=1, allreduce="mpi")
    shared = DistributedDataParallel(mlp(), comm=comm, allreduce="shared_memory")
    opts = {id(w): engine.optim.SGD(w.parameters(), lr=0.01) for w in (ddp, small, shared)}
    rng = np.random.default_rng(comm.rank)
    x = engine.from_numpy(rng.standard_normal((128, 784)).astype(np.float32))
    y = engine.from_numpy(rng.integers(0, 10, 128))
    flat = np.ones(sum(p.numel() for p in ddp.parameters()), dtype=np.float32)

    def step(wrapper) -> None:
        loss = F.cross_entropy(wrapper(x), y)
        opts[id(wrapper)].zero_grad()
        loss.backward()
        opts[id(wrapper)].step()

    def step_no_sync() -> None:
        with ddp.no_sync():
            step(ddp)

    samples: dict[str, list[float]] = {}
    interleaved(comm, {"ddp": lambda: step(ddp), "small": lambda: step(small),
                       "shared": lambda: step(shared), "none": step_no_sync,
                       "raw": lambda: comm.mpi_comm.Allreduce(MPI.IN_PLACE, flat)},
                samples, repeat)
    rows = [Row("step under `no_sync()` (no communication)", samples["none"]),
            Row("step with DistributedDataParallel (one 7.5 MB bucket)", samples["ddp"]),
            Row("exposed communication per step (difference)", samples["ddp"],
                minus=samples["none"]),
            Row("step with DistributedDataParallel, `bucket_cap_mb=1`", samples["small"]),
            Row("exposed communication per step, 1 MB buckets", samples["small"],
                minus=samples["none"]),
            Row("step with DistributedDataParallel + `SharedMemoryAllreduce`",
                samples["shared"]),
            Row("exposed communication per step, `SharedMemoryAllreduce`", samples["shared"],
                minus=samples["none"]),
            Row(f"raw `Allreduce` of its {flat.nbytes / 1e6:.1f} MB of gradients, for scale",
                samples["raw"])]
    return rows, f"{flat.size / 1e6:.2f}M parameters, 128 samples per rank, SGD"


# ---------------------------------------------------------------- one node's all-reduce

def shared_memory_rows(comm: Communicator, repeat: int) -> tuple[list[Row], str]:
    from mpi4py import MPI

    hook = SharedMemoryAllreduce(comm)
    node = comm.split_shared()
    rows = []
    contenders, names = {}, {}
    for mb, count in ((7.5, 1_863_690), (25.0, 25 * 1024 * 1024 // 4)):
        # Zeros: sums of sums would overflow over the repetitions; the bytes moved are the same.
        plain = np.zeros(count, dtype=np.float32)
        bucket = hook.allocate_bucket(count, np.float32)
        raw = node.allocate_shared(count, np.float32)
        lo, hi = count * node.rank // node.size, count * (node.rank + 1) // node.size
        slices = [segment[lo:hi] for segment in raw.segments]

        def raw_shared(raw=raw, slices=slices) -> None:
            raw.sync()
            node.barrier()
            raw.sync()
            sum_slices(slices)  # the hook's own step between its barriers
            raw.sync()
            node.barrier()
            raw.sync()

        tag = f"{mb:g} MB"
        cases = {
            f"mpich {tag}": (f"MPICH `Allreduce(IN_PLACE)`, {tag}",
                             lambda plain=plain: comm.mpi_comm.Allreduce(MPI.IN_PLACE, plain)),
            f"iall {tag}": (f"MPICH `Iallreduce` + `Request.wait` (DDP's `allreduce=mpi`), "
                            f"{tag}",
                            lambda plain=plain: comm.iallreduce_(plain).wait()),
            f"hook {tag}": (f"`SharedMemoryAllreduce` hook + `Request.wait`, {tag}",
                            lambda bucket=bucket: hook(comm, bucket).wait()),
            f"raw {tag}": (f"the same in a shared window with blocking `MPI_Barrier`s, {tag}",
                           raw_shared),
        }
        for key, (name, fn) in cases.items():
            contenders[key], names[key] = fn, name
    samples: dict[str, list[float]] = {}
    interleaved(comm, contenders, samples, repeat)
    for key, name in names.items():
        rows.append(Row(name, samples[key]))
    return rows, f"{node.size} ranks sharing memory, float32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=31, help="repetitions per row (median)")
    args = parser.parse_args()
    comm = Communicator()
    sync, sync_context = gradient_sync_rows(comm, args.repeat)
    step, step_context = mlp_step_rows(comm, args.repeat)
    shared, shared_context = shared_memory_rows(comm, args.repeat)
    if comm.rank != 0:
        return
    print(f"machine: {machine(comm)}; {args.repeat} repetitions per row\n")
    print(f"Gradient synchronisation: {sync_context}\n")
    raw, pieces = sync[0].median, sync[1].median
    print("| what | median ms | best ms | median vs one raw Allreduce | median vs raw in pieces |"
          "\n|---|---:|---:|---:|---:|")
    for row in sync:
        print(f"| {row.name} | {row.median:.1f} | {row.best:.1f} | {row.median / raw:.2f}x | "
              f"{row.median / pieces:.2f}x |")
    print(f"\nMLP training step: {step_context}\n")
    print("| what | median ms | best ms | median vs step without communication |\n"
          "|---|---:|---:|---:|")
    base = step[0].median
    for row in step:
        print(f"| {row.name} | {row.median:.1f} | {row.best:.1f} | "
              f"{100 * row.median / base:.0f}% |")
    print(f"\nOne node's all-reduce: {shared_context}\n")
    print("| what | median ms | best ms | median vs MPICH `Allreduce` of the same bytes |\n"
          "|---|---:|---:|---:|")
    for i, row in enumerate(shared):
        peer = shared[i - i % 4].median  # four rows per size, MPICH's first
        print(f"| {row.name} | {row.median:.2f} | {row.best:.2f} | {row.median / peer:.2f}x |")


if __name__ == "__main__":
    main()
