"""Sequence-parallel attention: ring vs Ulysses vs single-device flash attention, with the
communication each scheme moves per device.

    python -m experiments.bench_sequence_parallel            # seq 1K..8K over all devices
    python -m experiments.bench_sequence_parallel --quick    # seconds on a CPU

On a CPU host the script asks XLA for 8 emulated devices (unless XLA_FLAGS already sets a count).
They share the host's cores, so there the sequence-parallel times measure the schemes' overheads
(extra passes, collectives, the ring's per-step merges) against one device doing the same total
work, not a speedup; on real multi-device hardware the same table measures scaling.

Implementations, on the same inputs in the same process:
  single    kernels_pallas.flash_attention on one device over the whole sequence (the peer)
  ring      sharding.ring_attention, zig-zag layout (inputs laid out once, outside the timing)
  ulysses   sharding.ulysses_attention, contiguous layout

Each row: median and spread (min, max) of --reps timed calls after a compile-and-run warm-up,
the ratio time(single) / time(impl) (``vs_single``), the max abs difference of the output from the
single-device output (forward rows), and the elements each device sends per call twice: from
``sharding.communication_elements`` (the formula, from shapes) and from the compiled program's
collectives (``hlo_comm_elements``: collective-permute and all-to-all result sizes, times the
trip count of the loops they sit in). ``comm_MB`` counts every element at the input dtype, though
the ring's backward sends its dK/dV accumulators in float32. In the forward+backward program the
HLO count of the ring is one K/V hop below the formula: XLA merges the backward's first K/V hop
(outside the loop) with the identical one of the forward.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # CPU only: emulate a multi-device host (must precede the first jax import)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import sharding  # noqa: E402
from experiments.bench_attention import timed  # noqa: E402
from experiments.common import (RESULTS, environment, plot_curves, print_table,  # noqa: E402
                                write_json)
from kernels_pallas import flash_attention  # noqa: E402

IMPLS = ("single", "ring", "ulysses")
MODES = ("fwd", "fwd_bwd")


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_COLLECTIVE = re.compile(r"= (.+?) (collective-permute|all-to-all)(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(r"(body|condition|to_apply|calls|branch_computations)="
                     r"\{?(%[\w.\-]+(?:, *%[\w.\-]+)*)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def hlo_collective_elements(hlo: str, num_shards: int) -> int:
    """Elements one device sends, counted from the compiled (per-device) HLO: every
    collective-permute sends its operand; an all-to-all sends all but its own 1/P; a collective
    inside a while loop counts once per iteration (XLA's known_trip_count)."""
    lines_of, parent, trips = {}, {}, {}
    name = None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            name = head.group(1)
            lines_of[name] = []
            continue
        if name is None:
            continue
        lines_of[name].append(line)
        trip = _TRIP.search(line)
        for kind, callees in _CALLEE.findall(line):
            for callee in callees.split(","):
                callee = callee.strip().lstrip("%")
                parent[callee] = name
                if kind == "body" and trip:
                    trips[callee] = int(trip.group(1))

    def repeats(comp: str) -> int:
        n = 1
        while comp in parent:
            n *= trips.get(comp, 1)
            comp = parent[comp]
        return n

    total = 0
    for comp, lines in lines_of.items():
        for line in lines:
            match = _COLLECTIVE.search(line)
            if not match:
                continue
            result, op, start = match.groups()
            shapes = _SHAPE.findall(result)
            if start:  # async form: (operand, destination, context...) -> the operand
                shapes = shapes[:1]
            elements = sum(int(np.prod([int(d) for d in dims.split(",") if d]))
                           for _, dims in shapes)
            if op == "all-to-all":
                elements = elements * (num_shards - 1) // num_shards
            total += elements * repeats(comp)
    return total


def attention_fn(impl: str, mesh, causal: bool, backend: str):
    """(q, k, v) -> out, each in the layout its impl expects."""
    if impl == "single":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend)
    return lambda q, k, v: sharding.sequence_parallel_attention(
        q, k, v, mesh=mesh, impl=impl, causal=causal, backend=backend)


def with_backward(attend):
    """(q, k, v, ct) -> (out, (dq, dk, dv) of sum(out * ct)): forward and backward in one
    program, the output kept as a training step keeps it."""
    def fwd_bwd(q, k, v, ct):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(ct)
    return fwd_bwd


