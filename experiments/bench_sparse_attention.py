"""Block sparsity turned into speed: attention time versus the fraction of tiles computed.

    python -m experiments.bench_sparse_attention            # S = 4096 on CPU, 16K on GPU
    python -m experiments.bench_sparse_attention --quick    # seconds on a CPU

Masks: full, causal, and local windows of several sizes: causal sliding windows (w, 0) and
symmetric ones (w, w) (--quick skips causal and the symmetric ones). For each, ``tile_fraction``
gives the fraction of (block_q x block_k) tiles the kernels visit; the time of ``flash_attention``
(xla on CPU, pallas on GPU) relative to full attention should follow that fraction
(``time_rel_per_fraction`` near 1 means sparsity is turned into speed; above 1, the fixed costs of
a tile-visiting loop show). The peer, ``jax.nn.dot_product_attention(implementation="xla")`` with
the same mask, computes every tile and masks, so its time should stay flat;
``speedup_vs_jax_nn_xla`` is measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_attention import add_ratios, timed, with_backward
from experiments.common import RESULTS, environment, plot_curves, print_table, write_json
from kernels_pallas import flash_attention, tile_fraction


def masks(windows: list[int], symmetric: bool) -> list[tuple[str, bool, tuple[int, int] | None]]:
    """(name, causal, local_window) for full, causal and each window size."""
    out = [("full", False, None), ("causal", True, None)]
    out += [(f"causal_window_{w}", True, (w, 0)) for w in windows]
    if symmetric:
        out += [(f"window_{w}_{w}", False, (w, w)) for w in windows]
    return out


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
    args = parser.parse_args()
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

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, s, args.heads, args.head_dim)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    rows = []
    chosen = masks(args.windows, symmetric=not args.quick)
    if args.quick:  # full (every ratio's reference) and the causal windows: 4 compiles fewer
        chosen = [mask for mask in chosen if mask[0] != "causal"]
    for name, causal, window in chosen:
        fraction = tile_fraction(s, s, causal=causal, local_window=window, **blocks)
        impls = {
            args.backend: lambda q, k, v, c=causal, w=window: flash_attention(
                q, k, v, causal=c, local_window=w, backend=args.backend, **blocks),
            "jax_nn_xla": lambda q, k, v, c=causal, w=window: jax.nn.dot_product_attention(
                q, k, v, is_causal=c, local_window_size=w, implementation="xla"),
        }
        for mode in args.modes:
            for impl, attend in impls.items():
                fn = jax.jit(attend if mode == "fwd" else with_backward(attend))
                times = timed(fn, (q, k, v) if mode == "fwd" else (q, k, v, ct), args.reps)
                rows.append({"mask": name, "tile_fraction": fraction, "mode": mode, "impl": impl,
                             "median_ms": statistics.median(times) * 1e3,
                             "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3})
    full = {(r["mode"], r["impl"]): r["median_ms"] for r in rows if r["mask"] == "full"}
    for r in rows:
        r["time_rel_full"] = r["median_ms"] / full[(r["mode"], r["impl"])]
        r["time_rel_per_fraction"] = r["time_rel_full"] / r["tile_fraction"]
    add_ratios(rows, ("mask", "mode"), ["jax_nn_xla"])
    print_table(rows, ["mask", "tile_fraction", "mode", "impl", "median_ms", "min_ms", "max_ms",
                       "time_rel_full", "time_rel_per_fraction", "speedup_vs_jax_nn_xla"])
    if not gpu and args.backend == "pallas":
        print("note: pallas ran in interpret mode on CPU; its times measure the interpreter")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = {}
    for mode in args.modes:
        for impl in (args.backend, "jax_nn_xla"):
            pts = sorted((r["tile_fraction"], r["time_rel_full"]) for r in rows
                         if r["mode"] == mode and r["impl"] == impl)
            curves[f"{impl} {mode.replace('_', '+')}"] = ([p[0] for p in pts], [p[1] for p in pts])
    curves["ideal (time = fraction)"] = ([0.0, 1.0], [0.0, 1.0])
    png = plot_curves(curves, xlabel="fraction of tiles computed",
                      ylabel="time relative to full attention",
                      title=f"block-sparse attention, S={s}, {args.backend}, {args.dtype}",
                      out=out.with_suffix(".png"))
    record = {"experiment": "bench_sparse_attention", "quick": args.quick, **environment(),
              "settings": vars(args), "rows": rows, "png": str(png)}
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
