#!/usr/bin/env bash
# Multi-node 3D-parallel pretraining with DeepSpeed's launcher.
#
#   With passwordless ssh (run once, on the first host of the hostfile):
#     HOSTFILE=launch/hostfile.example bash launch/multinode.sh --train-iters 100000 --save ckpt
#   Without ssh (run on every node, same command, NODE_RANK = its line in the hostfile, from 0):
#     NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=hostfile bash launch/multinode.sh ...
#   On a simulated cluster on this machine (root; network namespaces, sshd per node, pdsh):
#     python tools/cluster.py up 2 --ranks-per-node 2 --rate 100mbit
#     python tools/cluster.py exec 0 env HOSTFILE=build/cluster/0/hostfile MASTER_ADDR=198.18.0.1 \
#         TP=2 PP=1 DS_CONFIG=configs/ds_tiny_cpu.json MODEL_CONFIG=configs/model/tiny.json \
#         bash launch/multinode.sh --train-iters 100
#     python tools/cluster.py down
#
# Settings (environment): HOSTFILE, DS_CONFIG, MODEL_CONFIG, DATA_PATH, TP, PP, MASTER_ADDR,
# MASTER_PORT, NODE_RANK. Extra arguments go to launch/pretrain_gpt.py. DP = world / (TP x PP).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${HOSTFILE:-$ROOT/launch/hostfile.example}"
DS_CONFIG="${DS_CONFIG:-$ROOT/configs/ds_1.3b_3d.json}"
MODEL_CONFIG="${MODEL_CONFIG:-$ROOT/configs/model/1.3b.json}"
DATA_PATH="${DATA_PATH:-$ROOT/build/data/stdlib-v4096}"
TP="${TP:-2}"
PP="${PP:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"

launcher=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
if [ -n "${NODE_RANK:-}" ]; then
    # No ssh: this invocation starts only this node's ranks; all nodes must name the same master.
    : "${MASTER_ADDR:?set MASTER_ADDR (the address of the node with NODE_RANK=0) with NODE_RANK}"
    launcher+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
elif [ -n "${MASTER_ADDR:-}" ]; then
    launcher+=(--master_addr "$MASTER_ADDR")
fi

exec "${launcher[@]}" "$ROOT/launch/pretrain_gpt.py" \
    --deepspeed_config "$DS_CONFIG" \
    --model-config "$MODEL_CONFIG" \
    --data-path "$DATA_PATH" \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
    "$@"
