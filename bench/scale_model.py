"""Scale model: data-parallel efficiency from 8 to 512 ranks, fitted on this machine.

Run it under MPI on 2 ranks, one BLAS thread per rank:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        MKL_NUM_THREADS=1 .venv/bin/mpiexec -n 2 .venv/bin/python bench/scale_model.py

What it measures here (medians, repetitions interleaved):

* ``Allreduce(IN_PLACE)`` of float32 arrays from 4 B to 64 MB (the fastest repetition); a
  least-squares fit (relative errors) of t = a + b·n gives this machine's α and β for a ring
  of p ranks,
  t = 2(p-1)α + 2(p-1)/p·n·β (p = 2 here);
* the engine's forward and backward time per parameter on the MLP 784-1024-1024-10 at 128
  samples per rank (both ranks computing, as in data-parallel training);
* the cost per element of the 16-bit codec of `CompressedAllreduce`;
* the 2-rank DDP step of that MLP with each comm hook, which the model then predicts from the
  numbers above: the check of the model against what this machine can measure.

``bench/scale_check_netns.py`` runs the same measurements (``--json``) with one rank on each
of 2–3 network-namespace hosts over shaped TCP links, and prints the same check for them.

The model (`step_time`): forward, then backward producing gradients at a constant rate in
reverse registration order; each bucket's reduction starts when its last gradient is ready
and the previous bucket's reduction has finished; the step ends when backward and the last
reduction have. Efficiency = compute time / step time. Reductions, with g ranks per node:

* ring (the default ``Iallreduce``): 2(p-1)α + 2(p-1)/p·n·β;
* hierarchical (`HierarchicalAllreduce`): the node's reduce + broadcast on shared memory (this
  machine's α, β, g ranks) plus a ring over the p/g node leaders on the network;
* compressed (`CompressedAllreduce`, 16-bit): a ring carrying n/2 bytes, plus the codec time;
* hierarchical+compressed: the node's stages, then a 16-bit ring over the leaders;
* tensor fusion sized by the model: for each algorithm the bucket size (DDP's
  ``bucket_cap_mb``, Horovod's fusion threshold) that minimises the modelled step.

On the modelled clusters the first bucket is PyTorch's 1 MiB (``first_bucket_cap_mb=1``: the
network moves it while backward goes on); the 2-rank check models DDP's defaults.

It prints the fit, the 2-rank check and the tables for ResNet-50 (25.6M parameters) and
BERT-large (340M) on 25 Gb/s (α = 25 µs) and 100 Gb/s (α = 5 µs) links at 8…512 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS = {"ResNet-50": 25.6e6, "BERT-large": 340e6}
LINKS = {"25 Gb/s": (25e-6, 8 / 25e9), "100 Gb/s": (5e-6, 8 / 100e9)}  # (α s, β s/byte)
RANKS = (8, 16, 32, 64, 128, 256, 512)
FIRST_BUCKET = 1024 * 1024
#: The comm hooks the model knows: the default Iallreduce, `HierarchicalAllreduce`,
#: `CompressedAllreduce` (bfloat16), and `HierarchicalAllreduce` with `CompressedAllreduce`
#: among the node leaders.
ALGORITHMS = ("ring", "hierarchical", "compressed", "hierarchical+compressed")
FUSION_CANDIDATES_MB = (1, 2, 4, 8, 16, 25, 32, 64, 128, 256, 512, 1024, 2048)


# ---------------------------------------------------------------- the model (pure)

@dataclass(frozen=True)
class Network:
    """The links of a cluster: network α (s per message), β (s per byte), and the node's
    shared-memory α, β with `ranks_per_node` ranks per node."""

    alpha: float
    beta: float
    local_alpha: float
    local_beta: float
    ranks_per_node: int = 8


def ring_time(nbytes: float, p: int, alpha: float, beta: float) -> float:
    """Seconds of a ring all-reduce of `nbytes` over `p` ranks (0 for one rank)."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta


