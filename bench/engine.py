"""Engine benchmark: per-op overhead, training steps of an MLP and of the model zoo's lenet,
resnet and transformer_lm, and the peak memory of each step.

Every row is measured in this one run, on one BLAS thread, against two peers: the same
computation written by hand in plain numpy (forward and backward — the floor for any
numpy-based engine) and PyTorch on the CPU when it is importable. Run it with

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        MKL_NUM_THREADS=1 .venv/bin/python bench/engine.py

(`make bench` does exactly that; ``--rows lenet,resnet`` runs a subset; ``--timer cpu`` times
with the process's CPU time instead of the wall clock, which a machine shared with other jobs
inflates less: a process waiting for a core is not charged; ``--numpy-path`` adds the engine's
own numpy path, ``DPTRAIN_CPU_KERNELS=0``, as a third contender of the model rows, interleaved
with the other two, for an A/B of the compiled CPU kernels in one run). The model rows train
the same architecture in both frameworks: bench/torch_models.py holds PyTorch twins of the zoo's
models, loaded with the engine model's initial weights. See docs/benchmarks.md for recorded
results.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step import numpy_path  # noqa: E402

import dptrain.engine.functional as F  # noqa: E402
from dptrain import engine  # noqa: E402
from dptrain.engine import nn  # noqa: E402
from dptrain.engine.models import get_model  # noqa: E402

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # PyTorch is a peer for comparison only, never a dependency
    torch = None


def _limit_blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(1)
        info = threadpool_info()
        return ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
                         for i in info if i["user_api"] == "blas")
    except ImportError:
        return "unknown (threadpoolctl not installed)"


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = TIMERS["wall"]  # set by --timer


def timeit(fn, repeat: int, number: int) -> float:
    """Median seconds per call over `repeat` rounds of `number` calls (after a warm-up)."""
    fn()
    samples = []
    for _ in range(repeat):
        t = clock()
        for _ in range(number):
            fn()
        samples.append((clock() - t) / number)
    return statistics.median(samples)


def timeit_interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds per call of each of `fns`, one call of each per round (after a warm-up):
    on a shared machine a burst of load then slows every contender alike."""
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = clock()
            fn()
            samples[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


# ---------------------------------------------------------------- peak memory

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_returns_memory() -> None:
    """Make glibc serve every array from mmap and unmap it when freed, so the resident set
    tracks live memory (by default freed arrays stay in malloc's heap and peaks are hidden)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def peak_memory_mib(fn, reset=None) -> float:
    """Peak resident memory added while `fn` runs, in MiB (Linux: VmHWM reset via clear_refs).

    `reset` drops state a step leaves behind (gradients) so every contender starts from its
    parameters and data alone."""
    fn()
    if reset:
        reset()
    gc.collect()
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


# ---------------------------------------------------------------- small-op chain

CHAIN = 10  # each link is 3 ops: mul, add, tanh; plus a final sum


def chain_autograd(x):
    """The chain through an autograd engine: the engine's Tensor or PyTorch's, alike."""
    def step():
        y = x
        for _ in range(CHAIN):
            y = (y * 0.9 + 0.1).tanh()
        y.sum().backward()
        x.grad = None
    return step


def chain_numpy(x0):
    def step():
        ys = [x0]
        y = x0
        for _ in range(CHAIN):
            y = np.tanh(y * 0.9 + 0.1)
            ys.append(y)
        _ = y.sum()
        g = np.ones_like(y)
        for i in range(CHAIN, 0, -1):
            g = g * (1 - ys[i] * ys[i])
            g = g * 0.9
        return g
    return step


# ---------------------------------------------------------------- MLP step

SIZES = (784, 1024, 1024, 10)


def mlp_data(batch: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], batch)
    ws = [(rng.standard_normal((o, i), dtype=np.float32) * np.float32(1 / np.sqrt(i)),
           np.zeros(o, np.float32)) for i, o in zip(SIZES[:-1], SIZES[1:])]
    return x, y, ws


def mlp_engine(x, y, ws, lr=0.01):
    layers = []
    for w, b in ws:
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data[...] = w
        lin.bias.data[...] = b
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = engine.optim.SGD(model.parameters(), lr=lr)
    xt, yt = engine.from_numpy(x), engine.from_numpy(y)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    step.reset = opt.zero_grad
    return step


def mlp_numpy(x, y, ws, lr=0.01):
    params = [(w.copy(), b.copy()) for w, b in ws]
    n = x.shape[0]
    rows = np.arange(n)

    def step():
        acts, h = [x], x
        for i, (w, b) in enumerate(params):
            h = h @ w.T
            h += b
            if i < len(params) - 1:
                h = np.maximum(h, 0)
            acts.append(h)
        z = h - h.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        _ = -np.log(p[rows, y]).mean()
        g = p
        g[rows, y] -= 1
        g /= n
        for i in range(len(params) - 1, -1, -1):
            w, b = params[i]
            gw = g.T @ acts[i]
            gb = g.sum(axis=0)
            if i:
                g = g @ w
                g *= acts[i] > 0
            w -= lr * gw
            b -= lr * gb
    return step


def mlp_torch(x, y, ws, lr=0.01):
    layers = []
    for w, b in ws:
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    step.reset = opt.zero_grad
    return step


MLP_STEPS = {"engine": mlp_engine, "numpy": mlp_numpy, "torch": mlp_torch}
ROWS = ("ops", "mlp", "lenet", "resnet", "transformer_lm")


# ---------------------------------------------------------------- model zoo steps

# row -> (table label, constructor arguments, batch size)
MODEL_ROWS = {
    "lenet": ("lenet 28×28 train step, batch 128", {"image_size": 28}, 128),
    "resnet": ("resnet (depth 8, width 16) train step, 32×32×3, batch 64",
               {"depth": 8, "width": 16, "in_channels": 3}, 64),
    "transformer_lm": ("transformer_lm (4 layers, d=256, 4 heads, context 128, vocab 256) "
                       "train step, batch 16",
                       {"vocab_size": 256, "d_model": 256, "n_layers": 4, "n_heads": 4,
                        "context": 128}, 16),
}


def model_data(name: str, batch: int):
    """Fixed random inputs and class (or next-token) targets for a model row."""
    rng = np.random.default_rng(0)
    if name == "transformer_lm":
        args = MODEL_ROWS[name][1]
        x = rng.integers(0, args["vocab_size"], (batch, args["context"]))
        return x, rng.integers(0, args["vocab_size"], batch * args["context"])
    shape = (batch, 1, 28, 28) if name == "lenet" else (batch, 3, 32, 32)
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, 10, batch)


def model_step(name: str, framework: str, lr: float = 0.01):
    """A training step (forward, cross entropy, backward, SGD) of zoo model `name` in
    `framework` ('engine' or 'torch'); both start from the engine model's initial weights."""
    _, args, batch = MODEL_ROWS[name]
    engine.manual_seed(0)
    model = get_model(name, **args)
    x, y = model_data(name, batch)
    if framework == "engine":
        opt = engine.optim.SGD(model.parameters(), lr=lr)
        xt, yt = engine.from_numpy(x), engine.from_numpy(y)

        def step():
            opt.zero_grad()
            out = model(xt)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), yt).backward()
            opt.step()
    else:
        import torch_models

        twin = torch_models.load_engine_weights(torch_models.TWINS[name](**args),
                                                model.state_dict())
        del model
        opt = torch.optim.SGD(twin.parameters(), lr=lr)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def step():
            opt.zero_grad()
            out = twin(xt)
            torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yt).backward()
            opt.step()
    step.reset = opt.zero_grad
    return step


