#!/usr/bin/env bash
# The GPU suite in one unattended call: tests/gpu (bf16 step, compile, SDPA kernel, bf16 sampling drift, one-process
# NCCL train + resume, Inception CUDA vs CPU; for flow models, four bf16 Trainer steps of DiT-XL/2 and the bf16
# drift of Heun and Euler sampling of DiT-XL/2 at cfg 4; for mean-flow models, four bf16 Trainer steps of a decoupled
# DiT-XL/2 with the JVP and DMF's model guidance, and its 1-step sampling throughput), then the DiT-XL/2 timings of bench_model.py against
# diffusers with MFU (the forward also as `dit sample` runs it: bf16 weights cast once, with inductor freezing, and
# with max-autotune's kernel tuning and CUDA graphs), then the race of issue 21 at XL/2: the whole `dit sample` against
# DiTPipeline in bf16, with sd-vae's layout (random weights). At most 9 minutes by the step limits, so it fits one
# 10-minute device call; every step has its own time limit, so one hang cannot eat the budget.
#
#   bash benchmarks/gpu.sh [OUT_DIR]     # default: $OUT, else benchmarks/results/gpu
#
# Writes to OUT_DIR (9 files at most): steps.jsonl (one line per step: rc, seconds, timed_out), tests.log,
# gpu-tests.json (each test's figures), bench.log, model.json (bench_model.py's rows), race.log, race.json (the race's
# rounds and ratio), summary.json (MFU of the XL/2 training step and sampling, ratios against diffusers, the race,
# test outcomes). Without CUDA it runs the same steps on the CPU at toy sizes, to check the plumbing: the CUDA-only
# tests are skipped with their reason.
# Needs torch, this package's dependencies (diffusers included) and pytest; the tree is imported from PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$out"
: > "$out/steps.jsonl"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DIT_GPU_REPORT="$out"
cuda=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

step() {  # step NAME LIMIT_S LOG COMMAND...: run under a time limit, append its outcome to steps.jsonl
    local name=$1 limit=$2 log=$3 start rc
    shift 3
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >>"$out/$log" 2>&1
    rc=$?
    printf '{"step": "%s", "rc": %d, "seconds": %d, "timed_out": %s}\n' "$name" "$rc" "$(($(date +%s) - start))" \
        "$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo true || echo false)" >>"$out/steps.jsonl"
}

python -c "import diffusers" >/dev/null 2>&1 ||
    echo '{"step": "check", "note": "diffusers is not importable: bench_model.py needs it (carry its wheel)"}' \
        >>"$out/steps.jsonl"

if [ "$cuda" = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$out/tests.log" 2>&1 || true
    step tests 200 tests.log python -m pytest -q -rs -p no:cacheprovider tests/gpu
    step bench 200 bench.log python benchmarks/bench_model.py --device cuda --compile --repeats 5 \
        --models DiT-XL/2 --batch 64 --sample-model DiT-XL/2 --sample-batch 64 --sample-steps 25 \
        --train-model DiT-XL/2 --train-batch 32 --out "$out/model.json"
    step race 120 race.log python benchmarks/race_pipeline.py --model DiT-XL/2 --vae-layout sd --device cuda \
        --rounds 2 --steps 50 --images 8 --precision bf16 --out "$out/race.json"
else
    step tests 200 tests.log python -m pytest -q -rs -p no:cacheprovider tests/gpu
    step bench 200 bench.log python benchmarks/bench_model.py --device cpu --repeats 1 --models DiT-S/8 --batch 2 \
        --sample-model DiT-S/8 --sample-batch 2 --sample-steps 2 --train-model DiT-S/8 --train-batch 2 \
        --out "$out/model.json"
    step race 240 race.log python benchmarks/race_pipeline.py --model DiT-S/8 --image-size 64 --rounds 1 --steps 2 \
        --images 4 --precision fp32 --out "$out/race.json"
fi
step summary 20 bench.log python benchmarks/gpu_summary.py "$out"
cat "$out/steps.jsonl"
