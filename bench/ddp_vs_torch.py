"""Data-parallel training step: DistributedDataParallel against PyTorch DDP and the ceiling.

Run it under MPI, one BLAS thread per rank:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        MKL_NUM_THREADS=1 .venv/bin/mpiexec -n 2 .venv/bin/python bench/ddp_vs_torch.py

One SGD step of the MLP 784-1024-1024-10 on a global batch of 256 (256 / ranks samples per
rank), every row measured in this one run, its repetitions interleaved round-robin with the
other rows', each time the median over repetitions of the slowest rank's time:

* dptrain `DistributedDataParallel`, with its defaults (all 7.5 MB of gradients in one 25 MB
  bucket, summed in an MPI-3 shared window by `SharedMemoryAllreduce` on one node), with
  PyTorch's 1 MB first bucket, and with MPI's all-reduce (``allreduce="mpi"``);
* the ceiling: every rank runs the same step on its half batch with no communication at all
  (two independent half-batch processes);
* one process on the whole batch (rank 0 alone; the other ranks wait asleep): the 1-rank step
  the speed-ups are counted from;
* PyTorch ``DistributedDataParallel`` over gloo (loopback) and PyTorch on one process, when
  torch is importable (a peer for comparison only, never a dependency);
* a raw mpi4py ``Allreduce(IN_PLACE)`` of the same 7.5 MB of gradients, for scale and for
  the bound ceiling / (ceiling + raw all-reduce) that a step cannot beat when, as with 2 ranks
  on 2 cores, no core is free to reduce while the others compute; and the same 7.5 MB through
  the `SharedMemoryAllreduce` hook, for that hook's bound.

Rank 0 prints a markdown table of medians, ratios, speed-ups and page faults per step (the
mean over repetitions and ranks: memory given back to the system and touched again costs a
fault per 4 KiB page); see docs/benchmarks.md.
``--rows ddp,ddp_mpi`` times only those contenders (and the ceiling), for an A/B without
the other models' steps in between.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dptrain.engine.functional as F  # noqa: E402
from dptrain import engine  # noqa: E402
from dptrain.engine import nn  # noqa: E402
from dptrain.worker import DistributedDataParallel  # noqa: E402
from dptrain.worker.comm import Communicator  # noqa: E402
from dptrain.worker.comm_hooks import SharedMemoryAllreduce  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allreduce import init_gloo, interleaved, machine  # noqa: E402

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # PyTorch is a peer for comparison only, never a dependency
    torch = None

SIZES = (784, 1024, 1024, 10)
GLOBAL_BATCH = 256
LR = 0.01


def engine_mlp() -> nn.Module:
    """The MLP, seeded, so that every rank and every contender starts from the same weights."""
    engine.manual_seed(1)
    layers = []
    for fan_in, fan_out in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batch(rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(rank)
    return (rng.standard_normal((size, SIZES[0])).astype(np.float32),
            rng.integers(0, SIZES[-1], size))


def engine_step(model, x: np.ndarray, y: np.ndarray):
    """One step of `model` (an engine module or a DDP wrapper) on (x, y)."""
    opt = engine.optim.SGD(model.parameters(), lr=LR)
    xt, yt = engine.from_numpy(x), engine.from_numpy(y)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    return step


def torch_step(model, x: np.ndarray, y: np.ndarray):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return step


def torch_mlp():
    """The same MLP in PyTorch, loaded with the engine model's initial weights."""
    layers = []
    for lin in engine_mlp():
        if isinstance(lin, nn.Linear):
            twin = torch.nn.Linear(lin.in_features, lin.out_features)
            with torch.no_grad():
                twin.weight.copy_(torch.from_numpy(lin.weight.numpy()))
                twin.bias.copy_(torch.from_numpy(lin.bias.numpy()))
            layers += [twin, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def rank0_alone(comm: Communicator, step):
    """`step` on rank 0 while the other ranks wait without spinning (so they leave rank 0
    its core, as an idle machine would)."""
    def run() -> None:
        if comm.rank == 0:
            step()
        comm.ibarrier().wait()
    return run


def counting_faults(name: str, fn, faults: dict[str, list[int]]):
    """`fn`, adding the page faults each call takes on this rank to ``faults[name]``: memory
    that the allocator gave back and a step touches again shows up here, not in the ratios."""
    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults.setdefault(name, []).append(
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=41, help="repetitions per row (median)")
    parser.add_argument("--rows", default=None,
                        help="only these contenders, comma-separated (of ddp, ddp_small_first, "
                             "ddp_mpi, single, raw, raw_shared, torch_ddp, torch_single; the "
                             "ceiling always runs): other models' steps between the compared "
                             "ones change their times (docs/benchmarks.md)")
    args = parser.parse_args()
    comm = Communicator()
    local = GLOBAL_BATCH // comm.size
    x, y = batch(comm.rank, local)
    x_all, y_all = batch(comm.size, GLOBAL_BATCH)
    # Identical wrappers timed side by side here differed by up to 8% at the machine's usual
    # load, so a difference of that size between the two DDP rows is not a finding.
    ddp = DistributedDataParallel(engine_mlp(), comm=comm)
    small_first = DistributedDataParallel(engine_mlp(), comm=comm, first_bucket_cap_mb=1)
    through_mpi = DistributedDataParallel(engine_mlp(), comm=comm, allreduce="mpi")
    hook = SharedMemoryAllreduce(comm)
    contenders = {
        "ddp": engine_step(ddp, x, y),
        "ddp_small_first": engine_step(small_first, x, y),
        "ddp_mpi": engine_step(through_mpi, x, y),
        "ceiling": engine_step(engine_mlp(), x, y),
        "single": rank0_alone(comm, engine_step(engine_mlp(), x_all, y_all)),
    }
    flat = np.ones(sum(p.numel() for p in ddp.parameters()), dtype=np.float32)
    mpi_comm = comm.mpi_comm
    from mpi4py import MPI  # the raw peer, called directly

    contenders["raw"] = lambda: mpi_comm.Allreduce(MPI.IN_PLACE, flat)
    # Zeros: sums of sums would overflow over the repetitions; the bytes moved are the same.
    shared_flat = hook.allocate_bucket(flat.size, flat.dtype)
    contenders["raw_shared"] = lambda: hook(comm, shared_flat).wait()
    if torch is not None:
        init_gloo(comm)
        contenders["torch_ddp"] = torch_step(
            torch.nn.parallel.DistributedDataParallel(torch_mlp()), x, y)
        contenders["torch_single"] = rank0_alone(comm, torch_step(torch_mlp(), x_all, y_all))
    if args.rows is not None:
        keep = set(args.rows.split(",")) | {"ceiling"}
        contenders = {k: v for k, v in contenders.items() if k in keep}
    samples: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}
    interleaved(comm, {k: counting_faults(k, fn, faults) for k, fn in contenders.items()},
                samples, args.repeat)
    # Mean over the timed steps (not the warm-up) and over the ranks.
    per_rank = comm.allgather_object({k: statistics.fmean(v[1:]) for k, v in faults.items()})
    if comm.rank != 0:
        return
    mean_faults = {k: statistics.fmean(r[k] for r in per_rank) for k in per_rank[0]}
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine(comm)}; torch {torch.__version__ if torch else 'not installed'}; "
          f"{args.repeat} repetitions per row; load average at the end {load}\n")
    print(f"MLP {'-'.join(map(str, SIZES))}, global batch {GLOBAL_BATCH} ({local} per rank), "
          f"SGD, {flat.nbytes / 1e6:.1f} MB of gradients\n")
    print("| what | median ms | vs the independent-process ceiling | speed-up over 1 process "
          "| page faults per step |\n|---|---:|---:|---:|---:|")
    rows = [(f"dptrain DDP step (defaults: {ddp.allreduce})", "ddp", "single"),
            ("dptrain DDP step, PyTorch's 1 MB first bucket (`first_bucket_cap_mb=1`)",
             "ddp_small_first", "single"),
            ("dptrain DDP step, MPI's all-reduce (`allreduce=\"mpi\"`)", "ddp_mpi", "single"),
            ("independent half-batch processes (ceiling, no communication)", "ceiling",
             "single"),
            ("dptrain, 1 process, whole batch", "single", "single")]
    if torch is not None:
        rows += [("PyTorch DDP (gloo) step", "torch_ddp", "torch_single"),
                 ("PyTorch, 1 process, whole batch", "torch_single", "torch_single")]
    for name, key, one in rows:
        if key in ms:
            speed_up = f"{ms[one] / ms[key]:.2f}x" if one in ms else ""
            print(f"| {name} | {ms[key]:.2f} | {100 * ms['ceiling'] / ms[key]:.0f}% | "
                  f"{speed_up} | {mean_faults[key]:.0f} |")
    for key, name in (("raw", "raw `Allreduce`"), ("raw_shared", "`SharedMemoryAllreduce`")):
        if key in ms:
            print(f"| {name} of the same {flat.nbytes / 1e6:.1f} MB | {ms[key]:.2f} | | | "
                  f"{mean_faults[key]:.0f} |")
    print()
    if "ddp" in ms and "torch_ddp" in ms:
        print(f"dptrain DDP step / PyTorch DDP step: {ms['ddp'] / ms['torch_ddp']:.2f}x "
              "(goal <= 0.9x)")
    for key, what in (("ddp", "dptrain DDP step"),
                      ("ddp_mpi", "dptrain DDP step with MPI's all-reduce")):
        if key in ms:
            print(f"{what} reaches {100 * ms['ceiling'] / ms[key]:.0f}% of the "
                  "independent-process ceiling (goal >= 90%)")
    # Both ranks' cores compute and a shared-memory reduction needs them, so the all-reduce
    # cannot hide behind backward here: the ceiling plus one all-reduce bounds the step.
    for step, reduce, what in (("ddp_mpi", "raw", "raw `Allreduce`"),
                               ("ddp", "raw_shared", "`SharedMemoryAllreduce`")):
        if step in ms and reduce in ms:
            bound = ms["ceiling"] / (ms["ceiling"] + ms[reduce])
            print(f"bound with the all-reduce not hidden, ceiling / (ceiling + {what}): "
                  f"{100 * bound:.0f}% of the ceiling; the {step} step reaches "
                  f"{100 * (ms['ceiling'] + ms[reduce]) / ms[step]:.0f}% of that bound")


if __name__ == "__main__":
    main()
