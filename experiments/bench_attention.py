"""Attention speed: forward and forward+backward time and TFLOP/s of every implementation, one run.

    python -m experiments.bench_attention            # GPU: S 512..16K, D 64/128, bfloat16
    python -m experiments.bench_attention --quick    # seconds on a CPU (no Pallas: our_impls)

Implementations, all on the same inputs in the same process:
  xla, pallas, reference   kernels_pallas.flash_attention(backend=...) (pallas runs in interpret
                           mode on CPU: it measures the interpreter, not a kernel)
  jax_nn_xla               jax.nn.dot_product_attention(implementation="xla")
  jax_nn_cudnn             jax.nn.dot_product_attention(implementation="cudnn") (GPU only)
  jax_pallas_mha           jax.experimental.pallas.ops.gpu.attention.mha (Triton; GPU only)
  pallas_mgpu              flash_attention(backend="pallas_mgpu"): our Mosaic GPU (Hopper) forward
                           with its default tiles (two consumer warpgroups + a TMA producer), Triton
                           backward (GPU only: interpreted on a CPU it takes seconds a tile)
  pallas_mgpu_1wg          the same kernel with one warpgroup issuing its own copies (GPU only)
  pallas_mgpu_mosaic_bwd   pallas_mgpu's default forward with the Mosaic GPU backward
                           (pallas_mgpu_bwd.py, two consumer warpgroups) in place of the Triton
                           one (fwd_bwd rows only; GPU only)
  pallas_mgpu_mosaic_bwd_1wg  the same with one warpgroup per backward program
  jax_mgpu                 jax.experimental.pallas.ops.gpu.attention_mgpu (jax's FlashAttention-3
                           in Mosaic GPU; GPU only): the peer that says what Mosaic can reach. It
                           takes float16 only (jax 0.10): its inputs are cast before timing (the
                           same tensor-core rate as bfloat16); no causal backward there

Shapes follow FlashAttention-2's benchmark: batch x S = 16K tokens and Hq = 2048 / D heads on a
GPU (smaller on CPU). FLOPs count the matmuls a dense kernel would do on the visible part of the
score matrix: forward 4·B·H·S²·D (halved, exactly (S+1)/2S, when causal), forward+backward 3.5x
that (FA2's convention: the backward does 5 matmuls to the forward's 2). Every implementation is
credited with the same count, so TFLOP/s ratios are speed ratios. ``speedup_vs_<peer>`` is
time(peer) / time(impl) on the same row settings, for each peer that ran: jax_nn_xla,
jax_nn_cudnn, jax_pallas_mha and jax_mgpu. A failed configuration (e.g. out of memory for
the reference at 16K) is recorded with its error and skipped. fwd_bwd programs return the forward
output beside the gradients, as a train step uses both. The JSON is rewritten after every row.

A second table times ``paged_decode_attention`` (one query token per sequence over a shuffled page
table) for xla, pallas and reference, against ``jax.nn.dot_product_attention`` on the same context
stored contiguously, and reports the K/V bytes read per second next to a streaming copy's
bandwidth measured in the same run (the issue's target: >= 80% of it on a GPU). --no-paged skips it.

A third table times one prefill-heavy serving step (a long prompt chunk starting mid-context
next to a batch of decodes, shuffled pages) two ways for xla and pallas: ``ragged_paged_attention``
(each sequence's pages read once per query block) against the engine's per-token path,
``jaxinfer.models.attention.paged_attention`` with ``PagedBatch.ragged`` False (one decode per token
over its sequence's pages, ``paged_decode_attention`` with per-token page rows);
``speedup_vs_per_token`` is time(per-token) / time(ragged) for the same backend. --no-ragged skips
it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (RESULTS, add_speedups, copy_bandwidth, environment, error_text,
                                parse_experiment_args, plot_curves, print_table, record_timing,
                                time_calls, with_backward, write_json)
from jaxinfer.models.attention import paged_attention
from jaxinfer.models.paged_kv import PagedBatch, PagedLayerKV
from kernels_pallas import flash_attention, paged_decode_attention, ragged_paged_attention
from kernels_pallas.attention import DEFAULT_BLOCK_SIZES, BlockSizes

OURS = ("xla", "pallas", "reference")
# Our Mosaic GPU variants: name -> flash_attention options (block_sizes None: the table's default).
MGPU_VARIANTS = {
    "pallas_mgpu": {},
    "pallas_mgpu_1wg": {"block_sizes": BlockSizes(block_q=64, block_k=64, block_q_bwd=64,
                                                   block_k_bwd=64, num_stages=2,
                                                   num_consumers=1)},
    "pallas_mgpu_mosaic_bwd": {"block_sizes": dataclasses.replace(
        DEFAULT_BLOCK_SIZES["pallas_mgpu"], mgpu_backward="mosaic")},
    "pallas_mgpu_mosaic_bwd_1wg": {"block_sizes": dataclasses.replace(
        DEFAULT_BLOCK_SIZES["pallas_mgpu"], mgpu_backward="mosaic", num_consumers_bwd=1)},
}
# Variants that differ from pallas_mgpu only in the backward: no forward rows of their own.
BACKWARD_ONLY = ("pallas_mgpu_mosaic_bwd", "pallas_mgpu_mosaic_bwd_1wg")


def our_impls(args) -> tuple[str, ...]:
    """OURS, less Pallas in a --quick run on a CPU: interpret mode times the interpreter, not a
    kernel, and its programs are the run's slowest compiles."""
    if args.quick and jax.default_backend() != "gpu":
        return tuple(impl for impl in OURS if impl != "pallas")
    return OURS


