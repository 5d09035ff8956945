"""Tile and launch settings of the Pallas attention kernels, swept on one card in one run.

    python -m experiments.tune_attention            # GPU: S = 4096, D = 128, bfloat16, causal
    python -m experiments.tune_attention --quick    # seconds on a CPU (interpret mode: checks the
                                                    # sweep runs and stays correct, times nothing)

Three tables: forward variants (block_q x block_k, warps, stages), backward variants (dk/dv tiles,
dq tiles, warps, stages; timed as forward + backward with the default forward) and paged decode
variants (pages per step, context splits). Every variant's result is checked against
``backend="reference"`` on the same inputs (``max_rel_err``) before it is timed, so a fast but
wrong setting shows. The winner of each table is what ``tiling.DEFAULT_BLOCK_SIZES`` and the paged
defaults should hold; the peer in the same run is cuDNN (``jax.nn.dot_product_attention``) on GPU.
The JSON is rewritten after every variant, so a run killed by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (RESULTS, environment, error_text, parse_experiment_args,
                                print_table, record_timing, time_calls, with_backward,
                                write_json)
from kernels_pallas import flash_attention, paged_decode_attention
from kernels_pallas.attention.tiling import default_block_sizes

# (block_q, block_k, num_warps, num_stages) of the forward kernel.
FORWARD = [(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 2), (128, 128, 4, 3),
           (64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 4, 2)]
# (block_q_bwd, block_k_bwd, block_q_dq, block_k_dq, num_warps_bwd, num_stages_bwd).
BACKWARD = [(64, 64, 64, 64, 8, 2), (32, 128, 128, 32, 4, 2), (32, 128, 128, 32, 8, 3),
            (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 4, 3),
            (16, 128, 128, 16, 4, 3)]
# (pages_per_block, splits multiplier of the default).
PAGED = [(None, 1), (4, 1), (8, 1), (16, 1), (None, 2), (None, 4), (8, 2)]


def rel_err(got, want) -> float:
    got, want = (np.asarray(x, np.float64) for x in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def run_variant(row: dict, fn, inputs, want, reps: int) -> dict:
    """Check ``fn(*inputs)`` against ``want``, then time it; errors are recorded, not raised."""
    try:
        got = jax.jit(fn)(*inputs)
        row["max_rel_err"] = max(rel_err(g, w) for g, w in zip(jax.tree.leaves(got),
                                                               jax.tree.leaves(want)))
        times = time_calls(jax.jit(fn), inputs, reps)
    except Exception as e:  # noqa: BLE001  (a setting the compiler rejects, out of resources...)
        row["error"] = error_text(e)
        print(f"failed {row}")
        return row
    record_timing(row, times)
    return row


def add_speedup(rows: list[dict], baseline_ms: float | None) -> None:
    for r in rows:
        if baseline_ms and "median_ms" in r:
            r["speedup_vs_first"] = baseline_ms / r["median_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "tune_attention.json"))
    args = parse_experiment_args(parser)
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    forward, backward, paged = FORWARD, BACKWARD, PAGED
    if args.quick or not gpu:
        args.seq_len, args.batch, args.heads, args.head_dim, args.reps = 64, 1, 2, 32, 1
        forward, backward, paged = FORWARD[:2], BACKWARD[:2], PAGED[:2]
    s, batch = args.seq_len or 4096, args.batch or 4
    h, d = args.heads, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((batch, s, h, d)), dtype) for _ in range(4))
    base = default_block_sizes("pallas", d)

    def attend(blocks, backend="pallas"):
        return lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend,
                                               block_sizes=blocks)

    fwd_rows, bwd_rows, paged_rows = [], [], []
    out = Path(args.out)
    record = {"experiment": "tune_attention", "quick": args.quick, **environment(),
              "settings": dict(seq_len=s, batch=batch, heads=h, head_dim=d,
                               dtype=jnp.dtype(dtype).name, reps=args.reps, causal=True),
              "forward": fwd_rows, "backward": bwd_rows, "paged_decode": paged_rows}

    def add(rows: list[dict], row: dict) -> None:  # a killed run keeps the variants it timed
        rows.append(row)
        write_json(record, out)

    want_fwd = jax.jit(attend(None, "reference"))(q, k, v)
    for bq, bk, warps, stages in forward:
        blocks = dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=warps,
                                     num_stages=stages)
        row = dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
        add(fwd_rows, run_variant(row, attend(blocks), (q, k, v), want_fwd, args.reps))
    want_bwd = jax.jit(with_backward(attend(None, "reference")))(q, k, v, ct)
    for bq, bk, bq_dq, bk_dq, warps, stages in backward:
        blocks = dataclasses.replace(base, block_q_bwd=bq, block_k_bwd=bk, block_q_dq=bq_dq,
                                     block_k_dq=bk_dq, num_warps_bwd=warps, num_stages_bwd=stages)
        row = dict(dkv=f"{bq}x{bk}", dq=f"{bq_dq}x{bk_dq}", num_warps=warps, num_stages=stages)
        add(bwd_rows, run_variant(row, with_backward(attend(blocks)), (q, k, v, ct), want_bwd,
                                  args.reps))
    if gpu:
        for name, rows, fn, inputs in (
                ("fwd", fwd_rows, lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn"), (q, k, v)),
                ("fwd_bwd", bwd_rows, with_backward(lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn")), (q, k, v, ct))):
            peer = run_variant({"peer": "cudnn", "mode": name}, fn, inputs,
                               want_fwd if name == "fwd" else want_bwd, args.reps)
            for r in rows:
                if "median_ms" in r and "median_ms" in peer:
                    r["speedup_vs_cudnn"] = peer["median_ms"] / r["median_ms"]
    for rows in (fwd_rows, bwd_rows):
        add_speedup(rows, rows[0].get("median_ms"))

    # Paged decode: batch 8, Hq 32, Hkv 8, pages of 16, context 8192 on GPU.
    pb, hq, hkv, page, ctx = (8, 32, 8, 16, 8192) if gpu else (2, 4, 2, 16, 128)
    pages_per_seq = ctx // page
    kp, vp = (jnp.asarray(rng.standard_normal((pb * pages_per_seq, page, hkv, d)), dtype)
              for _ in range(2))
    qd = jnp.asarray(rng.standard_normal((pb, hq, d)), dtype)
    table = jnp.asarray(rng.permutation(pb * pages_per_seq).reshape(pb, pages_per_seq), jnp.int32)
    lengths = jnp.full((pb,), ctx, jnp.int32)
    from kernels_pallas.attention.paged_pallas_gpu import default_num_splits
    splits0 = default_num_splits(pb, hkv, pages_per_seq)
    want_paged = paged_decode_attention(qd, kp, vp, table, lengths, backend="reference")
    kv_bytes = 2 * kp.size * kp.dtype.itemsize
    for ppb, mult in paged:
        row = dict(pages_per_block=ppb or "default", num_splits=splits0 * mult)
        fn = (lambda q, k, v, t, n, ppb=ppb, splits=splits0 * mult: paged_decode_attention(
            q, k, v, t, n, backend="pallas", num_splits=splits, pages_per_block=ppb))
        row = run_variant(row, fn, (qd, kp, vp, table, lengths), want_paged, args.reps)
        if "median_ms" in row:
            row["kv_GBps"] = kv_bytes / row["median_ms"] / 1e6
        add(paged_rows, row)
    add_speedup(paged_rows, paged_rows[0].get("median_ms"))

    timing = ["median_ms", "min_ms", "max_ms", "speedup_vs_first", "max_rel_err"]
    print(f"forward, causal, S={s}, batch={batch}, heads={h}, D={d}, {jnp.dtype(dtype).name}")
    print_table(fwd_rows, ["block_q", "block_k", "num_warps", "num_stages", *timing,
                           "speedup_vs_cudnn"])
    print("\nforward + backward (default forward)")
    print_table(bwd_rows, ["dkv", "dq", "num_warps", "num_stages", *timing, "speedup_vs_cudnn"])
    print(f"\npaged decode, batch={pb}, Hq={hq}, Hkv={hkv}, page={page}, context={ctx}")
    print_table(paged_rows, ["pages_per_block", "num_splits", *timing, "kv_GBps"])
    if not gpu:
        print("note: interpret mode on CPU: the times measure the interpreter, not a kernel")
    print(f"wrote {write_json(record, out)}")


if __name__ == "__main__":
    main()
