#!/usr/bin/env bash
# The device check for a lent GPU machine (no network there), under 5 minutes, from the
# repository root:
#
#   bench/gpu_check.sh [WHEELHOUSE]
#
# WHEELHOUSE (default: wheelhouse/) holds the wheels the machine's image may lack, built where
# there is a network, e.g.
#   .venv/bin/pip wheel --wheel-dir wheelhouse . mpich mpi4py cupy-cuda12x pyyaml safetensors
# and carried along. The check makes a venv that sees the image's own packages (PyTorch, CuPy
# where installed), installs dptrain from the wheelhouse, then:
#   1. names the card (nvidia-smi);
#   2. runs the engine tests on the cuda device (ops, autograd, models, optimizers,
#      checkpoints: the same tests the strict device runs in CI);
#   3. times training steps, engine vs PyTorch eager CUDA (bench/gpu_step.py, ratios);
#   4. trains on 2 ranks sharing the GPU through the host-staging path and checks their
#      parameters equal 1 rank's;
#   5. NCCL when more than one GPU is visible (not implemented yet: says so).
# DEVICE=strict SKIP_INSTALL=1 PY=.venv/bin/python bench/gpu_check.sh runs it all on the CPU
# (the strict device), to check the script itself.
set -euo pipefail
WHEELHOUSE=${1:-wheelhouse}
DEVICE=${DEVICE:-cuda}
PY=${PY:-.gpu-venv/bin/python}

if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m venv --system-site-packages .gpu-venv
  .gpu-venv/bin/pip install -q --no-index --find-links "$WHEELHOUSE" -e . mpich mpi4py \
    pytest pyyaml
fi
MPIEXEC=$(dirname "$PY")/mpiexec

echo "== 1. the card"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi (device $DEVICE)"
"$PY" -c "from dptrain.engine import backend; print('CuPy GPUs visible:', backend.gpu_count())"

echo "== 2. engine tests on $DEVICE"
timeout 150 "$PY" -m pytest -q -p no:randomly tests/engine/test_devices.py tests/engine \
  -k "$DEVICE" -W ignore 2>&1 | tail -5

echo "== 3. training steps, engine vs PyTorch eager CUDA"
SMALL=(); [ "$DEVICE" = strict ] && SMALL=(--small --repeat 3)
timeout 90 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" bench/gpu_step.py \
  --device "$DEVICE" "${SMALL[@]}"

echo "== 4. 2 ranks sharing the device through host staging vs 1 rank"
timeout 60 "$MPIEXEC" -n 2 "$PY" tests/worker/mpi_scripts/ddp_equivalence.py 0.0005 "$DEVICE" \
  | "$PY" -c '
import json, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])["ranks"]
same = len({x["hash"] for x in r}) == 1
worst, staged = max(r[0]["max_abs_diff"].values()), r[0]["staged_bytes"]
print(f"ranks identical: {same}; largest difference from 1 rank: {worst:.3g}; "
      f"bytes staged per rank: {staged}")
sys.exit(0 if same and worst < 1e-5 * max(1.0, r[0]["max_abs_param"]) else 1)'

echo "== 5. NCCL"
"$PY" -c "from dptrain.engine import backend; n = backend.gpu_count(); print(
    f'{n} GPU(s) visible: the NCCL all-reduce path is not implemented yet' if n > 1
    else 'one GPU or none: NCCL not applicable')"
