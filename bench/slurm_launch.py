"""How to start a job's ranks inside a Slurm allocation: ``srun --mpi=pmi2`` (what the Slurm
launcher does) against the venv's ``mpiexec`` (MPICH's Hydra, which itself starts its proxy
with ``srun``).

Brings up a real single-node Slurm cluster (``tests/helpers/slurmkit.py``: root and Debian's
``slurmctld slurmd slurm-client munge``), then submits the same 2-rank job (a digits MLP, 20
steps) as batch scripts that differ only in their launch line, A/B/A/B. Each script times its
launch line (start of the launcher to the exit of the last rank, inside the allocation); the
submission-to-end time is polled with ``scontrol`` every 0.1 s (``sbatch --wait`` polls with
a backoff of seconds and measures that instead). Prints a markdown table of medians and the
ratio to srun:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/slurm_launch.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "helpers"))

from jobkit import TINY_SPEC  # noqa: E402
from slurmkit import SlurmCluster, missing_reason  # noqa: E402

PYTHON = sys.executable
WORKER = f"{PYTHON} -m mpi4py -m dptrain.worker {{job}} --no-progress"
LAUNCH = {
    "srun --mpi=pmi2": f"srun --mpi=pmi2 --kill-on-bad-exit=1 {WORKER}",
    "mpiexec (Hydra) in the allocation": f"{Path(PYTHON).parent / 'mpiexec'} -n $SLURM_NTASKS "
                                         f"{WORKER}",
}


def script(launch: str, job: Path, output: Path, times: Path) -> str:
    return (f"#!/bin/sh\n#SBATCH --ntasks=2\n#SBATCH --output={output}\n"
            f"#SBATCH --open-mode=append\n"
            f"export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1\n"
            f"start=$(date +%s.%N)\n{launch.format(job=job)}\nstatus=$?\n"
            f"echo \"$start $(date +%s.%N)\" > {times}\nexit $status\n")


def run_job(path: Path, env: dict[str, str]) -> tuple[float, str]:
    """Submit a script and poll until it ends: (submission to end in s, final JobState)."""
    start = time.perf_counter()
    job_id = subprocess.run(["sbatch", "--parsable", str(path)], env=env, check=True,
                            capture_output=True, text=True).stdout.strip()
    while True:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env,
                               capture_output=True, text=True).stdout
        state = next((w.split("=", 1)[1] for w in shown.split() if w.startswith("JobState=")),
                     "")
        if state not in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return time.perf_counter() - start, state
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant")
    args = parser.parse_args()
    reason = missing_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dptrain-slurm-bench-") as tmp:
        root = Path(tmp)
        job = root / "job.json"
        job.write_text(json.dumps(TINY_SPEC))
        launch_s: dict[str, list[float]] = {name: [] for name in LAUNCH}
        total_s: dict[str, list[float]] = {name: [] for name in LAUNCH}
        output, stamps = root / "out.log", root / "times"
        with SlurmCluster.start(root / "slurm") as cluster:
            for i in range(args.repeats):
                for name, launch in LAUNCH.items():
                    path = root / f"{i}-{list(LAUNCH).index(name)}.sbatch"
                    path.write_text(script(launch, job, output, stamps))
                    elapsed, state = run_job(path, cluster.env())
                    if state != "COMPLETED":
                        print(f"{name}: the job ended {state}:\n{output.read_text()[-2000:]}",
                              file=sys.stderr)
                        return 1
                    begin, end = map(float, stamps.read_text().split())
                    launch_s[name].append(end - begin)
                    total_s[name].append(elapsed)
        worlds = output.read_text().count('"world_size": 2')
    base = statistics.median(launch_s["srun --mpi=pmi2"])
    base_total = statistics.median(total_s["srun --mpi=pmi2"])
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.repeats} runs each, A/B interleaved; "
          f"{worlds} of {2 * args.repeats} jobs reported world_size 2\n")
    print("| launch line | launch to last rank's exit, median s | ratio to srun | "
          "submission to end, median s | ratio to srun |")
    print("|---|---|---|---|---|")
    for name in LAUNCH:
        median, total = statistics.median(launch_s[name]), statistics.median(total_s[name])
        print(f"| {name} | {median:.2f} | {median / base:.2f} | {total:.2f} | "
              f"{total / base_total:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
