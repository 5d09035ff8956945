"""paged_decode_attention with a sliding window: every backend against the dense oracle over the
window, each sequence's walk (GPU splits, TPU steps) starting at its window's page with NaN/Inf
in every slot outside the windows, and traced lengths past the table clipped."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import paged_decode_attention
from kernels_pallas.attention import paged_pallas_tpu
from tests.kernels_pallas.attention_cases import TOLS, rel_err
from tests.kernels_pallas.paged_cases import (BACKENDS, PagedCase, assert_lse_matches,
                                              dense_oracle, make_inputs, poisoned_pages,
                                              quantize_pages)


# --- Sliding windows: the query (at position length - 1) sees keys length - 1 - w .. on. ---
# Page 8, 6 pages a sequence (capacity 48); GQA 4 with D 64 (two KV heads in one TPU lane
# block). Windows 0 (the query's own key), 5 (under a page), 13 and 30 (no multiple of the page)
# and 47 (= capacity - 1: every key, a mask that removes nothing); each call draws 7 lengths in
# [1, 48] next to 0, so some are shorter than the window, some equal to window + 1, most longer.
WINDOW_CASE = PagedCase("gqa4_f32_d64_window", hq=8, hkv=2, d=64, page_size=8, pages_per_seq=6,
                        lengths=())
WINDOW_BACKENDS = BACKENDS + [("pallas_tpu", {"pages_per_block": 2})]


def window_inputs(window: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = (0, min(window + 1, 48), *rng.integers(1, 49, size=6).tolist())
    case = dataclasses.replace(WINDOW_CASE, lengths=lengths, num_pages=60)
    return make_inputs(case, seed=seed)


@pytest.mark.parametrize("window", [0, 5, 13, 30, 47])
@pytest.mark.parametrize("backend,options", WINDOW_BACKENDS,
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_local_window_matches_dense_attention_over_the_window(backend, options, window):
    q, k_pages, v_pages, table, lengths = window_inputs(window, seed=20 + window)
    run = jax.jit(functools.partial(paged_decode_attention, backend=backend, return_lse=True,
                                    local_window=window, **options))
    out, lse = run(q, k_pages, v_pages, table, lengths)
    ref_out, ref_lse = dense_oracle(q, k_pages, v_pages, table, lengths, window=window)
    assert rel_err(out, ref_out) < TOLS["float32"]
    assert_lse_matches(lse, ref_lse)


@pytest.mark.parametrize("backend,options", WINDOW_BACKENDS[1:2] + WINDOW_BACKENDS[3:],
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_local_window_over_int8_pages_matches_dense_attention(backend, options):
    q, k_pages, v_pages, table, lengths = window_inputs(11, seed=30)
    (k8, ks), (v8, vs) = quantize_pages(k_pages), quantize_pages(v_pages)
    out = paged_decode_attention(q, k8, v8, table, lengths, k_scales=ks, v_scales=vs,
                                 local_window=11, backend=backend, **options)
    dequantized = [np.asarray(x, np.float32) * np.asarray(s)[..., None]
                   for x, s in ((k8, ks), (v8, vs))]
    ref_out, _ = dense_oracle(q, *dequantized, table, lengths, window=11)
    assert rel_err(out, ref_out) < TOLS["float32"]


# --- Window walks: each sequence's runs (GPU splits, TPU steps) start at its window's page. ---
# Page sizes 4, 8 and 16 (steps of at least 16 tokens: 4, 2 and 1 or 4 pages, so a run that starts
# at the window's page is mostly not step-aligned and its last step reads past the table's end);
# windows under a page (3), of exactly one page's keys and two pages' (7 and 15 at page 8, 15 at
# page 16), and longer (30, 40); num_splits 1, 2, 3 and 64 (capped to the window's blocks). The
# lengths hold 0, 1, 2, the window's w and w + 1 and w + 2 keys, page ends and the slots past
# them, and the capacity, so windows start at every offset in a page and some lengths are
# shorter than the window. Every K/V slot outside each row's window (before it, past the length,
# the pages only a length-0 row points at) is NaN or +-Inf; a run starting a page late loses
# window keys, one starting early reads NaN past a missed mask: either moves the output.
# The TPU kernel walks from the window's first page too (its grid has the window's steps): two
# runs, one with a window under a page and int8 pages, one with several steps.
WINDOW_SPLIT_RUNS = [  # (backend, page_size, window, options, int8)
    ("pallas", 8, 3, {"num_splits": 1}, False),
    ("pallas", 8, 3, {"num_splits": 2}, True),
    ("pallas", 8, 7, {"num_splits": 64}, False),
    ("pallas", 8, 15, {"num_splits": 3, "pages_per_block": 4}, False),
    ("pallas", 16, 15, {"num_splits": 2, "pages_per_block": 1}, True),
    ("pallas", 16, 40, {"num_splits": 64, "pages_per_block": 1}, False),
    ("pallas", 4, 30, {"num_splits": 2}, False),
    ("pallas_tpu", 8, 3, {}, True),
    ("pallas_tpu", 4, 30, {"pages_per_block": 3}, False),
]


def window_split_inputs(page_size: int, window: int, seed: int):
    """GQA 4 (8 query heads, 2 KV heads), 16 pages a row from a shuffled pool (a power of two, so
    the table has no padding but what the window's runs need): q, K/V pages, table, lengths."""
    capacity = 16 * page_size
    wanted = {0, 1, 2, window, window + 1, window + 2, page_size, page_size + 1,
              2 * page_size - 1, 2 * page_size, 5 * page_size + 3, capacity - 1, capacity}
    lengths = tuple(sorted(n for n in wanted if n <= capacity))
    case = PagedCase("window_splits", hq=8, hkv=2, d=32, page_size=page_size, pages_per_seq=16,
                     lengths=lengths, num_pages=16 * len(lengths) + 5)
    return make_inputs(case, seed=seed)


def window_slots(num_pages: int, page_size: int, table, lengths, window: int) -> np.ndarray:
    """bool [num_pages, page_size]: the slots holding a key of some row's window."""
    seen = np.zeros((num_pages, page_size), bool)
    for row, n in zip(np.asarray(table), np.asarray(lengths)):
        for p in range(max(0, int(n) - 1 - window), int(n)):
            seen[row[p // page_size], p % page_size] = True
    return seen


@pytest.mark.parametrize("backend,page_size,window,options,int8", WINDOW_SPLIT_RUNS,
                         ids=[f"{b}-page{p}-window{w}-{'-'.join(map(str, o.values()))}"
                              f"{'-int8' if i else ''}" for b, p, w, o, i in WINDOW_SPLIT_RUNS])
def test_window_walks_start_at_each_sequences_window(backend, page_size, window, options, int8):
    q, k_pages, v_pages, table, lengths = window_split_inputs(page_size, window, seed=window)
    seen = window_slots(k_pages.shape[0], page_size, table, lengths, window)
    clean, dirty = poisoned_pages(k_pages, v_pages, seen, int8)

    def attend(k, v, scales, backend, **options):
        return jax.jit(functools.partial(paged_decode_attention, backend=backend,
                                         return_lse=True, local_window=window, **options))(
            q, k, v, table, lengths, **scales)

    out, lse = attend(*dirty, backend, **options)
    ref_out, ref_lse = attend(*clean, "reference")
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, np.asarray(ref_out)) < TOLS["float32"]
    assert_lse_matches(lse, ref_lse)


def test_a_windowed_tpu_call_has_the_windows_steps_not_the_tables(monkeypatch):
    """A 255-key window over a 1024-page table of 16-token pages: the grid walks the window's 17
    pages (2 steps of 16 pages), not the table's 64 steps, and each sequence starts at the page of
    its first seen key (length - 1 - window)."""
    seen = []

    def capture(table, lens, lowest, qx, *row_limits, pages, scales, cfg):
        seen.append((cfg.span, cfg.pages_per_block, np.asarray(lowest).tolist()))
        return jnp.zeros(qx.shape, jnp.float32), jnp.zeros((*qx.shape[:3], 1), jnp.float32)

    monkeypatch.setattr(paged_pallas_tpu, "_call", capture)
    q = jnp.zeros((2, 4, 128), jnp.float32)
    pages = jnp.zeros((1024, 16, 2, 128), jnp.float32)
    table = jnp.zeros((2, 1024), jnp.int32)
    lengths = jnp.asarray([9000, 100], jnp.int32)
    for window in (255, None):
        paged_decode_attention(q, pages, pages, table, lengths, backend="pallas_tpu",
                               local_window=window)
    assert seen == [(17, 16, [9000 - 256, 100 - 256]), (1024, 16, [0, 0])]


@pytest.mark.parametrize("backend,options", WINDOW_BACKENDS,
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_traced_lengths_past_the_capacity_are_clipped_to_it(backend, options):
    """Under jit nothing checks the lengths; one past the table would start a windowed walk past
    the table's end (an out-of-bounds read on a GPU), so it is clipped: the query sits at the
    table's last position."""
    q, k_pages, v_pages, table, lengths = window_inputs(13, seed=7)
    capacity = table.shape[1] * k_pages.shape[1]
    run = jax.jit(functools.partial(paged_decode_attention, backend=backend, local_window=13,
                                    **options))
    over = run(q, k_pages, v_pages, table, lengths.at[1].set(capacity + 40))
    want = run(q, k_pages, v_pages, table, lengths.at[1].set(capacity))
    np.testing.assert_array_equal(np.asarray(over), np.asarray(want))
