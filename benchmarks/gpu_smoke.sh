#!/usr/bin/env bash
# GPU smoke run (no network): the `gpu` tests, then the smoke rows of benchmarks/gpu_smoke.py (1 GPU; 2 and 8 GPUs
# with ZeRO-2/3 and bf16 lenses; model.device_map auto; 2 Dask workers on 2 GPUs; rows needing more GPUs than the
# machine has are printed as skipped). Needs a venv whose torch has CUDA (TORCH=cuda ./scripts/install.sh); prints
# a table and writes benchmarks/results/gpu_smoke.json. Under 8 minutes on one GPU (estimated: see gpu_smoke.py).
# Usage: bash benchmarks/gpu_smoke.sh [--skip-8b] [--only ROW ...]     (the rows: gpu_smoke.py --plan)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: torch sees no CUDA device')"
status=0
"$PY" -m pytest -q -m gpu tests/test_gpu.py || status=$?  # the smoke rows still run: one run shows every failure
"$PY" benchmarks/gpu_smoke.py "$@" || status=$?
exit "$status"
