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
#   4. trains on 2 ranks sharing the GPU and checks their parameters equal 1 rank's: through
#      the pinned host-staging path, and through CUDA-aware MPI when the library is (the
#      mpich wheel is not: it says so);
#   5. the same on the NCCL path, one GPU per rank, when more than one GPU is visible (on
#      the strict device: through the test double of cupy.cuda.nccl);
#   6. trains 2 ranks with dropout on the device straight and in two halves, the second
#      resumed from a checkpoint, and checks they end with the same bytes (the device
#      generators' state is in the checkpoint).
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
DPTRAIN=$(dirname "$PY")/dptrain

echo "== 1. the card"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi (device $DEVICE)"
"$PY" -c "from dptrain.engine import backend; print('CuPy GPUs visible:', backend.gpu_count())"

echo "== 2. engine tests on $DEVICE"
timeout 120 "$PY" -m pytest -q -p no:randomly tests/engine/test_devices.py tests/engine \
  -k "$DEVICE" -W ignore 2>&1 | tail -5

echo "== 3. training steps, engine vs PyTorch eager CUDA"
SMALL=(); [ "$DEVICE" = strict ] && SMALL=(--small --repeat 3)
timeout 60 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" bench/gpu_step.py \
  --device "$DEVICE" "${SMALL[@]}"

# ddp_equivalence.py on N ranks and PATH: ranks identical and equal to 1 rank, or exit 1.
equivalence() {
  timeout 60 "$MPIEXEC" -n "$1" "$PY" tests/worker/mpi_scripts/ddp_equivalence.py 0.0005 "$2" \
    "$DEVICE" | "$PY" -c '
import json, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])["ranks"]
same = len({x["hash"] for x in r}) == 1
worst, staged = max(r[0]["max_abs_diff"].values()), r[0]["staged_bytes"]
hook, devices = r[0]["hook"], sorted({d for x in r for d in x["devices"]})
print(f"{sys.argv[1]}: {hook} on {devices}; ranks identical: {same}; largest difference "
      f"from 1 rank: {worst:.3g}; bytes staged per rank: {staged}")
sys.exit(0 if same and worst < 1e-5 * max(1.0, r[0]["max_abs_param"]) else 1)' "$2"
}

echo "== 4. 2 ranks sharing the device vs 1 rank: host staging, then CUDA-aware MPI"
equivalence 2 host
if "$PY" -c "from dptrain.worker.comm import cuda_aware_mpi; exit(0 if cuda_aware_mpi() else 1)"
then equivalence 2 cuda_aware
else echo "cuda_aware: this MPI library is not CUDA-aware (MPIX_Query_cuda_support): skipped"
fi

echo "== 5. NCCL, one GPU per rank"
GPUS=$("$PY" -c "from dptrain.engine import backend; print(backend.gpu_count())")
if [ "$DEVICE" = strict ]; then
  echo "strict device: the NCCL path through the test double of cupy.cuda.nccl"
  equivalence 2 nccl
elif [ "$GPUS" -gt 1 ]; then
  equivalence 2 nccl
else
  echo "$GPUS GPU(s) visible: the NCCL path needs one GPU per rank, skipped"
fi

echo "== 6. a resumed run draws the dropout masks of an uninterrupted one (2 ranks, the device)"
RESUME=$(mktemp -d)
LOOP=tests/worker/mpi_scripts/device_dropout_loop.py
timeout 60 "$DPTRAIN" run "$LOOP" -n 2 --checkpoint-dir "$RESUME/straight" -- --epochs 4 \
  --device "$DEVICE" | tail -1
timeout 60 "$DPTRAIN" run "$LOOP" -n 2 --checkpoint-dir "$RESUME/halves" -- --epochs 2 \
  --device "$DEVICE" > /dev/null
timeout 60 "$DPTRAIN" run "$LOOP" -n 2 --checkpoint-dir "$RESUME/halves" --resume -- --epochs 4 \
  --device "$DEVICE" | tail -1
if cmp "$RESUME"/straight/step-00000016/model.safetensors \
       "$RESUME"/halves/step-00000016/model.safetensors
then echo "resumed = uninterrupted, bit for bit"
else echo "resumed run differs from the uninterrupted one"; exit 1
fi
