#!/usr/bin/env bash
# Creates the project's virtual environment in .venv and installs the project into it.
# Usage: bash setup.sh [EXTRAS]   e.g. `bash setup.sh dev` for the test tools.
# Idempotent: a second run with the same pyproject.toml and extras does nothing.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  echo "setup.sh: installing deepmil-jax${extras:+[$extras]} into .venv (a few minutes the first time)"
  if [[ ",$extras," == *",dev,"* || ",$extras," == *",torch,"* || ",$extras," == *",pretrained,"* ]]; then
    # torch (reading .pth weights, the tests' reference models) installed first and pinned to
    # the tested version, so that the extras do not pull another. Which build that is depends on
    # the index pip is configured with: this project's machines serve the CPU build
    # (2.13.0+cpu); PyPI's Linux wheel is the CUDA build. If the pin cannot be had, the CPU build
    # from PyTorch's own index is tried.
    .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
  .venv/bin/python -c "import torch; print('setup.sh: torch', torch.__version__)" 2>/dev/null || true
  .venv/bin/pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
