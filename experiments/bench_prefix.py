"""Hydragen shared-prefix attention versus per-sequence attention as batch and prefix grow.

    python -m experiments.bench_prefix            # batch 1..64, shared prefix 256..4096 tokens
    python -m experiments.bench_prefix --quick    # seconds on a CPU

Decode step (one query per sequence) of B sequences that share a P-token prefix and each have a
`--suffix`-token suffix. Two per-sequence peers over each sequence's own copy of prefix + suffix
K/V ([B, P + S, Hkv, D], what a cache without prefix sharing holds and reads):
`flash_attention` (the XLA online-softmax path, which tiles the single query up to a query block)
and the models' dense-cache decode attention (`cached_attention`: one einsum, softmax, einsum).
Hydragen: `shared_prefix_attention` (one matmul over the single prefix K/V for all B queries,
per-sequence suffix attention, exact merge). All jitted, warmed up, then run in turn `--reps`
times; the table gives medians, the ratios peer / Hydragen, the K/V bytes each reads, and the
largest output difference (they compute the same attention).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (RESULTS, environment, parse_experiment_args, plot_curves,
                                print_table, spread_text, time_interleaved, write_json)
from jaxinfer.generate.hydragen import shared_prefix_attention
from jaxinfer.models.attention import cached_attention
from kernels_pallas import flash_attention


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prefix-lens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--suffix", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "bench_prefix.json"))
    args = parse_experiment_args(parser)
    if args.quick:
        args.batch_sizes, args.prefix_lens, args.suffix, args.reps = [2, 8], [128], 8, 2

    dtype = jnp.dtype(args.dtype)
    hydragen = jax.jit(shared_prefix_attention)
    per_sequence = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True))
    dense_decode = jax.jit(cached_attention)
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    rows = []
    for prefix in args.prefix_lens:
        for batch in args.batch_sizes:
            h, hkv, d, s = args.heads, args.kv_heads, args.head_dim, args.suffix
            q = normal(batch, 1, h, d)  # [batch, 1, Hq, D]: decode
            pk, pv = normal(prefix, hkv, d), normal(prefix, hkv, d)  # [P, Hkv, D], stored once
            sk, sv = normal(batch, s, hkv, d), normal(batch, s, hkv, d)  # [batch, S, Hkv, D]
            full_k = jnp.concatenate([jnp.broadcast_to(pk, (batch, *pk.shape)), sk], axis=1)
            full_v = jnp.concatenate([jnp.broadcast_to(pv, (batch, *pv.shape)), sv], axis=1)
            positions = jnp.full((batch, 1), prefix + s - 1, jnp.int32)  # the query's position
            times = time_interleaved({
                "flash": lambda: per_sequence(q, full_k, full_v),
                "einsum": lambda: dense_decode(q, full_k, full_v, positions),
                "hydragen": lambda: hydragen(q, pk, pv, sk, sv)}, args.reps)
            diff = float(jnp.abs(per_sequence(q, full_k, full_v).astype(jnp.float32)
                                 - hydragen(q, pk, pv, sk, sv).astype(jnp.float32)).max())
            kv_token_bytes = 2 * hkv * d * dtype.itemsize
            hyd = median_ms(times["hydragen"])
            rows.append({
                "prefix": prefix, "batch": batch, "suffix": s,
                "flash_ms": median_ms(times["flash"]), "einsum_ms": median_ms(times["einsum"]),
                "hydragen_ms": hyd,
                "hydragen_spread_ms": spread_text(times["hydragen"], 1e3),
                "flash_ratio": median_ms(times["flash"]) / hyd,
                "einsum_ratio": median_ms(times["einsum"]) / hyd,
                "per_sequence_kv_MiB": batch * (prefix + s) * kv_token_bytes / 2**20,
                "hydragen_kv_MiB": (prefix + batch * s) * kv_token_bytes / 2**20,
                "max_abs_diff": diff,
            })
    print_table(rows, ["prefix", "batch", "flash_ms", "einsum_ms", "hydragen_ms", "flash_ratio",
                       "einsum_ratio", "per_sequence_kv_MiB", "hydragen_kv_MiB", "max_abs_diff"])

    out = Path(args.out)  # its folder made by parse_experiment_args
    png = plot_curves({f"prefix {p}": ([r["batch"] for r in rows if r["prefix"] == p],
                                       [r["einsum_ratio"] for r in rows if r["prefix"] == p])
                       for p in args.prefix_lens},
                      xlabel="batch (sequences sharing the prefix)",
                      ylabel="per-sequence einsum time / Hydragen time",
                      title="Shared-prefix decode attention", out=out.with_suffix(".png"))
    record = {"experiment": "bench_prefix", "quick": args.quick, **environment(),
              "settings": vars(args), "rows": rows, "png": str(png)}
    print(f"wrote {write_json(record, out)}")


if __name__ == "__main__":
    main()
