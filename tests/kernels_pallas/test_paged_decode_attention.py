"""paged_decode_attention: every backend against dense float64 attention over the gathered pages
(sliding windows: test_paged_decode_window.py)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import paged_decode_attention
from kernels_pallas.attention import paged_pallas_gpu, paged_pallas_tpu, paged_xla, tiling
from tests.kernels_pallas.attention_cases import TOLS, rel_err
from tests.kernels_pallas.paged_cases import (BACKENDS, CASES, PagedCase, assert_lse_matches,
                                              dense_oracle, fake_gpu_without_triton, make_inputs,
                                              poison, quantize_pages, used_slots)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend,options", BACKENDS,
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_matches_dense_attention_over_gathered_pages(backend, options, case):
    q, k_pages, v_pages, table, lengths = make_inputs(case)
    run = jax.jit(lambda *a: paged_decode_attention(*a, backend=backend, return_lse=True,
                                                    **options))
    out, lse = run(q, k_pages, v_pages, table, lengths)
    ref_out, ref_lse = dense_oracle(q, k_pages, v_pages, table, lengths)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:2]
    assert rel_err(out, ref_out) < TOLS[case.dtype]
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out, np.float32)[empty] == 0)  # length 0: zeros, not NaN
    assert_lse_matches(lse, ref_lse)


@pytest.mark.parametrize("backend,options", BACKENDS[:2] + BACKENDS[3:],
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=lambda c: c.name)
def test_int8_pages_match_dense_attention_over_dequantized_pages(backend, options, case):
    """int8 pages with per-(token, head) scales: every backend dequantizes what it gathers; the
    oracle attends over values * scales, so the tolerance is the float one of q's dtype."""
    q, k_pages, v_pages, table, lengths = make_inputs(case, seed=2)
    (k8, ks), (v8, vs) = quantize_pages(k_pages), quantize_pages(v_pages)
    out = paged_decode_attention(q, k8, v8, table, lengths, k_scales=ks, v_scales=vs,
                                 backend=backend, **options)
    dequantized = [np.asarray(x, np.float32) * np.asarray(s)[..., None]
                   for x, s in ((k8, ks), (v8, vs))]
    ref_out, _ = dense_oracle(q, *dequantized, table, lengths)
    assert out.dtype == q.dtype
    assert rel_err(out, ref_out) < TOLS[case.dtype]


# Sequence 1 has length 0 and points at pages nobody uses; the others end mid-page, at a page's
# end and one slot into a page, with table entries past their lengths pointing at unused pages.
POISON_TABLE = np.array([[0, 1, 6], [7, 7, 6], [2, 3, 8], [4, 5, 9]], np.int32)
POISON_LENGTHS = np.array([5, 0, 16, 9], np.int32)


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("backend,options", BACKENDS + [("pallas_tpu", {"pages_per_block": 2})],
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_nan_and_inf_in_unused_slots_do_not_change_the_output(backend, options, int8):
    """K/V slots no sequence uses (past a length, on a sequence's last page, pages only a
    length-0 sequence points at) may hold NaN or Inf: masked weights are 0 and 0 * NaN = NaN, so
    every backend must keep them out of P @ V. Outputs and lse equal the clean run's exactly
    (the poisoned slots' weights are exactly 0 either way)."""
    rng = np.random.default_rng(7)
    num_pages, page_size, hq, hkv, d = 10, 8, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((4, hq, d)), jnp.float32)
    k_pages, v_pages = (rng.standard_normal((num_pages, page_size, hkv, d)) for _ in range(2))
    used = used_slots(num_pages, page_size, POISON_TABLE, POISON_LENGTHS)
    run = functools.partial(paged_decode_attention, backend=backend, return_lse=True, **options)
    if int8:  # the scales are what a stale slot poisons
        (k8, ks), (v8, vs) = quantize_pages(k_pages), quantize_pages(v_pages)
        clean = run(q, k8, v8, POISON_TABLE, POISON_LENGTHS, k_scales=ks, v_scales=vs)
        dirty = run(q, k8, v8, POISON_TABLE, POISON_LENGTHS, k_scales=poison(ks, used),
                    v_scales=poison(vs, used))
    else:
        k_pages, v_pages = jnp.asarray(k_pages, jnp.float32), jnp.asarray(v_pages, jnp.float32)
        clean = run(q, k_pages, v_pages, POISON_TABLE, POISON_LENGTHS)
        dirty = run(q, poison(k_pages, used), poison(v_pages, used), POISON_TABLE,
                    POISON_LENGTHS)
    assert np.isfinite(np.asarray(clean[0])).all()
    for got, expected in zip(dirty, clean):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("backend", ["auto", "xla", "pallas"])
