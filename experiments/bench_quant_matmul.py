"""Quantized matmul speed: ``quant_matmul`` (pallas, xla) on int4/int8/int3/int2 weights vs a
dense dot.

    python -m experiments.bench_quant_matmul            # GPU: Llama K x N, M 1, 2, ..., 128, bf16
    python -m experiments.bench_quant_matmul --quick    # seconds on a CPU

Per configuration (K x N weight shape, M activation rows, bits, group size) and backend, all in
one process on the same activations:

* ``dense``: ``x @ w`` with w the dequantized weight in the activation dtype (bfloat16 on GPU,
  float32 on CPU): the peer. ``speedup_vs_dense`` = time(dense) / time(row), same shape and M.
* ``pallas`` / ``xla``: ``quant_matmul(x, w, backend=...)`` on the packed weight. On CPU pallas runs
  in interpret mode (it measures the interpreter), so it only runs there when asked with
  ``--backends`` or in ``--quick`` at tiny sizes.

Timing: one jitted program runs the matmul ``--inner`` + 1 times (a ``fori_loop`` with x perturbed
by the loop index, so nothing is hoisted), so that microsecond decode kernels are not hidden under
Python dispatch; the first result feeds the error check. ``--reps`` such programs give the
median / min / max per matmul. ``weight_GBps`` is the bytes of the stored weight (packed ints +
scales + zeros, or the dense matrix) per matmul time; ``frac_of_stream`` divides it by a
streaming copy's bandwidth measured in the same run (the memory bound a decode matmul can reach).
``max_rel_err`` = max|y - y_ref| / max|y_ref| against ``backend="reference"`` (float32 dequantize
then dot). The issue's GPU target: int4 >= 3.5x the bf16 dense peer at M <= 16.

Each configuration runs under try/except (the error is recorded and the sweep goes on), and
``--budget-s`` stops starting new configurations once spent, so a fixed-timeout run still writes
its table; configurations are ordered by priority (int4 decode first).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (RESULTS, add_speedups, copy_bandwidth, environment, error_text,
                                parse_experiment_args, plot_curves, print_table, record_timing,
                                time_calls, write_json)
from kernels_pallas.quant_matmul import QuantizedWeight, quant_matmul

# Llama-7B's q/k/v/o, gate/up and down projections, then Llama-3-8B's gate/up.
GPU_SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336"]
GPU_MS = [1, 2, 4, 8, 16, 32, 64, 128]  # decode batch sizes up to small prefill
CPU_SHAPES = ["512x512", "512x1536"]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be KxN like 4096x4096; got {text!r}") from None
    return k, n


def random_weight(rng: np.random.Generator, k: int, n: int, bits: int,
                  group_size: int) -> QuantizedWeight:
    """A packed [K, N] weight of uniform random integers, zeros and positive scales."""
    groups = 1 if group_size == -1 else k // group_size
    q = rng.integers(0, 2 ** bits, (k, n), dtype=np.int8 if bits < 8 else np.int16)
    zeros = rng.integers(0, 2 ** bits, (groups, n), dtype=np.int32)
    scales = (rng.random((groups, n), dtype=np.float32) + 0.5) / (2 ** bits * np.sqrt(k))
    return QuantizedWeight.from_ints(q, jnp.asarray(scales, jnp.float16), zeros, bits=bits,
                                     group_size=group_size)


def weight_bytes(w: QuantizedWeight) -> int:
    leaves = jax.tree_util.tree_leaves(w)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)


def repeated(matmul, inner: int):
    """jit(x, w) -> (matmul(x, w), the sum of ``inner`` more results on x * (1 + i * 2**-10)).

    The first result serves the error check, so checking costs no second compilation; a call
    runs ``inner + 1`` matmuls. The loop keeps whole [M, N] results (a reduction to a scalar
    would invite XLA to simplify the dot away); the elementwise add is small next to a matmul.
    """
    def run(x, w):
        y0 = matmul(x, w)  # [M, N]

        def body(i, acc):
            xi = x * (1 + i.astype(x.dtype) * 2.0 ** -10)
            return acc + matmul(xi, w).astype(jnp.float32)
        return y0, jax.lax.fori_loop(1, inner + 1, body, jnp.zeros(y0.shape, jnp.float32))
    return jax.jit(run)


def time_per_call(fn, args, reps: int, calls: int):
    """(seconds per matmul for each rep, seconds of the first call: compile + run, its output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))  # the warm-up, timed here
    first = time.perf_counter() - t0
    times = [t / calls for t in time_calls(fn, args, reps, warmup=0)]
    return times, first, out


