"""Long-convolution speed and memory: ``kernels_pallas.fftconv`` (xla, pallas) against a plain
``jnp.fft.rfft`` causal convolution, forward and forward+backward, over sequence lengths; and the
forward time versus ``freq_sparsity`` and versus ``partial`` at one sequence length.

    python -m experiments.bench_fftconv                # GPU: N 256..1M, bf16 and f32, H = 768
                                                       # (~90 s on an H200, deadline included)
    python -m experiments.bench_fftconv --quick        # seconds on a CPU
    python -m experiments.bench_fftconv --out $OUT/bench_fftconv.json

Implementations, on the same inputs in the same process:
  xla      fftconv(backend="xla"): rfft at the smallest exact size, the power of two >= N + the
           filter's reach (``monarch.linear_fft_size``), in float32
  pallas   fftconv(backend="pallas"): the Monarch kernel (Triton on GPU) with the decomposition
           chosen by size (``monarch.choose_plan``; the row's ``plan``), once per matmul precision
           of --dot-precisions (the row's ``dot_precision``: float32 IEEE dots, bf16x3's three
           bf16 tensor-core products, or one bf16 product; the GPU's default bf16x3 first).
           On a CPU it runs in interpret mode, which measures the interpreter, so it is timed
           only with --quick (and recorded as skipped otherwise), there with float32 dots
           alone unless --dot-precisions says otherwise (each precision is seconds of
           interpreter compilation; the kernel tests check them all)
  jnp_fft  the peer: irfft(rfft(u, 2N) * rfft(k, 2N))[:N] in float32, written out here
``speedup_vs_jnp_fft`` = time(jnp_fft) / time(impl) on the same (dtype, N, mode). Memory is the
compiled program's temp bytes (``memory_analysis()``), the activations XLA keeps besides inputs and
outputs. Shapes: H channels and batch B = min(64, budget / (H N)) so big N stays within memory.
Each configuration is tried on its own and a failure is recorded with its error. The cheap
implementations run first and the Pallas kernel last (one precision after the other, each in
increasing N, both dtypes per N: a deadline then cuts the last precisions' largest N first);
``--budget-s`` stops starting new configurations, and at ``--deadline-s`` a watchdog writes what
was measured (noting the configuration still running) and exits, since a launched GPU program
cannot be interrupted.
The JSON is also rewritten after every configuration.

Sweeps (``record["sweeps"]``, forward only, float32, N = --sweep-n: 4096, 256 with --quick),
timed for the backends where the option changes the work, plus xla as the control:
  freq_sparsity s  xla: no saving. Every backend convolves at the same FFT size M whatever s
           (``filters.effective_filter`` low-passes the filter, it does not shrink the transform),
           so xla still runs the full rfft/irfft of every (batch row, channel) and s only adds a
           filter rfft/irfft per channel. pallas: the kernel skips the D-order DFT columns whose
           frequencies are all dropped (``monarch.frequency_columns``, padded to a power of two):
           ``kernel_cols`` Nk of N2 and ``kernel_mflop``, the kernel's real-matmul work per
           (batch row, channel), show what is saved (timed on GPU only: the CPU interpreter's time
           would not show it).
           ``rel_err_random`` and ``rel_err_hyena`` = |y_s - y_0| / |y_0| (xla) on the timed
           random filter (a flat spectrum: the worst case) and on a freshly initialized Hyena
           implicit filter (smooth and decaying, the filters the option is meant for; not with
           --quick, as building it costs seconds of compilation).
  partial L  xla and pallas (pallas on GPU only), each twice in the same run: with the automatic
           overlap-save blocking (``fftconv.blocked``: a short filter convolved in blocks at a
           small FFT size S, ``block_fft`` and ``blocks`` in the row) and unblocked
           (block_fft_size=0, label "unblocked": one transform of the whole sequence, at M on
           pallas whatever L, at the exact size for N + L - 1 on xla; only where the backend's rule blocks, elsewhere both are the same
           program: the xla rule counts transformed samples, the pallas rule the kernel's
           real-matmul work, ``blocked.choose_blocking``).
           ``fft_samples`` = blocks * S (or the one transform's size), the transformed samples per (batch row,
           channel); ``speedup_vs_unblocked`` and ``temp_ratio_vs_unblocked`` = the unblocked
           row's time and compiled temp bytes over the blocked row's, at the same L. reference:
           the direct O(N L) convolution, whose work also falls with L; it runs only up to
           --reference-max-taps taps (CPU, B = H = 16: ~2-3 s per call at 1024 taps, ~40 s at
           4096).
  (The pallas sweep rows use the first of --dot-precisions.)
  monarch_plan  pallas only (GPU only, like its s sweep): the kernel's decomposition forced to
           each of --plans (``PLANS``: order 2 (the first kernel, the ratios' base), r2c order 2,
           order 3, r2c order 3, an outer step of 2 around order-3 kernels); a plan whose
           matmuls Triton cannot compile at this N is recorded as skipped. ``kernel_mflop``
           counts each plan's real-matmul work. At the default N = 4096 (M = 8192) this is where
           the rule by size switches from r2c order 2 to order 3 one size up: the sweep says
           whether MACs (order 3 does fewer) or matmul width (order 2's are wider) win.
  (The reference is not swept over s: with s > 0 it is, by definition, an O(N M) circular sum.)
The settings of one sweep and implementation are timed in turn, one call each per round (a
shared machine's load then falls on all alike). ``time_ratio`` = time / time of the same
implementation at the most exact setting it ran (s = 0; the longest L; the order-2 plan).
"""

