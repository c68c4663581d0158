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
  if [[ ",$extras," == *",dev,"* || ",$extras," == *",torch,"* ]]; then
    # The CPU build of torch, for converting .pth weights and for the tests' reference models.
    # Installed first, so that the 'torch' extra does not pull the multi-GB CUDA build.
    .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
  .venv/bin/pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
