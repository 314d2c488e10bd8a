"""Train an MLP on scikit-learn's bundled handwritten digits with the dptrain engine.

    .venv/bin/python examples/digits_mlp.py [--epochs 30] [--seed 0]

Prints the loss per epoch and the held-out accuracy. The data ships with scikit-learn, so this
runs offline; it is what `make demo` runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dptrain.engine.functional as F  # noqa: E402
from dptrain import engine  # noqa: E402
from dptrain.engine import nn  # noqa: E402


def load_digits(seed: int = 0, test_fraction: float = 0.25):
    """Digits as float32 features scaled to [0, 1] and int64 labels, split deterministically."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with engine.no_grad():
        pred = model(engine.from_numpy(x)).argmax(dim=1).numpy()
    model.train()
    return float((pred == y).mean())


def train(epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
          verbose: bool = True) -> float:
    """Train and return the held-out accuracy."""
    engine.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits(seed)
    model = build_model()
    opt = engine.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(xtr))
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(engine.from_numpy(xtr[idx])), engine.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if verbose and (epoch % 5 == 4 or epoch == epochs - 1):
            print(f"epoch {epoch + 1:3d}  loss {total / len(xtr):.4f}  "
                  f"held-out accuracy {accuracy(model, xte, yte):.4f}")
    acc = accuracy(model, xte, yte)
    if verbose:
        print(f"digits MLP: held-out accuracy {acc:.4f} on {len(xte)} images "
              f"({time.perf_counter() - t0:.1f}s)")
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train an MLP on scikit-learn's digits.")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train(args.epochs, args.batch_size, args.lr, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