from __future__ import annotations

import argparse
import functools
import os
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (RESULTS, add_speedups, environment, error_text,
                                parse_experiment_args, plot_curves, print_table, record_timing,
                                time_calls, time_interleaved, with_backward, write_json)
from experiments.fftconv_sweep_metrics import (add_sparsity_errors, pallas_kernel_work,
                                               partial_work, plan_label)
from kernels_pallas import fftconv
from kernels_pallas.fftconv import DOT_PRECISIONS, MonarchPlan, monarch

PEER = "jnp_fft"
PEER_KEY = ("dtype", "N", "mode")  # a row's speedup_vs_jnp_fft: the peer's row of these values
# N on a GPU: 256 .. 1M where memory allows (a failing N records its error), the 1K..32K rows
# first, so that the budget or the deadline cuts the outer lengths rather than those
GPU_SEQ_LENS = (tuple(2**p for p in range(10, 16)) + (256, 512)
                + tuple(2**p for p in range(16, 21)))
SLOW_CALL_S = 5.0  # fewer repetitions when one call is slow: about this many seconds of timing
SWEEP_DTYPE = "float32"  # the sweeps compare work and accuracy; float32 keeps the error exact
SWEEP_IMPLS = {"freq_sparsity": ("xla", "pallas"), "partial": ("xla", "pallas", "reference"),
               "monarch_plan": ("pallas",)}
PLANS = {"order2": MonarchPlan(order=2), "order2_r2c": MonarchPlan(order=2, r2c=True),
         "order3": MonarchPlan(order=3), "order3_r2c": MonarchPlan(order=3, r2c=True),
         "order3_outer2": MonarchPlan(order=3, outer=2)}


def row_options(row: dict) -> dict:
    """The fftconv keywords of a row: its kernel's matmul precision (pallas rows) and, for a sweep
    row, the swept option (a plan sweep's value is a ``PLANS`` name)."""
    options = {"dot_precision": row["dot_precision"]} if "dot_precision" in row else {}
    if "block_fft_size" in row:
        options["block_fft_size"] = row["block_fft_size"]
    if row.get("sweep") == "monarch_plan":
        options["monarch_plan"] = PLANS[row["value"]]
    elif "sweep" in row:
        options[row["sweep"]] = row["value"]
    return options


def impl_label(row: dict) -> str:
    """An implementation's name in the curves: pallas rows carry their matmul precision, rows
    with blocking turned off say "unblocked"."""
    return (row["impl"] + (f" {row['dot_precision']}" if "dot_precision" in row else "")
            + (" unblocked" if row.get("block_fft_size") == 0 else ""))


def jnp_fft_conv(u: jax.Array, k: jax.Array) -> jax.Array:
    """The peer: causal convolution by one rfft of size 2N; u [B, H, N], k [H, L] -> [B, H, N]."""
    n = u.shape[-1]
    spec = jnp.fft.rfft(u.astype(jnp.float32), n=2 * n) * jnp.fft.rfft(k, n=2 * n)
    return jnp.fft.irfft(spec, n=2 * n)[..., :n].astype(u.dtype)