def test_default_options_and_softmax_scale_match_oracle(backend):
    """Default chunking/splits (one chunk, one split at this size) and a custom scale."""
    case = CASES[0]
    q, k_pages, v_pages, table, lengths = make_inputs(case, seed=1)
    out = paged_decode_attention(q, k_pages, v_pages, table, lengths, softmax_scale=0.7,
                                 backend=backend)
    ref_out, _ = dense_oracle(q, k_pages, v_pages, table, lengths, scale=0.7)
    assert rel_err(out, ref_out) < TOLS[case.dtype]


def test_odd_page_size_runs_on_auto_through_xla():
    """page_size 12 (not a power of two): auto falls back to xla, which pages any size."""
    case = PagedCase("odd_pages", hq=4, hkv=1, d=16, page_size=12, pages_per_seq=3,
                     lengths=(25, 36, 7, 0))
    q, k_pages, v_pages, table, lengths = make_inputs(case)
    out = paged_decode_attention(q, k_pages, v_pages, table, lengths, backend="auto",
                                 pages_per_block=2)
    ref_out, _ = dense_oracle(q, k_pages, v_pages, table, lengths)
    assert rel_err(out, ref_out) < TOLS[case.dtype]


def test_auto_on_a_gpu_runs_odd_page_sizes_through_xla(monkeypatch):
    """On a GPU auto would pick the Triton kernel, which needs power-of-two pages: page_size 12
    falls back to xla."""
    fake_gpu_without_triton(monkeypatch, paged_pallas_gpu, "paged_decode_attention")
    case = PagedCase("odd_pages", hq=4, hkv=1, d=16, page_size=12, pages_per_seq=3,
                     lengths=(25, 36, 7, 0))
    q, k_pages, v_pages, table, lengths = make_inputs(case)
    out = paged_decode_attention(q, k_pages, v_pages, table, lengths, backend="auto")
    ref_out, _ = dense_oracle(q, k_pages, v_pages, table, lengths)
    assert rel_err(out, ref_out) < TOLS[case.dtype]


def test_default_pages_per_block_cover_16_tokens_and_stay_in_the_span():
    assert paged_pallas_gpu.default_pages_per_block(page_size=16, span=512) == 4
    assert paged_pallas_gpu.default_pages_per_block(page_size=16, span=2) == 2
    assert paged_pallas_gpu.default_pages_per_block(page_size=4, span=2) == 4
    assert paged_pallas_gpu.default_pages_per_block(page_size=128, span=8) == 1


def test_xla_chunk_tokens_set_the_xla_default_pages_per_block_and_nothing_else(monkeypatch):
    """The hint replaces xla's ~512 tokens a step (page 8, 2-page table: 16 -> 2 pages; 8 -> 1),
    an explicit pages_per_block wins, and on the Pallas kernels it changes nothing."""
    seen = []

    def capture(*args, pages_per_block, **kwargs):
        seen.append(pages_per_block)
        return Q, jnp.zeros(Q.shape[:2], jnp.float32)

    for module in (paged_xla, paged_pallas_gpu):
        monkeypatch.setattr(module, "paged_decode_attention", capture)
    for kwargs in ({}, {"xla_chunk_tokens": 8}, {"xla_chunk_tokens": 8, "pages_per_block": 2},
                   {"xla_chunk_tokens": 8, "backend": "pallas"}, {"backend": "pallas"}):
        paged_decode_attention(Q, PAGES, PAGES, TABLE, LENGTHS, **{"backend": "xla", **kwargs})
    assert seen == [2, 1, 2, None, None]


def test_default_num_splits_fill_the_grid_but_keep_pages_per_split():
    assert paged_pallas_gpu.default_num_splits(batch=1, hkv=8, span=1024) == 32
    assert paged_pallas_gpu.default_num_splits(batch=64, hkv=8, span=1024) == 1
    # 16 pages allow at most 4 splits of >= MIN_PAGES_PER_SPLIT pages.
    assert paged_pallas_gpu.default_num_splits(batch=1, hkv=1, span=16) == 4


