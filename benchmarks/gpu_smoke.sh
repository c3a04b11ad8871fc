#!/usr/bin/env bash
# GPU smoke run (no network): the `gpu` tests, then every stage on cuda in bf16 (default model, then the 2-layer
# Llama-3-8B-shaped model with one rank per GPU, two at most). Needs a venv whose torch has CUDA; prints a table
# and writes benchmarks/results/gpu_smoke.json. Usage: bash benchmarks/gpu_smoke.sh [--skip-8b]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: torch sees no CUDA device')"
"$PY" -m pytest -q -m gpu tests/test_gpu.py
"$PY" benchmarks/gpu_smoke.py "$@"
