"""MoE expert placement: round-robin and contiguous vs load-balanced (LPT, or exact by MILP) vs
MoETuner-style placement (balance, then co-locate co-activated experts of consecutive layers, by
greedy swaps or by per-layer MILPs) on skewed routing traces.

    python -m experiments.moe_placement            # 32 layers, 64 experts over 8 devices
    python -m experiments.moe_placement --quick    # seconds on a CPU

Workload (synthetic, MoETuner's setting in miniature): per layer, expert popularity follows a
Zipf law of exponent `zipf` over a random expert order; between consecutive layers a fraction
`rho` of tokens follows a fixed preferred successor of its layer-l first choice (the cross-layer
dependency MoETuner exploits), the rest sample by popularity. Each token picks top-k distinct
experts. Placements are solved on one trace (profiling) and scored on a fresh trace of the same
distribution (serving), as a deployed placement would be.

Methods: `lpt` and `ilp_balance` balance load only (LPT heuristic; MILP minimising the max device
load, solved to `--mip-rel-gap`); `greedy` and `ilp` then co-locate within the load cap
(`sharding.placement.greedy_placement`, `ilp_placement`). Each MILP solve stops after
`--time-limit` seconds and falls back to the greedy step where that is better (logged).

Scores per placement: load imbalance (max device load / mean device load per layer; mean over
layers and worst layer; `imbalance_profile` is the mean on the profiling trace, the one the
solvers saw, where `ilp_balance` is optimal to within the gap) and cross-device transitions:
tokens whose layer-l and layer-(l+1) experts sit on different devices. Under MoETuner's cost
model each moves one hidden vector, so `a2a_MB` = transitions x hidden x bytes_per_element per
forward pass. (The first layer's dispatch from the tokens' home devices is the same for every
placement and is left out.) `*_vs_contig` and `*_vs_greedy` are the ratios against contiguous
placement (Megatron's default) and against the greedy placement on the same trace; `solve_s` is
the placement's wall-clock time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from experiments.common import (RESULTS, environment, parse_experiment_args, plot_curves,
                                print_table, write_json)
from sharding.placement import (RoutingStats, contiguous_placement, cross_device_transitions,
                                greedy_placement, ilp_placement, load_imbalance,
                                round_robin_placement, routing_statistics)

METHODS = ("round_robin", "contiguous", "lpt", "greedy", "ilp_balance", "ilp")


def synthetic_trace(rng: np.random.Generator, popularity: np.ndarray, successor: np.ndarray,
                    tokens: int, top_k: int, rho: float) -> np.ndarray:
    """expert ids int [L, T, K]. popularity [L, E] (rows sum to 1); successor int [L-1, E]."""
    layers, experts = popularity.shape
    ids = np.empty((layers, tokens, top_k), np.int64)
    for layer in range(layers):
        # Gumbel top-k = sampling k distinct experts with probabilities `popularity[layer]`
        scores = np.log(popularity[layer])[None, :] + rng.gumbel(size=(tokens, experts))
        if layer > 0:
            follow = rng.random(tokens) < rho
            preferred = successor[layer - 1][ids[layer - 1, :, 0]]
            scores[follow, preferred[follow]] = np.inf
        ids[layer] = np.argsort(-scores, axis=1)[:, :top_k]
    return ids


def workload(args, zipf: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(popularity [L, E], successor [L-1, E]) for one Zipf exponent."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, args.experts + 1) ** zipf
    popularity = np.stack([base[rng.permutation(args.experts)] for _ in range(args.layers)])
    popularity /= popularity.sum(axis=1, keepdims=True)
    successor = np.stack([rng.permutation(args.experts) for _ in range(args.layers - 1)])
    return popularity, successor


def place(method: str, stats: RoutingStats, args) -> np.ndarray:
    """device_of [L, E] by one of METHODS, solved on the profiling statistics."""
    if method == "round_robin":
        return round_robin_placement(args.layers, args.experts, args.devices)
    if method == "contiguous":
        return contiguous_placement(args.layers, args.experts, args.devices)
    if method == "lpt":  # balance only: the greedy's starting point, no co-location swaps
        return greedy_placement(stats, args.devices, sweeps=0)
    if method == "greedy":
        return greedy_placement(stats, args.devices, load_slack=args.load_slack)
    solver = {"time_limit": args.time_limit, "mip_rel_gap": args.mip_rel_gap}
    if method == "ilp_balance":  # exact balance only: the MILP's start, no co-location
        return ilp_placement(stats, args.devices, sweeps=0, **solver)
    return ilp_placement(stats, args.devices, load_slack=args.load_slack, **solver)


def run_zipf(zipf: float, args) -> list[dict]:
    popularity, successor = workload(args, zipf, args.seed)
    profile_rng, serve_rng = (np.random.default_rng(args.seed + i) for i in (1, 2))
    profile = routing_statistics(synthetic_trace(profile_rng, popularity, successor, args.tokens,
                                                 args.top_k, args.rho), args.experts)
    serve = routing_statistics(synthetic_trace(serve_rng, popularity, successor, args.tokens,
                                               args.top_k, args.rho), args.experts)
    total_transitions = int(serve.transitions.sum())
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        device_of = place(method, profile, args)
        solve_s = time.perf_counter() - start
        imbalance = load_imbalance(device_of, serve.loads, args.devices)
        cross = int(cross_device_transitions(device_of, serve.transitions).sum())
        rows.append({"zipf": zipf, "method": method, "imbalance_mean": float(imbalance.mean()),
                     "imbalance_max": float(imbalance.max()),
                     "imbalance_profile": float(load_imbalance(device_of, profile.loads,
                                                               args.devices).mean()),
                     "cross_transitions": cross,
                     "cross_fraction": cross / max(total_transitions, 1),
                     "a2a_MB": cross * args.hidden * args.bytes_per_element / 1e6,
                     "solve_s": solve_s})
    peers = {r["method"]: r for r in rows}
    for row in rows:
        for peer, suffix in (("contiguous", "contig"), ("greedy", "greedy")):
            row[f"imbalance_vs_{suffix}"] = row["imbalance_mean"] / peers[peer]["imbalance_mean"]
            row[f"traffic_vs_{suffix}"] = (row["cross_transitions"]
                                           / max(peers[peer]["cross_transitions"], 1))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per trace")
    parser.add_argument("--zipf", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--rho", type=float, default=0.5,
                        help="fraction of tokens following their expert's preferred successor")
    parser.add_argument("--load-slack", type=float, default=0.05)
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per MILP solve")
    parser.add_argument("--mip-rel-gap", type=float, default=1e-3,
                        help="HiGHS relative gap at which a MILP counts as solved")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (bytes estimate)")
    parser.add_argument("--bytes-per-element", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "moe_placement.json"))
    args = parse_experiment_args(parser, argv)
    if args.quick:
        args.layers, args.experts, args.devices, args.tokens = 4, 16, 4, 2048
        args.zipf = [0.0, 1.0, 2.0]
        args.mip_rel_gap = 1e-2  # near-uniform loads: proving the last 0.1% costs most
    rows = [row for zipf in args.zipf for row in run_zipf(zipf, args)]
    print_table(rows, ["zipf", "method", "imbalance_profile", "imbalance_mean", "imbalance_max",
                       "imbalance_vs_contig", "imbalance_vs_greedy", "cross_fraction",
                       "traffic_vs_contig", "traffic_vs_greedy", "a2a_MB", "solve_s"])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"experiment": "moe_placement", **settings, **environment(), "rows": rows}
    out = write_json(record, args.out)
    for metric, label, suffix in (("imbalance_mean", "max / mean device load", ""),
                                  ("cross_fraction", "cross-device transition fraction",
                                   "_traffic")):
        curves = {m: ([r["zipf"] for r in rows if r["method"] == m],
                      [r[metric] for r in rows if r["method"] == m]) for m in METHODS}
        plot_curves(curves, xlabel="Zipf exponent of expert popularity", ylabel=label,
                    title=f"{args.experts} experts on {args.devices} devices, "
                          f"{args.layers} layers",
                    out=Path(out).with_name(Path(out).stem + suffix + ".png"))
    print(f"wrote {out} and its PNGs")
    return record


if __name__ == "__main__":
    main()
