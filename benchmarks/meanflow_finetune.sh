#!/usr/bin/env bash
# The embedded mean-flow model's fine-tune (docs/meanflow.md): Decoupled MeanFlow's route, from the shipped flow model.
# Resumable across sessions: rerun the same command and --resume auto continues from the newest checkpoint in OUT.
# bf16 autocast (steps 0-267 ran in fp32): on an AVX-512 BF16 CPU a mean-flow step is several times faster; on a CPU
# without bf16 matmuls resume with --precision fp32 (a resumable change).
#   bash benchmarks/meanflow_finetune.sh [OUT]        (from the repository root; OUT defaults to ~/dit-runs/...)
set -euo pipefail
OUT=${1:-$HOME/dit-runs/fashion-meanflow}
exec dit train --preset fashion-mnist --data fashion-mnist --objective meanflow \
    --init-from weights/fashion-mnist.safetensors --decoupled-depth 4 --interval-ratio 0.5 \
    --train-guidance model --train-omega 0.6667 --train-guidance-interval 0.156,0.781 \
    --steps 2000 --lr 1e-4 --lr-schedule cosine --lr-warmup 100 --precision bf16 \
    --ckpt-every 100 --keep-last 40 --sample-every 500 --log-every 25 --resume auto --out "$OUT"