def time_into(row: dict, fn, inputs, reps: int) -> float | None:
    """Time fn(*inputs) into row (median, min and max ms) -> the median in seconds; a failure
    (out of memory, an unsupported shape...) is recorded in row["error"] and gives None."""
    try:
        times = time_calls(fn, inputs, reps)
    except Exception as e:  # noqa: BLE001
        row["error"] = error_text(e)
        return None
    return record_timing(row, times)


def attention_fn(impl: str, causal: bool, **options):
    """(q, k, v) -> out for one implementation name (see the module docstring)."""
    if impl in OURS:
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=impl, **options)
    if impl in MGPU_VARIANTS:
        options = {**MGPU_VARIANTS[impl], **options}
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="pallas_mgpu",
                                               **options)
    if impl == "jax_mgpu":
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        # its backward (non-causal only in jax 0.10) needs the backward tiles set
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                             causal=causal, block_q_dkv=64, block_kv_dkv=64,
                                             block_q_dq=64, block_kv_dq=64)
        return lambda q, k, v: attention_mgpu.attention(q, k, v, config)
    if impl.startswith("jax_nn_"):
        which = impl.removeprefix("jax_nn_")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation=which, **options)
    if impl == "jax_pallas_mha":
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        def mha(q, k, v):
            return pallas_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5,
                                        causal=causal)
        return mha
    raise ValueError(f"unknown implementation {impl!r}")


def attention_flops(batch: int, heads: int, t: int, s: int, d: int, causal: bool, mode: str):
    visible = t * s if not causal else t * (t + 1) // 2 + t * (s - t)
    fwd = 4.0 * batch * heads * visible * d
    return fwd if mode == "fwd" else 3.5 * fwd


def default_impls(platform: str) -> list[str]:
    impls = ["xla", "pallas", "reference", "jax_nn_xla"]
    if platform == "gpu":
        impls += ["jax_nn_cudnn", "jax_pallas_mha", *MGPU_VARIANTS, "jax_mgpu"]
    return impls


def bench_paged(args, rng, gpu: bool) -> tuple[list[dict], float]:
    """Paged decode rows (ms, K/V GB/s, fraction of the streaming bandwidth) and that bandwidth."""
    batch, hq, hkv, d, page, ctx = ((8, 32, 8, 128, 16, 8192) if gpu else
                                    (4, 8, 2, 64, 16, 2048))
    if args.quick:
        batch, ctx = 2, 256
    dtype = jnp.dtype(args.dtype)
    pages_per_seq = ctx // page
    num_pages = batch * pages_per_seq
    shape = (num_pages, page, hkv, d)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((batch, hq, d)), dtype)
    table = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq), jnp.int32)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    kv_bytes = 2 * batch * ctx * hkv * d * dtype.itemsize
    # The same context, contiguous, for the dense peer: [batch, ctx, Hkv, D].
    k_dense, v_dense = (x[table].reshape(batch, ctx, hkv, d) for x in (k_pages, v_pages))

    stream_gbps = copy_bandwidth((k_pages, v_pages), args.reps) / 1e9  # kv_bytes read, written
    runs = {impl: (jax.jit(lambda q, k, v, t, n, impl=impl: paged_decode_attention(
        q, k, v, t, n, backend=impl)), (q, k_pages, v_pages, table, lengths))
        for impl in our_impls(args)}
    runs["jax_nn_xla_dense"] = (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q[:, None], k, v, implementation="xla")[:, 0]), (q, k_dense, v_dense))
    rows = []
    for impl, (fn, inputs) in runs.items():
        row = {"impl": impl, "batch": batch, "Hq": hq, "Hkv": hkv, "D": d, "page_size": page,
               "context": ctx}
        rows.append(row)
        med = time_into(row, fn, inputs, args.reps)
        if med is not None:
            row.update(kv_GBps=kv_bytes / med / 1e9,
                       frac_of_stream=kv_bytes / med / 1e9 / stream_gbps)
    add_speedups(rows, (), ["jax_nn_xla_dense"])  # one peer for every row
    return rows, stream_gbps


