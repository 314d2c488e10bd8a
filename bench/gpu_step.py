"""Training steps on a GPU: the engine on CuPy against PyTorch eager CUDA, in the same run.

Rows: the MLP, the model zoo's resnet and transformer_lm at d_model=1024. Each step is forward,
cross entropy, backward and SGD, both frameworks starting from the engine model's weights;
the two contenders alternate call by call (A/B/A/B) and each call ends by waiting for the GPU,
so the medians compare the same minutes of a shared machine. Goals (issue: GPUs): MLP step
<= 1.2x PyTorch, transformer_lm (d=1024) <= 1.5x.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/gpu_step.py
    .venv/bin/python bench/gpu_step.py --device strict --small   # the script itself, on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dptrain.engine.functional as F  # noqa: E402
from dptrain import engine  # noqa: E402
from dptrain.engine.backend import synchronize  # noqa: E402
from dptrain.engine.models import get_model  # noqa: E402

# name -> (model args, batch, goal: engine time / torch time)
ROWS = {
    "mlp": ({"in_features": 1024, "hidden": (1024, 1024), "num_classes": 10}, 256, 1.2),
    "resnet": ({"depth": 8, "width": 16}, 64, None),
    "transformer_lm": ({"vocab_size": 256, "d_model": 1024, "n_layers": 2, "n_heads": 16,
                        "context": 128}, 8, 1.5),
}
SMALL = {
    "mlp": ({"in_features": 16, "hidden": (8,), "num_classes": 3}, 4, 1.2),
    "resnet": ({"depth": 8, "width": 4}, 2, None),
    "transformer_lm": ({"vocab_size": 11, "d_model": 8, "n_layers": 1, "n_heads": 2,
                        "context": 6}, 2, 1.5),
}


def data(name: str, args: dict, batch: int):
    rng = np.random.default_rng(0)
    if name == "transformer_lm":
        v, t = args["vocab_size"], args["context"]
        return rng.integers(0, v, (batch, t)), rng.integers(0, v, batch * t)
    if name == "mlp":
        return (rng.standard_normal((batch, args["in_features"]), dtype=np.float32),
                rng.integers(0, args["num_classes"], batch))
    return rng.standard_normal((batch, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, batch)


def steps(name: str, args: dict, batch: int, device: str) -> dict:
    """``{"engine": step, "torch": step}`` (torch only where importable with CUDA)."""
    engine.manual_seed(0)
    model = get_model(name, **args)
    x, y = data(name, args, batch)
    state = model.state_dict()
    model.to(device)
    opt = engine.optim.SGD(model.parameters(), lr=0.01)
    xt, yt = engine.tensor(x, device=device), engine.tensor(y, device=device)

    def engine_step():
        opt.zero_grad()
        out = model(xt)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), yt).backward()
        opt.step()
        synchronize(device)

    out = {"engine": engine_step}
    try:
        import torch
        import torch_models
    except ImportError:
        return out
    if device.startswith("cuda") and torch.cuda.is_available():
        twin_cls = torch_models.TWINS.get(name)
        twin = (twin_cls(**args) if twin_cls else _torch_mlp(args))
        twin = torch_models.load_engine_weights(twin, state).to(device)
        topt = torch.optim.SGD(twin.parameters(), lr=0.01)
        tx, ty = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

        def torch_step():
            topt.zero_grad()
            o = twin(tx)
            torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), ty).backward()
            topt.step()
            torch.cuda.synchronize()

        out["torch"] = torch_step
    return out


def _torch_mlp(args: dict):
    """PyTorch twin of the zoo's MLP (Linear/ReLU stack, the engine's state-dict keys)."""
    import torch

    sizes = [args["in_features"], *args["hidden"], args["num_classes"]]
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def interleaved(fns: dict, repeat: int, timer=time.perf_counter) -> dict:
    """``{name: median seconds}`` of each ``fns[name]()``, after one warm-up call each, the
    calls interleaved round-robin `repeat` times, timed by `timer`."""
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = timer()
            fn()
            samples[k].append(timer() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def numpy_path(fn):
    """`fn` run with the compiled CPU kernels switched off (``DPTRAIN_CPU_KERNELS=0``): the
    engine's numpy path, the variable put back as it was after each call. A model step's
    `reset` carries over."""
    def run():
        before = os.environ.get("DPTRAIN_CPU_KERNELS")
        os.environ["DPTRAIN_CPU_KERNELS"] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["DPTRAIN_CPU_KERNELS"]
            else:
                os.environ["DPTRAIN_CPU_KERNELS"] = before
    if hasattr(fn, "reset"):
        run.reset = fn.reset
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--small", action="store_true", help="tiny models: check the script runs")
    args = p.parse_args(argv)
    rows = SMALL if args.small else ROWS
    print(f"device {args.device}; median of {args.repeat} interleaved steps")
    print(f"{'row':<16}{'engine ms':>12}{'torch ms':>12}{'ratio':>8}{'goal':>8}")
    for name, (margs, batch, goal) in rows.items():
        t = interleaved(steps(name, margs, batch, args.device), args.repeat)
        e, tt = t["engine"] * 1e3, t.get("torch")
        ratio = f"{t['engine'] / tt:.2f}x" if tt else "n/a"
        print(f"{name:<16}{e:>12.2f}{(tt * 1e3 if tt else float('nan')):>12.2f}{ratio:>8}"
              f"{(f'{goal}x' if goal else '-'):>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
