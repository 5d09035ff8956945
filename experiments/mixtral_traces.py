"""Expert placement on routing traces recorded from a trained small Mixtral (experiments/
moe_placement.py compares the same placements on synthetic traces).

    python -m experiments.mixtral_traces            # 4 layers x 8 experts, 300 training steps
    python -m experiments.mixtral_traces --quick    # seconds on a CPU

A tiny Mixtral (jaxinfer.models.mixtral, dropless top-2 routing) is trained by
`jaxinfer.train.step.train_step` on the embedded corpus (jaxinfer.assets, King James Bible
sample, default tokenizer). Its routing is then recorded on the held-out tail of the corpus: every
token's top-k experts per layer, from `forward_with_routing`'s router logits. The first half of
the held-out windows is the profiling trace the placements are solved on; the second half is the
serving trace they are scored on, as a deployed placement would be. The traces and their
`sharding.placement.RoutingStats` (per-layer loads [L, E], layer-to-layer transitions
[L-1, E, E]) go to experiments/results/mixtral_traces.npz.

Placements and scores are experiments/moe_placement's (`place`, METHODS): round-robin,
contiguous, LPT, greedy co-location, MILP balance, MILP co-location, over --devices devices;
per placement the serving trace's load imbalance (max / mean device load, mean over layers) and
cross-device transitions (tokens whose consecutive layers' experts sit on different devices),
with ratios against contiguous placement (Megatron's default).

The training step has no load-balancing loss (train_step optimises next-token loss only), so
the routing is whatever next-token training makes of it; `loss_first`/`loss_last` in the record
show that the model did learn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from experiments.common import RESULTS, environment, print_table, write_json
from experiments.moe_placement import METHODS, place
from jaxinfer.assets import corpus_sample_path, default_model_dir
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.train.data import TokenWindows, read_corpus, split_held_out, tokenize_corpus
from jaxinfer.train.optimizer import make_optimizer
from jaxinfer.train.step import train_step
from sharding.placement import cross_device_transitions, load_imbalance, routing_statistics


def train(model: MixtralForCausalLM, windows: TokenWindows, steps: int, lr: float
          ) -> tuple[nnx.GraphDef, nnx.State, list[float]]:
    """`steps` AdamW updates on consecutive batches of `windows` -> (graphdef, params, losses)."""
    tx = make_optimizer(learning_rate=lr, total_steps=steps, warmup_steps=max(1, steps // 10),
                        weight_decay=0.1, clip_norm=1.0)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    losses = []
    for step in range(steps):
        batches = jnp.asarray(windows.batch(step))[None]  # [accum=1, B, L+1]
        params, opt_state, loss, _ = train_step(graphdef, tx, params, opt_state, batches)
        losses.append(float(loss))
    return graphdef, params, losses


def expert_ids(graphdef: nnx.GraphDef, params: nnx.State, batches: list[np.ndarray], top_k: int
               ) -> np.ndarray:
    """Every token's top-k experts per layer over `batches` [B, L+1] (inputs = all but the last
    token): int [layers, tokens, top_k]."""
    @jax.jit
    def route(params, ids):  # ids [B, L] -> [layers, B * L, top_k]
        _, _, routing = nnx.merge(graphdef, params).forward_with_routing(ids)
        return jax.lax.top_k(routing.router_logits, top_k)[1]

    return np.concatenate([np.asarray(route(params, jnp.asarray(b[:, :-1]))) for b in batches],
                          axis=1)


def score(device_of: np.ndarray, stats, num_devices: int) -> dict:
    """Serving-trace load imbalance and cross-device transitions of one placement."""
    imbalance = load_imbalance(device_of, stats.loads, num_devices)
    cross = int(cross_device_transitions(device_of, stats.transitions).sum())
    return {"imbalance_mean": float(imbalance.mean()), "imbalance_max": float(imbalance.max()),
            "cross_transitions": cross,
            "cross_fraction": cross / max(int(stats.transitions.sum()), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--devices", type=int, default=4, help="expert-parallel devices G")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--trace-batches", type=int, default=8,
                        help="held-out batches per trace (profiling and serving each)")
    parser.add_argument("--load-slack", type=float, default=0.05)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--mip-rel-gap", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "mixtral_traces.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.steps, args.batch, args.seq = 2, 32, 5, 4, 32
        args.trace_batches = 2

    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    train_tokens, held_out = split_held_out(
        tokenize_corpus(read_corpus(corpus_sample_path()), tokenizer), 0.1)
    config = MixtralConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden,
                           intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=args.seq, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k)
    start = time.perf_counter()
    graphdef, params, losses = train(
        MixtralForCausalLM(config, rngs=nnx.Rngs(args.seed)),
        TokenWindows(train_tokens, args.seq, args.batch, seed=args.seed), args.steps, args.lr)
    train_s = time.perf_counter() - start
    batches = TokenWindows(held_out, args.seq, args.batch).fixed_batches(2 * args.trace_batches)
    half = len(batches) // 2
    profile_ids = expert_ids(graphdef, params, batches[:half], args.top_k)
    serve_ids = expert_ids(graphdef, params, batches[half:], args.top_k)
    profile = routing_statistics(profile_ids, args.experts)
    serve = routing_statistics(serve_ids, args.experts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out.with_suffix(".npz"), profile_expert_ids=profile_ids,
                        serve_expert_ids=serve_ids, profile_loads=profile.loads,
                        profile_transitions=profile.transitions, serve_loads=serve.loads,
                        serve_transitions=serve.transitions)

    rows = []
    for method in METHODS:
        start = time.perf_counter()
        device_of = place(method, profile, args)
        rows.append({"method": method, **score(device_of, serve, args.devices),
                     "solve_s": time.perf_counter() - start})
    contiguous = next(r for r in rows if r["method"] == "contiguous")
    for row in rows:
        row["imbalance_vs_contig"] = row["imbalance_mean"] / contiguous["imbalance_mean"]
        row["traffic_vs_contig"] = (row["cross_transitions"]
                                    / max(contiguous["cross_transitions"], 1))
    print(f"trained {args.steps} steps in {train_s:.1f} s: loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}; expert share of the busiest expert per layer: "
          f"{np.round(serve.loads.max(axis=1) / serve.loads.sum(axis=1), 3).tolist()}")
    print_table(rows, ["method", "imbalance_mean", "imbalance_max", "cross_transitions",
                       "cross_fraction", "imbalance_vs_contig", "traffic_vs_contig", "solve_s"])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"experiment": "mixtral_traces", **settings, **environment(), "train_s": train_s,
              "loss_first": losses[0], "loss_last": losses[-1],
              "serve_tokens": int(serve_ids.shape[1]),
              "serve_load_share": (serve.loads / serve.loads.sum(axis=1, keepdims=True)).tolist(),
              "rows": rows}
    write_json(record, out)
    print(f"wrote {out} and {out.with_suffix('.npz')}")
    return record


if __name__ == "__main__":
    main()
