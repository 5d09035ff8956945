"""ragged_paged_attention: every backend (the TPU kernel interpreted) against dense float64
attention per token, the block layout, agreement with paged_decode_attention on decode-only steps,
bad inputs, and the Triton and Mosaic lowerings."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import paged_decode_attention, ragged_paged_attention
from kernels_pallas.attention import (checks, paged_pallas_tpu, ragged_blocks, ragged_pallas_gpu,
                                      ragged_pallas_tpu)
from tests.kernels_pallas.attention_cases import TOLS, rel_err
from tests.kernels_pallas.paged_cases import (assert_lse_matches, fake_gpu_without_triton, poison,
                                              poisoned_pages, quantize_pages, used_slots)

# Tolerances: TOLS (relative to the largest output entry). float32: the xla and pallas paths fold
# the keys into an online softmax chunk by chunk while the oracle sums them at once in float64;
# measured <= 9e-7 (int8 pages included: both sides attend over values * scales; the TPU kernel
# folds page by page, <= 5e-7), so 1e-5 keeps 10x headroom, while one wrongly masked key moves an
# output by ~1/context (> 1e-2 here). bfloat16: q, K, V and P enter the matmuls in bf16 and the
# output is rounded to bf16 (2^-9), measured <= 3.3e-3 on every backend, under 1.5e-2. lse is
# float32 on every path: LSE_ATOL (measured <= 7e-7).


@dataclasses.dataclass(frozen=True)
class RaggedCase:
    name: str
    hq: int
    hkv: int
    d: int
    page_size: int
    pages_per_seq: int
    q_lens: tuple[int, ...]  # per sequence; 0: a sequence with nothing to compute this step
    dtype: str = "float32"
    padding: int = 0  # tokens past the last sequence's (owned by none)
    num_seqs: int | None = None  # sequences past it are padding: their entries are garbage
    int8: bool = False


# Mixed decode (q_len 1) and prefill chunks of odd lengths, chunks starting mid-context (kv_len
# drawn in [q_len, capacity]), a zero-length sequence, padding tokens, num_seqs < S, GQA 1/2/4 and
# MQA, D 64 and 128, page sizes 4 and 16, shuffled page tables, float32, bfloat16 and int8 pages.
CASES = [
    RaggedCase("gqa2_f32_pages4_mixed", hq=4, hkv=2, d=64, page_size=4, pages_per_seq=12,
               q_lens=(1, 5, 0, 17, 1), padding=3),
    RaggedCase("mha_bf16_d128_pages16", hq=2, hkv=2, d=128, page_size=16, pages_per_seq=4,
               q_lens=(33, 1, 1, 5), dtype="bfloat16"),
    RaggedCase("gqa4_f32_num_seqs_padding", hq=8, hkv=2, d=64, page_size=16, pages_per_seq=3,
               q_lens=(17, 1, 5, 9, 4), padding=2, num_seqs=3),
    RaggedCase("mqa_int8_f32_pages4", hq=4, hkv=1, d=64, page_size=4, pages_per_seq=10,
               q_lens=(5, 1, 33, 1), int8=True),
]

# Runs of the backends. Small blocks force several query blocks per sequence and several KV
# steps (and for pallas both the unmasked and the masked loop); the defaults run too. The Triton
# kernel runs interpreted (~4 s a call here), so it covers the cases that add kernel features:
# small pages and blocks, D 128 with bf16, MQA with int8 pages, padding with num_seqs.
SMALL_BLOCKS = {"block_q": 4, "pages_per_block": 2}
XLA_RUNS = [(backend, options, case) for case in CASES
            for backend, options in (("reference", {}), ("xla", SMALL_BLOCKS))]
XLA_RUNS += [("xla", {}, case) for case in CASES[1::2]]
PALLAS_RUNS = [(CASES[0], {"block_q": 4, "pages_per_block": 1}), (CASES[1], {}),
               (CASES[2], {"block_q": 2, "pages_per_block": 1}), (CASES[3], {})]
# The Mosaic kernel runs interpreted (~3-5 s a call here, growing with grid steps and page slots),
# so three calls cover its features: GQA 4 with D 64 (two KV heads in one lane block: block-diagonal
# queries) and int8 pages (scale columns picked per head), MHA with D 128 (one head per lane block,
# two blocks) in bfloat16, page sizes 8 and 16, several query blocks per sequence and several page
# steps (a ragged last one, steps past a block's causal limit skipped), num_seqs < S with garbage
# entries past it, padding tokens, the default block_q and pages_per_block, and blocks run in
# chunks (a table budget of 16 entries: 2 calls of 4 blocks' rows, one of them padding).
TPU_CASES = [
    RaggedCase("gqa4_int8_f32_d64_pages8_num_seqs", hq=8, hkv=2, d=64, page_size=8,
               pages_per_seq=5, q_lens=(1, 11, 1, 6, 3), padding=3, num_seqs=4, int8=True),
    RaggedCase("mha_bf16_d128_pages16", hq=2, hkv=2, d=128, page_size=16, pages_per_seq=4,
               q_lens=(1, 21, 1, 6), dtype="bfloat16"),
]
TPU_RUNS = [  # (case, options, table entries per call: None = the default)
    (TPU_CASES[0], {"block_q": 4, "pages_per_block": 2}, None),
    (TPU_CASES[1], {"block_q": 8, "pages_per_block": 3}, 16),
    (CASES[2], {}, None),
]


def make_inputs(case: RaggedCase, seed: int = 0):
    """-> (q, k_pages, v_pages, page_table, query_starts, kv_lengths) and the scales kwargs."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    s = len(case.q_lens)
    capacity = case.page_size * case.pages_per_seq
    t = sum(case.q_lens) + case.padding
    starts = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    kv_lengths = np.array([rng.integers(n, capacity + 1) for n in case.q_lens], np.int32)
    if case.num_seqs is not None:  # what follows num_seqs must not matter: make it garbage
        starts[case.num_seqs + 1:] = rng.integers(0, t + 1, size=s - case.num_seqs)
        kv_lengths[case.num_seqs:] = 0
    num_pages = s * case.pages_per_seq + 7
    table = rng.permutation(num_pages)[:s * case.pages_per_seq].reshape(s, case.pages_per_seq)
    if case.num_seqs is not None:
        table[case.num_seqs:] = -1  # out of range: never read
    q = jnp.asarray(rng.standard_normal((t, case.hq, case.d)), dt)
    shape = (num_pages, case.page_size, case.hkv, case.d)
    k_pages, v_pages = (rng.standard_normal(shape) for _ in range(2))
    scales = {}
    if case.int8:
        (k_pages, ks), (v_pages, vs) = quantize_pages(k_pages), quantize_pages(v_pages)
        scales = {"k_scales": ks, "v_scales": vs}
    else:
        k_pages, v_pages = jnp.asarray(k_pages, dt), jnp.asarray(v_pages, dt)
    arrays = (q, k_pages, v_pages, jnp.asarray(table, jnp.int32), jnp.asarray(starts),
              jnp.asarray(kv_lengths))
    return arrays, scales


