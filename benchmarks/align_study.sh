#!/usr/bin/env bash
# Steps to quality with representation alignment (docs/alignment.md, issue 31 item 6). The goal is the shipped flow
# model's FD (22.3 at its default sampler, docs/flow.md) in at most a third of its 12,017 steps. So every run here,
# the baseline and each alignment variant, trains 4,006 steps (a third) as one cosine run with the shipped model's
# model, recipe and batch, logs its FD every EVAL_EVERY steps, and its last EMA is then scored at the shipped
# default sampler against the shipped model (the 12,017-step baseline) by benchmarks/align_study_plot.py.
# About 1.2 h per plain run on 2 CPU cores in bf16, 2 h on 1 (REPA with its 2048-wide projector about 2.4 times
# that, benchmarks/results/align-cpu.json). Resumable: rerun the same command and each run continues from its newest
# checkpoint (--resume auto); a finished run is skipped by dit itself.
#   bash benchmarks/align_study.sh [OUT]      (from the repository root; OUT defaults to ~/dit-runs/align-study-4006)
# Then: python benchmarks/align_study_plot.py OUT --out docs/images/align-study.png
# Stop it by killing this script first: a run stopped by a signal returns, and the script goes on to the next one.
#
# FD is scored in the shipped judge's features (weights/fashion-judge.safetensors), the features of the shipped
# model's FD 22.3. REPA's encoder must not be the network FD is scored with, so it is a second judge, trained here
# from another seed (benchmarks/fashion_judge.py --seed 1): the same architecture and data, other weights. With a
# DINOv2 file, REPA_DINOV2=path/to/dinov2_vits14_pretrain.pth adds REPA with DINOv2 (ViT-S/14: 98 px inputs).
# The in-training evaluation samples as --eval-sampler euler --eval-steps 9 --eval-cfg 3, the shipped model's sampler
# and scale but guided on every step (dit train's evaluation has no guidance interval), so its curve is read against
# the baseline's curve; the last checkpoints are scored with the interval as well.
set -euo pipefail
OUT=${1:-$HOME/dit-runs/align-study-4006}
STEPS=${STEPS:-4006}
EVAL_EVERY=${EVAL_EVERY:-500}
mkdir -p "$OUT"

# The reference (60k train split, judge features) and REPA's encoder, each made once.
[ -f "$OUT/fm-judge-ref.npz" ] || dit fid --make-ref fashion-mnist --split train --features fashion-judge -o "$OUT/fm-judge-ref.npz"
[ -f "$OUT/encoder-judge.safetensors" ] || python benchmarks/fashion_judge.py --seed 1 --out "$OUT/encoder-judge.safetensors"

RECIPE=(--preset fashion-mnist --objective flow --no-learn-sigma --time-sampling logit-normal --steps "$STEPS"
        --lr-schedule cosine --lr-warmup 200 --precision bf16 --seed 1 --ckpt-every 500 --keep-last 3
        --eval-every "$EVAL_EVERY" --eval-ref "$OUT/fm-judge-ref.npz" --eval-features fashion-judge --eval-num 1000
        --eval-sampler euler --eval-steps 9 --eval-cfg 3 --resume auto)

train() {  # NAME, then the variant's own options
    local name=$1
    shift
    dit train "${RECIPE[@]}" "$@" --out "$OUT/$name"
}

train baseline
train repa-judge-256 --align repa --align-encoder "$OUT/encoder-judge.safetensors" --align-projector-dim 256
train dispersive --dispersive
train self --align self
train repa-judge --align repa --align-encoder "$OUT/encoder-judge.safetensors"
train repa-judge-dispersive --align repa --align-encoder "$OUT/encoder-judge.safetensors" --dispersive
if [ -n "${REPA_DINOV2:-}" ]; then
    train repa-dinov2 --align repa --align-encoder dinov2 --dinov2-weights "$REPA_DINOV2"
fi