def place(impl: str, arrays, mesh, p: int):
    """Put the arrays where `impl` wants them: one device, or the sequence split over the mesh
    (zig-zag permuted for the ring)."""
    if impl == "single":
        return [jax.device_put(x, jax.devices()[0]) for x in arrays]
    if impl == "ring":
        arrays = [sharding.zigzag_permute(x, p) for x in arrays]
    spec = NamedSharding(mesh, PartitionSpec(None, "sequence", None, None))
    return [jax.device_put(x, spec) for x in arrays]


def run_config(seq: int, args, mesh, p: int) -> list[dict]:
    rng = np.random.default_rng(seq)
    dtype = jnp.dtype(args.dtype)
    q_shape = (args.batch, seq, args.heads, args.head_dim)
    kv_shape = (args.batch, seq, args.kv_heads, args.head_dim)
    host = [jnp.asarray(rng.standard_normal(s), dtype) for s in (q_shape, kv_shape, kv_shape,
                                                                   q_shape)]
    rows, single = [], {}
    for impl in IMPLS:
        q, k, v, ct = place(impl, host, mesh, p)
        attend = attention_fn(impl, mesh, args.causal, args.backend)
        for mode in args.modes:
            row = dict(impl=impl, mode=mode, seq=seq, devices=1 if impl == "single" else p)
            if mode == "fwd":
                fn, call_args = jax.jit(attend), (q, k, v)
            else:
                fn, call_args = jax.jit(with_backward(attend)), (q, k, v, ct)
            try:
                compiled = fn.lower(*call_args).compile()
                times = timed(compiled, call_args, args.reps)
            except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                rows.append(row | {"error": f"{type(err).__name__}: {err}"[:300]})
                continue
            row |= {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                    "max_ms": 1e3 * max(times)}
            if impl == "single":
                single[mode] = row["median_ms"]
            row["vs_single"] = single.get(mode, float("nan")) / row["median_ms"]
            if mode == "fwd":
                out = fn(*call_args)
                if impl == "ring":
                    out = sharding.zigzag_unpermute(out, p)
                single.setdefault("out", out)
                row["max_abs_diff"] = float(jnp.abs(jax.device_get(out).astype(jnp.float32)
                                                    - jax.device_get(single["out"])).max())
            if impl != "single":
                elements = sharding.communication_elements(
                    impl, batch=args.batch, seq=seq, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, num_shards=p, backward=mode == "fwd_bwd")
                row |= {"comm_elements": elements, "comm_MB": elements * dtype.itemsize / 1e6,
                        "hlo_comm_elements": hlo_collective_elements(compiled.as_text(), p)}
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int, default=None, help="P (default: all devices)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--backend", default="auto", help="flash_attention backend per block")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "bench_sequence_parallel.json"))
    args = parser.parse_args()
    on_cpu = jax.devices()[0].platform == "cpu"
    if args.quick:
        args.seq_lens = args.seq_lens or [256]
        args.heads, args.kv_heads, args.head_dim = 4, 4, 32
        args.devices = args.devices or 4
        args.reps = min(args.reps, 3)
    args.seq_lens = args.seq_lens or ([1024, 2048, 4096] if on_cpu else [4096, 16384, 65536])
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    p = args.devices or len(jax.devices())
    mesh = sharding.make_mesh(sequence=p, devices=jax.devices()[:p])

    rows = []
    for seq in args.seq_lens:
        rows += run_config(seq, args, mesh, p)
    print_table(rows, ["impl", "mode", "seq", "devices", "median_ms", "min_ms", "max_ms",
                       "vs_single", "max_abs_diff", "comm_elements", "hlo_comm_elements",
                       "comm_MB", "error"])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"experiment": "bench_sequence_parallel", **settings, **environment(),
              "num_devices": p, "rows": rows}
    out = write_json(record, args.out)
    curves = {f"{impl} {mode}": ([r["seq"] for r in rows if (r["impl"], r["mode"]) == (impl, mode)
                                  and "median_ms" in r],
                                 [r["median_ms"] for r in rows
                                  if (r["impl"], r["mode"]) == (impl, mode) and "median_ms" in r])
              for impl in IMPLS for mode in args.modes}
    png = plot_curves(curves, xlabel="sequence length", ylabel="median ms",
                      title=f"attention over {p} devices ({jax.devices()[0].device_kind})",
                      out=Path(out).with_suffix(".png"))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