def reduce_time(algorithm: str, nbytes: float, p: int, net: Network,
                codec_s_per_byte: float = 0.0) -> float:
    """Seconds to reduce one bucket of `nbytes` (float32) over `p` ranks with `algorithm`,
    one of `ALGORITHMS`."""
    if algorithm == "ring":
        return ring_time(nbytes, p, net.alpha, net.beta)
    if algorithm == "compressed":
        return ring_time(nbytes / 2, p, net.alpha, net.beta) + nbytes * codec_s_per_byte
    if algorithm in ("hierarchical", "hierarchical+compressed"):
        g = min(net.ranks_per_node, p)
        nodes = -(-p // g)
        local = ring_time(nbytes, g, net.local_alpha, net.local_beta)
        if algorithm == "hierarchical":
            return local + ring_time(nbytes, nodes, net.alpha, net.beta)
        codec = nbytes * codec_s_per_byte if nodes > 1 else 0.0
        return local + ring_time(nbytes / 2, nodes, net.alpha, net.beta) + codec
    raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")


def bucket_sizes(total_bytes: float, cap_bytes: float,
                 first_bytes: float | None = None) -> list[float]:
    """DDP's buckets for a model of `total_bytes` with evenly spread parameters (the first one
    at most `first_bytes`, DDP's ``first_bucket_cap_mb``)."""
    sizes, left = [], total_bytes
    cap = cap_bytes if first_bytes is None else min(first_bytes, cap_bytes)
    while left > 0:
        sizes.append(min(cap, left))
        left -= sizes[-1]
        cap = cap_bytes
    return sizes


def step_time(params: float, forward_s: float, backward_s: float, p: int, net: Network,
              algorithm: str = "ring", cap_bytes: float = 25 * 1024 * 1024,
              codec_s_per_byte: float = 0.0, overlap: bool = True,
              first_bytes: float | None = FIRST_BUCKET) -> float:
    """Seconds of one data-parallel step: forward, then backward overlapped with the bucket
    reductions, which run one at a time in bucket order. With ``overlap=False`` reductions
    and backward take turns (a reduction over shared memory runs on the computing cores).
    `first_bytes`: the first bucket's cap (PyTorch's 1 MiB, for a cluster; None for one cap)."""
    total = 4 * params
    ready = end = 0.0
    for size in bucket_sizes(total, cap_bytes, first_bytes):
        ready += backward_s * size / total
        end = max(end, ready) + reduce_time(algorithm, size, p, net, codec_s_per_byte)
    if not overlap:
        return forward_s + backward_s + sum(
            reduce_time(algorithm, size, p, net, codec_s_per_byte)
            for size in bucket_sizes(total, cap_bytes, first_bytes))
    return forward_s + max(backward_s, end)


def best_fusion(params: float, forward_s: float, backward_s: float, p: int, net: Network,
                algorithm: str, codec_s_per_byte: float = 0.0) -> tuple[float, float]:
    """Tensor fusion sized by the model: ``(bucket MB, step seconds)`` of the bucket size
    among `FUSION_CANDIDATES_MB` that gives the shortest modelled step."""
    return min(((mb, step_time(params, forward_s, backward_s, p, net, algorithm,
                               mb * 1024 * 1024, codec_s_per_byte))
                for mb in FUSION_CANDIDATES_MB), key=lambda t: t[1])


def fit_alpha_beta(nbytes: list[float], seconds: list[float], p: int,
                   relative: bool = True) -> tuple[float, float]:
    """α, β of the ring model from all-reduce timings on `p` ranks: t = a + b·n fitted by
    least squares, a = 2(p-1)α, b = 2(p-1)/p·β. On relative errors (every size counts
    alike), or with ``relative=False`` on absolute errors (the large sizes, the buckets',
    decide: for links whose rate holds only past a burst, as a token bucket's)."""
    n, t = np.asarray(nbytes, float), np.asarray(seconds, float)
    w = 1 / t if relative else np.ones_like(t)
    a, b = np.linalg.lstsq(np.stack([w, n * w], axis=1), t * w, rcond=None)[0]
    return max(a, 0.0) / (2 * (p - 1)), b / (2 * (p - 1) / p)


def load_measurement(path: Path) -> dict:
    """What ``--json`` wrote: `measure`'s dict, its all-reduce sizes made numbers again."""
    m = json.loads(Path(path).read_text())
    return {**m, "allreduce": {int(n): t for n, t in m["allreduce"].items()}}


CHECKED = ("ring", "hierarchical", "compressed")  # the hooks the check measures


def per_parameter(m: dict) -> tuple[float, float]:
    """Seconds per parameter of the measured step outside backward (forward, loss,
    ``zero_grad``, the optimizer's update) and of backward: what the model scales up."""
    rest = m["steps"]["none"] - m["backward"]
    return rest / m["params"], m["backward"] / m["params"]


def check_rows(m: dict, p: int, net: Network) -> list[str]:
    """The model against the measured DDP steps of `m` (what `measure` returns) on `p`
    ranks joined by `net`: markdown rows of measured and modelled step (with and without
    overlap, the buckets measured) and modelled ÷ measured."""
    rest, backward = m["steps"]["none"] - m["backward"], m["backward"]
    rows = ["| algorithm | measured ms | modelled ms, overlap | modelled ms, no overlap | "
            "overlap / measured | no overlap / measured |", "|---|---:|---:|---:|---:|---:|",
            f"| no communication | {1e3 * m['steps']['none']:.2f} | | | | |"]
    for algorithm in CHECKED:
        pred = [step_time(m["params"], rest, backward, p, net, algorithm,
                          m["bucket_mb"] * 1024 * 1024, m["codec_s_per_byte"], overlap=o,
                          first_bytes=None)
                for o in (True, False)]
        meas = m["steps"][algorithm]
        rows.append(f"| {algorithm} | {1e3 * meas:.2f} | {1e3 * pred[0]:.2f} | "
                    f"{1e3 * pred[1]:.2f} | {pred[0] / meas:.2f} | {pred[1] / meas:.2f} |")
    return rows


def check_report(m: dict, p: int, net: Network, links: str) -> list[str]:
    """Lines of the whole check on `p` ranks over `links`: the fit, measured against fitted
    all-reduce times, the engine's time per parameter and `check_rows`."""
    tau_rest, tau_b = per_parameter(m)
    lines = [f"Fitted on {p} ranks ({links}): α = {1e6 * m['alpha']:.2f} µs, "
             f"β = {1e12 * m['beta']:.1f} ps/byte ({1e-9 / m['beta']:.2f} GB/s)", "",
             "| bytes | fastest measured ms | fitted ms |", "|---:|---:|---:|"]
    lines += [f"| {n} | {1e3 * t:.3f} | {1e3 * ring_time(n, p, m['alpha'], m['beta']):.3f} |"
              for n, t in m["allreduce"].items()]
    lines += ["", f"Engine, MLP at 128 samples per rank, per parameter: backward "
              f"{1e9 * tau_b:.2f} ns, forward and the rest of the step {1e9 * tau_rest:.2f} ns "
              f"(of which forward {1e9 * m['forward'] / m['params']:.2f} ns); bfloat16 codec "
              f"of CompressedAllreduce {1e12 * m['codec_s_per_byte']:.0f} ps per byte", "",
              f"Check at {p} ranks (MLP DDP step, {m['bucket_mb']:g} MiB buckets):", ""]
    return lines + check_rows(m, p, net)


# ---------------------------------------------------------------- measurements (MPI)

def _median_times(comm, contenders: dict, repeat: int, stat=statistics.median) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from allreduce import interleaved

    samples: dict[str, list[float]] = {}
    interleaved(comm, contenders, samples, repeat)
    return {k: stat(v) for k, v in samples.items()}


def measure(comm, repeat: int, max_bytes: int = 64 * 1024 * 1024,
            relative_fit: bool = True, bucket_mb: float = 25) -> dict:
    """Everything the model takes from this machine, and the DDP steps it predicts (buckets
    of `bucket_mb` MiB); the all-reduce sizes go from 4 B up by 4x to at most `max_bytes`,
    `relative_fit` as in `fit_alpha_beta`."""
    from mpi4py import MPI

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_vs_torch import batch, engine_mlp, engine_step

    from dptrain import engine
    from dptrain.worker import DistributedDataParallel
    from dptrain.worker.comm_hooks import (
        CompressedAllreduce,
        HierarchicalAllreduce,
        decode_16bit,
        encode_16bit,
    )

    sizes = [4 * 4 ** k for k in range(13) if 4 * 4 ** k <= max_bytes]
    arrays = {n: np.ones(n // 4, dtype=np.float32) for n in sizes}
    # The fastest of the repetitions: other processes on a shared machine only ever add time,
    # and α, β describe the links, not the load.
    ar = _median_times(comm, {n: (lambda a=a: comm.mpi_comm.Allreduce(MPI.IN_PLACE, a))
                              for n, a in arrays.items()}, repeat, stat=min)
    ar = {n: ar[n] for n in sizes}  # in size order (the rounds ran them shuffled)
    alpha, beta = fit_alpha_beta(sizes, list(ar.values()), comm.size, relative_fit)

    x, y = batch(comm.rank, 128)
    model = engine_mlp()
    params = sum(p.numel() for p in model.parameters())
    xt, yt = engine.from_numpy(x), engine.from_numpy(y)
    import dptrain.engine.functional as F

    def forward():
        return F.cross_entropy(model(xt), yt)

    def forward_backward():
        model.zero_grad()
        forward().backward()
    fb = _median_times(comm, {"forward": forward, "both": forward_backward}, repeat)

    codec = np.ones(1 << 20, dtype=np.float32)
    bits = np.empty(codec.size, dtype=np.uint16)
    scratch = np.empty(codec.size, dtype=np.uint32)

    def roundtrip():  # per element: encode twice, decode three times, as the hook does
        for _ in range(2):
            encode_16bit(codec, "bfloat16", bits, scratch)
        for _ in range(3):
            decode_16bit(bits, "bfloat16", codec)
    codec_s = _median_times(comm, {"codec": roundtrip}, repeat)["codec"] / codec.nbytes

    # MPI's all-reduce, the ring the model describes (not the one-node shared-window default).
    steps = {name: DistributedDataParallel(engine_mlp(), comm=comm, bucket_cap_mb=bucket_mb,
                                           allreduce="mpi")
             for name in CHECKED}
    steps["hierarchical"].register_comm_hook(HierarchicalAllreduce(comm))
    steps["compressed"].register_comm_hook(CompressedAllreduce(comm, "bfloat16"))
    contenders = {k: engine_step(w, x, y) for k, w in steps.items()}
    contenders["none"] = engine_step(engine_mlp(), x, y)
    measured = _median_times(comm, contenders, repeat)
    return {"alpha": alpha, "beta": beta, "allreduce": ar, "params": params,
            "forward": fb["forward"], "backward": fb["both"] - fb["forward"],
            "codec_s_per_byte": codec_s, "steps": measured, "bucket_mb": bucket_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21, help="repetitions per row (median)")
    parser.add_argument("--ranks-per-node", type=int, default=8,
                        help="ranks per node of the modelled cluster (default 8)")
    parser.add_argument("--speedups", type=lambda v: [float(x) for x in v.split(",")],
                        default=[1.0, 10.0],
                        help="also model compute this many times faster than this engine, "
                             "e.g. a GPU (comma-separated; default 1,10)")
    parser.add_argument("--node-gbps", type=float, default=None,
                        help="bandwidth within a node in GB/s (default: fitted here)")
    parser.add_argument("--codec-gbps", type=float, default=None,
                        help="16-bit codec throughput in GB/s of float32 (default: measured "
                             "here)")
    parser.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024,
                        help="largest all-reduce of the fit (default 64 MiB)")
    parser.add_argument("--fit", choices=("relative", "absolute"), default="relative",
                        help="least squares of the α, β fit on relative errors (default) or "
                             "absolute ones (the large sizes decide)")
    parser.add_argument("--bucket-mb", type=float, default=25,
                        help="DDP's bucket_cap_mb in the measured steps (default 25, DDP's)")
    parser.add_argument("--json", type=Path, default=None,
                        help="only measure, and write the measurements to this JSON file "
                             "(for bench/scale_check_netns.py, which runs this on its hosts)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from allreduce import machine

    from dptrain.worker.comm import Communicator

    comm = Communicator()
    m = measure(comm, args.repeat, args.max_bytes, args.fit == "relative", args.bucket_mb)
    if comm.rank != 0:
        return
    if args.json is not None:
        from dptrain.atomic_files import write_atomically

        write_atomically(args.json, [json.dumps({**m, "machine": machine(comm)}).encode()])
        return
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine(comm)}; {args.repeat} repetitions; load average at the end "
          f"{load}\n")
    here = Network(m["alpha"], m["beta"], m["alpha"], m["beta"], ranks_per_node=comm.size)
    print("\n".join(check_report(m, comm.size, here, "shared memory")))
    tau_rest, tau_b = per_parameter(m)
    goals = []
    local_beta = m["beta"] if args.node_gbps is None else 1 / (args.node_gbps * 1e9)
    codec_s = (m["codec_s_per_byte"] if args.codec_gbps is None
               else 1 / (args.codec_gbps * 1e9))
    print(f"\nModelled clusters: within a node α = {1e6 * m['alpha']:.2f} µs (fitted here) and "
          f"{1e-9 / local_beta:.1f} GB/s ({'fitted here' if args.node_gbps is None else 'given'}"
          f"); codec {1e-9 / codec_s:.2f} GB/s "
          f"({'measured here' if args.codec_gbps is None else 'given'})")
    for speedup in args.speedups:
        for model_name, params in MODELS.items():
            forward, backward = tau_rest * params / speedup, tau_b * params / speedup
            for link, (alpha, beta) in LINKS.items():
                net = Network(alpha, beta, m["alpha"], local_beta, args.ranks_per_node)
                print(f"\n{model_name} ({params / 1e6:.1f}M parameters), compute "
                      f"{1e3 * (forward + backward):.0f} ms per step (this engine"
                      f"{'' if speedup == 1 else f' {speedup:g}x faster'}), {link}, α = "
                      f"{1e6 * alpha:.0f} µs, {args.ranks_per_node} ranks per node: modelled "
                      "efficiency\n")
                print("| algorithm | " + " | ".join(map(str, RANKS)) + " |\n|---|"
                      + "---:|" * len(RANKS))
                for algorithm in ALGORITHMS:
                    cells, fused = [], []
                    for p in RANKS:
                        t = step_time(params, forward, backward, p, net, algorithm,
                                      codec_s_per_byte=codec_s)
                        mb, t_best = best_fusion(params, forward, backward, p, net, algorithm,
                                                 codec_s)
                        cells.append(f"{100 * (forward + backward) / t:.0f}%")
                        fused.append(f"{100 * (forward + backward) / t_best:.0f}% ({mb} MB)")
                        if (p, model_name, link) == (512, "ResNet-50", "100 Gb/s"):
                            goals.append((speedup, algorithm, (forward + backward) / t_best))
                    print(f"| {algorithm}, 25 MB buckets | " + " | ".join(cells) + " |")
                    print(f"| {algorithm}, fusion sized by the model | " + " | ".join(fused)
                          + " |")
    for speedup in args.speedups:
        best = max((g for g in goals if g[0] == speedup), key=lambda g: g[2])
        print(f"\nResNet-50, 512 ranks, 100 Gb/s, compute of this engine"
              f"{'' if speedup == 1 else f' {speedup:g}x faster'}: best modelled efficiency "
              f"{100 * best[2]:.0f}% ({best[1]} with fusion sized by the model; goal >= 90%)")


if __name__ == "__main__":
    main()