def _peak_in_fresh_process(name: str, batch: int) -> float:
    """Each contender's peak is measured in its own process, so none inherits another's heap.
    `name` is an MLP contender ('engine', 'numpy', 'torch') or 'row:framework' for a model,
    where the framework 'numpy-path' is the engine with ``DPTRAIN_CPU_KERNELS=0``."""
    import subprocess

    env = dict(os.environ)
    if name.endswith(":numpy-path"):
        name, env["DPTRAIN_CPU_KERNELS"] = name.replace("numpy-path", "engine"), "0"
    out = subprocess.run([sys.executable, __file__, "--peak-memory-of", name, "--batch",
                          str(batch)], check=True, capture_output=True, text=True,
                         env=env).stdout
    return float(out.strip().splitlines()[-1])


def _step_for_peak(contender: str, batch: int):
    if ":" in contender:
        return model_step(*contender.split(":"))
    return MLP_STEPS[contender](*mlp_data(batch))


# ---------------------------------------------------------------- report

def ratio(a, b) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}×"


def fmt(v, unit) -> str:
    return "—" if v is None else f"{v:,.1f} {unit}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="MLP batch size (default 256)")
    ap.add_argument("--repeat", type=int, default=7, help="timing rounds per row (median)")
    ap.add_argument("--timer", choices=TIMERS, default="wall",
                    help="wall clock (default) or the process's CPU time")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated rows to run, from {','.join(ROWS)} (default all)")
    ap.add_argument("--numpy-path", action="store_true",
                    help="also time the model rows on the engine's numpy path "
                         "(DPTRAIN_CPU_KERNELS=0), interleaved with the others")
    ap.add_argument("--peak-memory-of", choices=[*MLP_STEPS] + [
        f"{m}:{f}" for m in MODEL_ROWS for f in ("engine", "torch")],
                    help=argparse.SUPPRESS)  # internal: one contender, in a fresh process
    args = ap.parse_args(argv)
    global clock
    clock = TIMERS[args.timer]
    if args.peak_memory_of:
        _limit_blas_threads()
        _malloc_returns_memory()
        step = _step_for_peak(args.peak_memory_of, args.batch)
        print(peak_memory_mib(step, getattr(step, "reset", None)))
        return 0
    load = os.getloadavg()
    selected = args.rows.split(",")
    unknown = sorted(set(selected) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")

    blas = _limit_blas_threads()
    x16 = np.random.default_rng(0).standard_normal((16, 16), dtype=np.float32)
    n_ops = CHAIN * 3 + 1
    rows = []

    if "ops" in selected:
        t_e = timeit(chain_autograd(engine.tensor(x16, requires_grad=True)), args.repeat, 200)
        t_n = timeit(chain_numpy(x16), args.repeat, 200)
        t_t = (timeit(chain_autograd(torch.tensor(x16, requires_grad=True)), args.repeat, 200)
               if torch else None)
        rows.append(("small-op chain on 16×16, per op (fwd+bwd)", 1e6 / n_ops, "µs",
                     t_e, t_n, t_t))

    if "mlp" in selected:
        x, y, ws = mlp_data(args.batch)
        steps = {"engine": mlp_engine(x, y, ws), "numpy": mlp_numpy(x, y, ws)}
        if torch:
            steps["torch"] = mlp_torch(x, y, ws)
        times = {k: timeit(v, args.repeat, 3) for k, v in steps.items()}
        rows.append((f"MLP 784-1024-1024-10 train step, batch {args.batch}", 1e3, "ms",
                     times["engine"], times["numpy"], times.get("torch")))
        mem = {k: _peak_in_fresh_process(k, args.batch) for k in steps}
        rows.append(("peak memory of that step", 1.0, "MiB", mem["engine"], mem["numpy"],
                     mem.get("torch")))

    for name in MODEL_ROWS:
        if name not in selected:
            continue
        frameworks = ("engine", "torch") if torch else ("engine",)
        steps = {f: model_step(name, f) for f in frameworks}
        if args.numpy_path:
            steps["numpy-path"] = numpy_path(model_step(name, "engine"))
        times = timeit_interleaved(steps, args.repeat)
        rows.append((MODEL_ROWS[name][0], 1e3, "ms", times["engine"], None, times.get("torch")))
        mem = {f: _peak_in_fresh_process(f"{name}:{f}", 0) for f in steps}
        rows.append(("peak memory of that step", 1.0, "MiB", mem["engine"], None,
                     mem.get("torch")))
        if args.numpy_path:
            rows.append(("the same step on the numpy path (DPTRAIN_CPU_KERNELS=0)", 1e3, "ms",
                         times["numpy-path"], None, times.get("torch")))
            rows.append(("peak memory of that step", 1.0, "MiB", mem["numpy-path"], None,
                         mem.get("torch")))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}, BLAS: {blas}")
    print(f"torch: {torch.__version__ if torch else 'not installed'}; timer: {args.timer}; "
          f"load average (1, 5, 15 min) at start {', '.join(f'{v:.1f}' for v in load)}, at end "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print()
    print("| row | engine | numpy by hand | PyTorch CPU | engine / numpy | engine / PyTorch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, scale, unit, e, n, t in rows:
        e_, n_, t_ = (None if v is None else v * scale for v in (e, n, t))
        print(f"| {name} | {fmt(e_, unit)} | {fmt(n_, unit)} | {fmt(t_, unit)} | "
              f"{ratio(e, n)} | {ratio(e, t)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
