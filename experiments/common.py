"""Shared plumbing for experiments: where a run writes its record (a --quick run: not over the
committed one), the environment record every result JSON carries, its (atomic) writing, timing
calls, a forward+backward program of a function, compiled memory, and tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
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
