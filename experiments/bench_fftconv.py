"""Long-convolution speed and memory: ``kernels_pallas.fftconv`` (xla, pallas) against a plain
``jnp.fft.rfft`` causal convolution, forward and forward+backward, over sequence lengths.

    python -m experiments.bench_fftconv                # GPU: N 1K..64K, bf16 and f32, H = 768
                                                       # (~90 s on an H200, deadline included)
    python -m experiments.bench_fftconv --quick        # seconds on a CPU
    python -m experiments.bench_fftconv --out $OUT/bench_fftconv.json

Implementations, on the same inputs in the same process:
  xla      fftconv(backend="xla"): rfft of size M = 2P (P the power of two >= N) in float32
  pallas   fftconv(backend="pallas"): the order-2 Monarch kernel (Triton on GPU). On a CPU it runs
           in interpret mode, which measures the interpreter, so it is timed only with --quick
           (and recorded as skipped otherwise)
  jnp_fft  the peer: irfft(rfft(u, 2N) * rfft(k, 2N))[:N] in float32, written out here
``speedup_vs_jnp_fft`` = time(jnp_fft) / time(impl) on the same (dtype, N, mode). Memory is the
compiled program's temp bytes (``memory_analysis()``), the activations XLA keeps besides inputs and
outputs. Shapes: H channels and batch B = min(64, budget / (H N)) so big N stays within memory.
Each configuration is tried on its own and a failure is recorded with its error. The cheap
implementations run first and the Pallas kernel last (in increasing N, both dtypes per N);
``--budget-s`` stops starting new configurations, and at ``--deadline-s`` a watchdog writes what
was measured (noting the configuration still running) and exits, since a launched GPU program
cannot be interrupted.
The JSON is also rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import RESULTS, environment, plot_curves, print_table, write_json
from kernels_pallas import fftconv

PEER = "jnp_fft"
SLOW_CALL_S = 5.0  # fewer repetitions when one call is slow: about this many seconds of timing


def jnp_fft_conv(u: jax.Array, k: jax.Array) -> jax.Array:
    """The peer: causal convolution by one rfft of size 2N; u [B, H, N], k [H, L] -> [B, H, N]."""
    n = u.shape[-1]
    spec = jnp.fft.rfft(u.astype(jnp.float32), n=2 * n) * jnp.fft.rfft(k, n=2 * n)
    return jnp.fft.irfft(spec, n=2 * n)[..., :n].astype(u.dtype)


def conv_fn(impl: str):
    if impl == PEER:
        return jnp_fft_conv
    return lambda u, k: fftconv(u, k, backend=impl)


def with_backward(conv):
    """(u, k, ct) -> (y, (du, dk)) of sum(conv(u, k) * ct): forward and backward in one program.
    y is returned, as training uses it; otherwise XLA drops the forward as dead code."""
    def fwd_bwd(u, k, ct):
        y, vjp = jax.vjp(conv, u, k)
        return y, vjp(ct)
    return fwd_bwd


def timed(compiled, args, reps: int) -> list[float]:
    """Seconds per call of an already compiled (and warmed-up) function."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return times


def temp_mib(compiled) -> float | None:
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None)
    return None if temp is None else temp / 2**20


def measure(row: dict, impl: str, mode: str, inputs: tuple, reps: int) -> None:
    """Compile, read memory, time; fills `row` in place (raises on failure). `row["phase"]`
    says what is running, for the deadline watchdog's note."""
    conv = conv_fn(impl)
    fn = jax.jit(conv if mode == "fwd" else with_backward(conv))
    args = inputs[:2] if mode == "fwd" else inputs
    row["phase"] = "compile"
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["temp_MiB"] = temp_mib(compiled)
    row["phase"] = "warm-up call"
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    row["phase"] = "timing"
    times = timed(compiled, args, max(1, min(reps, int(SLOW_CALL_S / max(first, 1e-9)))))
    med = statistics.median(times)
    row.pop("phase")
    row.update(median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
               reps=len(times))


def add_ratios(rows: list[dict]) -> None:
    peer = {(r["dtype"], r["N"], r["mode"]): r.get("median_ms") for r in rows
            if r["impl"] == PEER}
    for r in rows:
        peer_ms = peer.get((r["dtype"], r["N"], r["mode"]))
        if peer_ms and r.get("median_ms"):
            r[f"speedup_vs_{PEER}"] = peer_ms / r["median_ms"]