def dense_oracle(q, k_pages, v_pages, table, starts, kv_lengths, num_seqs, scales, window=None):
    """float64 numpy, token by token: query i of sequence s attends over the first
    kv_len - q_len + i + 1 keys of its gathered pages (with a window only the last window + 1 of
    them); tokens of no real sequence: 0 and -inf."""
    k_pages, v_pages = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                        for x in (k_pages, v_pages))
    if scales:
        k_pages = k_pages * np.asarray(scales["k_scales"], np.float64)[..., None]
        v_pages = v_pages * np.asarray(scales["v_scales"], np.float64)[..., None]
    q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
    t, hq, d = q.shape
    groups = hq // k_pages.shape[2]
    out, lse = np.zeros((t, hq, d)), np.full((t, hq), -np.inf)
    for s in range(len(kv_lengths) if num_seqs is None else num_seqs):
        k = np.concatenate([k_pages[p] for p in np.asarray(table[s])])  # [capacity, Hkv, D]
        v = np.concatenate([v_pages[p] for p in np.asarray(table[s])])
        first, q_len = int(starts[s]), int(starts[s + 1] - starts[s])
        for i in range(q_len):
            keys = int(kv_lengths[s]) - q_len + i + 1
            lo = 0 if window is None else max(0, keys - 1 - window)
            for h in range(hq):
                scores = k[lo:keys, h // groups] @ q[first + i, h] * d ** -0.5
                w = np.exp(scores - scores.max())
                out[first + i, h] = w @ v[lo:keys, h // groups] / w.sum()
                lse[first + i, h] = scores.max() + np.log(w.sum())
    return out, lse


def check_against_oracle(case: RaggedCase, backend: str, options: dict) -> None:
    arrays, scales = make_inputs(case)
    run = jax.jit(functools.partial(ragged_paged_attention, backend=backend, return_lse=True,
                                    num_seqs=case.num_seqs, **options))
    out, lse = run(*arrays, **scales)
    ref_out, ref_lse = dense_oracle(*arrays, case.num_seqs, scales,
                                    window=options.get("local_window"))
    q = arrays[0]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:2]
    assert rel_err(out, ref_out) < TOLS[case.dtype]
    padding = np.isinf(ref_lse[:, 0])
    assert np.all(np.asarray(out, np.float32)[padding] == 0)  # padding tokens: zeros, not NaN
    assert_lse_matches(lse, ref_lse)


@pytest.mark.parametrize("backend,options,case", XLA_RUNS,
                         ids=[f"{b}-{'-'.join(map(str, o.values()))}-{c.name}"
                              for b, o, c in XLA_RUNS])
def test_matches_dense_attention_per_token(backend, options, case):
    check_against_oracle(case, backend, options)


@pytest.mark.parametrize("case,options", PALLAS_RUNS, ids=[c.name for c, _ in PALLAS_RUNS])
def test_pallas_kernel_matches_dense_attention_per_token(case, options):
    check_against_oracle(case, "pallas", options)


@pytest.mark.parametrize("case,options,table_budget", TPU_RUNS,
                         ids=[c.name for c, *_ in TPU_RUNS])
def test_tpu_kernel_matches_dense_attention_per_token(case, options, table_budget, monkeypatch):
    if table_budget is not None:
        monkeypatch.setattr(paged_pallas_tpu, "MAX_TABLE_ENTRIES", table_budget)
    check_against_oracle(case, "pallas_tpu", options)


# Sliding windows: query at position p sees keys p - w .. p. Windows 0 (its own key), 3 (under a
# page of 4), 13 and 30 (no multiple of the page or the blocks) and 40 (longer than most chunk
# starts: with 16-token pallas steps, some steps lie wholly inside every query's window and run
# unmasked); the cases' kv lengths are drawn in [q_len, capacity], so windows fall both short of
# and beyond each sequence's context, over chunks, decodes, GQA 2/4, MQA, int8 and num_seqs.
WINDOW_RUNS = [(backend, {**options, "local_window": w}, case)
               for case, w in ((CASES[0], 0), (CASES[0], 13), (CASES[2], 30), (CASES[3], 3),
                               (CASES[1], 40))
               for backend, options in (("reference", {}), ("xla", SMALL_BLOCKS), ("xla", {}))]
WINDOW_RUNS += [("pallas", {"block_q": 4, "pages_per_block": 1, "local_window": 3}, CASES[0]),
                ("pallas", {"block_q": 4, "pages_per_block": 1, "local_window": 40}, CASES[0]),
                ("pallas", {"local_window": 13}, CASES[3]),
                ("pallas", {"block_q": 2, "pages_per_block": 1, "local_window": 30}, CASES[2]),
                ("pallas_tpu", {"block_q": 4, "pages_per_block": 2, "local_window": 6},
                 TPU_CASES[0]),
                ("pallas_tpu", {"local_window": 13}, CASES[2])]


@pytest.mark.parametrize("backend,options,case", WINDOW_RUNS,
                         ids=[f"{b}-{'-'.join(map(str, o.values()))}-{c.name}"
                              for b, o, c in WINDOW_RUNS])
def test_local_window_matches_dense_attention_over_each_tokens_window(backend, options, case):
    check_against_oracle(case, backend, options)


# The Triton and Mosaic kernels walk a block's pages from the one holding its first query's window
# start (xla walks chunks from the batch's earliest window, zeroing V rows before each block's
# window); the keys before it, and past each sequence's kv_length, are NaN or +-Inf (a walk starting
# a page late loses keys, a mask or V zeroing that misses one lets NaN in). Page 8 (2-page steps at
# least, so most walks are not step-aligned), 16 pages a row (a power of two: the table has no
# padding but what a walk from the row's last page needs); decodes at lengths 1, 8 (a page's end)
# and 128 (the capacity), chunks of 5, 9 and 20 tokens starting at a page's start (32), mid-page
# (21) and at 0, an empty sequence; windows under a page (3), of exactly one page's keys (7) and
# spanning blocks (20); GQA 4; float32 and int8 pages; block_q 4 (several blocks per chunk, each
# with its own window start) and the defaults.
WINDOW_GARBAGE_Q_LENS = (1, 5, 1, 9, 0, 20, 1)
WINDOW_GARBAGE_KV_LENGTHS = (1, 37, 8, 30, 0, 20, 128)
WINDOW_GARBAGE_RUNS = [  # (backend, options, window, int8)
    ("pallas", {"block_q": 4, "pages_per_block": 1}, 3, True),
    ("pallas", {"block_q": 4, "pages_per_block": 2}, 7, False),
    ("pallas", {}, 20, False),
    ("pallas_tpu", {"block_q": 4, "pages_per_block": 2}, 7, True),
    ("xla", {"block_q": 4, "pages_per_block": 2}, 7, True),
    ("xla", {}, 20, False),
]


@pytest.mark.parametrize("backend,options,window,int8", WINDOW_GARBAGE_RUNS)
def test_backends_ignore_nan_and_inf_before_every_window(backend, options, window, int8):
    rng = np.random.default_rng(window)
    page_size, pages_per_seq, hq, hkv, d = 8, 16, 8, 2, 32
    q_lens, kv_lengths = np.array(WINDOW_GARBAGE_Q_LENS), np.array(WINDOW_GARBAGE_KV_LENGTHS)
    num_pages = len(q_lens) * pages_per_seq + 3
    table = rng.permutation(num_pages)[:len(q_lens) * pages_per_seq].reshape(len(q_lens), -1)
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(starts[-1]), hq, d)), jnp.float32)
    k_pages, v_pages = (rng.standard_normal((num_pages, page_size, hkv, d)) for _ in range(2))
    # The keys some query sees: from the first query's window start to the kv_length.
    seen = np.zeros((num_pages, page_size), bool)
    for row, n, first in zip(table, kv_lengths, kv_lengths - q_lens):
        for p in range(max(0, first - window), n):
            seen[row[p // page_size], p % page_size] = True
    clean, dirty = poisoned_pages(k_pages, v_pages, seen, int8)

    def attend(k, v, scales, backend, **options):
        return jax.jit(functools.partial(ragged_paged_attention, backend=backend,
                                         return_lse=True, local_window=window, **options))(
            q, k, v, table, starts, kv_lengths, **scales)

    out, lse = attend(*dirty, backend, **options)
    ref_out, ref_lse = attend(*clean, "reference")
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, np.asarray(ref_out)) < TOLS["float32"]
    assert_lse_matches(lse, ref_lse)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas", "pallas_tpu"])
def test_traced_kv_lengths_past_the_capacity_are_clipped_to_it(backend):
    """Under jit nothing checks kv_lengths; one past the table would start a windowed walk past
    the table's end (an out-of-bounds read on a GPU), so it is clipped to the capacity."""
    rng = np.random.default_rng(3)
    page_size, pages_per_seq, hq, hkv, d = 8, 4, 4, 2, 16
    table = rng.permutation(12)[:8].reshape(2, pages_per_seq)
    starts = np.array([0, 3, 4], np.int32)
    q = jnp.asarray(rng.standard_normal((4, hq, d)), jnp.float32)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((12, page_size, hkv, d)), jnp.float32)
                        for _ in range(2))
    run = jax.jit(functools.partial(ragged_paged_attention, backend=backend, local_window=5))
    capacity = pages_per_seq * page_size
    over = run(q, k_pages, v_pages, table, starts, jnp.array([capacity + 24, 9]))
    want = run(q, k_pages, v_pages, table, starts, jnp.array([capacity, 9]))
    np.testing.assert_array_equal(np.asarray(over), np.asarray(want))


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas", "pallas_tpu"])
def test_decode_only_step_equals_paged_decode_attention(backend):
    """Every q_len 1: each token is its sequence's newest, so the ragged call is a batch of
    decodes; paged_decode_attention's reference backend (one gathered context per sequence) must
    agree to float32 rounding."""
    case = RaggedCase("decode_only", hq=4, hkv=1, d=64, page_size=4, pages_per_seq=6,
                      q_lens=(1,) * 5)
    (q, k_pages, v_pages, table, starts, kv_lengths), _ = make_inputs(case, seed=3)
    out = jax.jit(functools.partial(ragged_paged_attention, backend=backend))(
        q, k_pages, v_pages, table, starts, kv_lengths)
    expected = jax.jit(functools.partial(paged_decode_attention, backend="reference"))(
        q, k_pages, v_pages, table, kv_lengths)
    assert rel_err(out, expected) < TOLS["float32"]


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("backend,options", [
    ("reference", {}), ("xla", {"block_q": 2, "pages_per_block": 1}), ("pallas", {}),
    ("pallas_tpu", {"block_q": 2, "pages_per_block": 2})], ids=lambda x: x if isinstance(x, str)
    else "-".join(map(str, x.values())))
