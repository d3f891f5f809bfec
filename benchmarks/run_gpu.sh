#!/usr/bin/env bash
# Every GPU measurement of issue 11 in one call on a lent machine, one JSON line per run under $OUT
# (benchmarks/RESULTS.md says what each row means). Wheels for packages the machine lacks (diffusers,
# transformers, peft, accelerate, pypng) travel in .whl/ (git-ignored): `pip download --no-deps -d .whl ...`.
#
#   bash benchmarks/run_gpu.sh            # on the device: ~10 min on an H200
#   TINY=1 bash benchmarks/run_gpu.sh     # the same steps with tiny models on the CPU: checks that it runs
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ "${TINY:-0}" = 1 ]; then
  # tiny: one compiled configuration only (each compile costs a minute on a CPU)
  T="--tiny --device cpu --runs 1 --warmup 0"; S512=128; S4K=256; S8K=512; N="--no-flops"
  MODES=none,default; MODES2=none
  TRAIN="--tiny --device cpu --crop 96 --steps 1 --mixed-precision no"
else
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD || exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # inductor's FX graph / autotune caches persist across runs of this script (compile time stated once)
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache} TORCHINDUCTOR_FX_GRAPH_CACHE=1
  T="--device cuda"; S512=512; S4K=4096; S8K=8192; N=""
  MODES=none,default,reduce-overhead,max-autotune; MODES2=none,max-autotune
  TRAIN="--device cuda --crop 512 --steps 3 --mixed-precision fp16"
fi
B="$PY benchmarks/bench_sr.py --json $OUT/gpu.jsonl"
step() { echo; echo "## $*"; }
step "1. eager vs compiled (default / reduce-overhead / max-autotune), channels-last, 512², bf16, batch 1"
$B --dtypes bf16 --sizes $S512 --compile $MODES --runs 20 --warmup 3 $N $T
$B --dtypes bf16 --sizes $S512 --channels-last --compile $MODES2 --runs 20 --warmup 3 --no-flops $T
step "2. throughput: batch 1/4/8/16 at 512² (bf16, eager and max-autotune)"
$B --dtypes bf16 --sizes $S512 --batch 1,4,8,16 --compile $MODES2 --runs 10 --warmup 2 --no-flops $T
step "3. memory: 1024²→4096² and 2048²→8192², bf16, with and without --vae-offload"
$B --dtypes bf16 --sizes $S4K --runs 2 --warmup 1 --no-flops $T
$B --dtypes bf16 --sizes $S4K,$S8K --vae-offload --runs 1 --warmup 1 --no-flops $T
step "4. fp16 training step at 512² crops, batch 1/2/4, gradient checkpointing"
$PY benchmarks/bench_train_step.py $TRAIN --batches 1,2,4 --json $OUT/train.jsonl
echo; echo "JSON lines: $OUT/gpu.jsonl $OUT/train.jsonl"
