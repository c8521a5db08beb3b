#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install ggspeed with its test extras.
# Sourced by scripts/test.sh and launch/demo.sh so that each does its own set-up on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GGSPEED_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.ggspeed-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    # torch first, pinned to the CPU build on this disk: a plain requirement would pull CUDA.
    if ! python -c "import torch" >/dev/null 2>&1; then
        python -m pip install --quiet "torch==2.13.0"
    fi
    python -m pip install --quiet -e "$ROOT[dev]"
    touch "$stamp"
fi

# DeepSpeed JIT-compiles a few ops on first use; cache them inside the ignored build folder.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/build/torch_extensions}"
# Numba caches compiled kernels beside the sources unless told otherwise.
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$ROOT/build/numba_cache}"
mkdir -p "$TORCH_EXTENSIONS_DIR" "$NUMBA_CACHE_DIR"

# DeepSpeed's torch backend builds its CPU shared-memory comm op at every init_distributed on CPU
# (70+ s the first time). Build it once here, serially, instead of inside the first multi-rank
# run; a lock left by a killed build would otherwise hang every later init_distributed.
if [ ! -f "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so" ]; then
    rm -f "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock"
    echo "[setup] building DeepSpeed's CPU comm op once (about a minute)"
    python - <<'PY'
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None:
    builder.load(verbose=False)
PY
fi
