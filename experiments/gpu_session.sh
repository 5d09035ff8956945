#!/usr/bin/env bash
# One lent-GPU session: kernel correctness on the GPU (the kernel tests, compiled, not interpreted),
# then the benchmark tables. Everything lands in $OUT (default: experiments/results/gpu).
#   PYTHONPATH=. bash experiments/gpu_session.sh [section ...]   # sections: env tests attention
#                                                                #   tune attention128 sparse
#                                                                #   generate quant fftconv
#                                                                #   train_mfu serving
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
      python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" ;;
    tests)
      JAX_PLATFORMS=cuda timeout 120 python3 -m pytest tests/kernels_pallas -q -n 8 -m "not slow" \
        -p no:cacheprovider > "$OUT/pytest_kernels.log" 2>&1
      grep -E "passed|failed|error" "$OUT/pytest_kernels.log" | tail -3
      grep -E "^(FAILED|ERROR)" "$OUT/pytest_kernels.log" | head -40 ;;
    attention)
      timeout 150 python3 -m experiments.bench_attention --seq-lens 1024 4096 16384 \
        --head-dims 128 --masks causal full --reps 10 \
        --impls pallas xla jax_nn_xla jax_nn_cudnn jax_pallas_mha --out "$OUT/bench_attention.json" ;;
    tune)
      timeout 100 python3 -m experiments.tune_attention --out "$OUT/tune_attention.json" ;;
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
      timeout 240 python3 -m experiments.bench_serving --random-model 2048 16 --dtype bfloat16 \
        --rates inf --num-requests 64 --prompt-len 128 512 --output-len 128 256 --max-batch 64 \
        --num-pages 4096 --peer-repeats 1 --out "$OUT/bench_serving.json" ;;
    train_mfu)
      timeout 90 python3 -m experiments.bench_train_mfu --out "$OUT/bench_train_mfu.json" ;;
    quant)
      timeout 120 python3 -m experiments.bench_quant_matmul --out "$OUT/bench_quant_matmul.json" ;;
    fftconv)
      timeout 120 python3 -m experiments.bench_fftconv --out "$OUT/bench_fftconv.json" ;;
    *) echo "unknown section $section" ;;
  esac
done
