"""Model FLOPs utilization (MFU) of the jitted Llama train step on one device.

    python -m experiments.bench_train_mfu                   # 0.89B Llama, seq 2048, batch 8
    python -m experiments.bench_train_mfu --batches 4 8 16  # sweep the batch (one compile each)
    python -m experiments.bench_train_mfu --quick           # a tiny config, seconds on a CPU

What is timed is the project's own step, `jaxinfer.train.step.train_step` with the AdamW of
`jaxinfer.train.optimizer.make_optimizer`, exactly as `jaxinfer.train.loop` calls it (one
micro-batch per update, gradient clipping, weight decay): compiled once per batch size through
`train_step.lower(...).compile()`, then --warmup untimed steps and --steps timed ones, each ended
by `jax.block_until_ready`; the table shows the median and the spread (min-max). Parameters and
optimizer state are carried from step to step as in training.

Model FLOPs per step (the PaLM paper's appendix B, Megatron-LM's 2021 paper; remat recomputation
is not counted, which is what makes it *model* and not hardware FLOPs utilization):

    F = 6 * N * tokens  +  6 * L * T * (Hq * D) * tokens

* tokens = batch * T (T = --seq), the positions whose next token is predicted.
* N = parameters that take part in a matmul: every parameter except the input embedding table (a
  lookup costs no FLOPs), with the LM head's hidden * vocab counted once whether or not it is tied
  to the embedding (tied, the same matrix is a matmul there). Norm gains and biases are included
  (< 0.01% here). 6 = 2 FLOPs per multiply-add x (forward + 2 x backward).
* the attention term: per layer and token QK^T and PV take 2 * 2 * T * (Hq * D) FLOPs forward,
  x 3 for forward + backward gives 12 * L * T * (Hq * D); causal attention computes half of the
  score matrix, hence 6. GQA does not change it (every query head still scores T keys). Hq * D is
  the hidden size in every standard Llama.

MFU = F / (step seconds x peak FLOP/s), against two peaks: the device's dense spec peak from
SPEC_PEAK_TFLOPS where the device is known (or --peak-tflops), and -- always -- the FLOP/s that a
large square matmul in the compute dtype reaches on the same device in the same run (the peer:
on a CPU, where no spec peak is tabled, it is the only one). `mfu_matmul` says how close the step
comes to what this stack can do on dense matmuls at all.

Memory: the compiled step's `memory_analysis()`: `peak_MB` = arguments (parameters, optimizer
state, batch) + outputs (the new parameters and optimizer state, live beside the old ones since
the step donates nothing) + temporaries - aliased buffers (`experiments.common.peak_bytes`, as
bench_layouts counts); on a GPU also the device's running peak bytes in use. A batch that does not
fit becomes an "out of memory" row and the sweep goes on; the JSON is written before the first
batch and rewritten after every batch, so a sweep killed by a timeout keeps the rows it finished.
`--remat full|dots` recomputes each decoder layer's activations in the backward pass
(LlamaConfig.remat; the FLOP count above does not count the recomputation, as MFU's definition
asks), so larger batches fit; the step does not donate its inputs. The model stores parameters in
--param-dtype (float32 by default, master weights) and computes matmuls in --dtype (bfloat16 by
default on GPU/TPU, float32 on CPU); norms, softmax and logits stay float32 (LlamaConfig).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from experiments.common import (RESULTS, environment, init_model, parse_experiment_args, peak_bytes,
                                plot_curves, print_table, record_timing, time_calls, write_json)
from jaxinfer.config import ATTENTION_BACKENDS, REMAT_MODES
from jaxinfer.train.optimizer import make_optimizer
from jaxinfer.train.step import train_step

# Dense (no 2:4 sparsity) peak TFLOP/s per device in the 16-bit compute dtype, from the vendors'
# data sheets; matched as lower-case substrings of `device_kind`, first match wins (so the PCIe
# H100 precedes the SXM one, which `jax` reports as e.g. "NVIDIA H100 80GB HBM3"; "h200" also
# matches the GH200, whose GPU has the same peak).
SPEC_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM
    ("h200", 989.0),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
)

# The GPU default: a 0.89B-parameter Llama of Llama-2 shape with GQA (0.82B matmul parameters,
# the LM head's 66M included); 87 model TFLOPs per step at batch 8 x 2048 tokens.
FULL = dict(vocab=32000, hidden=2048, layers=16, heads=16, kv_heads=8, intermediate=5632,
            seq=2048, batches=[8], steps=10, warmup=3)
# --quick: seconds on a CPU (one compile of a 1-layer model).
QUICK = dict(vocab=256, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, seq=32,
             batches=[2], steps=3, warmup=1, matmul_size=512)
# --quick compiles without XLA's LLVM optimisation (as bench_layouts --fast-compile): its timings
# only show that the pipeline runs.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def model_config(args) -> jaxinfer.LlamaConfig:
    return jaxinfer.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq, dtype=args.dtype,
        param_dtype=args.param_dtype, attention_backend=args.attention_backend, remat=args.remat)


def matmul_params(config: jaxinfer.LlamaConfig) -> int:
    """N of the FLOP formula: parameters that take part in a matmul (see the module docstring)."""
    c = config
    h, q_width, kv_width, inter = (c.hidden_size, c.num_attention_heads * c.head_dim,
                                   c.num_key_value_heads * c.head_dim, c.intermediate_size)
    attention = h * q_width + 2 * h * kv_width + q_width * h
    attention += (q_width + 2 * kv_width) * c.qkv_bias + h * c.o_bias
    mlp = 3 * h * inter + (2 * inter + h) * c.mlp_bias
    norms = 2 * h
    final_norm_and_head = h + h * c.vocab_size
    return c.num_hidden_layers * (attention + mlp + norms) + final_norm_and_head


def model_flops_per_step(config: jaxinfer.LlamaConfig, batch: int, seq: int) -> dict:
    """FLOPs of one train step on batch x seq predicted tokens: dense, attention (causal), total."""
    tokens = batch * seq
    dense = 6 * matmul_params(config) * tokens
    attention = 6 * config.num_hidden_layers * seq * (
        config.num_attention_heads * config.head_dim) * tokens
    return {"dense": dense, "attention": attention, "total": dense + attention}


def spec_peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, tflops in SPEC_PEAK_TFLOPS:
        if key in kind:
            return tflops * 1e12
    return None


def matmul_peak(size: int, dtype: str, reps: int, options: dict) -> dict:
    """Achieved FLOP/s of a [size, size] @ [size, size] matmul in `dtype`: the measured peak."""
    rng = np.random.default_rng(2)
    a, b = (jnp.asarray(rng.standard_normal((size, size), np.float32), dtype) for _ in range(2))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=options)
    times = time_calls(compiled, (a, b), max(reps, 5), warmup=2)
    median = statistics.median(times)
    return {"size": size, "dtype": dtype, "median_ms": 1e3 * median,
            "flops_per_s": 2 * size ** 3 / median}


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return None if not stats else stats.get("peak_bytes_in_use")


def measure(model: nnx.Module, batch: int, args, options: dict) -> dict:
    """Compile the train step for `batch` sequences of args.seq tokens, then time it."""
    tx = make_optimizer(learning_rate=1e-4, total_steps=1000, warmup_steps=10, weight_decay=0.1,
                        clip_norm=1.0)
    graphdef, params = nnx.split(model)
    opt_state = jax.jit(tx.init).lower(params).compile(compiler_options=options)(params)
    batches = jnp.asarray(np.random.default_rng(1).integers(
        0, args.vocab, (1, batch, args.seq + 1), dtype=np.int32))  # [accum, B, L+1]
    t0 = time.perf_counter()
    compiled = train_step.lower(graphdef, tx, params, opt_state, batches).compile(
        compiler_options=options)
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state = {"params": params, "opt_state": opt_state}

    def step():
        state["params"], state["opt_state"], loss, grad_norm = compiled(
            state["params"], state["opt_state"], batches)
        return loss, grad_norm

    times = time_calls(step, (), args.steps, warmup=args.warmup)
    loss = float(step()[0])
    flops = model_flops_per_step(model.config, batch, args.seq)
    row = {"batch": batch, "seq": args.seq, "tokens_per_step": batch * args.seq,
           "compile_s": compile_s}
    median = record_timing(row, times)
    row |= {"tokens_per_s": batch * args.seq / median,
            "model_tflops_per_step": flops["total"] / 1e12,
            "attention_flops_fraction": flops["attention"] / flops["total"],
            "achieved_tflops": flops["total"] / median / 1e12, "loss": loss}
    if memory is not None:
        row |= {"argument_MB": memory.argument_size_in_bytes / 1e6,
                "temp_MB": memory.temp_size_in_bytes / 1e6,
                "output_MB": memory.output_size_in_bytes / 1e6,  # not donated: also live
                "alias_MB": memory.alias_size_in_bytes / 1e6,
                "peak_MB": peak_bytes(compiled) / 1e6}
    device_peak = device_peak_bytes()
    if device_peak is not None:  # the process's running peak: after this and any earlier batch
        row["device_peak_MB"] = device_peak / 1e6
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--seq", type=int, help="tokens per sequence (predicted positions)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (sequences) to sweep")
    parser.add_argument("--steps", type=int, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, help="untimed steps after compiling")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="auto",
                        help="kernels_pallas.flash_attention backend (auto: Pallas on GPU/TPU)")
    parser.add_argument("--remat", choices=list(REMAT_MODES), default="none",
                        help="recompute layer activations in the backward pass (LlamaConfig.remat)")
    parser.add_argument("--matmul-size", type=int,
                        help="side of the square matmul peer (default: 8192; 2048 on CPU)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's spec peak in TFLOP/s (default: SPEC_PEAK_TFLOPS)")
    parser.add_argument("--fast-compile", action="store_true",
                        help="compile without XLA backend optimisation (on with --quick)")
    parser.add_argument("--out", default=str(RESULTS / "bench_train_mfu.json"))
    args = parse_experiment_args(parser, argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.fast_compile = args.fast_compile or args.quick
    on_cpu = jax.default_backend() == "cpu"
    if args.dtype is None:
        args.dtype = "float32" if on_cpu else "bfloat16"
    if args.matmul_size is None:  # 8192: ~1.1 TFLOP, a few ms on an H100-class GPU
        args.matmul_size = 2048 if on_cpu else 8192

    for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate", "seq",
                 "steps", "matmul_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches must all be >= 1; got {args.batches}")
    if args.hidden % args.heads:
        parser.error(f"--hidden must be divisible by --heads; got {args.hidden} and {args.heads}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads must be a multiple of --kv-heads; got {args.heads} and "
                     f"{args.kv_heads}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive; got {args.peak_tflops}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    options = FAST_COMPILE if args.fast_compile else {}
    env = environment()
    spec_peak = (args.peak_tflops * 1e12 if args.peak_tflops is not None
                 else spec_peak_flops(env["device_kind"]))
    peak_source = ("--peak-tflops" if args.peak_tflops is not None
                   else "SPEC_PEAK_TFLOPS" if spec_peak is not None else None)
    matmul = matmul_peak(args.matmul_size, args.dtype, args.steps, options)

    config = model_config(args)
    model = init_model(config, options)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"experiment": "bench_train_mfu", **settings, **env,
              "matmul_params": matmul_params(config),
              "total_params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
              "donated_inputs": False,
              "spec_peak_tflops": None if spec_peak is None else spec_peak / 1e12,
              "spec_peak_source": peak_source, "matmul_peer": matmul, "rows": []}
    print(f"{env['device_kind']}: {args.layers} layers, hidden {args.hidden}, "
          f"{record['matmul_params'] / 1e6:.4g}M matmul params, seq {args.seq}, {args.dtype} "
          f"compute, {args.param_dtype} params; matmul peer "
          f"{matmul['flops_per_s'] / 1e12:.4g} TFLOP/s"
          + ("" if spec_peak is None else f", spec peak {spec_peak / 1e12:.4g} TFLOP/s"))
    out = write_json(record, args.out)  # the peer, before the first (long) compile
    for batch in args.batches:
        try:
            row = measure(model, batch, args, options)
        except jax.errors.JaxRuntimeError as e:  # a sweep past what fits goes on to record it
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            row = {"batch": batch, "seq": args.seq, "tokens_per_step": batch * args.seq,
                   "error": "out of memory"}
        else:
            achieved = row["achieved_tflops"] * 1e12
            row["mfu_matmul"] = achieved / matmul["flops_per_s"]
            row["mfu_spec"] = None if spec_peak is None else achieved / spec_peak
        record["rows"].append(row)
        out = write_json(record, args.out)  # after every batch: a killed sweep keeps its rows
        print(f"batch {batch}: " + ", ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float)
                                            else f"{k} {row[k]}" for k in (
            "median_ms", "mfu_spec", "mfu_matmul", "error") if row.get(k) is not None), flush=True)

    rows = record["rows"]
    print_table(rows, ["batch", "tokens_per_step", "median_ms", "min_ms", "max_ms", "tokens_per_s",
                       "achieved_tflops", "mfu_spec", "mfu_matmul", "peak_MB", "device_peak_MB",
                       "compile_s", "error"])
    done = [r for r in rows if "error" not in r]
    tokens = [r["tokens_per_step"] for r in done]
    curves = {"vs matmul peer": (tokens, [r["mfu_matmul"] for r in done])}
    if spec_peak is not None:
        curves["vs spec peak"] = (tokens, [r["mfu_spec"] for r in done])
    png = plot_curves(curves, xlabel="tokens per step", ylabel="MFU",
                      title=f"train step MFU, {args.layers}x{args.hidden} Llama, "
                            f"{env['device_kind']}", out=Path(out).with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return record


if __name__ == "__main__":
    main()
