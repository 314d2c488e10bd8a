"""The scale model checked on real TCP hosts: network namespaces joined by shaped links.

Run it as root (it makes network namespaces and shapes their links with ``tc``):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/scale_check_netns.py

For each host count (``--hosts``, default 2 and 3) it makes that many namespace "hosts" on a
bridge (the several-hosts tests' fixture, ``tests/helpers/netns.py``), one rank on each, and
for each link setting (``--links``) shapes what every host sends: a token bucket at the
setting's rate and, where the setting names one, a netem delay (the kernel must have netem).
It then runs ``bench/scale_model.py --json`` across the hosts with ``mpiexec
-launcher-exec netns-exec`` over MPICH's ofi/tcp (as the several-hosts tests do), which fits α
and β to ``Allreduce`` timings over those links and measures the MLP's DDP step with each comm
hook and without communication; this prints the fit next to the shaped rate, and the measured
steps against the model's prediction (overlap and no overlap) with their ratios, the table
``bench/scale_model.py`` prints for 2 ranks on shared memory. Each host is alone on its node,
so the model's hierarchical hook is its ring over the hosts.

Each setting runs with MPICH's own all-reduce and with a forced ring (``--mpi-allreduce``),
and with DDP's 25 MiB buckets (one for the MLP) and 1 MiB ones (eight: the overlap matters;
``--bucket-mb``). α and β are fitted on absolute errors: the token bucket lets the first
milliseconds of each message through at the veth's speed, so the small sizes do not show the
link's rate. More hosts than cores oversubscribe them (the header of each run says so).

Without root, iproute2 or tc it says why and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: MPICH's all-reduce algorithms to run with: its own choice, which for large messages is
#: reduce-scatter + all-gather and on a number of ranks that is not a power of two first folds
#: the extra ranks into partners (their whole buffer each way, in series: not the model's
#: ring); and a ring forced for ``Allreduce`` and ``Iallreduce`` (DDP's default hook).
MPI_ALLREDUCE = {
    "default": {},
    "ring": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring",
             "MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM": "tsp_ring"},
}


def parse_link(text: str) -> tuple[float, float]:
    """A link setting ``MBIT[/DELAY_US]`` (e.g. ``1000/200``: 1 Gb/s, 200 µs one way) as
    ``(bits per second, seconds of delay)``."""
    rate, _, delay = text.partition("/")
    try:
        bps, delay_s = float(rate) * 1e6, float(delay or 0) * 1e-6
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--links: each setting must be MBIT[/DELAY_US], e.g. 1000/200, got {text!r}"
        ) from None
    if bps <= 0 or delay_s < 0:
        raise argparse.ArgumentTypeError(
            f"--links: the rate must be > 0 and the delay >= 0, got {text!r}")
    return bps, delay_s


def parse_hosts(text: str) -> list[int]:
    """``2,3`` as ``[2, 3]``: host counts, each at least 2."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(
            f"--hosts: comma-separated host counts, each at least 2, got {text!r}")
    return counts


def describe_link(bps: float, delay_s: float) -> str:
    """``1000 Mb/s`` or ``1000 Mb/s, 200 µs``."""
    return f"{bps / 1e6:g} Mb/s" + (f", {delay_s * 1e6:g} µs" if delay_s else "")


def shaped_rows(m: dict, p: int, bps: float, delay_s: float) -> list[str]:
    """The fitted α, β next to what the links were shaped to: β as 8 bits over the rate
    (each host sends at most that), α as the netem delay (the links' own latency comes on
    top); and the smallest all-reduce's time over the ring's 2(p-1) steps, the latency the
    fit on absolute errors cannot see."""
    shaped_beta, smallest = 8 / bps, min(m["allreduce"])
    latency = m["allreduce"][smallest] / (2 * (p - 1))

    def ratio(value: float) -> str:
        return f"{value / delay_s:.2f}" if delay_s else ""
    return ["| | shaped | measured | measured / shaped |", "|---|---:|---:|---:|",
            f"| β (fitted), ps/byte | {1e12 * shaped_beta:.1f} | {1e12 * m['beta']:.1f} | "
            f"{m['beta'] / shaped_beta:.2f} |",
            f"| α (fitted), µs | {1e6 * delay_s:.1f} | {1e6 * m['alpha']:.2f} | "
            f"{ratio(m['alpha'])} |",
            f"| {smallest} B all-reduce / 2(p-1), µs | {1e6 * delay_s:.1f} | "
            f"{1e6 * latency:.2f} | {ratio(latency)} |"]


