"""Data-parallel scaling: training throughput of the same job with 1 and 2 ranks.

Each job runs through the real entry point (``mpiexec -n N python -m dptrain.worker JOB``, the
command line `worker.mpiexec_command` builds, one BLAS thread per rank) with the same global
batch, so 2 ranks each compute half of every batch and all-reduce the gradients. Throughput is the
trainer's own steady-state samples/s (the final JSON line's ``samples_per_s``: step time
only, after the first step, without evaluation or checkpoints). Runs alternate 1 rank, 2
ranks, 2 independent runs, 1, 2, ... and the best of each is reported: on a shared machine
other processes only ever slow a run down, so the fastest run is the least disturbed.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/scaling.py

Scaling efficiency = samples/s with 2 ranks / (2 x samples/s with 1 rank); the goal is
>= 90%. Prints a markdown table (docs/benchmarks.md records one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dptrain.worker.mpiexec_command import LaunchSettings, mpiexec_command  # noqa: E402

# (row label, job file, overrides for the benchmark)
JOBS = [
    ("digits MLP 64-128-64-10", "examples/digits_mlp.yaml", {"batch_size": 64}),
    ("digits MLP 64-128-64-10", "examples/digits_mlp.yaml", {"batch_size": 512}),
    ("digits lenet (8x8)", "examples/digits_lenet.yaml", {"batch_size": 64}),
    ("digits lenet (8x8)", "examples/digits_lenet.yaml", {"batch_size": 512}),
    ("synthetic MLP 256-512-512-10", "examples/synthetic_bench.yaml", {"batch_size": 256}),
    ("synthetic MLP 256-512-512-10", "examples/synthetic_bench.yaml", {"batch_size": 2048}),
]
GOAL = 0.90
# Set on these machines, these select slow OpenBLAS kernels; benchmarks unset them (as
# `make bench` does), tests never do.
_SLOW_BLAS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def run_job(job: dict, ranks: int, workdir: Path) -> dict:
    """Run `job` on `ranks` ranks and return its final metrics (the JSON line)."""
    path = workdir / f"job-{ranks}.yaml"
    path.write_text(yaml.safe_dump(job))
    cmd = mpiexec_command(LaunchSettings(str(path), ranks, progress=False))
    env = {k: v for k, v in os.environ.items() if k not in _SLOW_BLAS}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_independent(job: dict, workdir: Path) -> float:
    """The machine's ceiling for 2 ranks: two single-rank runs of half the batch at the same
    time, with no communication at all. Returns their summed samples/s."""
    half = {**job, "batch_size": job["batch_size"] // 2}
    procs = []
    env = {k: v for k, v in os.environ.items() if k not in _SLOW_BLAS}
    env["PYTHONPATH"] = str(REPO)
    for i in range(2):
        path = workdir / f"alone-{i}.yaml"
        path.write_text(yaml.safe_dump(half))
        # Each pinned to its own core, as mpiexec pins the ranks of the 2-rank run.
        cmd = ["taskset", "-c", str(i), *mpiexec_command(LaunchSettings(
            str(path), 1, bind_to=None, progress=False))]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    total = 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"an independent run failed ({proc.returncode}):\n{err}")
        total += json.loads(out.strip().splitlines()[-1])["samples_per_s"]
    return total


def bench_job(label: str, job_file: str, overrides: dict, steps: int, repeat: int) -> dict:
    """Best samples/s with 1 and 2 ranks (and 2 independent runs) for one job."""
    job = yaml.safe_load((REPO / job_file).read_text())
    job.update(overrides)
    job.update(name=job["name"] + "-bench", max_steps=steps, epochs=None, eval_every=0,
               workers=2, checkpoint={"every_steps": 0, "keep": 1})
    job.pop("scheduler", None)  # a schedule tied to the example's length
    rates: dict[int, list[float]] = {1: [], 2: [], 0: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            for ranks in (1, 2):
                rates[ranks].append(run_job(job, ranks, Path(tmp))["samples_per_s"])
            rates[0].append(run_independent(job, Path(tmp)))
    one, two, ceiling = (max(rates[k]) for k in (1, 2, 0))
    return {"label": label, "batch": job["batch_size"], "steps": steps, "one": one,
            "two": two, "ceiling": ceiling, "speedup": two / one,
            "efficiency": two / (2 * one), "of_ceiling": two / ceiling}


def machine() -> str:
    """One line describing this machine and the BLAS numpy uses."""
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
                         for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        blas = "BLAS unknown"
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"numpy {np.__version__}, {blas}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per rank count (best)")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = [bench_job(label, job, overrides, args.steps, args.repeat)
            for label, job, overrides in JOBS]
    print(f"Machine: {machine()}")
    print(f"Load average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f} "
          f"(other processes on the machine distort every column)\n")
    print("| job | global batch | 1 rank | 2 ranks | 2 independent half-batch runs | "
          "speed-up | efficiency (goal ≥ 90%) | 2 ranks / independent |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        mark = "✔" if r["efficiency"] >= GOAL else "✘"
        print(f"| {r['label']} | {r['batch']} | {r['one']:,.0f} | {r['two']:,.0f} | "
              f"{r['ceiling']:,.0f} | {r['speedup']:.2f}× | {r['efficiency']:.0%} {mark} | "
              f"{r['of_ceiling']:.0%} |")
    print("\nsamples/s, best of the runs. 'Independent': two single-rank runs of half "
          "the batch at once, no communication: the most 2 ranks can reach on this machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
