#!/usr/bin/env bash
# The GPU benchmark as one call on a lent machine (see benchmarks/RESULTS.md). Wheels for packages the
# machine lacks (diffusers, pypng) travel in .whl/ (git-ignored).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
B="python3 benchmarks/bench_sr.py --device cuda --json $OUT/gpu.jsonl"
$B --dtypes bf16,fp16 --sizes 512 --variants merged,unmerged --runs 20 --warmup 3
$B --dtypes fp16 --sizes 512 --variants merged --dape --runs 20 --warmup 3 --no-flops
$B --dtypes bf16 --sizes 1024,2048 --runs 5 --warmup 1
$B --dtypes bf16 --sizes 4096 --runs 2 --warmup 1 --no-flops
