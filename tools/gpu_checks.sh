#!/usr/bin/env bash
# The checks that need a GPU, in one run (for a lent GPU machine with PyTorch, Triton and numba
# installed; CI has no GPU and skips them): the CUDA tests, then the Triton codec benchmark.
#   bash tools/gpu_checks.sh [OUTDIR]     # logs and bench_codec_gpu.{json,md} in OUTDIR
# Requirements the GPU machine's image lacks (pydantic, deepspeed) may be given as wheels in .whl/:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl pydantic pydantic_core annotated-types typing-inspection typing_extensions
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/build/gpu_checks}")  # relative to where it is called from
mkdir -p "$out"
cd "$root"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ggspeed-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ggspeed-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NUMBA_CACHE_DIR=/tmp/ggspeed-numba PYTHONUNBUFFERED=1
python3 -c "import torch, triton, numba, numpy; print('torch', torch.__version__, 'triton', \
triton.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
rc=0
timeout 260 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" -s tests/test_codec_cuda.py \
    tests/test_gct_cuda.py tests/test_act_cuda.py "tests/test_gg.py::test_cuda_generator_and_device" 2>&1 \
    | tee "$out/tests.log" || rc=1
timeout 180 python3 tools/bench_codec_gpu.py --out "$out" "${@:2}" 2>&1 | tee "$out/bench.log" || rc=1
exit $rc
