#!/usr/bin/env bash
# Steps to quality with representation alignment (docs/alignment.md, issue 31 item 6). The goal is the shipped flow
# model's FD in at most a third of its 12,017 steps. So every run here, the baseline and each alignment variant,
# trains 4,006 steps (a third) as one cosine run with the shipped model's architecture, objective, recipe and batch
# (the shipped model itself was two cosine runs, 5,500 + 6,517 steps, docs/flow.md), and logs its FD every
# EVAL_EVERY steps. After the runs, the shipped model (the 12,017-step baseline) is scored once in the same protocol
# as those evaluations, into OUT/shipped-eval.json (below). About 40 min to 1.2 h per plain run on 2 CPU cores in
# bf16, by the CPU, 2 h on 1 (REPA with its 2048-wide projector about 2.4 times the step, align-cpu.json).
# Resumable: rerun the same command and each run continues from its newest checkpoint (--resume auto); a finished run
# is skipped by dit itself, and the files made once are kept.
#   bash benchmarks/align_study.sh [OUT]      (from the repository root; OUT defaults to ~/dit-runs/align-study-4006)
# Then: python benchmarks/align_study_plot.py OUT --out docs/images/align-study.png (the FD curves, the shipped
# model's FD as a line, and the step at which each run reaches the baseline's last FD).
# Stop it by killing this script first: a run stopped by a signal returns, and the script goes on to the next one.
#
# FD is scored in the shipped judge's features (weights/fashion-judge.safetensors), the features of the shipped
# model's FD 22.3 (docs/flow.md). REPA's encoder must not be the network FD is scored with, so it is a second judge,
# trained here from another seed (benchmarks/fashion_judge.py --seed 1): the same architecture and data, other
# weights. With a DINOv2 file, REPA_DINOV2=path/to/dinov2_vits14_pretrain.pth adds REPA with DINOv2 (ViT-S/14: 98 px
# inputs).
# The in-training evaluation draws EVAL_NUM images with uniformly random classes from the runs' seed, Euler 9 at
# cfg 3: the shipped model's sampler and scale, but guided on every step (dit train's evaluation has no guidance
# interval), so its FD is not the 22.3 of the shipped model's default. The shipped model's own point on these curves
# is `dit sample` with the same images' options and --guidance-interval none (it draws the images the evaluation
# would: a run's checkpoint sampled so gives its eval .npz byte for byte), scored as the evaluation scores:
# OUT/shipped-eval.json holds its fd, kid and the two commands.
set -euo pipefail
OUT=${1:-$HOME/dit-runs/align-study-4006}
STEPS=${STEPS:-4006}
EVAL_EVERY=${EVAL_EVERY:-500}
SEED=1  # the runs' seed, from which the evaluation draws its classes and noise too
EVAL_NUM=1000
EVAL_SAMPLER=euler
EVAL_STEPS=9
EVAL_CFG=3
mkdir -p "$OUT"

# The reference (60k train split, judge features) and REPA's encoder, each made once.
[ -f "$OUT/fm-judge-ref.npz" ] ||
    dit fid --make-ref fashion-mnist --split train --features fashion-judge -o "$OUT/fm-judge-ref.npz"
[ -f "$OUT/encoder-judge.safetensors" ] ||
    python benchmarks/fashion_judge.py --seed 1 --out "$OUT/encoder-judge.safetensors"

RECIPE=(--preset fashion-mnist --objective flow --no-learn-sigma --time-sampling logit-normal --steps "$STEPS"
        --lr-schedule cosine --lr-warmup 200 --precision bf16 --seed "$SEED" --ckpt-every 500 --keep-last 3
        --eval-every "$EVAL_EVERY" --eval-ref "$OUT/fm-judge-ref.npz" --eval-features fashion-judge
        --eval-num "$EVAL_NUM" --eval-sampler "$EVAL_SAMPLER" --eval-steps "$EVAL_STEPS" --eval-cfg "$EVAL_CFG"
        --resume auto)

train() {  # NAME, then the variant's own options
    local name=$1
    shift
    dit train "${RECIPE[@]}" "$@" --out "$OUT/$name"
}

shipped_eval() {  # the shipped model in the evaluation's protocol, into $OUT/shipped-eval.json
    local sample=(dit sample --model fashion-mnist-flow --num "$EVAL_NUM" --seed "$SEED" --sampler "$EVAL_SAMPLER"
                  --steps "$EVAL_STEPS" --cfg "$EVAL_CFG" --guidance-interval none --force
                  --npz "$OUT/shipped-eval.npz")
    local score=(dit fid "$OUT/shipped-eval.npz" --ref "$OUT/fm-judge-ref.npz" --features fashion-judge --no-pr --json)
    "${sample[@]}"
    "${score[@]}" | python -c '
import json, sys
fid = json.load(sys.stdin)
print(json.dumps({"model": "fashion-mnist-flow", "fd": fid["fid"], "kid": fid["kid"], "kid_std": fid["kid_std"],
                  "num": fid["num_samples"], "features": fid["features"], "commands": sys.argv[1:]}, indent=2))
' "${sample[*]}" "${score[*]}" > "$OUT/shipped-eval.json.part"
    mv "$OUT/shipped-eval.json.part" "$OUT/shipped-eval.json"
}

train baseline
train repa-judge-256 --align repa --align-encoder "$OUT/encoder-judge.safetensors" --align-projector-dim 256
train dispersive --dispersive
train self --align self
train repa-judge --align repa --align-encoder "$OUT/encoder-judge.safetensors"
train repa-judge-dispersive --align repa --align-encoder "$OUT/encoder-judge.safetensors" --dispersive
train dispersive-025 --dispersive --dispersive-weight 0.25  # the released training script's weight
train baseline-seed2 --seed 2  # the baseline's spread over seeds (the evaluation draws from the seed too)
train repa-judge-256-seed2 --align repa --align-encoder "$OUT/encoder-judge.safetensors" --align-projector-dim 256 \
    --seed 2
if [ -n "${REPA_DINOV2:-}" ]; then
    train repa-dinov2 --align repa --align-encoder dinov2 --dinov2-weights "$REPA_DINOV2"
fi

# The shipped model (12,017 steps), scored once in the same protocol as the runs' evaluations.
[ -f "$OUT/shipped-eval.json" ] || shipped_eval
