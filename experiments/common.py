"""Shared plumbing for experiments: where a run writes its record (a --quick run: not over the
committed one), the environment record every result JSON carries, its (atomic) writing, timing
calls (one at a time or several in turn) and a row's timing fields (median/min/max, an error,
speed ratios against a peer row), a copy's streaming bandwidth, a forward+backward program of a
function, compiled memory, and tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import jax

RESULTS = Path(__file__).parent / "results"
# where a --quick run given no --out writes (gitignored): a smoke run must not replace the
# committed record that --out's default names
QUICK_RESULTS = RESULTS / "quick"


def parse_experiment_args(parser: argparse.ArgumentParser,
                          argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args(argv) for an experiment with --quick and --out (default: its record in
    RESULTS): without --out, a --quick run writes the file of that name in QUICK_RESULTS. The
    output's folder is created here, since some experiments save a plot before their JSON."""
    record = parser.get_default("out")
    parser.set_defaults(out=None)  # so that an --out given as the record's own path is kept
    try:
        args = parser.parse_args(argv)
    finally:
        parser.set_defaults(out=record)
    if args.out is None:
        args.out = str(QUICK_RESULTS / Path(record).name) if args.quick else record
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    return args


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "backend": device.platform,
        "device_kind": device.device_kind,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "argv": list(sys.argv),  # the command line that produced the record
    }


def write_json(record: dict, out: str | Path) -> Path:
    """Write `record` to `out` through a temporary file and os.replace, so that a run killed
    mid-write (a timeout) leaves the previous complete record, never a truncated one; scripts call
    it after every row so that a killed run keeps the rows it finished."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def time_calls(fn, args: tuple, reps: int, *, warmup: int = 1) -> list[float]:
    """Seconds of each of `reps` calls fn(*args), each waited on with jax.block_until_ready,
    after `warmup` untimed calls (the first compiles; 0 where the caller has made and timed its
    own). The caller takes the median and the spread."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(arrays: Sequence[jax.Array], reps: int) -> float:
    """Bytes per second of a jitted x + 1 over each of `arrays` (every byte read once and written
    once), the median of `reps` calls after a warm-up: the streaming bandwidth that a
    memory-bound kernel's bytes per second are held against."""
    copy = jax.jit(lambda *xs: tuple(x + 1 for x in xs))
    nbytes = sum(x.nbytes for x in arrays)
    return 2 * nbytes / statistics.median(time_calls(copy, tuple(arrays), reps))


def time_interleaved(calls: Mapping[Hashable, Callable[[], object]],
                     reps: int | Mapping[Hashable, int], *, warmup: int = 1
                     ) -> dict[Hashable, list[float]]:
    """Seconds of each named call's runs, the calls run in turn: `warmup` untimed rounds (the
    first compiles), then rounds in which each call, in `calls`' order, runs once and is waited on
    with jax.block_until_ready, so that a shared machine's drifting load falls on every call
    alike and their ratio is fair. `reps` is the number of timed rounds, or a number per call (a
    call with fewer sits out the later rounds)."""
    counts = {name: reps[name] if isinstance(reps, Mapping) else reps for name in calls}
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[Hashable, list[float]] = {name: [] for name in calls}
    for i in range(max(counts.values(), default=0)):
        for name, call in calls.items():
            if i < counts[name]:
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times[name].append(time.perf_counter() - t0)
    return times


def record_timing(row: dict, times: Sequence[float]) -> float:
    """Write the median, min and max of `times` (seconds) into `row` as median_ms, min_ms and
    max_ms; returns the median in seconds (for the rates a row derives from it)."""
    median = statistics.median(times)
    row.update(median_ms=median * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3)
    return median


def spread_text(times: Sequence[float], scale: float = 1.0) -> str:
    """The spread of `times` (times `scale`) in one table cell: "min-max", to 3 decimals."""
    return f"{scale * min(times):.3f}-{scale * max(times):.3f}"


def error_text(error: BaseException) -> str:
    """A failed measurement's record: the exception's type and the first line of its message,
    cut to 200 characters (an XLA error runs to pages; MemoryError() has no message)."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


def add_speedups(rows: list[dict], key_fields: Sequence[str], peers: Sequence[str], *,
                 name_field: str = "impl") -> None:
    """rows[i]["speedup_vs_<peer>"] = the peer row's median_ms / this row's, for each of `peers`
    (a value of `name_field`) that has a timed row agreeing with this one on every one of
    `key_fields` (a peer's own row gets 1.0). Rows without a median_ms (failed, skipped, not yet
    run) get no ratio and serve as no peer; with repeated calls, ratios appear as peers finish."""
    medians = {(tuple(r[f] for f in key_fields), r[name_field]): r["median_ms"] for r in rows
               if r.get("median_ms")}
    for r in rows:
        if not r.get("median_ms"):
            continue
        key = tuple(r[f] for f in key_fields)
        for peer in peers:
            peer_ms = medians.get((key, peer))
            if peer_ms:
                r[f"speedup_vs_{peer}"] = peer_ms / r["median_ms"]


def with_backward(fn):
    """fn(*inputs) -> out becomes (*inputs, ct) -> (out, gradients of sum(out * ct) with respect
    to each input): forward and backward in one program. The forward output is returned (and so
    waited on) as a training step uses it: discarded, XLA would drop the work only it needs (a
    dense attention's final P @ V, 16% of its FLOPs)."""
    def fwd_bwd(*args):
        *inputs, ct = args
        out, vjp = jax.vjp(fn, *inputs)
        return out, vjp(ct)
    return fwd_bwd


def peak_bytes(compiled) -> int:
    """Bytes a compiled program holds at once (per device), from XLA's memory analysis:
    arguments + outputs + temporaries - buffers aliased between arguments and outputs."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of the given columns."""
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def plot_curves(curves: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
                out: str | Path) -> Path:
    """Line plot of named (x, y) series to a PNG through matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def init_model(config, compiler_options: dict | None = None):
    """A randomly initialised LlamaForCausalLM of `config` (seed 0), built by one compiled
    program: eager initialisers would compile once per parameter shape (seconds per model on a
    CPU, minutes for a billion parameters)."""
    from flax import nnx

    import jaxinfer

    create = lambda: jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(create))
    init = jax.jit(lambda: nnx.split(create())[1]).lower().compile(
        compiler_options=compiler_options or {})
    return nnx.merge(graphdef, init())