def conv_fn(impl: str, **options):
    """(u, k) -> y of one implementation; `options`: fftconv keywords (freq_sparsity, partial)."""
    if impl == PEER:
        return jnp_fft_conv
    return lambda u, k: fftconv(u, k, backend=impl, **options)


def temp_mib(compiled) -> float | None:
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None)
    return None if temp is None else temp / 2**20


def prepare(row: dict, conv, mode: str, inputs: tuple) -> tuple:
    """Compile `conv` (u, k) -> y (or its forward+backward (u, k, ct) -> (y, (du, dk))), read its
    memory, make the warm-up call; fills `row` in place (raises on failure). Returns (compiled,
    its arguments, repetitions to time: as many as fit SLOW_CALL_S at the warm-up call's time).
    `row["phase"]` says what is running, for the deadline watchdog's note."""
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
    return compiled, args, int(SLOW_CALL_S / max(first, 1e-9))


def record_times(row: dict, times: list[float]) -> None:
    """Median, spread and count of the seconds per call, in ms, into `row`."""
    row.pop("phase", None)
    record_timing(row, times)
    row["reps"] = len(times)


def record_error(row: dict, error: Exception) -> None:
    """Record a failed row's error: its type and first line."""
    row.pop("phase", None)
    row["error"] = error_text(error)


def measure(row: dict, conv, mode: str, inputs: tuple, reps: int) -> None:
    """Compile, read memory, time `conv` (u, k) -> y; fills `row` in place (raises on failure)."""
    compiled, args, affordable = prepare(row, conv, mode, inputs)
    # prepare() made the warm-up call (its time sets the repetitions): none here
    record_times(row, time_calls(compiled, args, max(1, min(reps, affordable)), warmup=0))


def measure_alternating(rows: list[dict], inputs: tuple, reps: int) -> None:
    """Time the rows of one sweep and implementation in turn, one call of each per round, so
    that a shared machine's changing load falls on every setting alike (the sweep compares them
    with each other); fills the rows in place, a failing one with its error."""
    calls, counts = {}, {}  # by the row's index: its compiled call, its repetitions
    for i, row in enumerate(rows):
        try:
            compiled, args, affordable = prepare(
                row, conv_fn(row["impl"], **row_options(row)), row["mode"], inputs)
            calls[i], counts[i] = functools.partial(compiled, *args), max(1, min(reps, affordable))
        except Exception as e:  # noqa: BLE001 - record and go on to the next one
            record_error(row, e)
    # prepare() made each warm-up call: none here
    for i, times in time_interleaved(calls, counts, warmup=0).items():
        record_times(rows[i], times)