def bench_ragged(args, rng, gpu: bool) -> list[dict]:
    """One mixed step: a prompt chunk of `chunk` tokens ending at position `ctx` plus `decodes`
    one-token sequences at context `ctx`; ragged vs per-token rows for xla and pallas."""
    hq, hkv, d, page, chunk, decodes, ctx = ((32, 8, 128, 16, 512, 32, 4096) if gpu else
                                             (8, 2, 64, 16, 128, 4, 512))
    if args.quick:
        chunk, decodes, ctx = 32, 2, 128
    dtype = jnp.dtype(args.dtype)
    s, pages_per_seq = 1 + decodes, ctx // page
    num_pages = s * pages_per_seq
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((num_pages, page, hkv, d)), dtype)
                        for _ in range(2))
    q_lens = np.array([chunk] + [1] * decodes)
    t = int(q_lens.sum())
    q = jnp.asarray(rng.standard_normal((t, hq, d)), dtype)
    table = rng.permutation(num_pages).reshape(s, pages_per_seq).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_lengths = np.full(s, ctx, np.int32)
    kv = PagedLayerKV(k_pages, v_pages)
    # The engine's per-token path: the same sequences, each token a decode (no K/V written here).
    per_token = PagedBatch(positions=None, write_slots=None, page_table=jnp.asarray(table),
                           query_starts=jnp.asarray(starts), kv_lengths=jnp.asarray(kv_lengths),
                           num_seqs=jnp.int32(s), ragged=False)
    rows = []
    outputs = {}
    for impl in [impl for impl in ("xla", "pallas") if impl in our_impls(args)]:
        runs = {"ragged": (jax.jit(lambda q, k, v, tb, st, n, impl=impl: ragged_paged_attention(
                    q, k, v, tb, st, n, backend=impl)),
                    (q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(starts),
                     jnp.asarray(kv_lengths))),
                "per_token": (jax.jit(lambda q, kv, meta, impl=impl: paged_attention(
                    q, kv, meta, backend=impl)), (q, kv, per_token))}
        for path, (fn, inputs) in runs.items():
            row = {"impl": impl, "path": path, "chunk": chunk, "decodes": decodes,
                   "context": ctx, "Hq": hq, "Hkv": hkv, "D": d, "page_size": page}
            rows.append(row)
            if time_into(row, fn, inputs, args.reps) is not None:
                outputs[impl, path] = np.asarray(fn(*inputs), np.float32)
    add_speedups(rows, ("impl",), ["per_token"], name_field="path")
    for r in rows:
        if "speedup_vs_per_token" in r:
            r["max_abs_diff_vs_per_token"] = float(np.max(np.abs(
                outputs[r["impl"], r["path"]] - outputs[r["impl"], "per_token"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--masks", nargs="+", default=["causal", "full"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--impls", nargs="+", default=None)
    parser.add_argument("--tokens", type=int, default=None, help="batch x S (default 16K on GPU)")
    parser.add_argument("--hidden", type=int, default=None, help="Hq x D (default 2048 on GPU)")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: Hq (no GQA)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-paged", dest="paged", action="store_false",
                        help="skip the paged decode table")
    parser.add_argument("--no-ragged", dest="ragged", action="store_false",
                        help="skip the ragged (mixed prefill/decode step) table")
    parser.add_argument("--out", default=str(RESULTS / "bench_attention.json"))
    args = parse_experiment_args(parser)
    platform = jax.default_backend()
    gpu = platform == "gpu"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.impls = args.impls or [impl for impl in default_impls(platform)
                                if impl not in OURS or impl in our_impls(args)]
    args.seq_lens = args.seq_lens or ([512, 1024, 2048, 4096, 8192, 16384] if gpu
                                      else [256, 512, 1024])
    args.tokens = args.tokens or (16384 if gpu else 1024)
    args.hidden = args.hidden or (2048 if gpu else 256)
    if args.quick:
        args.seq_lens, args.head_dims, args.masks = [256], [64], ["causal"]
        args.tokens, args.hidden, args.reps = 256, 128, 2

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    rows = []
    peers = [p for p in ("jax_nn_xla", "jax_nn_cudnn", "jax_pallas_mha", "jax_mgpu")
             if p in args.impls]
    out = Path(args.out)
    record = {"experiment": "bench_attention", "quick": args.quick, **environment(),
              "settings": vars(args), "flops_convention": "fwd 4*B*H*visible*D; fwd_bwd 3.5x",
              "rows": rows, "paged_decode": {"stream_GBps": None, "rows": []},
              "ragged_step": {"rows": []}, "png": None}

    def save() -> None:  # after every row: a run killed by a timeout keeps what it measured
        add_speedups(rows, ("mask", "D", "S", "mode"), peers)
        write_json(record, out)

    for mask in args.masks:
        causal = mask == "causal"
        for d in args.head_dims:
            for s in args.seq_lens:
                batch, heads = max(1, args.tokens // s), max(1, args.hidden // d)
                kv_heads = args.kv_heads or heads
                q, k, v, ct = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in (
                    (batch, s, heads, d), (batch, s, kv_heads, d), (batch, s, kv_heads, d),
                    (batch, s, heads, d)))
                for mode in args.modes:
                    for impl in args.impls:
                        if mode == "fwd" and impl in BACKWARD_ONLY:
                            continue  # pallas_mgpu's forward kernel: timed in that row
                        row = {"mask": mask, "D": d, "S": s, "batch": batch, "heads": heads,
                               "mode": mode, "impl": impl}
                        inputs = (q, k, v) if mode == "fwd" else (q, k, v, ct)
                        if impl == "jax_mgpu":  # its shared-memory tiles are float16 (jax 0.10)
                            inputs = tuple(x.astype(jnp.float16) for x in inputs)
                        rows.append(row)
                        try:  # building a peer may fail too (a jax version's changed API)
                            attend = attention_fn(impl, causal)
                            fn = jax.jit(attend if mode == "fwd" else with_backward(attend))
                            times = time_calls(fn, inputs, args.reps)
                        except Exception as e:  # noqa: BLE001  (OOM, unsupported shape...)
                            row["error"] = error_text(e)
                            print(f"skipped {impl} {mask} D={d} S={s} {mode}: {row['error']}")
                            save()
                            continue
                        med = record_timing(row, times)
                        flops = attention_flops(batch, heads, s, s, d, causal, mode)
                        row["tflops"] = flops / med / 1e12
                        save()
    columns = ["mask", "D", "S", "mode", "impl", "median_ms", "min_ms", "max_ms", "tflops"]
    print_table(rows, columns + [f"speedup_vs_{p}" for p in peers])
    paged_rows, stream_gbps = bench_paged(args, rng, gpu) if args.paged else ([], None)
    record["paged_decode"] = {"stream_GBps": stream_gbps, "rows": paged_rows}
    save()
    if paged_rows:
        print(f"\npaged decode (streaming copy: {stream_gbps:.3g} GB/s)")
        print_table(paged_rows, ["impl", "batch", "Hq", "Hkv", "D", "page_size", "context",
                                 "median_ms", "min_ms", "max_ms", "kv_GBps", "frac_of_stream",
                                 "speedup_vs_jax_nn_xla_dense"])
    ragged_rows = bench_ragged(args, rng, gpu) if args.ragged else []
    record["ragged_step"] = {"rows": ragged_rows}
    save()
    if ragged_rows:
        print("\nmixed step: ragged_paged_attention vs one decode per token (the engine's paths)")
        print_table(ragged_rows, ["impl", "path", "chunk", "decodes", "context", "median_ms",
                                  "min_ms", "max_ms", "speedup_vs_per_token",
                                  "max_abs_diff_vs_per_token"])
    if not gpu and "pallas" in args.impls:
        print("note: pallas ran in interpret mode on CPU; its times measure the interpreter")

    mask, d, mode = args.masks[0], args.head_dims[-1], args.modes[-1]
    curves = {}
    for impl in args.impls:
        pts = [(r["S"], r["tflops"]) for r in rows if r["impl"] == impl and r["mask"] == mask
               and r["D"] == d and r["mode"] == mode and "tflops" in r]
        if pts:
            curves[impl] = ([p[0] for p in pts], [p[1] for p in pts])
    png = plot_curves(curves, xlabel="sequence length S", ylabel="TFLOP/s",
                      title=f"{mask} attention {mode}, D={d}, {args.dtype}",
                      out=out.with_suffix(".png"))
    record["png"] = str(png)
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