def plan(args, gpu: bool) -> list[dict]:
    """Rows to measure, cheap implementations first: a slow kernel at a large N (which cannot be
    interrupted once launched) then costs only the rows after it, all of them its own."""
    rows = []
    for slow_pass in (False, True):
        for n in args.seq_lens:
            batch = max(1, min(args.max_batch, args.elements // (args.channels * n)))
            for dtype in args.dtypes:
                for mode in args.modes:
                    for impl in args.impls:
                        if (impl == "pallas") == slow_pass:
                            rows.append({"dtype": dtype, "N": n, "batch": batch,
                                         "H": args.channels, "mode": mode, "impl": impl})
    if not gpu and not args.quick:
        for r in rows:
            if r["impl"] == "pallas":
                r["skipped"] = "pallas interprets on CPU (timed with --quick only)"
    return rows


def make_inputs(row: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """u, ct [batch, H, N] in the row's dtype and k [H, N] float32, drawn on the device."""
    key_u, key_k, key_ct = jax.random.split(jax.random.key(row["N"]), 3)
    shape, dtype = (row["batch"], row["H"], row["N"]), jnp.dtype(row["dtype"])
    u = jax.random.normal(key_u, shape, dtype)
    ct = jax.random.normal(key_ct, shape, dtype)
    k = jax.random.normal(key_k, (row["H"], row["N"]), jnp.float32) / np.sqrt(row["N"])
    return u, k, ct


COLUMNS = ["dtype", "N", "batch", "H", "mode", "impl", "median_ms", "min_ms", "max_ms",
           f"speedup_vs_{PEER}", "temp_MiB", "compile_s", "error", "skipped"]


def finish(record: dict, out: Path, args) -> None:
    """Table, PNG (median time versus N for the first dtype) and the JSON record."""
    rows = record["rows"]
    add_ratios(rows)
    print_table(sorted(rows, key=lambda r: (args.dtypes.index(r["dtype"]), r["N"],
                                            args.modes.index(r["mode"]),
                                            args.impls.index(r["impl"]))), COLUMNS)
    first = args.dtypes[0]
    curves = {}
    for impl in args.impls:
        for mode in args.modes:
            done = [r for r in rows if (r["impl"], r["mode"], r["dtype"]) == (impl, mode, first)
                    and "median_ms" in r]
            if done:
                curves[f"{impl} {mode}"] = ([r["N"] for r in done], [r["median_ms"] for r in done])
    if curves:
        record["png"] = str(plot_curves(curves, xlabel="sequence length N", ylabel="median ms",
                                        title=f"fftconv, {first}", out=out.with_suffix(".png")))
    print(f"wrote {write_json(record, out)} {record.get('png', '')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: bfloat16 float32 on GPU, float32 on CPU")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--impls", nargs="+", default=["xla", "pallas", PEER])
    parser.add_argument("--channels", type=int, default=None, help="H (default 768 on GPU)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--elements", type=int, default=None,
                        help="budget for B*H*N (default 2^28 on GPU)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new configuration after this many seconds (default: 60 "
                             "on GPU, none on CPU)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="write what was measured and exit after this many seconds, even "
                             "while a configuration is still running (default: 85 on GPU, none "
                             "on CPU)")
    parser.add_argument("--out", default=str(RESULTS / "bench_fftconv.json"))
    args = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    args.dtypes = args.dtypes or (["bfloat16", "float32"] if gpu else ["float32"])
    args.seq_lens = args.seq_lens or ([1024, 2048, 4096, 16384, 65536] if gpu
                                      else [256, 1024, 4096])
    args.channels = args.channels or (768 if gpu else 16)
    args.elements = args.elements or (2**28 if gpu else 2**20)
    args.reps = args.reps or (10 if gpu else 3)
    args.budget_s = args.budget_s or (60.0 if gpu else None)
    args.deadline_s = args.deadline_s or (85.0 if gpu else None)
    if args.quick:
        args.seq_lens, args.channels, args.elements, args.reps = [256], 4, 2**11, 2

    out = Path(args.out)
    began = time.perf_counter()
    rows = plan(args, gpu)
    record = {**environment(), "quick": args.quick, "settings": vars(args), "rows": rows}
    lock = threading.Lock()  # finish() runs once: from the watchdog or at the end

    def on_deadline() -> None:
        with lock:
            running = [r for r in rows if r.get("phase")]
            for r in running:
                r["error"] = (f"still in {r.pop('phase')} at the {args.deadline_s:.0f} s "
                              "deadline (run stopped)")
            for r in rows:
                if not {"median_ms", "error", "skipped"} & r.keys():
                    r["skipped"] = "not reached before the deadline"
            record["wall_s"] = time.perf_counter() - began
            finish(record, out, args)
            os._exit(0)  # a launched XLA program cannot be interrupted

    watchdog = None
    if args.deadline_s is not None:
        watchdog = threading.Timer(args.deadline_s, on_deadline)
        watchdog.daemon = True
        watchdog.start()
    inputs_key, inputs = None, None
    for row in rows:
        if "skipped" in row:
            continue
        if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
            row["skipped"] = f"time budget of {args.budget_s:.0f} s spent"
            continue
        try:
            key = (row["dtype"], row["N"], row["batch"])
            if key != inputs_key:
                inputs_key, inputs = key, None  # free the previous size first
                inputs = make_inputs(row)
            measure(row, row["impl"], row["mode"], inputs, args.reps)
        except Exception as e:  # noqa: BLE001 - record and go on to the next one
            row.pop("phase", None)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        with lock:
            add_ratios(rows)
            write_json(record, out)
        print(f"{row['dtype']} N={row['N']} {row['mode']} {row['impl']}: "
              f"{row.get('median_ms', row.get('error'))}", flush=True)
    if watchdog is not None:
        watchdog.cancel()
    record["wall_s"] = time.perf_counter() - began
    with lock:
        finish(record, out, args)


if __name__ == "__main__":
    main()