@pytest.mark.parametrize("pages_per_seq,page_size,window,tokens,span", [
    (8192, 16, None, 1, 8192),  # no window: the whole row
    (8192, 16, 4095, 1, 257),  # 4096 keys straddle 257 pages of 16 when they start mid-page
    (8192, 16, 4096, 1, 257),  # 4097 keys: at most 257 pages too
    (8192, 16, 0, 1, 1),  # the query's own key
    (8192, 16, 15, 1, 2),  # one page's worth of keys, straddling two pages
    (8192, 16, 16, 1, 2),
    (8192, 16, 17, 1, 3),
    (8192, 16, 15, 2, 2),  # two queries: 17 keys from the first one's window start
    (8192, 16, 16, 2, 3),  # 18 keys
    (8192, 16, 0, 16, 2),  # 16 queries with windows of their own key: 16 keys
    (4, 16, 40, 1, 4),  # at most the row
])
def test_span_pages_is_the_window_pages_at_most_the_row(pages_per_seq, page_size, window, tokens,
                                                        span):
    assert tiling.span_pages(pages_per_seq, page_size, window, tokens) == span


@pytest.mark.parametrize("span,num_splits,pages_per_block,layout", [
    (257, 32, 4, (12, 22)),  # cdiv(257 / 32) = 9 pages, rounded up to whole blocks of 4
    (257, 1, 4, (260, 1)),
    (8192, 128, 4, (64, 128)),
    (3, 64, 1, (1, 3)),  # no more splits than the span has blocks
    (3, 64, 2, (2, 2)),
    (1, 2, 4, (4, 1)),
])
def test_split_layout_covers_the_span_with_whole_blocks_and_no_empty_split(
        span, num_splits, pages_per_block, layout):
    per_split, splits = paged_pallas_gpu.split_layout(span, num_splits, pages_per_block)
    assert (per_split, splits) == layout
    assert per_split % pages_per_block == 0 and splits <= num_splits
    assert splits * per_split >= span > (splits - 1) * per_split


def test_a_windowed_call_sizes_its_splits_by_the_window_not_the_table(monkeypatch):
    """A 255-key window over a 16K-token table (1024 pages of 16): the default splits cut the
    window's 17 pages (3 runs of 8 over the window), not the table's 1024 (128 runs of 8, of which
    all but ~3 would loop over nothing for every sequence)."""
    seen = []

    def capture(q, k_pages, v_pages, scales, table, lens, cfg):
        seen.append((cfg.pages_per_split, cfg.num_splits, table.shape[1]))
        shape = (*q.shape[:2], cfg.num_splits, *q.shape[2:])  # [batch, Hkv, splits, g_pad, D]
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:-1], jnp.float32)

    monkeypatch.setattr(paged_pallas_gpu, "_partials", capture)
    q = jnp.zeros((1, 4, 16), jnp.float32)
    pages = jnp.zeros((1024, 16, 2, 16), jnp.float32)
    table = jnp.zeros((1, 1024), jnp.int32)
    for window in (255, None):
        paged_decode_attention(q, pages, pages, table, jnp.asarray([9000], jnp.int32),
                               backend="pallas", local_window=window)
    # Default pages_per_block: 4 pages (64 tokens). With the window a step may start at the
    # row's last page, so the table is padded past it (1024 + 3 columns, to a power of two).
    assert seen == [(8, 3, 2048), (8, 128, 1024)]


Q = jnp.zeros((2, 4, 16), jnp.float32)
PAGES = jnp.zeros((6, 8, 2, 16), jnp.float32)
TABLE = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
LENGTHS = jnp.asarray([3, 16], jnp.int32)


