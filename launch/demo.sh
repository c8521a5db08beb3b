#!/usr/bin/env bash
# The main job, on a fresh machine: set-up, the embedded corpus, then a 3D-parallel pretraining
# on the CPU (4 ranks: pipeline 2 x data 2) with GG Init, ACT and GCT switched on by
# configs/ds_tiny_cpu.json. Ends with a summary: losses, tokens/s, bits per element, where the
# logs, plot and checkpoint are. DEMO_ITERS (steps) and MASTER_PORT can be overridden.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh
source "$ROOT/scripts/setup_env.sh"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

DATA="$ROOT/build/data/stdlib-v4096"
if [ ! -f "$DATA/meta.json" ]; then
    echo "[demo] building the corpus dataset (Python stdlib -> BPE 4096 -> $DATA)"
    python tools/preprocess_data.py --output-dir "$DATA" --vocab-size 4096
fi

RUN="$ROOT/build/runs/demo"
rm -rf "$RUN"
mkdir -p "$RUN"
echo "[demo] training: 4 CPU ranks = pipeline 2 x data 2; logs in $RUN"
deepspeed --num_gpus 4 --master_port "${MASTER_PORT:-29517}" launch/pretrain_gpt.py \
    --deepspeed_config configs/ds_tiny_cpu.json \
    --model-config configs/model/tiny.json \
    --pipeline-model-parallel-size 2 \
    --data-path "$DATA" \
    --train-iters "${DEMO_ITERS:-60}" \
    --eval-interval 20 --eval-iters 2 \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 \
    --save "$RUN/checkpoints" --save-interval 30 \
    --log-dir "$RUN" | { grep -v -E "^\[20[0-9-]+ " || true; }  # DeepSpeed's INFO lines; the bar is on stderr