def stream_bandwidth(nbytes: int, reps: int) -> float:
    """GB/s of a jitted copy (read + write) of an ``nbytes`` float32 buffer."""
    return copy_bandwidth([jnp.ones((nbytes // 4,), jnp.float32)], reps) / 1e9


def max_rel_err(y, y_ref) -> float:
    y, y_ref = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    return float(np.max(np.abs(y - y_ref)) / max(np.max(np.abs(y_ref)), 1e-30))


def configurations(args) -> list[tuple]:
    """(shape, M, bits, group_size) in priority order: int4 decode first, prefill last."""
    weights = [(b, g) for b in args.bits for g in args.group_sizes]
    weights.sort(key=lambda bg: (bg[0] != 4, bg[1] == -1))
    decode = [m for m in args.ms if m <= 16]
    prefill = [m for m in args.ms if m > 16]
    out = []
    for ms in (decode, prefill):
        for bits, g in weights:
            for shape in args.shapes:
                for m in ms:
                    out.append((shape, m, bits, g))
    return out


def bench(args) -> tuple[list[dict], float]:
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    started = time.perf_counter()
    stream = stream_bandwidth(args.stream_mib << 20, args.reps)
    rows: list[dict] = []
    cache: dict = {}  # ("w", K, N, bits, g) -> weight (one kept at a time); ("x", K, M) -> x
    dense_done: set = set()
    for (k, n), m, bits, g in configurations(args):
        if time.perf_counter() - started > args.budget_s:
            rows.append({"K": k, "N": n, "M": m, "bits": bits, "group_size": g,
                         "impl": "*", "error": f"skipped: --budget-s {args.budget_s} spent"})
            continue
        base = {"K": k, "N": n, "M": m}
        try:
            x = cache.get(("x", k, m))
            if x is None:
                x = cache[("x", k, m)] = jnp.asarray(rng.standard_normal((m, k)), dtype)
            wkey = ("w", k, n, bits, g)
            if wkey not in cache:
                cache.clear()  # one weight at a time: 14336-wide int weights are large
                cache[("x", k, m)] = x
                cache[wkey] = random_weight(rng, k, n, bits, g)
            w = cache[wkey]
            y_ref = quant_matmul(x, w, backend="reference")
        except Exception as e:  # noqa: BLE001  (out of memory, unsupported shape...)
            rows.append({**base, "bits": bits, "group_size": g, "impl": "*",
                         "error": error_text(e)})
            print(f"skipped K={k} N={n} M={m} int{bits} g={g}: {rows[-1]['error']}")
            continue
        runs = []
        if (k, n, m) not in dense_done:  # the peer: one per shape and M
            dense_done.add((k, n, m))
            wd = w.dequantize(dtype)
            runs.append(("dense", {"bits": 8 * dtype.itemsize, "group_size": None},
                         lambda x, w: jnp.dot(x, w), wd, wd.size * wd.dtype.itemsize))
        for backend in args.backends:
            runs.append((backend, {"bits": bits, "group_size": g},
                         lambda x, w, b=backend: quant_matmul(x, w, backend=b), w,
                         weight_bytes(w)))
        for impl, fields, matmul, weight, nbytes in runs:
            row = {**base, **fields, "impl": impl}
            try:
                times, first, (y, _) = time_per_call(repeated(matmul, args.inner), (x, weight),
                                                     args.reps, args.inner + 1)
                err = max_rel_err(y, y_ref)
            except Exception as e:  # noqa: BLE001
                row["error"] = error_text(e)
                print(f"skipped {impl} K={k} N={n} M={m} int{bits} g={g}: {row['error']}")
                rows.append(row)
                continue
            med = record_timing(row, times)
            row.update(first_call_s=first, weight_MB=nbytes / 1e6,
                       weight_GBps=nbytes / med / 1e9, frac_of_stream=nbytes / med / 1e9 / stream,
                       max_rel_err=err)
            rows.append(row)
    add_speedups(rows, ("K", "N", "M"), ["dense"])
    return rows, stream


def plot(rows: list[dict], args, out: Path) -> Path:
    """Speedup over the dense peer against M, per (backend, bits), at the largest shape."""
    k, n = args.shapes[-1]
    g = args.group_sizes[0]
    curves = {}
    for impl in args.backends:
        for bits in args.bits:
            pts = sorted((r["M"], r["speedup_vs_dense"]) for r in rows
                         if r["impl"] == impl and r["bits"] == bits and r["group_size"] == g
                         and r["K"] == k and r["N"] == n and "speedup_vs_dense" in r)
            if pts:
                curves[f"{impl} int{bits}"] = ([p[0] for p in pts], [p[1] for p in pts])
    return plot_curves(curves, xlabel="M (activation rows)", ylabel="speedup vs dense x @ w",
                       title=f"quant_matmul {k}x{n}, group {g}, {args.dtype}",
                       out=out.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                        help="weight shapes KxN (default: Llama 7B/8B shapes on GPU)")
    parser.add_argument("--ms", type=int, nargs="+", default=None, help="activation rows M")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8, 3, 2],
                        help="in priority order after int4")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[128, -1],
                        help="-1 is per channel")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="quant_matmul backends (default: pallas xla on GPU, xla on CPU)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--inner", type=int, default=None, help="matmuls per timed jit call")
    parser.add_argument("--stream-mib", type=int, default=None,
                        help="buffer size of the streaming-copy bandwidth peer")
    parser.add_argument("--budget-s", type=float, default=70.0,
                        help="start no new configuration after this many seconds")
    parser.add_argument("--out", default=str(RESULTS / "bench_quant_matmul.json"))
    args = parse_experiment_args(parser)
    gpu = jax.default_backend() == "gpu"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.shapes = args.shapes or [parse_shape(s) for s in (GPU_SHAPES if gpu else CPU_SHAPES)]
    args.ms = args.ms or (GPU_MS if gpu else [1, 16, 128])
    args.backends = args.backends or (["pallas", "xla"] if gpu else ["xla"])
    args.reps = args.reps or (10 if gpu else 5)
    args.inner = args.inner or (20 if gpu else 2)
    args.stream_mib = args.stream_mib or (512 if gpu else 64)
    if args.quick:
        args.shapes, args.ms, args.group_sizes = [(256, 256)], [1, 16], [128]
        args.backends = ["pallas", "xla"]
        args.reps, args.inner, args.stream_mib = 2, 1, 8

    rows, stream = bench(args)
    print(f"streaming copy: {stream:.4g} GB/s")
    print_table(rows, ["K", "N", "M", "bits", "group_size", "impl", "median_ms", "min_ms",
                       "max_ms", "first_call_s", "weight_GBps", "frac_of_stream",
                       "speedup_vs_dense", "max_rel_err", "error"])
    if not gpu and "pallas" in args.backends:
        print("note: pallas ran in interpret mode on CPU; its times measure the interpreter")
    out = Path(args.out)  # its folder made by parse_experiment_args
    png = plot(rows, args, out)
    settings = {**vars(args), "shapes": [f"{k}x{n}" for k, n in args.shapes]}
    record = {"experiment": "bench_quant_matmul", "quick": args.quick, **environment(),
              "settings": settings, "stream_GBps": stream, "rows": rows, "png": str(png)}
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