@pytest.mark.parametrize("args,kwargs,match", [
    ((Q[0], PAGES, PAGES, TABLE, LENGTHS), {},
     r"q must have rank 3 \[batch, Hq, D\].*got q \[4, 16\]"),
    ((Q, PAGES[0], PAGES[0], TABLE, LENGTHS), {}, r"k_pages must have rank 4"),
    ((Q, PAGES, PAGES[:, :4], TABLE, LENGTHS), {},
     r"k_pages and v_pages must have the same shape"),
    ((Q, PAGES[..., :8], PAGES[..., :8], TABLE, LENGTHS), {}, r"same head dim D"),
    ((jnp.zeros((2, 3, 16)), PAGES, PAGES, TABLE, LENGTHS), {},
     r"Hq % Hkv == 0\); got Hq=3, Hkv=2"),
    ((Q, PAGES.astype(jnp.bfloat16), PAGES.astype(jnp.bfloat16), TABLE, LENGTHS), {},
     r"must share a dtype"),
    ((Q, PAGES, PAGES, TABLE[:1], LENGTHS), {},
     r"page_table must have shape \[batch, pages_per_seq\]"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS[:1]), {},
     r"lengths must have shape \[batch\] = \[2\]; got \[1\]"),
    ((Q, PAGES, PAGES, TABLE.astype(jnp.float32), LENGTHS), {},
     r"page_table must have an integer"),
    ((Q, PAGES, PAGES, TABLE + 4, LENGTHS), {},
     r"page_table entries must lie in \[0, num_pages\) = \[0, 6\); got values in \[4, 7\]"),
    ((Q, PAGES, PAGES, TABLE, jnp.asarray([3, 17], jnp.int32)), {},
     r"lengths must lie in \[0, pages_per_seq \* page_size\] = \[0, 16\]; got values in \[3, 17\]"),
    ((Q, PAGES.astype(jnp.int8), PAGES.astype(jnp.int8), TABLE, LENGTHS), {},
     r"int8 pages need k_scales: float32 \[num_pages, page_size, Hkv\] = \[6, 8, 2\]"),
    ((Q, PAGES.astype(jnp.int8), PAGES.astype(jnp.int8), TABLE, LENGTHS),
     {"k_scales": PAGES[..., 0], "v_scales": PAGES[:, :4, :, 0]}, r"v_scales must be float32"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS), {"k_scales": PAGES[..., 0], "v_scales": PAGES[..., 0]},
     r"k_scales/v_scales go with int8 pages"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS), {"backend": "tpu"}, r"backend must be one of"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS), {"num_splits": 0},
     r"num_splits must be None or a positive"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS), {"xla_chunk_tokens": 0},
     r"xla_chunk_tokens must be None or a positive int; got 0"),
    ((Q, jnp.zeros((6, 12, 2, 16)), jnp.zeros((6, 12, 2, 16)), TABLE, LENGTHS),
     {"backend": "pallas"}, r"power-of-two page_size .* got page_size=12"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS), {"local_window": -1},
     r"local_window must be None or an int >= 0 .*; got -1"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS), {"local_window": (4, 0)}, r"local_window must be None"),
    ((Q, PAGES, PAGES, TABLE, LENGTHS), {"local_window": True}, r"local_window must be None"),
])
def test_bad_input_raises_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(*args, **kwargs)


def test_under_jit_the_table_and_lengths_are_traced_and_unchecked():
    out = jax.jit(lambda t, n: paged_decode_attention(Q, PAGES, PAGES, t, n))(TABLE, LENGTHS)
    assert out.shape == Q.shape


@pytest.mark.parametrize("page_size,d,hq,hkv,int8", [(16, 128, 8, 2, False), (8, 80, 4, 4, False),
                                                     (32, 256, 32, 4, False), (16, 128, 8, 2, True)])
