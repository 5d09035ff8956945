"""MoE expert placement: round-robin and contiguous vs load-balanced (LPT) vs MoETuner-style greedy
(balance, then co-locate co-activated experts of consecutive layers) on skewed routing traces.

    python -m experiments.moe_placement            # 32 layers, 64 experts over 8 devices
    python -m experiments.moe_placement --quick    # seconds on a CPU

Workload (synthetic, MoETuner's setting in miniature): per layer, expert popularity follows a
Zipf law of exponent `zipf` over a random expert order; between consecutive layers a fraction
`rho` of tokens follows a fixed preferred successor of its layer-l first choice (the cross-layer
dependency MoETuner exploits), the rest sample by popularity. Each token picks top-k distinct
experts. Placements are solved on one trace (profiling) and scored on a fresh trace of the same
distribution (serving), as a deployed placement would be.

Scores per placement: load imbalance (max device load / mean device load per layer; mean over
layers and worst layer) and cross-device transitions: tokens whose layer-l and layer-(l+1)
experts sit on different devices. Under MoETuner's cost model each moves one hidden vector, so
`a2a_MB` = transitions x hidden x bytes_per_element per forward pass. (The first layer's dispatch
from the tokens' home devices is the same for every placement and is left out.) `*_vs_rr` are the
ratios against round-robin on the same trace.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from experiments.common import RESULTS, environment, plot_curves, print_table, write_json
from sharding.placement import (RoutingStats, contiguous_placement, cross_device_transitions,
                                greedy_placement, load_imbalance, round_robin_placement,
                                routing_statistics)

METHODS = ("round_robin", "contiguous", "lpt", "greedy")


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
    if method == "round_robin":
        return round_robin_placement(args.layers, args.experts, args.devices)
    if method == "contiguous":
        return contiguous_placement(args.layers, args.experts, args.devices)
    if method == "lpt":  # balance only: the greedy's starting point, no co-location swaps
        return greedy_placement(stats, args.devices, sweeps=0)
    return greedy_placement(stats, args.devices, load_slack=args.load_slack)


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
                     "imbalance_max": float(imbalance.max()), "cross_transitions": cross,
                     "cross_fraction": cross / max(total_transitions, 1),
                     "a2a_MB": cross * args.hidden * args.bytes_per_element / 1e6,
                     "solve_s": solve_s})
    rr = rows[0]
    for row in rows:
        row["imbalance_vs_rr"] = row["imbalance_mean"] / rr["imbalance_mean"]
        row["traffic_vs_rr"] = row["cross_transitions"] / max(rr["cross_transitions"], 1)
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
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (bytes estimate)")
    parser.add_argument("--bytes-per-element", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "moe_placement.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.experts, args.devices, args.tokens = 4, 16, 4, 2048
        args.zipf = [0.0, 1.0, 2.0]
    rows = [row for zipf in args.zipf for row in run_zipf(zipf, args)]
    print_table(rows, ["zipf", "method", "imbalance_mean", "imbalance_max", "imbalance_vs_rr",
                       "cross_fraction", "traffic_vs_rr", "a2a_MB", "solve_s"])
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
