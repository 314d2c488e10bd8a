"""Per-op benchmark of transformer_lm's pieces against PyTorch CPU eager: GELU, layer norm,
causal scaled dot-product attention and one pre-norm encoder layer, each forward and
backward, at the shapes of `bench/engine.py`'s transformer_lm row (batch 16, context 128,
d_model 256, 4 heads, d_ff 1024), and the engine's own numpy path (``DPTRAIN_CPU_KERNELS=0``,
no compiled kernels) as a third contender. CPU-time medians, the three interleaved call by
call in one process, one BLAS thread; backward is (forward + backward) - forward. Run

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        MKL_NUM_THREADS=1 .venv/bin/python bench/transformer_ops.py --rows gelu,ln,attn,mha

(PyTorch is required here: `pip install -e '.[test-torch]'`). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step import interleaved, numpy_path  # noqa: E402

import dptrain.engine.functional as F  # noqa: E402
from dptrain import engine  # noqa: E402
from dptrain.engine import nn  # noqa: E402

ROWS = ("gelu", "ln", "attn", "mha")


def compare(name: str, ours, theirs, shape: tuple, repeat: int) -> None:
    """Time ``ours()`` (with the compiled kernels and on the numpy path) and ``theirs()``
    (each returning the output to backpropagate) forward only and forward + backward,
    interleaved; print medians and ratios."""
    import torch

    g = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    ge, gt = engine.from_numpy(g), torch.from_numpy(g)
    fns = {"engine fwd": ours, "engine fwd+bwd": lambda: ours().backward(ge),
           "numpy fwd": numpy_path(ours), "numpy fwd+bwd": numpy_path(lambda: ours().backward(ge)),
           "torch fwd": theirs, "torch fwd+bwd": lambda: theirs().backward(gt)}
    m = {k: v * 1e3 for k, v in interleaved(fns, repeat, time.process_time).items()}
    ef, eb = m["engine fwd"], m["engine fwd+bwd"] - m["engine fwd"]
    nf, nb = m["numpy fwd"], m["numpy fwd+bwd"] - m["numpy fwd"]
    tf, tb = m["torch fwd"], m["torch fwd+bwd"] - m["torch fwd"]
    print(f"| {name} | {ef:.2f} / {nf:.2f} / {tf:.2f} ms ({ef / tf:.2f}×, numpy path "
          f"{nf / tf:.2f}×) | {eb:.2f} / {nb:.2f} / {tb:.2f} ms ({eb / tb:.2f}×, numpy path "
          f"{nb / tb:.2f}×) |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"from {','.join(ROWS)}")
    ap.add_argument("--repeat", type=int, default=11, help="timing rounds (median)")
    args = ap.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    rows = args.rows.split(",")
    rng = np.random.default_rng(0)
    print("| op | forward: engine / numpy path / PyTorch | backward: engine / numpy path / "
          "PyTorch |")
    print("|---|---:|---:|")

    def pair(shape):
        a = rng.standard_normal(shape, dtype=np.float32)
        return engine.tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)

    if "gelu" in rows:
        xe, xt = pair((16, 128, 1024))
        compare("gelu (16, 128, 1024)", lambda: F.gelu(xe),
                lambda: torch.nn.functional.gelu(xt), xe.shape, args.repeat)
    if "ln" in rows:
        xe, xt = pair((16, 128, 256))
        le, lt = nn.LayerNorm(256), torch.nn.LayerNorm(256)
        compare("layer norm (16, 128, 256)", lambda: le(xe), lambda: lt(xt), xe.shape,
                args.repeat)
    if "attn" in rows:
        (qe, qt), (ke, kt), (ve, vt) = (pair((16, 4, 128, 64)) for _ in range(3))
        compare("causal attention (16, 4, 128, 64)",
                lambda: F.scaled_dot_product_attention(qe, ke, ve, is_causal=True),
                lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt,
                                                                         is_causal=True),
                qe.shape, args.repeat)
    if "mha" in rows:
        xe, xt = pair((16, 128, 256))
        engine.manual_seed(0)
        le = nn.TransformerEncoderLayer(256, 4, 1024, 0.0, activation="gelu",
                                        batch_first=True, norm_first=True)
        lt = torch.nn.TransformerEncoderLayer(256, 4, 1024, 0.0, activation="gelu",
                                              batch_first=True, norm_first=True)
        mask = torch.triu(torch.ones(128, 128, dtype=torch.bool), 1)
        compare("encoder layer (16, 128, 256), causal", lambda: le(xe, is_causal=True),
                lambda: lt(xt, src_mask=mask, is_causal=True), xe.shape, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