def test_nan_and_inf_in_unused_slots_do_not_change_the_output(backend, options, int8):
    """Slots past each sequence's kv_length, pages only an empty sequence or one past num_seqs
    points at, may hold NaN or Inf (a reused page): outputs and lse equal the clean run's
    exactly. Sequence 0 is a 4-token chunk ending mid-page, 1 a decode at length 1, 2 is empty
    and 3 lies past num_seqs (its 2 tokens are padding)."""
    rng = np.random.default_rng(8)
    num_pages, page_size, hq, hkv, d = 10, 8, 4, 2, 16
    table = np.array([[0, 1, 6], [2, 7, 7], [8, 8, 8], [9, 9, 9]], np.int32)
    starts = np.array([0, 4, 5, 5, 7], np.int32)
    kv_lengths = np.array([13, 1, 0, 5], np.int32)
    q = jnp.asarray(rng.standard_normal((7, hq, d)), jnp.float32)
    k_pages, v_pages = (rng.standard_normal((num_pages, page_size, hkv, d)) for _ in range(2))
    used = used_slots(num_pages, page_size, table[:3], kv_lengths[:3])
    run = functools.partial(ragged_paged_attention, backend=backend, num_seqs=3,
                            return_lse=True, **options)
    if int8:  # the scales are what a stale slot poisons
        (k8, ks), (v8, vs) = quantize_pages(k_pages), quantize_pages(v_pages)
        clean = run(q, k8, v8, table, starts, kv_lengths, k_scales=ks, v_scales=vs)
        dirty = run(q, k8, v8, table, starts, kv_lengths, k_scales=poison(ks, used),
                    v_scales=poison(vs, used))
    else:
        k_pages, v_pages = jnp.asarray(k_pages, jnp.float32), jnp.asarray(v_pages, jnp.float32)
        clean = run(q, k_pages, v_pages, table, starts, kv_lengths)
        dirty = run(q, poison(k_pages, used), poison(v_pages, used), table, starts, kv_lengths)
    assert np.isfinite(np.asarray(clean[0])).all()
    for got, expected in zip(dirty, clean):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_traced_num_seqs_serves_every_count_with_one_compilation():
    """num_seqs as a traced scalar: fixed shapes, and the sequences past it (and their tokens)
    turn into padding without recompiling."""
    case = CASES[2]
    arrays, _ = make_inputs(dataclasses.replace(case, num_seqs=None), seed=5)
    run = jax.jit(lambda n, *a: ragged_paged_attention(*a, num_seqs=n, backend="xla"))
    for n in (3, 1, 0):
        out = run(jnp.int32(n), *arrays)
        ref_out, _ = dense_oracle(*arrays, n, {})
        assert rel_err(out, ref_out) < TOLS["float32"], n
    assert run._cache_size() == 1


