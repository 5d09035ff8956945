"""Block sparsity turned into speed: attention time versus the fraction of tiles computed.

    python -m experiments.bench_sparse_attention            # S = 4096 on CPU, 16K on GPU
    python -m experiments.bench_sparse_attention --quick    # seconds on a CPU

Masks: full, causal, and local windows of several sizes: causal sliding windows (w, 0) and
symmetric ones (w, w) (--quick skips causal and the symmetric ones). For each, ``tile_fraction``
gives the fraction of tiles the kernels of the row's mode visit: the forward's (block_q x block_k)
tiles for fwd; for fwd_bwd the forward's and the backward kernels' (dk/dv and dq tiles, which may
differ) weighted by FA2's matmul count, 2 forward to 5 backward (``tile_fraction_fwd`` and
``tile_fraction_bwd`` hold both). The time of ``flash_attention``
(xla on CPU, pallas on GPU) relative to full attention should follow that fraction
(``time_rel_per_fraction`` near 1 means sparsity is turned into speed; above 1, the fixed costs of
a tile-visiting loop show). The peer, ``jax.nn.dot_product_attention(implementation="xla")`` with
the same mask, computes every tile and masks, so its time should stay flat;
``speedup_vs_jax_nn_xla`` is measured in the same run. A configuration that fails is recorded
with its error; the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (RESULTS, add_speedups, environment, error_text,
                                parse_experiment_args, plot_curves, print_table, record_timing,
                                time_calls, with_backward, write_json)
from kernels_pallas import flash_attention, tile_fraction
from kernels_pallas.attention.tiling import default_block_sizes


def masks(windows: list[int], symmetric: bool) -> list[tuple[str, bool, tuple[int, int] | None]]:
    """(name, causal, local_window) for full, causal and each window size."""
    out = [("full", False, None), ("causal", True, None)]
    out += [(f"causal_window_{w}", True, (w, 0)) for w in windows]
    if symmetric:
        out += [(f"window_{w}_{w}", False, (w, w)) for w in windows]
    return out


def mode_tile_fractions(s: int, causal: bool, window, tiles) -> dict[str, float]:
    """Fraction of tiles computed per mode: fwd on the forward tiles; fwd_bwd the forward's and the
    backward's (the mean of the dk/dv and dq kernels') weighted 2:5 as FA2 counts their matmuls."""
    def frac(block_q, block_k):
        return tile_fraction(s, s, causal=causal, local_window=window, block_q=block_q,
                             block_k=block_k)
    fwd = frac(tiles.block_q, tiles.block_k)
    bwd = (frac(tiles.block_q_bwd, tiles.block_k_bwd) + frac(*tiles.dq)) / 2
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (2 * fwd + 5 * bwd) / 7}


def add_relative(rows: list[dict]) -> None:
    """time_rel_full, time_rel_per_fraction and speedup_vs_jax_nn_xla of the rows measured so far
    (a row is relative to full attention of the same mode and impl, once that has run)."""
    full = {(r["mode"], r["impl"]): r["median_ms"] for r in rows
            if r["mask"] == "full" and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and (r["mode"], r["impl"]) in full:
            r["time_rel_full"] = r["median_ms"] / full[(r["mode"], r["impl"])]
            r["time_rel_per_fraction"] = r["time_rel_full"] / r["tile_fraction"]
    add_speedups(rows, ("mask", "mode"), ["jax_nn_xla"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--windows", type=int, nargs="+", default=None,
                        help="window sizes (default S/32, S/16, S/8, S/4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=None,
                        help="block_q = block_k (default: 128 on CPU, the backend table on GPU)")
    parser.add_argument("--backend", default=None, help="default: pallas on GPU, xla on CPU")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "bench_sparse_attention.json"))
    args = parse_experiment_args(parser)
    gpu = jax.default_backend() == "gpu"
    args.backend = args.backend or ("pallas" if gpu else "xla")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.seq_len = args.seq_len or (16384 if gpu else 4096)
    args.heads = args.heads or (16 if gpu else 4)
    # The XLA path's default 512-tiles are too coarse to show windows at CPU sizes.
    args.block = args.block or (None if gpu else 128)
    if args.quick:
        args.seq_len, args.heads, args.block, args.reps = 512, 2, 64, 2
        args.windows = args.windows or [64]
    s = args.seq_len
    args.windows = args.windows or [s // 32, s // 16, s // 8, s // 4]
    blocks = {} if args.block is None else {"block_q": args.block, "block_k": args.block}
    tiles = default_block_sizes(args.backend, args.head_dim)  # as flash_attention resolves them
    if args.block is not None:
        tiles = dataclasses.replace(tiles, block_q=args.block, block_k=args.block,
                                    block_q_bwd=args.block, block_k_bwd=args.block,
                                    block_q_dq=args.block, block_k_dq=args.block)

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, s, args.heads, args.head_dim)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    rows = []
    out = Path(args.out)
    record = {"experiment": "bench_sparse_attention", "quick": args.quick, **environment(),
              "settings": vars(args), "tiles": dataclasses.asdict(tiles), "rows": rows,
              "png": None}
    chosen = masks(args.windows, symmetric=not args.quick)
    if args.quick:  # full (every ratio's reference) and the causal windows: 4 compiles fewer
        chosen = [mask for mask in chosen if mask[0] != "causal"]
    for name, causal, window in chosen:
        fractions = mode_tile_fractions(s, causal, window, tiles)
        impls = {
            args.backend: lambda q, k, v, c=causal, w=window: flash_attention(
                q, k, v, causal=c, local_window=w, backend=args.backend, **blocks),
            "jax_nn_xla": lambda q, k, v, c=causal, w=window: jax.nn.dot_product_attention(
                q, k, v, is_causal=c, local_window_size=w, implementation="xla"),
        }
        for mode in args.modes:
            for impl, attend in impls.items():
                row = {"mask": name, "tile_fraction": fractions[mode],
                       "tile_fraction_fwd": fractions["fwd"],
                       "tile_fraction_bwd": fractions["bwd"], "mode": mode, "impl": impl}
                rows.append(row)
                try:
                    fn = jax.jit(attend if mode == "fwd" else with_backward(attend))
                    times = time_calls(fn, (q, k, v) if mode == "fwd" else (q, k, v, ct),
                                       args.reps)
                except Exception as e:  # noqa: BLE001  (out of memory...): record, go on
                    row["error"] = error_text(e)
                    print(f"skipped {impl} {name} {mode}: {row['error']}")
                else:
                    record_timing(row, times)
                add_relative(rows)
                write_json(record, out)  # after every row: a killed run keeps what it measured
    print_table(rows, ["mask", "tile_fraction", "mode", "impl", "median_ms", "min_ms", "max_ms",
                       "time_rel_full", "time_rel_per_fraction", "speedup_vs_jax_nn_xla"])
    if not gpu and args.backend == "pallas":
        print("note: pallas ran in interpret mode on CPU; its times measure the interpreter")

    curves = {}
    for mode in args.modes:
        for impl in (args.backend, "jax_nn_xla"):
            pts = sorted((r["tile_fraction"], r["time_rel_full"]) for r in rows
                         if r["mode"] == mode and r["impl"] == impl and "time_rel_full" in r)
            curves[f"{impl} {mode.replace('_', '+')}"] = ([p[0] for p in pts], [p[1] for p in pts])
    curves["ideal (time = fraction)"] = ([0.0, 1.0], [0.0, 1.0])
    png = plot_curves(curves, xlabel="fraction of tiles computed",
                      ylabel="time relative to full attention",
                      title=f"block-sparse attention, S={s}, {args.backend}, {args.dtype}",
                      out=out.with_suffix(".png"))
    record["png"] = str(png)
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