def test_pallas_paged_kernel_lowers_to_triton(page_size, d, hq, hkv, int8):
    """The kernel passes the Triton lowering (page gathers, padded D and groups, small pages,
    int8 pages dequantized in the kernel)."""
    pytest.importorskip("jax.experimental.pallas.triton")
    q = jax.ShapeDtypeStruct((3, hq, d), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((50, page_size, hkv, d), jnp.int8 if int8 else jnp.bfloat16)
    scales = jax.ShapeDtypeStruct((50, page_size, hkv), jnp.float32) if int8 else None
    table = jax.ShapeDtypeStruct((3, 7), jnp.int32)
    lengths = jax.ShapeDtypeStruct((3,), jnp.int32)

    def attend(q, k, v, table, lengths, ks, vs):
        return paged_pallas_gpu.paged_decode_attention(q, k, v, table, lengths, scale=0.1,
                                                       num_splits=2, pages_per_block=None,
                                                       interpret=False, k_scales=ks, v_scales=vs)

    lowered = jax.jit(attend).trace(q, pages, pages, table, lengths, scales, scales).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


# --- The TPU (Mosaic) kernel, interpreted on a CPU, against the reference backend. ---
# Interpreting compiles the grid loop (~2.5 s a call here), so four calls cover its features:
# GQA ratios 4 and 1, several KV heads in one lane block (D 64: block-diagonal queries) and one
# head per block (D 128), page sizes 4, 8, 12 (no power of two) and 16, more than one page per
# step with a ragged last step, float32 and bfloat16, int8 pages in both (in float32 with two
# blocks of two heads, so the second block picks scale columns 2 and 3), a batch run in chunks
# (a table budget of 8 entries: 3 calls of 2 sequences, one of them padding), and lengths 0 and 1
# next to random ones.
# Tolerances: TOLS. float32 measured <= 3e-7 (the kernel folds pages into an online softmax, the
# reference sums all scores at once); 1e-5 keeps 30x headroom, while one wrongly masked key moves
# the output by ~1/length (> 1e-2). bfloat16 measured <= 2e-3 (q, K, V and P are bf16 in the
# kernel's matmuls), under 1.5e-2. lse is float32 either way: LSE_ATOL.
def _tpu_case(name, *, hq, hkv, d, page_size, pages_per_seq, dtype, seed, n_random=2):
    """A case whose lengths are random (seeded) apart from a 1 and a 0 (nothing to attend to)."""
    capacity = page_size * pages_per_seq
    rng = np.random.default_rng(seed)
    lengths = (1, 0, *rng.integers(2, capacity + 1, size=n_random).tolist())
    return PagedCase(name, hq=hq, hkv=hkv, d=d, page_size=page_size, pages_per_seq=pages_per_seq,
                     lengths=lengths, dtype=dtype)


TPU_CASES = [  # (case, pages_per_block, int8 pages, table entries per call: None = the default)
    (_tpu_case("gqa4_f32_d64_int8_two_head_blocks", hq=16, hkv=4, d=64, page_size=8,
               pages_per_seq=5, dtype="float32", seed=3), 2, True, None),
    (_tpu_case("gqa1_bf16_d128_default_block_batch_chunks", hq=2, hkv=2, d=128, page_size=16,
               pages_per_seq=4, dtype="bfloat16", seed=4, n_random=3), None, False, 8),
    (_tpu_case("gqa4_f32_d64_small_pages", hq=8, hkv=2, d=64, page_size=4, pages_per_seq=9,
               dtype="float32", seed=5), 4, False, None),
    (_tpu_case("gqa1_bf16_d128_int8_page_size_12", hq=4, hkv=4, d=128, page_size=12,
               pages_per_seq=3, dtype="bfloat16", seed=6), 2, True, None),
]


@pytest.mark.parametrize("case,pages_per_block,int8,table_budget", TPU_CASES,
                         ids=[case.name for case, *_ in TPU_CASES])
def test_tpu_kernel_matches_reference_backend(case, pages_per_block, int8, table_budget,
                                              monkeypatch):
    if table_budget is not None:
        monkeypatch.setattr(paged_pallas_tpu, "MAX_TABLE_ENTRIES", table_budget)
    q, k_pages, v_pages, table, lengths = make_inputs(case, seed=7)
    scales = {}
    if int8:
        (k_pages, ks), (v_pages, vs) = quantize_pages(k_pages), quantize_pages(v_pages)
        scales = {"k_scales": ks, "v_scales": vs}
    def attend(backend, **options):  # jitted: one compilation, not one per eager op
        return jax.jit(functools.partial(paged_decode_attention, backend=backend, return_lse=True,
                                         **options))(q, k_pages, v_pages, table, lengths, **scales)

    out, lse = attend("pallas_tpu", pages_per_block=pages_per_block)
    ref_out, ref_lse = attend("reference")
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:2]
    assert rel_err(out, np.asarray(ref_out, np.float32)) < TOLS[case.dtype]
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out, np.float32)[empty] == 0)  # length 0: zeros, not NaN
    assert_lse_matches(lse, ref_lse)


@jax.jit  # one compilation for every length, not one per eager op
def _table_columns(length, lowest):
    """Columns that 16 page slots read over 4 steps of 16 pages of 16 tokens: [steps, slots]."""
    return paged_pallas_tpu.table_column(length, lowest, jnp.arange(4)[:, None],
                                         jnp.arange(16)[None, :], page_size=16, pages_per_block=16)


