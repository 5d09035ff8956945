"""Train-step throughput and compiled memory per sharding layout: one small Llama (and a small
Mixtral for expert parallelism) trained by `jaxinfer.train.step.train_step` under each preset of
`sharding.rules`, against the same model on one device in the same process.

    python -m experiments.bench_layouts            # 2-layer Llama, batch 16 x 128 tokens
    python -m experiments.bench_layouts --quick    # seconds on a CPU

Layouts over 8 devices (preset, mesh): dp (data=8), fsdp (fsdp=8), tp (data=2, tensor=4), tp_sp
(the same with Megatron sequence-parallel norms), fsdp_tp (data=2, fsdp=2, tensor=2), sp_ring and
sp_ulysses (data=2, sequence=4; attention by ring attention / Ulysses) and ep (a Mixtral with
8 experts over expert=8, capacity routing with all_to_all). On a CPU host the script asks XLA for
8 emulated devices, which share the host's cores: the ratios then measure each layout's overheads
(collectives, resharding, redundant work) against one device doing the same total work, not a
speedup. Only the ratios are worth quoting, and only against the peer from the same run.

Each row: median and spread (min, max) of --reps timed steps after a compile-and-run warm-up;
steps/s and tokens/s; ``vs_single`` = steps/s over the single-device steps/s of the same model
(Llama for every preset but ep, whose peer is the Mixtral on one device); and the compiled
program's memory per device from ``memory_analysis()``: arguments + outputs + temporaries minus
aliased buffers (``peak_MB``), the parameters and optimizer state included.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # CPU only: emulate a multi-device host (must precede the first jax import)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxinfer  # noqa: E402
import sharding  # noqa: E402
from experiments.common import (RESULTS, environment, parse_experiment_args,  # noqa: E402
                                peak_bytes, print_table, record_timing, time_calls,
                                write_json)
from jaxinfer.models.mixtral import MixtralForCausalLM  # noqa: E402
from jaxinfer.models.mixtral_config import MixtralConfig  # noqa: E402
from jaxinfer.train.optimizer import make_optimizer  # noqa: E402
from jaxinfer.train.step import train_step  # noqa: E402

NUM_DEVICES = 8
LAYOUTS = {  # row name -> (preset, mesh sizes over NUM_DEVICES devices)
    "dp": ("dp", dict(data=8)),
    "fsdp": ("fsdp", dict(fsdp=8)),
    "tp": ("tp", dict(data=2, tensor=4)),
    "tp_sp": ("tp_sp", dict(data=2, tensor=4)),
    "fsdp_tp": ("fsdp_tp", dict(data=2, fsdp=2, tensor=2)),
    "sp_ring": ("sp_ring", dict(data=2, sequence=4)),
    "sp_ulysses": ("sp_ulysses", dict(data=2, sequence=4)),
    "ep": ("ep", dict(expert=8)),
}
QUICK_LAYOUTS = ("tp_sp",)
# --fast-compile: XLA's backend (LLVM) optimisation off, which cuts a train step's CPU compile ~3x;
# --quick uses it, as its timings only show that the pipeline runs
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def model_config(args, *, moe: bool, sequence_parallel: str = "ring") -> jaxinfer.LlamaConfig:
    """A Llama whose attention runs `sequence_parallel` where the rules split "seq", or (moe) a
    Mixtral of the same attention with 8 experts, routed with all_to_all where the rules split
    "expert" (capacity routing on one device)."""
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=args.seq)
    if moe:
        return MixtralConfig(**common, intermediate_size=args.hidden, num_local_experts=8,
                             num_experts_per_tok=2, moe_impl="expert_parallel")
    return jaxinfer.LlamaConfig(**common, intermediate_size=4 * args.hidden,
                                sequence_parallel=sequence_parallel)


def build(config: jaxinfer.LlamaConfig) -> nnx.Module:
    """The model for `config`, seed 0 (so a layout and its single-device peer share weights)."""
    cls = MixtralForCausalLM if isinstance(config, MixtralConfig) else jaxinfer.LlamaForCausalLM
    return cls(config, rngs=nnx.Rngs(0))


def measure(model: nnx.Module, batches: jax.Array, reps: int, options: dict, mesh=None,
            rules=None) -> dict:
    """Timing and memory of the jitted train step (compiled with XLA `options`) on one device
    (mesh None) or on `mesh` with parameters, optimizer state and batches placed by `rules`."""
    tx = make_optimizer(learning_rate=1e-3, total_steps=100, warmup_steps=1, weight_decay=0.1,
                        clip_norm=1.0)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    if mesh is None:
        params, opt_state, batches = jax.device_put((params, opt_state, batches),
                                                    jax.devices()[0])
        lowered = train_step.lower(graphdef, tx, params, opt_state, batches)
    else:
        params = sharding.place(params, mesh, rules, head_counts=sharding.head_counts_of(model))
        opt_state = sharding.place(opt_state, mesh, rules)
        batches = jax.device_put(batches,
                                 sharding.batch_sharding(mesh, rules, (None, "batch", None)))
        with sharding.use_rules(mesh, rules):
            lowered = train_step.lower(graphdef, tx, params, opt_state, batches)
    compiled = lowered.compile(compiler_options=options)
    row: dict = {}
    median = record_timing(row, time_calls(compiled, (params, opt_state, batches), reps))
    tokens = batches.shape[0] * batches.shape[1] * (batches.shape[2] - 1)
    return row | {"steps_per_s": 1 / median, "tokens_per_s": tokens / median,
                  "peak_MB": peak_bytes(compiled) / 1e6}


def run(args) -> list[dict]:
    """One row per single-device peer and per layout, in the order of args.layouts."""
    batches = jax.random.randint(jax.random.key(1), (1, args.batch, args.seq + 1), 0, args.vocab,
                                 jnp.int32)  # [accum, B, L+1]
    options = FAST_COMPILE if args.fast_compile else {}
    rows, single = [], {}
    for model_kind in dict.fromkeys("mixtral" if n == "ep" else "llama" for n in args.layouts):
        config = model_config(args, moe=model_kind == "mixtral")
        row = {"layout": f"single ({model_kind})", "preset": None, "mesh": "1", "devices": 1,
               **measure(build(config), batches, args.reps, options)}
        single[model_kind] = row["steps_per_s"]
        rows.append(row | {"vs_single": 1.0})
    devices = jax.devices()[:NUM_DEVICES]
    for name in args.layouts:
        preset, sizes = LAYOUTS[name]
        mesh = sharding.make_mesh(**sizes, devices=devices)
        row = {"layout": name, "preset": preset,
               "mesh": "x".join(f"{a}={n}" for a, n in sizes.items()), "devices": NUM_DEVICES}
        config = model_config(args, moe=name == "ep", sequence_parallel=(
            sharding.SEQUENCE_PARALLEL_IMPL.get(preset, "ring")))
        row |= measure(build(config), batches, args.reps, options, mesh,
                       sharding.rules_for(preset))
        peer = single["mixtral" if name == "ep" else "llama"]
        rows.append(row | {"vs_single": row["steps_per_s"] / peer})
    return rows


def plot_bars(rows: list[dict], out: Path, title: str) -> Path:
    """Bar chart of steps/s relative to the single-device peer, one bar per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(rows)), [r["vs_single"] for r in rows])
    ax.set_xticks(range(len(rows)), [r["layout"] for r in rows], rotation=30, ha="right")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(ylabel="train steps/s vs one device", title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--fast-compile", action="store_true",
                        help="compile without XLA backend optimisation (see FAST_COMPILE)")
    parser.add_argument("--out", default=str(RESULTS / "bench_layouts.json"))
    args = parse_experiment_args(parser, argv)
    if args.quick:
        args.layouts = [n for n in args.layouts if n in QUICK_LAYOUTS]
        args.vocab, args.hidden, args.layers, args.batch, args.seq = 64, 32, 1, 8, 16
        args.reps, args.fast_compile = min(args.reps, 2), True
    if len(jax.devices()) < NUM_DEVICES:
        raise SystemExit(f"bench_layouts needs {NUM_DEVICES} devices; found {len(jax.devices())}")

    rows = run(args)
    print_table(rows, ["layout", "mesh", "median_ms", "min_ms", "max_ms", "steps_per_s",
                       "tokens_per_s", "vs_single", "peak_MB"])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"experiment": "bench_layouts", **settings, **environment(), "rows": rows}
    out = write_json(record, args.out)
    png = plot_bars(rows, Path(out).with_suffix(".png"),
                    f"train step per layout, {NUM_DEVICES} x {jax.devices()[0].device_kind}")
    print(f"wrote {out} and {png}")
    return record


if __name__ == "__main__":
    main()
