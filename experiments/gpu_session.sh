#!/usr/bin/env bash
# One lent-GPU session: kernel correctness on the GPU (the kernel tests, compiled, not interpreted),
# then the benchmark tables. Everything lands in $OUT (default: experiments/results/gpu).
#   PYTHONPATH=. bash experiments/gpu_session.sh [section ...]   # sections: env tests attention
#                                                                #   attention_mgpu tune
#                                                                #   attention128 sparse generate
#                                                                #   quant fftconv train_mfu serving
#
# Plan for a 15-minute lease (device time includes the machine's start-up, a few minutes): two
# commands of about 330 s each, so that both fit beside a start-up of up to ~4 minutes:
#   OUT=$OUT bash experiments/gpu_session.sh env tests attention tune          # <= 330 s
#   OUT=$OUT bash experiments/gpu_session.sh quant fftconv train_mfu serving   # <= 325 s
# Each section's budget is its timeout below, and every script writes its JSON before that fires
# (after every row, or by its own --budget-s / --deadline-s), so a timeout loses only the tail:
#   env 20 | tests 115 (collect 25, run 85 + 5 to print) | attention 130 | tune 65
#   attention_mgpu 65 (our Mosaic GPU forward with the Triton and the Mosaic backward, beside
#   cuDNN and jax's own Mosaic FlashAttention-3 at S 4K/16K, D 128, the one-warpgroup variant
#   last; same budget as tune, so it takes tune's place in the first command until the Mosaic
#   kernels are measured: "env tests attention attention_mgpu")
#   quant 45 (--budget-s 25) | fftconv 55 (--deadline-s 45) | train_mfu 75 | serving 150
# Estimates from the H200 run of 2026-11-28: compiles dominate (attention's 60 programs time only
# ~10 s at 10 reps), so reps are cut to 5, and serving to 32 requests of 64-128 new tokens.
set -u
OUT=${OUT:-experiments/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(env tests attention sparse generate)
for section in "${sections[@]}"; do
  echo "=== $section $(date -u +%H:%M:%S)"
  case $section in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
      timeout 20 python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" ;;
    tests)  # the tests that compile a GPU kernel: pallas/triton/paged/ragged in the test's name
      # or parameters (-k would match every test: the package is kernels_pallas). -v writes each
      # result as it comes and SIGINT makes pytest print its summary, so a timeout keeps a verdict.
      timeout 25 python3 -m pytest tests/kernels_pallas -m "not slow" -p no:cacheprovider \
        --collect-only -q 2> "$OUT/pytest_collect.err" \
        | grep -E '^tests/[^ ]*::[^ ]*(pallas|triton|paged|ragged|mosaic|mgpu)' \
        > "$OUT/pytest_kernels_ids.txt"
      per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=60)
      mapfile -t ids < "$OUT/pytest_kernels_ids.txt"
      if [ ${#ids[@]} -gt 0 ]; then  # no ids would make pytest run every test
        JAX_PLATFORMS=cuda timeout -s INT -k 5 85 python3 -m pytest -v -rfE -n 12 -m "not slow" \
          -p no:cacheprovider $per_test "${ids[@]}" > "$OUT/pytest_kernels.log" 2>&1
      else
        echo "collection failed: see $OUT/pytest_collect.err" > "$OUT/pytest_kernels.log"
      fi
      echo "selected ${#ids[@]}; finished:" \
        "$(grep -cE ' PASSED ' "$OUT/pytest_kernels.log") passed," \
        "$(grep -cE ' (FAILED|ERROR) ' "$OUT/pytest_kernels.log") failed or errors"
      grep -E "(passed|failed|error).* in [0-9.]+s|Interrupted|Timeout" "$OUT/pytest_kernels.log" \
        | tail -3
      grep -E "^(FAILED|ERROR)" "$OUT/pytest_kernels.log" | head -40 ;;
    attention)
      timeout 130 python3 -m experiments.bench_attention --seq-lens 1024 4096 16384 \
        --head-dims 128 --masks causal full --reps 5 \
        --impls pallas xla jax_nn_xla jax_nn_cudnn jax_pallas_mha \
        --out "$OUT/bench_attention.json" ;;
    attention_mgpu)  # issue 3: Mosaic GPU vs cuDNN (rows are written as they finish)
      timeout 65 python3 -m experiments.bench_attention --seq-lens 4096 16384 --head-dims 128 \
        --masks causal full --reps 5 --no-paged --no-ragged \
        --impls pallas_mgpu jax_nn_cudnn pallas_mgpu_mosaic_bwd jax_mgpu pallas_mgpu_1wg \
        --out "$OUT/bench_attention_mgpu.json" ;;
    tune)
      timeout 65 python3 -m experiments.tune_attention --reps 5 --out "$OUT/tune_attention.json" ;;
    attention128)
      timeout 60 python3 -m experiments.bench_attention --seq-lens 4096 16384 --head-dims 128 \
        --masks causal --reps 10 --no-paged --impls pallas jax_nn_cudnn jax_pallas_mha \
        --out "$OUT/bench_attention_causal.json" ;;
    sparse)
      timeout 60 python3 -m experiments.bench_sparse_attention --windows 256 1024 4096 \
        --modes fwd fwd_bwd --out "$OUT/bench_sparse_attention.json" ;;
    generate)
      timeout 60 python3 -m experiments.bench_generate --out "$OUT/bench_generate.json" ;;
    serving)  # decode roofline of a ~1B random Llama, engine against transformers on the GPU
      timeout 150 python3 -m experiments.bench_serving --random-model 2048 16 --dtype bfloat16 \
        --rates inf --num-requests 32 --prompt-len 128 512 --output-len 64 128 --max-batch 32 \
        --num-pages 2048 --peer-repeats 1 --out "$OUT/bench_serving.json" ;;
    train_mfu)
      timeout 75 python3 -m experiments.bench_train_mfu --steps 5 --warmup 2 \
        --out "$OUT/bench_train_mfu.json" ;;
    quant)
      timeout 45 python3 -m experiments.bench_quant_matmul --budget-s 25 \
        --out "$OUT/bench_quant_matmul.json" ;;
    fftconv)
      timeout 55 python3 -m experiments.bench_fftconv --budget-s 30 --deadline-s 45 \
        --out "$OUT/bench_fftconv.json" ;;
    *) echo "unknown section $section" ;;
  esac
done