@pytest.mark.parametrize("q_lens,block_q", [((1, 5, 0, 17, 1), 4), ((33,), 16), ((0, 0, 1), 1),
                                            ((16, 16, 15, 1, 2, 3), 8)])
def test_blocks_cover_each_token_once_within_the_static_count(q_lens, block_q):
    """The block layout: no block straddles sequences, the real blocks come first and fit in
    T // block_q + S, and each token has its own row (first at its block's first row)."""
    t = sum(q_lens) + 2
    starts = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv_lengths = jnp.asarray(q_lens, jnp.int32) + 3
    layout = jax.jit(ragged_blocks.ragged_layout, static_argnums=(2, 3, 4))(
        starts, kv_lengths, None, t, block_q)
    count = np.asarray(layout.block_count)
    real = sum(-(-n // block_q) for n in q_lens)
    assert layout.num_blocks == t // block_q + len(q_lens) >= real
    assert np.all(count[:real] > 0) and np.all(count[real:] == 0)
    assert count.sum() == sum(q_lens)
    rows = np.asarray(layout.token_row)[np.asarray(layout.token_owned)]
    assert len(set(rows.tolist())) == sum(q_lens)
    seq, first = np.asarray(layout.block_seq)[:real], np.asarray(layout.block_first)[:real]
    ends = np.asarray(starts)[seq + 1]
    assert np.all(first + count[:real] <= ends)  # within its own sequence
    pos0 = np.asarray(layout.block_pos0)[:real]
    assert np.all(pos0 == np.asarray(kv_lengths)[seq] - (ends - first))  # bottom-right aligned


Q = jnp.zeros((6, 4, 16), jnp.float32)
PAGES = jnp.zeros((6, 8, 2, 16), jnp.float32)
TABLE = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
STARTS = jnp.asarray([0, 4, 6], jnp.int32)
KV = jnp.asarray([9, 2], jnp.int32)


@pytest.mark.parametrize("args,kwargs,match", [
    ((Q[0], PAGES, PAGES, TABLE, STARTS, KV), {},
     r"q must have rank 3 \[T, Hq, D\].*got q \[4, 16\]"),
    ((Q, PAGES, PAGES[:, :4], TABLE, STARTS, KV), {}, r"k_pages and v_pages must have the same"),
    ((Q, PAGES.astype(jnp.bfloat16), PAGES.astype(jnp.bfloat16), TABLE, STARTS, KV), {},
     r"must share a dtype"),
    ((Q, PAGES, PAGES, TABLE, STARTS[None], KV), {}, r"query_starts must have shape \[S \+ 1\]"),
    ((Q, PAGES, PAGES, TABLE[:1], STARTS, KV), {},
     r"page_table must have shape \[S, pages_per_seq\] with S=2"),
    ((Q, PAGES, PAGES, TABLE, STARTS, KV[:1]), {}, r"kv_lengths must have shape \[S\] = \[2\]"),
    ((Q, PAGES, PAGES, TABLE, STARTS.astype(jnp.float32), KV), {},
     r"query_starts must have an integer dtype"),
    ((Q, PAGES, PAGES, TABLE, jnp.asarray([0, 5, 4], jnp.int32), KV), {},
     r"query_starts\[:num_seqs \+ 1\] must be non-decreasing within \[0, T\] = \[0, 6\]; "
     r"got \[0, 5, 4\]"),
    ((Q, PAGES, PAGES, TABLE, jnp.asarray([0, 4, 7], jnp.int32), KV), {}, r"within \[0, T\]"),
    ((Q, PAGES, PAGES, TABLE, STARTS, jnp.asarray([3, 2], jnp.int32)), {},
     r"kv_lengths must lie in \[q_len, pages_per_seq \* page_size\].*kv_lengths\[0\]=3 with "
     r"q_len=4"),
    ((Q, PAGES, PAGES, TABLE, STARTS, jnp.asarray([9, 17], jnp.int32)), {},
     r"capacity 16\); got kv_lengths\[1\]=17"),
    ((Q, PAGES, PAGES, TABLE + 4, STARTS, KV), {},
     r"page_table entries must lie in \[0, num_pages\) = \[0, 6\)"),
    ((Q, PAGES, PAGES, TABLE, STARTS, KV), {"num_seqs": 3}, r"num_seqs must lie in \[0, S\]"),
    ((Q, PAGES, PAGES, TABLE, STARTS, KV), {"num_seqs": 1.0}, r"num_seqs must be None, an int"),
    ((Q, PAGES, PAGES, TABLE, STARTS, KV), {"backend": "tpu"}, r"backend must be one of"),
    ((Q, PAGES, PAGES, TABLE, STARTS, KV), {"backend": "pallas", "block_q": 3},
     r"block_q must be a power of two"),
    ((Q, jnp.zeros((6, 12, 2, 16)), jnp.zeros((6, 12, 2, 16)), TABLE, STARTS, KV),
     {"backend": "pallas"}, r"power-of-two page_size .* got page_size=12"),
    ((Q, PAGES.astype(jnp.int8), PAGES.astype(jnp.int8), TABLE, STARTS, KV), {},
     r"int8 pages need k_scales"),
    ((Q, PAGES, PAGES, TABLE, STARTS, KV), {"local_window": -3},
     r"local_window must be None or an int >= 0 .*; got -3"),
    ((Q, PAGES, PAGES, TABLE, STARTS, KV), {"local_window": 2.0}, r"local_window must be None"),
])
def test_bad_input_raises_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, **kwargs)


def test_entries_past_num_seqs_are_not_validated():
    """Entries past num_seqs are ignored, so they may be anything (the engine's padding; that
    the kernels ignore them too is checked by the num_seqs case above)."""
    checks.check_ragged(Q, PAGES, PAGES, TABLE.at[1:].set(-1), jnp.asarray([0, 4, 1], jnp.int32),
                        jnp.asarray([5, 0], jnp.int32), 1)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas", "pallas_tpu"])
def test_traced_num_seqs_does_not_validate_a_concrete_table_past_it(backend):
    """With num_seqs traced and the table concrete, no row is known to be real: the padding
    row's out-of-range ids pass, and the output equals the call without that sequence."""
    rng = np.random.default_rng(9)
    q = jnp.asarray(rng.standard_normal((8, 2, 16)), jnp.float32)
    pages = jnp.asarray(rng.standard_normal((6, 8, 1, 16)), jnp.float32)
    table = jnp.asarray([[0, 1, 2], [3, 4, 5], [10**6, -5, 99]], jnp.int32)  # row 2 not real
    starts = jnp.asarray([0, 3, 8, 8], jnp.int32)
    kv_lengths = jnp.asarray([5, 20, 7], jnp.int32)
    expected = ragged_paged_attention(q, pages, pages, table[:2], starts[:3], kv_lengths[:2],
                                      backend=backend)
    out = jax.jit(lambda n: ragged_paged_attention(q, pages, pages, table, starts, kv_lengths,
                                                   num_seqs=n, backend=backend))(jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas", "pallas_tpu"])
def test_a_traced_out_of_range_page_id_reads_a_page_of_the_pool(backend):
    """No check sees a traced table: its ids are clamped into the pool (the GPU and TPU kernels
    index pages without bounds checks), so a bad id in a real row reads the nearest pool page."""
    rng = np.random.default_rng(10)
    q = jnp.asarray(rng.standard_normal((8, 2, 16)), jnp.float32)
    pages = jnp.asarray(rng.standard_normal((6, 8, 1, 16)), jnp.float32)
    table = jnp.asarray([[0, 10**6, 2], [3, -5, 5]], jnp.int32)  # both rows use column 1
    starts, kv_lengths = jnp.asarray([0, 3, 8], jnp.int32), jnp.asarray([12, 20], jnp.int32)
    expected = ragged_paged_attention(q, pages, pages, jnp.clip(table, 0, 5), starts, kv_lengths,
                                      backend=backend)
    out = jax.jit(lambda t: ragged_paged_attention(q, pages, pages, t, starts, kv_lengths,
                                                   backend=backend))(table)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("page_size,d,hq,hkv,int8,window", [
    (16, 128, 8, 2, False, None), (8, 80, 4, 4, False, None), (4, 64, 7, 1, False, None),
    (16, 128, 32, 4, True, None), (16, 128, 8, 2, False, 37), (8, 64, 8, 2, True, 5)])
def test_pallas_kernel_lowers_to_triton(page_size, d, hq, hkv, int8, window):
    """The kernel passes the Triton lowering (table and page gathers, padded D and groups, both
    loops, int8 pages dequantized in the kernel); lowering needs no GPU, compiling to PTX does."""
    pytest.importorskip("jax.experimental.pallas.triton")
    t, s = 40, 5
    q = jax.ShapeDtypeStruct((t, hq, d), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((50, page_size, hkv, d), jnp.int8 if int8 else jnp.bfloat16)
    scales = jax.ShapeDtypeStruct((50, page_size, hkv), jnp.float32) if int8 else None
    table = jax.ShapeDtypeStruct((s, 7), jnp.int32)
    starts, kv_lengths = (jax.ShapeDtypeStruct((n,), jnp.int32) for n in (s + 1, s))
    groups = hq // hkv
    block_q = ragged_pallas_gpu.kernel_block_q(ragged_blocks.default_block_q("pallas", groups),
                                               groups)

    def attend(q, k, v, table, starts, kv_lengths, ks, vs):
        layout = ragged_blocks.ragged_layout(starts, kv_lengths, None, t, block_q)
        return ragged_pallas_gpu.ragged_paged_attention(
            q, k, v, table, layout, scale=0.1, block_q=block_q, pages_per_block=4,
            interpret=False, k_scales=ks, v_scales=vs, local_window=window)

    lowered = jax.jit(attend).trace(q, pages, pages, table, starts, kv_lengths, scales,
                                    scales).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


def _abstract_ragged_inputs(t, s, page_size, d, hq, hkv, int8, pages_per_seq=7, num_pages=50):
    """ShapeDtypeStructs (q, k, v, table, starts, kv_lengths, k_scales, v_scales): bfloat16."""
    q = jax.ShapeDtypeStruct((t, hq, d), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((num_pages, page_size, hkv, d),
                                 jnp.int8 if int8 else jnp.bfloat16)
    scales = jax.ShapeDtypeStruct((num_pages, page_size, hkv), jnp.float32) if int8 else None
    table = jax.ShapeDtypeStruct((s, pages_per_seq), jnp.int32)
    starts, kv_lengths = (jax.ShapeDtypeStruct((n,), jnp.int32) for n in (s + 1, s))
    return q, pages, pages, table, starts, kv_lengths, scales, scales


def _lower_tpu_kernel(args, block_q=None, pages_per_block=3, local_window=None) -> str:
    """The Mosaic kernel (with its XLA block gathers) lowered for a TPU, as text."""
    t, groups = args[0].shape[0], args[0].shape[1] // args[1].shape[2]
    block_q = block_q or ragged_blocks.default_block_q("pallas_tpu", groups)

    def attend(q, k, v, table, starts, kv_lengths, ks, vs):
        layout = ragged_blocks.ragged_layout(starts, kv_lengths, None, t, block_q)
        return ragged_pallas_tpu.ragged_paged_attention(
            q, k, v, table, layout, scale=0.1, block_q=block_q, pages_per_block=pages_per_block,
            interpret=False, k_scales=ks, v_scales=vs, local_window=local_window)

    return jax.jit(attend).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("page_size,d,hq,hkv,int8,window", [
    (16, 128, 8, 2, False, None), (8, 64, 16, 4, True, None), (12, 80, 4, 2, False, None),
    (16, 128, 8, 2, False, 37)])
def test_tpu_kernel_lowers_to_mosaic(page_size, d, hq, hkv, int8, window):
    """The kernel passes the Pallas -> Mosaic lowering, which checks the TPU block rules (last two
    block dims divisible by 8 and 128 or whole) and the kernel's ops: one head per lane block,
    two int8 heads per block, a whole-row block with a page size that is no power of two.
    Lowering needs no TPU; compiling (Mosaic's layout passes) does."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    text = _lower_tpu_kernel(_abstract_ragged_inputs(40, 5, page_size, d, hq, hkv, int8),
                             local_window=window)
    assert text.count("tpu_custom_call") == 1


def test_tpu_kernel_lowers_a_large_step_in_calls_whose_table_fits_smem():
    """512 tokens in 64 sequences of 512 pages: 96 query blocks of 16 tokens (GQA 4), each with
    its sequence's page-table row, a 192 KiB table, more than the SMEM budget: it lowers as one
    kernel under a loop of 3 calls, each prefetching 32 block limits and 32 rows (16K entries)."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    args = _abstract_ragged_inputs(512, 64, 16, 128, 8, 2, False, pages_per_seq=512,
                                   num_pages=1024)
    text = _lower_tpu_kernel(args, pages_per_block=2)
    # The scalar-prefetch operands come first: block limits [blocks], flat table [blocks * P].
    prefetched = re.findall(r"tpu_custom_call\(.*\} : \(tensor<(\d+)xi32>, tensor<(\d+)xi32>",
                            text)
    assert ragged_blocks.num_blocks(512, 64, 16) == 96
    assert prefetched == [("32", str(32 * 512))]
    assert 32 * 512 <= paged_pallas_tpu.MAX_TABLE_ENTRIES


def test_auto_on_a_gpu_runs_odd_page_sizes_through_xla(monkeypatch):
    """On a GPU auto would pick the Triton kernel, which needs power-of-two pages: page_size 12
    falls back to xla."""
    fake_gpu_without_triton(monkeypatch, ragged_pallas_gpu, "ragged_paged_attention")
    case = RaggedCase("odd_pages", hq=4, hkv=2, d=16, page_size=12, pages_per_seq=3,
                      q_lens=(1, 5, 9))
    check_against_oracle(case, "auto", {})


@pytest.mark.parametrize("backend", ["auto", "pallas"])
def test_auto_and_pallas_run_the_tpu_kernel_on_a_tpu_for_any_page_size(backend, monkeypatch):
    """On a TPU, auto and pallas dispatch to the Mosaic kernel, even for page_size 12 (which the
    Triton kernel cannot take). The platform is faked; lowering for TPU shows which kernel
    runs."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v, table, starts, kv_lengths, _, _ = _abstract_ragged_inputs(40, 5, 12, 128, 8, 2, False)
    attend = functools.partial(ragged_paged_attention, backend=backend)
    text = jax.jit(attend).trace(q, k, v, table, starts, kv_lengths).lower(
        lowering_platforms=("tpu",)).as_text()
    assert re.findall(r'kernel_name = "(\w+)"', text) == ["ragged_paged_attention_tpu"]