def sweep_groups(rows: list[dict]) -> list[list[dict]]:
    """The rows not skipped, grouped by (sweep, implementation), in order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "skipped" not in r:
            groups.setdefault((r["sweep"], r["impl"]), []).append(r)
    return list(groups.values())


def plan(args, gpu: bool) -> list[dict]:
    """Rows to measure, cheap implementations first: a slow kernel at a large N (which cannot be
    interrupted once launched) then costs only the rows after it, all of them its own."""
    rows = []
    for slow_pass in (False, True):
        for precision in args.dot_precisions if slow_pass else [None]:
            for n in args.seq_lens:
                batch = max(1, min(args.max_batch, args.elements // (args.channels * n)))
                for dtype in args.dtypes:
                    for mode in args.modes:
                        for impl in args.impls:
                            if (impl == "pallas") != slow_pass:
                                continue
                            rows.append({"dtype": dtype, "N": n, "batch": batch,
                                         "H": args.channels, "mode": mode, "impl": impl})
                            if impl == "pallas":
                                rows[-1].update(plan=plan_label(monarch.choose_plan(
                                    monarch.fft_size(n))), dot_precision=precision)
    if not gpu and not args.quick:
        for r in rows:
            if r["impl"] == "pallas":
                r["skipped"] = "pallas interprets on CPU (timed with --quick only)"
    return rows


def plan_sweeps(args, gpu: bool) -> list[dict]:
    """Rows of the freq_sparsity, partial and monarch_plan sweeps at N = args.sweep_n (see the
    docstring)."""
    n = args.sweep_n
    batch = max(1, min(args.max_batch, args.elements // (args.channels * n)))
    rows = []
    for sweep, values in (("freq_sparsity", args.sparsities), ("partial", args.partials),
                          ("monarch_plan", args.plans)):
        for impl in SWEEP_IMPLS[sweep]:
            for value in values:
                row = {"sweep": sweep, "value": value, "impl": impl, "dtype": SWEEP_DTYPE,
                       "N": n, "batch": batch, "H": args.channels, "mode": "fwd"}
                variants = [row]
                if sweep == "partial" and impl != "reference":
                    work = partial_work(n, value, impl)
                    blocks = work.pop("blocked")
                    row.update(work)
                    if blocks:  # this backend's rule blocks
                        variants.append({**row, "block_fft_size": 0,
                                         **partial_work(n, value, impl, blocking=False)})
                        variants[-1].pop("blocked")
                for row in variants:
                    if sweep == "partial" and impl == "xla":  # the kernel's work: pallas rows
                        for key in ("plan", "kernel_mflop", "lowers"):
                            row.pop(key)
                    if impl == "pallas":
                        row["dot_precision"] = args.dot_precisions[0]
                        if sweep == "monarch_plan":
                            row.update(pallas_kernel_work(n, 0.0, PLANS[value]))
                        elif sweep == "freq_sparsity":
                            row.update(pallas_kernel_work(n, value))
                        if not row.pop("lowers", True):
                            row["skipped"] = ("matmuls under 16 wide at this N: Triton cannot "
                                              "compile")
                        elif not gpu:  # interpreted, its time would not show the saved work
                            row["skipped"] = "pallas interprets on CPU (swept on GPU only)"
                    if impl == "reference" and value > args.reference_max_taps:
                        row["skipped"] = (f"direct O(N L) convolution: more than "
                                          f"--reference-max-taps={args.reference_max_taps} taps")
                    rows.append(row)
    return rows


def add_sweep_ratios(rows: list[dict]) -> None:
    """time_ratio: each sweep row's time over its implementation's at the most exact setting it
    ran: s = 0, or the longest L (the reference is not run at L = N); for the plans, over the
    order-2 plan's (the first kernel's)."""
    base: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["sweep"], impl_label(r))
        if r["sweep"] == "monarch_plan":
            if "median_ms" in r and r["value"] == "order2":
                base[key] = r
        elif "median_ms" in r and (key not in base or (r["value"] < base[key]["value"]
                                                     if r["sweep"] == "freq_sparsity"
                                                     else r["value"] > base[key]["value"])):
            base[key] = r
    for r in rows:
        if "median_ms" in r and (r["sweep"], impl_label(r)) in base:
            r["time_ratio"] = r["median_ms"] / base[(r["sweep"], impl_label(r))]["median_ms"]
    unblocked = {(r["impl"], r["value"]): r for r in rows
                 if r["sweep"] == "partial" and r.get("block_fft_size") == 0}
    for r in rows:
        peer = unblocked.get((r["impl"], r["value"]))
        if r["sweep"] != "partial" or r.get("block_fft_size") == 0 or peer is None:
            continue
        if "median_ms" in r and "median_ms" in peer:
            r["speedup_vs_unblocked"] = peer["median_ms"] / r["median_ms"]
        if r.get("temp_MiB") and peer.get("temp_MiB") is not None:
            r["temp_ratio_vs_unblocked"] = peer["temp_MiB"] / r["temp_MiB"]


def make_inputs(row: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """u, ct [batch, H, N] in the row's dtype and k [H, N] float32, drawn on the device."""
    key_u, key_k, key_ct = jax.random.split(jax.random.key(row["N"]), 3)
    shape, dtype = (row["batch"], row["H"], row["N"]), jnp.dtype(row["dtype"])
    u = jax.random.normal(key_u, shape, dtype)
    ct = jax.random.normal(key_ct, shape, dtype)
    k = jax.random.normal(key_k, (row["H"], row["N"]), jnp.float32) / np.sqrt(row["N"])
    return u, k, ct