@pytest.mark.parametrize("length,lowest,first,needed,fetches", [
    (0, 0, 0, 1, 16), (1, 0, 0, 1, 16), (128, 0, 0, 8, 16), (256, 0, 0, 16, 16),
    (300, 0, 0, 19, 19), (1024, 0, 0, 64, 64),
    # With a window the walk starts at the page of the first key seen (lowest).
    (300, 200, 12, 7, 16), (1024, 700, 43, 21, 21), (1024, 1023, 63, 1, 16), (5, -20, 0, 1, 16)])
def test_tpu_index_map_fetches_each_needed_page_once(length, lowest, first, needed, fetches):
    """Page 16, 16 pages a step, 64 pages in the table (4 steps). The pipeline fetches a slot's
    page at step 0 and whenever its column changes; a slot past the length must not change, so
    the fetches are the needed pages (first .. first + needed - 1) plus step 0's padding
    (16 - needed slots, when fewer)."""
    steps, ppb = 4, 16
    cols = np.asarray(_table_columns(jnp.int32(length), jnp.int32(lowest)))  # [steps, slots]
    last = first + needed - 1
    assert cols[0].tolist() == [min(first + i, last) for i in range(ppb)]
    for j in range(steps):  # a slot holding a needed page holds the page of its position
        pages = first + j * ppb + np.arange(ppb)
        in_use = pages <= last
        np.testing.assert_array_equal(cols[j][in_use], pages[in_use])
    assert set(cols.ravel().tolist()) == set(range(first, last + 1))
    assert ppb + int((np.diff(cols, axis=0) != 0).sum()) == fetches


def test_tpu_batch_chunks_keep_each_table_under_the_budget():
    # (kernel calls, sequences per call): the fewest calls, rows spread evenly (padding < calls).
    assert paged_pallas_tpu.batch_chunks(batch=4, pages_per_seq=8, max_table_entries=64) == (1, 4)
    assert paged_pallas_tpu.batch_chunks(batch=512, pages_per_seq=512,
                                         max_table_entries=16384) == (16, 32)
    assert paged_pallas_tpu.batch_chunks(batch=5, pages_per_seq=4, max_table_entries=8) == (3, 2)
    assert paged_pallas_tpu.batch_chunks(batch=33, pages_per_seq=512,
                                         max_table_entries=16384) == (2, 17)
    # A row wider than the budget goes alone.
    assert paged_pallas_tpu.batch_chunks(batch=3, pages_per_seq=40000,
                                         max_table_entries=16384) == (3, 1)


def test_tpu_lane_blocks_and_default_pages_per_block():
    # The fewest KV heads whose lanes are a multiple of 128, else all of them (a whole row).
    assert paged_pallas_tpu.heads_per_block(hkv=8, head_dim=128) == 1
    assert paged_pallas_tpu.heads_per_block(hkv=8, head_dim=64) == 2
    assert paged_pallas_tpu.heads_per_block(hkv=8, head_dim=80) == 8
    assert paged_pallas_tpu.heads_per_block(hkv=6, head_dim=80) == 6
    # ~256 tokens a step, at most 16 pages and the span (the table's width or a window's pages).
    assert paged_pallas_tpu.default_pages_per_block(page_size=16, span=512) == 16
    assert paged_pallas_tpu.default_pages_per_block(page_size=128, span=512) == 2
    assert paged_pallas_tpu.default_pages_per_block(page_size=4, span=3) == 3
    # A requested value is clipped to MAX_PAGES_PER_BLOCK (16) and the span.
    assert paged_pallas_tpu.resolve_pages_per_block(64, page_size=4, span=512) == 16
    assert paged_pallas_tpu.resolve_pages_per_block(7, page_size=16, span=3) == 3
    assert paged_pallas_tpu.resolve_pages_per_block(5, page_size=16, span=512) == 5
    assert paged_pallas_tpu.resolve_pages_per_block(None, page_size=16, span=512) == 16


