#!/usr/bin/env bash
# The embedded mean-flow model's fine-tune (docs/meanflow.md): Decoupled MeanFlow's route, from the shipped flow model,
# within the flow model's own budget of 12,017 steps at batch 128, in stages. Each stage is resumable across
# sessions: rerun the same command and --resume auto continues from the newest checkpoint in its folder.
#   bash benchmarks/meanflow_finetune.sh 1|2|3|4|5 [ROOT]     (from the repository root; ROOT defaults to ~/dit-runs)
# Stage 1 (1,900 steps, as run): MeanFlow's logit-normal(-0.4, 1) times, half of each batch on intervals, lr 1e-4
#   on a cosine meant for 2,000 steps (the session ended at 1,900); steps 0-267 in fp32, the rest in bf16.
# Stage 2: from stage 1's EMA at step 1,900, times drawn wider and noisier (logit-normal(0, 1.6): the pure-noise end,
#   where every one- and two-step sample starts, was almost never drawn), three quarters on intervals, lr 2e-4
#   constant, so that --steps can be extended on resume.
# Stage 3: the anneal, from stage 2's EMA: the same recipe with the learning rate along a cosine to 0. A probe of
#   1,000 steps from stage-2 step 2,800 barely moved the two-step FD (its instantaneous velocity had drifted from
#   the flow model's: FD 31.5 at 16 steps against the flow model's 20.4), so the run went on with stage 4.
# Stage 4: distillation, from stage 2's EMA at FROM: the target is the frozen shipped flow model's velocity guided
#   as it samples (scale 3 on flow times 0.156-0.781; --train-guidance distill --teacher), so every row's target is
#   the teacher's field instead of one sample's velocity; half of each batch on intervals, lr 1e-4 along a cosine
#   to 0 over STEPS (3,000 by default).
# Stage 5: from stage 4's EMA at FROM (its last step, 3,000, by default), the same distillation with DMF's separate
#   time proposals for the one- and two-step maps (t's noise level logit-normal(0.4, 1), r's (-1.2, 1), sorted: long
#   jumps out of high noise, which stage 4's shared draw almost never made), three quarters of each batch on
#   intervals, lr 1e-4 along a cosine to 0 over STEPS (3,443 by default: the rest of the budget).
# bf16 autocast: on a CPU without bf16 matmuls resume with --precision fp32 (a resumable change).
set -euo pipefail
STAGE=${1:?stage 1 to 5}
ROOT=${2:-$HOME/dit-runs}
COMMON=(--preset fashion-mnist --data fashion-mnist --objective meanflow --decoupled-depth 4 --precision bf16
        --ckpt-every 100 --keep-last 40 --sample-every 500 --log-every 25 --resume auto)
SELF=(--train-guidance model --train-omega 0.6667 --train-guidance-interval 0.156,0.781)
WIDE=(--mf-time-mean 0.0 --mf-time-std 1.6 --ema-decay 0.999)
case $STAGE in
  1) exec dit train "${COMMON[@]}" "${SELF[@]}" --init-from weights/fashion-mnist.safetensors --interval-ratio 0.5 \
         --steps 2000 --lr 1e-4 --lr-schedule cosine --lr-warmup 100 --out "$ROOT/fashion-meanflow" ;;
  2) exec dit train "${COMMON[@]}" "${SELF[@]}" "${WIDE[@]}" --interval-ratio 0.75 \
         --init-from "$ROOT/fashion-meanflow/ckpt-0001900.pt" \
         --steps "${STEPS:-9117}" --lr 2e-4 --lr-schedule constant --lr-warmup 50 --out "$ROOT/fashion-meanflow-s2" ;;
  3) exec dit train "${COMMON[@]}" "${SELF[@]}" "${WIDE[@]}" --interval-ratio 0.75 \
         --init-from "$ROOT/fashion-meanflow-s2/ckpt-${FROM:?FROM=step}.pt" \
         --steps "${STEPS:-1000}" --lr 2e-4 --lr-schedule cosine --lr-warmup 0 --out "$ROOT/fashion-meanflow-s3" ;;
  4) exec dit train "${COMMON[@]}" "${WIDE[@]}" --interval-ratio 0.5 --train-guidance distill \
         --teacher weights/fashion-mnist.safetensors --train-omega 3 --train-guidance-interval 0.156,0.781 \
         --init-from "$ROOT/fashion-meanflow-s2/ckpt-${FROM:?FROM=step}.pt" \
         --steps "${STEPS:-3000}" --lr 1e-4 --lr-schedule cosine --lr-warmup 50 --out "$ROOT/fashion-meanflow-s4" ;;
  5) exec dit train "${COMMON[@]}" --mf-time-mean 0.4 --mf-time-std 1.0 --mf-r-time=-1.2,1 --ema-decay 0.999 \
         --interval-ratio 0.75 --train-guidance distill --teacher weights/fashion-mnist.safetensors --train-omega 3 \
         --train-guidance-interval 0.156,0.781 --init-from "$ROOT/fashion-meanflow-s4/ckpt-${FROM:-0003000}.pt" \
         --steps "${STEPS:-3443}" --lr 1e-4 --lr-schedule cosine --lr-warmup 50 --out "$ROOT/fashion-meanflow-s5" ;;
  *) echo "stage must be 1 to 5" >&2; exit 2 ;;
esac
