"""Expert placement on routing traces recorded from a trained small Mixtral, trained with and
without the Switch load-balancing loss (experiments/moe_placement.py compares the same placements
on synthetic traces).

    python -m experiments.mixtral_traces            # 4 layers x 8 experts, 300 steps per run
    python -m experiments.mixtral_traces --quick    # seconds on a CPU

A tiny Mixtral (jaxinfer.models.mixtral, dropless top-2 routing) is trained once per
--aux-coefs entry on the embedded corpus (jaxinfer.assets, King James Bible sample, default
tokenizer), from the same initialisation and batches, by jaxinfer.train's own step: "no_lb"
(coefficient 0) on next-token loss alone, "lb_<alpha>" on next-token loss plus alpha times the
Switch load-balancing loss (`moe.load_balancing_loss`; Switch used alpha = 1e-2) and the ST-MoE
router z-loss (`moe.router_z_loss`, weight --z-coef), the router losses Mixtral reports to the
step. --router-jitter turns on the Switch router input jitter in every run (off by default).
Each model's routing is then recorded
on the held-out tail of the corpus: every token's top-k experts per layer, from
`forward_with_routing`'s router logits. The first half of the held-out windows is the profiling
trace the placements are solved on; the second half is the serving trace they are scored on, as
a deployed placement would be. The traces and their `sharding.placement.RoutingStats` (per-layer
loads [L, E], layer-to-layer transitions [L-1, E, E]) go to experiments/results/
mixtral_traces.npz, keys prefixed by the run ("lb_0.01_serve_loads", ...).

Reported per run: the serving trace's expert load imbalance (max / mean token-choices per expert,
per layer: 1 = balanced, E / k = every token on the same k experts) and the busiest expert's
share; then per placement (experiments/moe_placement's `place`, METHODS: round-robin, contiguous,
LPT, greedy co-location, MILP balance, MILP co-location, over --devices devices) the serving
trace's device load imbalance (max / mean device load, mean over layers), cross-device
transitions (tokens whose consecutive layers' experts sit on different devices), and ratios
against contiguous placement (Megatron's default). The first run's `train_s` includes compiling
the train step; the later runs reuse it (the loss weights are the step's traced `loss_weights`,
not config fields).
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

from experiments.common import RESULTS, environment, parse_experiment_args, print_table, write_json
from experiments.moe_placement import METHODS, place
from jaxinfer.assets import corpus_sample_path, default_model_dir
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.train.data import TokenWindows, read_corpus, split_held_out, tokenize_corpus
from jaxinfer.train.optimizer import make_optimizer
from jaxinfer.train.step import train_step_with_losses
from sharding.placement import (RoutingStats, cross_device_transitions, load_imbalance,
                                routing_statistics)


def run_name(aux_coef: float) -> str:
    """"no_lb" for next-token loss alone, "lb_<aux_coef>" with the router losses."""
    return "no_lb" if aux_coef == 0 else f"lb_{aux_coef:g}"


def train(model: MixtralForCausalLM, windows: TokenWindows, steps: int, lr: float, *,
          aux_coef: float, z_coef: float, seed: int
          ) -> tuple[nnx.GraphDef, nnx.State, list[dict[str, float]]]:
    """`steps` AdamW updates on consecutive batches of `windows` by jaxinfer.train's step, its
    router-loss weights set to aux_coef (load balancing) and z_coef (z-loss), a router-jitter key
    per step -> (graphdef, params, per-step losses: the step's unweighted loss parts)."""
    tx = make_optimizer(learning_rate=lr, total_steps=steps, warmup_steps=max(1, steps // 10),
                        weight_decay=0.1, clip_norm=1.0)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    keys = jax.random.split(jax.random.key(seed), steps)  # [steps] one jitter key per step
    weights = {"load_balancing_loss": aux_coef, "router_z_loss": z_coef}
    history = []
    for step in range(steps):
        batches = jnp.asarray(windows.batch(step))[None]  # [accum=1, B, L+1]
        params, opt_state, _, _, losses = train_step_with_losses(
            graphdef, tx, params, opt_state, batches, keys[step], weights)
        history.append({k: float(v) for k, v in losses.items()})
    return graphdef, params, history


def expert_ids(graphdef: nnx.GraphDef, params: nnx.State, batches: list[np.ndarray], top_k: int
               ) -> np.ndarray:
    """Every token's top-k experts per layer over `batches` [B, L+1] (inputs = all but the last
    token; no jitter key, so routing is exact): int [layers, tokens, top_k]."""
    @jax.jit
    def route(params, ids):  # ids [B, L] -> [layers, B * L, top_k]
        _, _, routing = nnx.merge(graphdef, params).forward_with_routing(ids)
        return jax.lax.top_k(routing.router_logits, top_k)[1]

    return np.concatenate([np.asarray(route(params, jnp.asarray(b[:, :-1]))) for b in batches],
                          axis=1)


def expert_imbalance(loads: np.ndarray) -> np.ndarray:
    """loads [L, E] -> float [L]: max / mean token-choices per expert (each expert its own
    device), 1 when balanced."""
    loads = np.asarray(loads)
    layers, experts = loads.shape
    return load_imbalance(np.tile(np.arange(experts), (layers, 1)), loads, experts)


def score(device_of: np.ndarray, stats: RoutingStats, num_devices: int) -> dict:
    """Serving-trace load imbalance and cross-device transitions of one placement."""
    imbalance = load_imbalance(device_of, stats.loads, num_devices)
    cross = int(cross_device_transitions(device_of, stats.transitions).sum())
    return {"imbalance_mean": float(imbalance.mean()), "imbalance_max": float(imbalance.max()),
            "cross_transitions": cross,
            "cross_fraction": cross / max(int(stats.transitions.sum()), 1)}


def placement_rows(run: str, profile: RoutingStats, serve: RoutingStats, args) -> list[dict]:
    """One row per placement method: solved on `profile`, scored on `serve`, with ratios
    against contiguous placement."""
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        device_of = place(method, profile, args)
        rows.append({"run": run, "method": method, **score(device_of, serve, args.devices),
                     "solve_s": time.perf_counter() - start})
    contiguous = next(r for r in rows if r["method"] == "contiguous")
    for row in rows:
        row["imbalance_vs_contig"] = row["imbalance_mean"] / contiguous["imbalance_mean"]
        row["traffic_vs_contig"] = (row["cross_transitions"]
                                    / max(contiguous["cross_transitions"], 1))
    return rows


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
    parser.add_argument("--aux-coefs", type=float, nargs="+", default=[0.0, 1e-2, 1e-1],
                        help="one training run per load-balancing loss weight (0: no router "
                             "losses; Switch: 1e-2)")
    parser.add_argument("--z-coef", type=float, default=1e-3,
                        help="router z-loss weight of the runs with a load-balancing loss "
                             "(ST-MoE: 1e-3)")
    parser.add_argument("--router-jitter", type=float, default=0.0,
                        help="router input jitter eps in both runs (Switch: 1e-2)")
    parser.add_argument("--trace-batches", type=int, default=8,
                        help="held-out batches per trace (profiling and serving each)")
    parser.add_argument("--load-slack", type=float, default=0.05)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--mip-rel-gap", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "mixtral_traces.json"))
    args = parse_experiment_args(parser, argv)
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
                           num_experts_per_tok=args.top_k, router_jitter_noise=args.router_jitter)
    batches = TokenWindows(held_out, args.seq, args.batch).fixed_batches(2 * args.trace_batches)
    half = len(batches) // 2
    out = Path(args.out)  # its folder made by parse_experiment_args
    traces, runs, rows = {}, {}, []
    for aux_coef in args.aux_coefs:
        run, z_coef = run_name(aux_coef), args.z_coef if aux_coef > 0 else 0.0
        start = time.perf_counter()
        graphdef, params, history = train(
            MixtralForCausalLM(config, rngs=nnx.Rngs(args.seed)),
            TokenWindows(train_tokens, args.seq, args.batch, seed=args.seed), args.steps, args.lr,
            aux_coef=aux_coef, z_coef=z_coef, seed=args.seed)
        train_s = time.perf_counter() - start
        profile_ids = expert_ids(graphdef, params, batches[:half], args.top_k)
        serve_ids = expert_ids(graphdef, params, batches[half:], args.top_k)
        profile = routing_statistics(profile_ids, args.experts)
        serve = routing_statistics(serve_ids, args.experts)
        traces.update({f"{run}_profile_expert_ids": profile_ids,
                       f"{run}_serve_expert_ids": serve_ids,
                       f"{run}_profile_loads": profile.loads,
                       f"{run}_profile_transitions": profile.transitions,
                       f"{run}_serve_loads": serve.loads,
                       f"{run}_serve_transitions": serve.transitions})
        imbalance = expert_imbalance(serve.loads)  # [L]
        runs[run] = {"aux_coef": aux_coef, "z_coef": z_coef, "train_s": train_s,
                     "ce_first": history[0]["next_token_loss"],
                     "ce_last": history[-1]["next_token_loss"],
                     "aux_first": history[0]["load_balancing_loss"],
                     "aux_last": history[-1]["load_balancing_loss"],
                     "z_last": history[-1]["router_z_loss"],
                     "expert_imbalance_mean": float(imbalance.mean()),
                     "expert_imbalance_max": float(imbalance.max()),
                     "expert_imbalance_per_layer": imbalance.tolist(),
                     "busiest_expert_share": (serve.loads.max(axis=1)
                                              / serve.loads.sum(axis=1)).tolist(),
                     "serve_tokens": int(serve_ids.shape[1]),
                     "serve_load_share": (serve.loads
                                          / serve.loads.sum(axis=1, keepdims=True)).tolist()}
        rows += placement_rows(run, profile, serve, args)
    np.savez_compressed(out.with_suffix(".npz"), **traces)

    summary = [{"run": run, **{k: v for k, v in r.items() if not isinstance(v, list)}}
               for run, r in runs.items()]
    print_table(summary, ["run", "aux_coef", "z_coef", "ce_first", "ce_last", "aux_last",
                          "expert_imbalance_mean", "expert_imbalance_max", "train_s"])
    print_table(rows, ["run", "method", "imbalance_mean", "imbalance_max", "cross_transitions",
                       "cross_fraction", "imbalance_vs_contig", "traffic_vs_contig", "solve_s"])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"experiment": "mixtral_traces", **settings, **environment(), "runs": runs,
              "rows": rows}
    write_json(record, out)
    print(f"wrote {out} and {out.with_suffix('.npz')}")
    return record


if __name__ == "__main__":
    main()