def unavailable_here() -> str | None:
    """Why the check cannot run on this machine (None: it can)."""
    from netns import unavailable

    reason = unavailable()
    if reason is None and shutil.which("tc") is None:
        return "needs the 'tc' command (Debian: apt-get install iproute2)"
    return reason


def run_on_hosts(net, args: argparse.Namespace, out: Path, algorithm: str,
                 bucket_mb: float) -> None:
    """`bench/scale_model.py --json out` with one rank on each host of `net` (a
    ``netns.HostNetwork``), MPICH's all-reduce as `algorithm` (`MPI_ALLREDUCE`), DDP's
    buckets of `bucket_mb` MiB."""
    from netns import NETNS_EXEC

    from dptrain.worker.mpiexec_command import default_mpiexec

    python = sys.executable
    cmd = [default_mpiexec(python), "-n", str(len(net.hosts)),
           "-hosts", ",".join(f"{host}:1" for host in net.hosts),
           "-launcher-exec", NETNS_EXEC]
    for name in BLAS_THREADS:
        cmd += ["-genv", name, "1"]
    cmd += [python, str(HERE / "scale_model.py"), "--json", str(out),
            "--repeat", str(args.repeat), "--max-bytes", str(args.max_bytes), "--fit", "absolute",
            "--bucket-mb", str(bucket_mb)]
    env = {**os.environ, **net.environment(), **MPI_ALLREDUCE[algorithm]}
    done = subprocess.run(cmd, env=env, cwd=HERE.parent,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"mpiexec on {len(net.hosts)} hosts exited {done.returncode}:\n"
                           f"{done.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=parse_hosts,
                        default=[2, 3], help="host counts, comma-separated (default 2,3)")
    parser.add_argument("--links", type=parse_link, nargs="+",
                        default=[parse_link("1000"), parse_link("300"),
                                 parse_link("1000/200")],
                        help="link settings MBIT[/DELAY_US] (default: 1000 300 1000/200)")
    parser.add_argument("--mpi-allreduce", choices=MPI_ALLREDUCE, nargs="+",
                        default=list(MPI_ALLREDUCE),
                        help="MPICH's all-reduce: its own choice, a forced ring, or both "
                             "(the default)")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[25, 1],
                        help="DDP's bucket_cap_mb of the measured steps (default: 25, DDP's "
                             "own, one bucket for the MLP; and 1, eight buckets, for the "
                             "overlap)")
    parser.add_argument("--repeat", type=int, default=11, help="repetitions per row (median)")
    parser.add_argument("--max-bytes", type=int, default=16 * 1024 * 1024,
                        help="largest all-reduce of the fit (default 16 MiB)")
    args = parser.parse_args()
    # Here, not at import: the tests load this file for its pure functions, and bench/ on
    # sys.path would shadow the package's folders (bench/engine.py).
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "helpers")]
    from netns import HostNetwork
    from scale_model import Network, check_report, load_measurement

    reason = unavailable_here()
    if reason is not None:
        print(f"scale check on namespace hosts skipped: {reason}")
        return 0
    cores = os.cpu_count() or 1
    for count in args.hosts:
        net = HostNetwork.create(count)
        try:
            for bps, delay_s in args.links:
                link = describe_link(bps, delay_s)
                try:
                    for host in net.hosts:
                        net.shape(host, bps, delay_s)
                except RuntimeError as e:
                    print(f"\n{count} hosts, {link}: skipped, the link cannot be shaped ({e})")
                    continue
                for algorithm, bucket_mb in itertools.product(args.mpi_allreduce,
                                                              args.bucket_mb):
                    with tempfile.TemporaryDirectory() as tmp:
                        out = Path(tmp) / "measured.json"
                        run_on_hosts(net, args, out, algorithm, bucket_mb)
                        m = load_measurement(out)
                    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
                    crowded = (f"; {count} ranks on {cores} cores: oversubscribed, every rank "
                               "competes with the others and the network stack for a core"
                               if count > cores else "")
                    print(f"\n### {count} hosts, one rank each, TCP links shaped to {link}, "
                          f"MPICH's all-reduce: {algorithm}\n\nmachine: {m['machine']}; "
                          f"{args.repeat} repetitions; load average at the end {load}"
                          f"{crowded}\n")
                    print("\n".join(shaped_rows(m, count, bps, delay_s)) + "\n")
                    hosts = Network(m["alpha"], m["beta"], m["alpha"], m["beta"],
                                    ranks_per_node=1)
                    print("\n".join(check_report(m, count, hosts, f"TCP, {link}")),
                          flush=True)
        finally:
            net.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
