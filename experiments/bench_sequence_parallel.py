"""Sequence-parallel attention: ring vs Ulysses vs single-device flash attention, with the
communication each scheme moves per device, and the communication per layer of ring vs Ulysses
vs Megatron sequence parallelism for several P and GQA ratios.

    python -m experiments.bench_sequence_parallel            # seq 1K, 2K, 4K (CPU) or 4K, 16K,
                                                             # 64K (GPU) over all devices
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
collectives (``hlo_comm_elements``, see `hlo_collectives`: each collective's per-device sends
under the bandwidth-optimal algorithm, times the trip count of the loops it sits in).
``comm_MB`` counts every element at the input dtype, though the ring's backward sends its dK/dV
accumulators in float32. In the forward+backward program the HLO count of the ring is one K/V hop
below the formula: XLA merges the backward's first K/V hop (outside the loop) with the identical
one of the forward.

Communication sweep (``comm_rows``, compile only, forward, one layer): for each P in
--comm-devices and KV-head count in --comm-kv-heads, the elements each device sends under
  ring, ulysses  the attention above over sequence=P (under sequence parallelism the MLP sends
                 nothing), formula `sharding.communication_elements`;
  tp_sp          Megatron-SP: one jaxinfer Llama DecoderLayer (attention + SwiGLU MLP) under the
                 "tp_sp" preset over tensor=P, the residual split along the sequence; formula
                 `megatron_sp_elements` (an all-gather and a reduce-scatter of [b, S, D] per block);
  tp             the same layer under plain Megatron TP ("tp"): two all-reduces, the same formula.
``hlo_collectives`` names what the compiled program ran and ``vs_megatron_sp`` is the formula's
ratio to Megatron-SP's. The tp_sp layer runs exactly the formula's all-gathers and
reduce-scatters (`sharding.column_parallel_matmul` / `row_parallel_matmul`), also where the
tensor axis does not divide the KV heads (replicated, see `megatron_layer_hlo_collectives`: each
device projects K and V of the gathered sequence). Left to the partitioner, XLA:CPU all-reduced
the partial sums and kept a slice (1.5x the formula) and, with replicated KV heads, projected K
and V per sequence slice and all-gathered them, adding the ring's K/V volume.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # CPU only: emulate a multi-device host (must precede the first jax import)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import jaxinfer  # noqa: E402
import sharding  # noqa: E402
from experiments.bench_layouts import FAST_COMPILE  # noqa: E402
from experiments.common import (RESULTS, environment, parse_experiment_args,  # noqa: E402
                                plot_curves, print_table, record_timing, time_calls,
                                with_backward, write_json)
from jaxinfer.models.llama import RESIDUAL, DecoderLayer  # noqa: E402
from jaxinfer.models.rope import inverse_frequencies, rotary_tables  # noqa: E402
from kernels_pallas import flash_attention  # noqa: E402

IMPLS = ("single", "ring", "ulysses")
MODES = ("fwd", "fwd_bwd")
COMM_IMPLS = ("ring", "ulysses", "tp_sp", "tp")  # tp_sp: Megatron-SP; tp: Megatron all-reduces


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_COLLECTIVE = re.compile(r"= (.+?) (collective-permute|all-to-all|all-gather|reduce-scatter"
                         r"|all-reduce)(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(r"(body|condition|to_apply|calls|branch_computations)="
                     r"\{?(%[\w.\-]+(?:, *%[\w.\-]+)*)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_GROUPS_LISTED = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")


def group_size(line: str, num_devices: int) -> int:
    """Devices taking part in one group of the collective on this HLO line: the first of its
    listed replica groups, the second dimension of an iota form [groups, size]<=[...], the
    product of the named axes of a mesh form mesh['a'=2,'b'=4] {'b'}, or all `num_devices` where
    it names none."""
    mesh = _GROUPS_MESH.search(line)
    if mesh:
        sizes = {k.strip("'"): int(v) for k, v in
                 (item.split("=") for item in mesh.group(1).split(","))}
        return int(np.prod([sizes[a.strip().strip("'")] for a in mesh.group(2).split(",")]))
    listed = _GROUPS_LISTED.search(line)
    if listed:
        return len(listed.group(1).split(","))
    iota = _GROUPS_IOTA.search(line)
    return int(iota.group(1)) if iota else num_devices


def sent_elements(op: str, result_elements: int, g: int) -> int:
    """Elements one device sends for a collective of result size `result_elements` (per device)
    over groups of g devices, with the bandwidth-optimal (ring) algorithms: a permute sends its
    operand; an all-to-all all but its own 1/g; an all-gather the (g-1)/g it did not hold; a
    reduce-scatter g-1 result-sized pieces; an all-reduce a reduce-scatter plus an all-gather."""
    if op == "collective-permute":
        return result_elements
    if op == "reduce-scatter":
        return result_elements * (g - 1)
    sent = result_elements * (g - 1) // g
    return 2 * sent if op == "all-reduce" else sent


def hlo_collectives(hlo: str, num_devices: int) -> dict[str, list[int]]:
    """{op: [executions, elements sent]} per device, counted from the compiled (per-device) HLO:
    every collective-permute, all-to-all, all-gather, reduce-scatter and all-reduce by
    `sent_elements` over its replica-group size; a collective inside a while loop counts once per
    iteration (XLA's known_trip_count)."""
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

    ops: dict[str, list[int]] = {}
    for comp, lines in lines_of.items():
        for line in lines:
            match = _COLLECTIVE.search(line)
            if not match:
                continue
            result, op, start = match.groups()
            shapes = _SHAPE.findall(result)
            if start and op == "collective-permute":  # (operand, destination, context...)
                shapes = shapes[:1]
            elif start and op == "all-gather":  # (operands..., results...)
                shapes = shapes[len(shapes) // 2:]
            elements = sum(int(np.prod([int(d) for d in dims.split(",") if d]))
                           for _, dims in shapes)
            count = ops.setdefault(op, [0, 0])
            count[0] += repeats(comp)
            count[1] += sent_elements(op, elements, group_size(line, num_devices)) * repeats(comp)
    return ops


def total_sent(ops: dict[str, list[int]]) -> int:
    """Elements sent over all the collectives of a `hlo_collectives` record."""
    return sum(elements for _, elements in ops.values())


def hlo_collective_elements(hlo: str, num_devices: int) -> int:
    """Elements one device sends in all the collectives of the compiled HLO."""
    return total_sent(hlo_collectives(hlo, num_devices))


def describe_collectives(ops: dict[str, list[int]]) -> str:
    """"all-gather x2, all-reduce x2": what the compiled program ran, for the table."""
    return ", ".join(f"{op} x{n}" for op, (n, _) in sorted(ops.items()))


def megatron_sp_elements(*, batch: int, seq: int, hidden: int, num_shards: int,
                         backward: bool = False) -> int:
    """Elements each device sends per decoder layer (attention + MLP) under Megatron tensor
    parallelism with sequence parallelism (Korthikanti et al., 2022) over P = num_shards devices.

    Per block one all-gather of the sequence-split [batch, seq, hidden] residual before the
    column-parallel matmuls and one reduce-scatter after the row-parallel ones, each sending
    (P-1)/P of the whole tensor: 4 b S D (P-1)/P in the forward, constant in P. The backward's
    transposes (all-gather <-> reduce-scatter) send the same again. Plain TP's two all-reduces
    send exactly as much (an all-reduce is a reduce-scatter plus an all-gather)."""
    p = num_shards
    forward = 4 * batch * seq * hidden * (p - 1) // p
    return 2 * forward if backward else forward


def megatron_layer_hlo_collectives(preset: str, *, batch: int, seq: int, heads: int,
                                   kv_heads: int, head_dim: int, num_shards: int
                                   ) -> dict[str, list[int]]:
    """`hlo_collectives` of the forward of one Llama decoder layer (attention + SwiGLU MLP,
    jaxinfer.models.llama.DecoderLayer) under Megatron preset "tp" or "tp_sp" over
    tensor=num_shards devices. KV heads that the tensor axis does not divide are replicated (the
    documented way out)."""
    p = num_shards
    config = jaxinfer.LlamaConfig(vocab_size=64, hidden_size=heads * head_dim,
                                  intermediate_size=2 * heads * head_dim, num_hidden_layers=1,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=seq)
    rules = sharding.rules_for(preset)
    if kv_heads % p:
        rules |= {"kv_heads": None, "act_kv_heads": None}
    mesh = sharding.make_mesh(tensor=p, devices=jax.devices()[:p])
    graphdef, params = nnx.split(DecoderLayer(config, rngs=nnx.Rngs(0)))
    params = sharding.place(params, mesh, rules, head_counts=sharding.head_counts_of(config))
    x = jax.device_put(jnp.zeros((batch, seq, config.hidden_size), jnp.float32),
                       sharding.batch_sharding(mesh, rules, RESIDUAL))

    def layer(params, x):  # x [batch, seq, hidden] -> the same, the residual as the rules say
        positions = jnp.arange(seq, dtype=jnp.int32)[None]  # [1, seq]
        cos, sin = rotary_tables(positions, inverse_frequencies(config))
        out, _ = nnx.merge(graphdef, params)(sharding.constrain(x, RESIDUAL), cos, sin,
                                             positions, None, 0)
        return sharding.constrain(out, RESIDUAL)

    with sharding.use_rules(mesh, rules):
        compiled = jax.jit(layer).lower(params, x).compile(compiler_options=FAST_COMPILE)
    return hlo_collectives(compiled.as_text(), p)


def attention_hlo_collectives(impl: str, shapes, *, num_shards: int, backend: str
                              ) -> dict[str, list[int]]:
    """`hlo_collectives` of the forward of sequence-parallel attention `impl` on zero-filled
    q, k, v of `shapes` over sequence=num_shards devices."""
    p = num_shards
    mesh = sharding.make_mesh(sequence=p, devices=jax.devices()[:p])
    q, k, v = place(impl, [jnp.zeros(s, jnp.float32) for s in shapes], mesh, p)
    attend = jax.jit(attention_fn(impl, mesh, True, backend))
    compiled = attend.lower(q, k, v).compile(compiler_options=FAST_COMPILE)
    return hlo_collectives(compiled.as_text(), p)


def communication_sweep(args) -> list[dict]:
    """Forward elements per device per layer of ring, Ulysses, Megatron-SP (preset tp_sp) and
    plain TP (preset tp), from the formulas and from the compiled HLO, for each P in
    args.comm_devices and each KV-head count in args.comm_kv_heads (GQA ratio heads/kv_heads).
    Ring and Ulysses count attention only: under sequence parallelism the MLP moves nothing."""
    b, s, h, d = args.batch, args.comm_seq, args.heads, args.head_dim
    rows = []
    for p in args.comm_devices:
        for kv in args.comm_kv_heads:
            shapes = [(b, s, h, d), (b, s, kv, d), (b, s, kv, d)]
            base = dict(devices=p, heads=h, kv_heads=kv, gqa=h // kv, seq=s)
            for impl in COMM_IMPLS:
                if impl in ("ring", "ulysses"):
                    formula = sharding.communication_elements(
                        impl, batch=b, seq=s, heads=h, kv_heads=kv, head_dim=d, num_shards=p)
                    ops = attention_hlo_collectives(impl, shapes, num_shards=p,
                                                    backend=args.backend)
                else:
                    formula = megatron_sp_elements(batch=b, seq=s, hidden=h * d, num_shards=p)
                    ops = megatron_layer_hlo_collectives(impl, batch=b, seq=s, heads=h,
                                                         kv_heads=kv, head_dim=d, num_shards=p)
                hlo = total_sent(ops)
                rows.append(base | {"impl": impl, "comm_elements": formula,
                                    "hlo_comm_elements": hlo, "hlo_vs_formula": hlo / formula,
                                    "hlo_collectives": describe_collectives(ops),
                                    "comm_MB": formula * jnp.dtype(args.dtype).itemsize / 1e6})
            megatron = next(r["comm_elements"] for r in rows[-len(COMM_IMPLS):]
                            if r["impl"] == "tp_sp")
            for r in rows[-len(COMM_IMPLS):]:
                r["vs_megatron_sp"] = r["comm_elements"] / megatron
    return rows


def attention_fn(impl: str, mesh, causal: bool, backend: str):
    """(q, k, v) -> out, each in the layout its impl expects."""
    if impl == "single":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend)
    return lambda q, k, v: sharding.sequence_parallel_attention(
        q, k, v, mesh=mesh, impl=impl, causal=causal, backend=backend,
        layout="zigzag" if impl == "ring" else "contiguous")


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
                times = time_calls(compiled, call_args, args.reps)
            except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                rows.append(row | {"error": f"{type(err).__name__}: {err}"[:300]})
                continue
            record_timing(row, times)
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


def main(argv: list[str] | None = None) -> dict:
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
    parser.add_argument("--comm-devices", type=int, nargs="+", default=[2, 4, 8],
                        help="P values of the communication sweep")
    parser.add_argument("--comm-kv-heads", type=int, nargs="+", default=[8, 4, 2, 1],
                        help="KV-head counts of the communication sweep (GQA ratio heads/kv)")
    parser.add_argument("--comm-seq", type=int, default=1024,
                        help="sequence length of the communication sweep")
    parser.add_argument("--out", default=str(RESULTS / "bench_sequence_parallel.json"))
    args = parse_experiment_args(parser, argv)
    on_cpu = jax.devices()[0].platform == "cpu"
    if args.quick:
        args.seq_lens = args.seq_lens or [256]
        args.heads, args.kv_heads, args.head_dim = 4, 4, 32
        args.devices = args.devices or 4
        args.reps = min(args.reps, 3)
        args.comm_devices, args.comm_kv_heads, args.comm_seq = [4], [4, 1], 64
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
    comm_rows = communication_sweep(args)
    print_table(comm_rows, ["devices", "heads", "kv_heads", "gqa", "seq", "impl", "comm_elements",
                            "hlo_comm_elements", "hlo_vs_formula", "comm_MB", "vs_megatron_sp",
                            "hlo_collectives"])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"experiment": "bench_sequence_parallel", **settings, **environment(),
              "num_devices": p, "rows": rows, "comm_rows": comm_rows}
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
    return record


if __name__ == "__main__":
    main()
