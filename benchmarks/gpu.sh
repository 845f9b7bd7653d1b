#!/usr/bin/env bash
# The same benchmarks on one CUDA GPU, with compile, at the sizes a GPU needs.
# Run from the repository root on a machine with torch (CUDA build) and this package installed:
#   bash benchmarks/gpu.sh            # writes benchmarks/results/model-cuda.json and fid-cuda.json
# MFU is reported against the bf16 (and fp32/TF32) matmul peak measured in the same run; the nominal dense bf16 peaks
# are about 989 TFLOP/s (H100 SXM) and the same for H200.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python benchmarks/bench_model.py --device cuda --compile --repeats 10 \
    --models DiT-S/2 DiT-B/2 DiT-XL/2 --batch 64 \
    --sample-model DiT-XL/2 --sample-batch 64 --sample-steps 25 \
    --train-model DiT-XL/2 --train-batch 32 \
    --out benchmarks/results/model-cuda.json
python benchmarks/bench_fid.py --device cuda --num-images 512 --batch-size 128 --repeats 3 || true