COLUMNS = ["dtype", "N", "batch", "H", "mode", "impl", "plan", "dot_precision", "median_ms",
           "min_ms", "max_ms", f"speedup_vs_{PEER}", "temp_MiB", "compile_s", "error", "skipped"]
SWEEP_COLUMNS = ["sweep", "value", "impl", "block_fft_size", "N", "batch", "H", "median_ms",
                 "min_ms", "max_ms", "time_ratio", "block_fft", "blocks", "fft_samples",
                 "temp_MiB", "speedup_vs_unblocked", "temp_ratio_vs_unblocked",
                 "rel_err_random", "rel_err_hyena", "plan", "kernel_cols", "kernel_mflop",
                 "dot_precision", "error", "skipped"]


def plot_sweeps(sweeps: list[dict], out: Path) -> list[str]:
    """One PNG per sweep: time_ratio per implementation (and, for freq_sparsity, the relative
    errors) versus the swept value."""
    pngs = []
    for sweep, xlabel in (("freq_sparsity", "freq_sparsity s"), ("partial", "partial taps L")):
        curves = {}
        for r in sweeps:
            if r["sweep"] == sweep and "time_ratio" in r:
                xs, ys = curves.setdefault(f"{impl_label(r)} time ratio", ([], []))
                xs.append(r["value"])
                ys.append(r["time_ratio"])
        errs = [r for r in sweeps if r["sweep"] == sweep and r["impl"] == "xla"
                and "rel_err_random" in r]
        for name in ("random", "hyena"):
            if errs and f"rel_err_{name}" in errs[0]:
                curves[f"rel. error, {name} filter"] = ([r["value"] for r in errs],
                                                        [r[f"rel_err_{name}"] for r in errs])
        if curves:
            pngs.append(str(plot_curves(
                curves, xlabel=xlabel, ylabel="ratio", title=f"fftconv, N = {sweeps[0]['N']}",
                out=out.with_name(f"{out.stem}_{sweep}.png"))))
    return pngs