def _abstract_inputs(page_size, d, hq, hkv, int8, dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((3, hq, d), dtype)
    pages = jax.ShapeDtypeStruct((50, page_size, hkv, d), jnp.int8 if int8 else dtype)
    scales = jax.ShapeDtypeStruct((50, page_size, hkv), jnp.float32) if int8 else None
    return (q, pages, pages, jax.ShapeDtypeStruct((3, 7), jnp.int32),
            jax.ShapeDtypeStruct((3,), jnp.int32), scales, scales)


@pytest.mark.parametrize("page_size,d,hq,hkv,int8", [(16, 128, 8, 2, False), (8, 64, 16, 4, True),
                                                     (12, 80, 4, 2, False)])
def test_tpu_paged_kernel_lowers_to_mosaic(page_size, d, hq, hkv, int8):
    """The kernel passes the Pallas -> Mosaic lowering, which checks the TPU block rules (last two
    block dims divisible by 8 and 128 or whole): one head per lane block, two int8 heads per
    block, and a whole-row block with a page size that is no power of two. Lowering needs no TPU;
    compiling does."""
    pytest.importorskip("jax.experimental.pallas.tpu")

    def attend(q, k, v, table, lengths, ks, vs):
        return paged_pallas_tpu.paged_decode_attention(q, k, v, table, lengths, scale=0.1,
                                                       pages_per_block=3, interpret=False,
                                                       k_scales=ks, v_scales=vs)

    args = _abstract_inputs(page_size, d, hq, hkv, int8)
    lowered = jax.jit(attend).trace(*args).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 1


def test_tpu_kernel_lowers_a_large_batch_in_calls_whose_table_fits_smem():
    """512 tokens x 512 pages (the model passes one table row per token) is a 1 MiB table, all of
    SMEM: it lowers as one kernel under a loop, each call prefetching 32 rows (16K entries)."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    q = jax.ShapeDtypeStruct((512, 8, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((1024, 16, 2, 128), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((512, 512), jnp.int32)
    lengths = jax.ShapeDtypeStruct((512,), jnp.int32)

    def attend(q, k, v, table, lengths):
        return paged_pallas_tpu.paged_decode_attention(q, k, v, table, lengths, scale=0.1,
                                                       pages_per_block=2, interpret=False)

    text = jax.jit(attend).trace(q, pages, pages, table, lengths).lower(
        lowering_platforms=("tpu",)).as_text()
    # The scalar-prefetch operands come first: lengths [seqs], flat table [seqs * pages_per_seq].
    prefetched = re.findall(r"tpu_custom_call\(.*\} : \(tensor<(\d+)xi32>, tensor<(\d+)xi32>",
                            text)
    assert prefetched == [("32", str(32 * 512))]
    assert 32 * 512 <= paged_pallas_tpu.MAX_TABLE_ENTRIES


@pytest.mark.parametrize("backend", ["auto", "pallas"])
def test_auto_and_pallas_run_the_tpu_kernel_on_a_tpu_for_any_page_size(backend, monkeypatch):
    """On a TPU, auto and pallas dispatch to the Mosaic kernel, even for page_size 12 (which the
    GPU kernel cannot take). The platform is faked; lowering for TPU shows which kernel runs."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v, table, lengths, _, _ = _abstract_inputs(12, 128, 8, 2, False)
    attend = functools.partial(paged_decode_attention, backend=backend)
    text = jax.jit(attend).trace(q, k, v, table, lengths).lower(
        lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1


@pytest.mark.parametrize("platform,page_size,window,options", [
    ("cuda", 16, 37, {"num_splits": 2}),
    ("cuda", 8, 5, {"num_splits": 8}),  # 2-page steps from any page: the padded table's reads
    ("tpu", 16, 37, {}),
])
def test_local_window_kernels_lower_to_triton_and_mosaic(platform, page_size, window, options):
    """The window's mask, the GPU kernel's runs from each window's first page and the TPU
    kernel's skipped steps pass the Triton and Mosaic lowerings."""
    gpu = platform == "cuda"
    pytest.importorskip("jax.experimental.pallas." + ("triton" if gpu else "tpu"))
    q, k, v, table, lengths, _, _ = _abstract_inputs(page_size, 128, 8, 2, False)
    kernel = paged_pallas_gpu if gpu else paged_pallas_tpu
    attend = functools.partial(kernel.paged_decode_attention, scale=0.1, pages_per_block=None,
                               interpret=False, local_window=window, **options)
    text = jax.jit(attend).trace(q, k, v, table, lengths).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count("__gpu$xla.gpu.triton" if gpu else "tpu_custom_call") == 1