def finish(record: dict, out: Path, args) -> None:
    """Tables, PNGs (median time versus N for the first dtype; the sweeps) and the JSON record."""
    rows = record["rows"]
    add_speedups(rows, PEER_KEY, [PEER])
    add_sweep_ratios(record["sweeps"])
    print_table(sorted(rows, key=lambda r: (
        args.dtypes.index(r["dtype"]), r["N"], args.modes.index(r["mode"]),
        args.impls.index(r["impl"]),
        args.dot_precisions.index(r["dot_precision"]) if "dot_precision" in r else -1)), COLUMNS)
    first = args.dtypes[0]
    curves = {}
    for r in sorted(rows, key=lambda r: r["N"]):
        if r["dtype"] == first and "median_ms" in r:
            xs, ys = curves.setdefault(f"{impl_label(r)} {r['mode']}", ([], []))
            xs.append(r["N"])
            ys.append(r["median_ms"])
    if curves:
        record["png"] = str(plot_curves(curves, xlabel="sequence length N", ylabel="median ms",
                                        title=f"fftconv, {first}", out=out.with_suffix(".png")))
    if record["sweeps"]:
        print()
        print_table(record["sweeps"], SWEEP_COLUMNS)
        record["sweep_pngs"] = plot_sweeps(record["sweeps"], out)
    print(f"wrote {write_json(record, out)} {record.get('png', '')} "
          f"{' '.join(record.get('sweep_pngs', []))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: bfloat16 float32 on GPU, float32 on CPU")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--impls", nargs="+", default=["xla", "pallas", PEER])
    parser.add_argument("--dot-precisions", nargs="+", choices=DOT_PRECISIONS,
                        default=None,
                        help="the pallas kernel's matmul precisions, each timed (the first is "
                             "the one the sweeps use; default bf16x3 bf16 float32, float32 "
                             "alone with --quick)")
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
    parser.add_argument("--sweep-n", type=int, default=None,
                        help="N of the freq_sparsity and partial sweeps (default 4096)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--partials", type=int, nargs="+", default=None,
                        help="partial taps L (default N/256, N/32, N/4, N)")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS),
                        help="Monarch plans of the pallas monarch_plan sweep (GPU only)")
    parser.add_argument("--reference-max-taps", type=int, default=1024)
    parser.add_argument("--out", default=str(RESULTS / "bench_fftconv.json"))
    args = parse_experiment_args(parser)
    gpu = jax.default_backend() == "gpu"
    args.dtypes = args.dtypes or (["bfloat16", "float32"] if gpu else ["float32"])
    args.seq_lens = args.seq_lens or (list(GPU_SEQ_LENS) if gpu else [256, 1024, 4096])
    args.channels = args.channels or (768 if gpu else 16)
    args.elements = args.elements or (2**28 if gpu else 2**20)
    args.reps = args.reps or 10  # a shared CPU is noisy: as many as on a GPU (capped per call)
    args.budget_s = args.budget_s or (60.0 if gpu else None)
    args.deadline_s = args.deadline_s or (85.0 if gpu else None)
    args.sweep_n = args.sweep_n or 4096
    args.dot_precisions = args.dot_precisions or (
        ["float32"] if args.quick else ["bf16x3", "bf16", "float32"])
    if args.quick:
        args.seq_lens, args.channels, args.elements, args.reps = [256], 4, 2**11, 2
        # N = 1024: a short filter runs in several blocks (xla: 5 of S = 256 against M = 2048)
        args.sweep_n, args.sparsities = 1024, [0.0, 0.75]
        args.partials = args.partials or [16]  # blocked and unblocked: times no trend
    args.partials = args.partials or [args.sweep_n // d for d in (256, 32, 4, 1)]

    out = Path(args.out)
    began = time.perf_counter()
    rows, sweeps = plan(args, gpu), plan_sweeps(args, gpu)
    record = {"experiment": "bench_fftconv", **environment(), "quick": args.quick,
              "settings": vars(args), "rows": rows, "sweeps": sweeps}
    lock = threading.Lock()  # finish() runs once: from the watchdog or at the end

    def on_deadline() -> None:
        with lock:
            running = [r for r in rows + sweeps if r.get("phase")]
            for r in running:
                r["error"] = (f"still in {r.pop('phase')} at the {args.deadline_s:.0f} s "
                              "deadline (run stopped)")
            for r in rows + sweeps:
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
    freq_rows = [r for r in sweeps if r["sweep"] == "freq_sparsity"]
    if freq_rows:  # before any timing: a few untimed xla programs on the sweep's inputs
        add_sparsity_errors(freq_rows, make_inputs(freq_rows[0]), hyena=not args.quick)
    # units of work: cheap rows first, then the Pallas sweep at its moderate N, then the Pallas
    # N sweep, whose largest N is the run's riskiest; a sweep's rows are timed together
    units = ([[r] for r in rows if r["impl"] != "pallas" and "skipped" not in r]
             + sweep_groups([r for r in sweeps if r["impl"] != "pallas"])
             + sweep_groups([r for r in sweeps if r["impl"] == "pallas"])
             + [[r] for r in rows if r["impl"] == "pallas" and "skipped" not in r])
    inputs_key, inputs = None, None
    for unit in units:
        if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
            for row in unit:
                row["skipped"] = f"time budget of {args.budget_s:.0f} s spent"
            continue
        first = unit[0]
        try:
            key = (first["dtype"], first["N"], first["batch"])
            if key != inputs_key:
                inputs_key, inputs = key, None  # free the previous size first
                inputs = make_inputs(first)
            if "sweep" in first:
                measure_alternating(unit, inputs, args.reps)
            else:
                measure(first, conv_fn(first["impl"], **row_options(first)), first["mode"],
                        inputs, args.reps)
        except Exception as e:  # noqa: BLE001 - record and go on to the next one
            for row in unit:
                if not {"median_ms", "error"} & row.keys():
                    record_error(row, e)
        with lock:
            add_speedups(rows, PEER_KEY, [PEER])
            write_json(record, out)
        for row in unit:
            sweep = f" {row['sweep']}={row['value']}" if "sweep" in row else ""
            print(f"{row['dtype']} N={row['N']} {row['mode']} {impl_label(row)}{sweep}: "
                  f"{row.get('median_ms', row.get('error'))}", flush=True)
    if watchdog is not None:
        watchdog.cancel()
    record["wall_s"] = time.perf_counter() - began
    with lock:
        finish(record, out, args)


if __name__ == "__main__":
    main()
