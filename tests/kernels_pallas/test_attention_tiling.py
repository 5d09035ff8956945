"""Block sparsity (tile_fraction, loop bounds, skipped tiles) and Triton lowering of the Pallas
kernels."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention, tile_fraction
from kernels_pallas.attention import pallas_gpu, pallas_tpu, tiling
from kernels_pallas.attention.reference import dense_mask
from tests.kernels_pallas.attention_cases import F32_TOL, rel_err


def test_tile_fraction_causal_square_is_lower_triangle():
    # 4 x 4 tiles of 16: the causal mask leaves the 10 tiles on and below the diagonal.
    assert tile_fraction(64, 64, causal=True, block_q=16, block_k=16) == 10 / 16


def test_tile_fraction_causal_prefix_aligns_bottom_right():
    # T=32 queries are positions 32..63: q block 0 sees keys 0..47 (3 tiles), block 1 all 4.
    assert tile_fraction(32, 64, causal=True, block_q=16, block_k=16) == 7 / 8


def test_tile_fraction_window_is_a_band():
    # Row p sees p-15..p: q block i needs kv blocks i-1 and i (block 0 only itself): 7 of 16.
    assert tile_fraction(64, 64, local_window=(15, 0), block_q=16, block_k=16) == 7 / 16
    assert tile_fraction(64, 64, block_q=16, block_k=16) == 1.0


def test_tile_fraction_packed_segments_are_block_diagonal():
    ids = jnp.asarray([[0] * 32 + [1] * 32], jnp.int32)
    assert tile_fraction(64, 64, segment_ids=ids, block_q=16, block_k=16) == 8 / 16
    assert tile_fraction(64, 64, causal=True, segment_ids=ids, block_q=16, block_k=16) == 6 / 16


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_tile_fraction_at_a_head_dim_counts_the_tiles_the_pallas_kernel_runs(head_dim,
                                                                            monkeypatch):
    """tile_fraction's default tiles are the ones flash_attention hands the Pallas GPU kernel at
    that head dim (64 x 32 from D = 256, not the 128 x 64 of D <= 128)."""
    seen = {}

    def capture(q, k, v, q_seg, kv_seg, *, blocks, **kwargs):
        seen["blocks"] = blocks
        return jnp.zeros_like(q), jnp.zeros(q.shape[:3], jnp.float32)

    monkeypatch.setattr(pallas_gpu, "flash_attention", capture)
    x = jnp.zeros((1, 512, 1, head_dim), jnp.float32)
    flash_attention(x, x, x, causal=True, backend="pallas")
    blocks = seen["blocks"]
    assert (blocks.block_q, blocks.block_k) == ((64, 32) if head_dim >= 256 else (128, 64))
    kwargs = dict(causal=True, local_window=(100, 0))
    expected = tile_fraction(512, 512, block_q=blocks.block_q, block_k=blocks.block_k, **kwargs)
    assert tile_fraction(512, 512, head_dim=head_dim, **kwargs) == expected
    if head_dim >= 256:  # the narrower band of smaller tiles is a smaller fraction
        assert expected < tile_fraction(512, 512, **kwargs)


@pytest.mark.parametrize("t,s,causal,window", [(17, 33, True, None), (33, 33, False, (5, 3)),
                                               (40, 100, True, (20, 0)), (100, 100, False, None)])
def test_loop_bounds_cover_exactly_the_non_empty_tiles(t, s, causal, window):
    """Every tile holding a visible pair is inside [lo, hi), and every visited tile holds one."""
    bq, bk = 16, 8
    spec = tiling.MaskSpec(t, s, causal, window, False)
    t_pad, s_pad = tiling.cdiv(t, bq) * bq, tiling.cdiv(s, bk) * bk
    lo, hi = jax.jit(lambda: tiling.loop_bounds(
        tiling.block_visibility(spec, bq, bk, t_pad, s_pad)))()
    dense = np.zeros((t_pad, s_pad), bool)
    dense[:t, :s] = np.asarray(dense_mask(t, s, causal=causal, local_window=window))[0]
    tiles = dense.reshape(t_pad // bq, bq, s_pad // bk, bk).any(axis=(1, 3))
    for i in range(t_pad // bq):
        visited = np.zeros(s_pad // bk, bool)
        visited[int(lo[0, i]):int(hi[0, i])] = True
        np.testing.assert_array_equal(visited, tiles[i])


@pytest.mark.parametrize("t,s,causal,window", [(17, 33, True, None), (48, 48, True, None),
                                               (33, 33, False, (5, 3)), (40, 100, True, (20, 0)),
                                               (64, 128, False, (40, 24)), (100, 100, False, None)])
def test_full_tiles_are_exactly_the_unmasked_ones_and_contiguous(t, s, causal, window):
    """full_visibility marks a tile iff all its pairs are visible (those skip the in-tile mask), and
    per row of tiles they form one run, as the kernels' masked-edge / unmasked-middle loops need."""
    bq, bk = 16, 8
    spec = tiling.MaskSpec(t, s, causal, window, False)
    t_pad, s_pad = tiling.cdiv(t, bq) * bq, tiling.cdiv(s, bk) * bk
    full = np.asarray(tiling.full_visibility(spec, bq, bk, t_pad, s_pad))[0]
    dense = np.zeros((t_pad, s_pad), bool)
    dense[:t, :s] = np.asarray(dense_mask(t, s, causal=causal, local_window=window))[0]
    np.testing.assert_array_equal(full, dense.reshape(t_pad // bq, bq, s_pad // bk, bk).all((1, 3)))
    for row in full.astype(int):
        assert np.count_nonzero(np.diff(np.concatenate([[0], row, [0]]))) <= 2


def test_no_tile_is_full_with_segment_ids():
    spec = tiling.MaskSpec(32, 32, False, None, True)
    assert not np.asarray(tiling.full_visibility(spec, 16, 16, 32, 32)).any()


# Skipping, seen from outside: causal with window (15, 0) on 64 x 64 scores in 16 x 16 tiles leaves
# q blocks 0 and 1 visiting key tile 0 and q blocks 2 and 3 (rows 32..63) never. NaN in that tile's
# V poisons every row of a block that computes the tile (0 * NaN = NaN in P @ V, even where P is
# masked to 0), so rows 32..63 stay finite only if their blocks skip the tile.
SKIP_T, SKIP_BLOCK, SKIP_CLEAN_FROM = 64, 16, 32


def _skip_inputs():
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((1, SKIP_T, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, SKIP_T, 1, 16)), jnp.float32) for _ in range(2))
    ct = jnp.asarray(rng.standard_normal((1, SKIP_T, 2, 16)), jnp.float32)
    return q, k, v, v.at[:, :SKIP_BLOCK].set(jnp.nan), ct


@functools.lru_cache(maxsize=None)
def _window_grad_fn(backend: str):
    """jit of (q, k, v, ct) -> ((dq, dk, dv), out) for sum(out * ct), causal + window (15, 0)."""
    blocks = {} if backend == "reference" else dict(block_q=SKIP_BLOCK, block_k=SKIP_BLOCK)

    def loss(q, k, v, ct):
        out = flash_attention(q, k, v, causal=True, local_window=(15, 0), backend=backend,
                              **blocks)
        return jnp.sum(out * ct), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_tiles_the_mask_empties_are_skipped_so_nan_there_leaves_other_rows_finite(backend):
    q, k, v, v_nan, ct = _skip_inputs()
    (dq, dk, dv), out = _window_grad_fn(backend)(q, k, v_nan, ct)
    (ref_dq, ref_dk, ref_dv), ref_out = _window_grad_fn("reference")(q, k, v, ct)
    # The reference computes every score and masks: the NaN reaches all rows, as it would in a
    # kernel that visited the empty tiles.
    dense_out = _window_grad_fn("reference")(q, k, v_nan, ct)[1]
    assert np.isnan(np.asarray(dense_out)[:, SKIP_CLEAN_FROM:]).all()
    rows = slice(SKIP_CLEAN_FROM, None)  # query rows, and the keys only those rows see
    for name, x, ref in (("out", out, ref_out), ("dq", dq, ref_dq), ("dk", dk, ref_dk),
                         ("dv", dv, ref_dv)):
        assert np.isfinite(np.asarray(x)[:, rows]).all(), name
        assert rel_err(x[:, rows], ref[:, rows]) < F32_TOL, name
    # The injected NaN is live: blocks 0 and 1, which need the tile, do read it.
    assert np.isnan(np.asarray(out)[:, :SKIP_CLEAN_FROM]).any()


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_pallas_kernels_lower_to_triton(d):
    """Forward, dq and dk/dv kernels pass the Triton lowering (power-of-two tiles etc.) for the
    head dims the issue requires; lowering needs no GPU. Compiling to PTX does."""
    pytest.importorskip("jax.experimental.pallas.triton")
    batch, t, s, hq, hkv = 2, 100, 300, 6, 2  # odd lengths, GQA with 3 heads per KV head
    dt = jnp.bfloat16
    q = jax.ShapeDtypeStruct((batch, t, hq, d), dt)
    kv = jax.ShapeDtypeStruct((batch, s, hkv, d), dt)
    ids_q = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    ids_kv = jax.ShapeDtypeStruct((batch, s), jnp.int32)
    spec = tiling.MaskSpec(t, s, True, (64, 0), True)

    def fwd_bwd(q, k, v, q_ids, kv_ids):
        def attend(q, k, v):
            return pallas_gpu.flash_attention(
                q, k, v, q_ids, kv_ids, spec=spec, scale=0.1, softcap=30.0,
                blocks=tiling.default_block_sizes("pallas", d), interpret=False)
        outs, vjp = jax.vjp(attend, q, k, v)
        return vjp(outs)

    lowered = jax.jit(fwd_bwd).trace(q, kv, kv, ids_q, ids_kv).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("d", [64, 80, 128])
def test_tpu_kernels_lower_to_mosaic(d):
    """Forward, dq and dk/dv pass the Mosaic lowering, which checks TPU block-shape rules (last two
    block dims divisible by 8 and 128 or whole); lowering needs no TPU. Compiling does."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    batch, t, s, hq, hkv = 2, 100, 300, 6, 2
    dt = jnp.bfloat16
    q = jax.ShapeDtypeStruct((batch, t, hq, d), dt)
    kv = jax.ShapeDtypeStruct((batch, s, hkv, d), dt)
    ids_q = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    ids_kv = jax.ShapeDtypeStruct((batch, s), jnp.int32)
    spec = tiling.MaskSpec(t, s, True, (64, 0), True)
    blocks = tiling.default_block_sizes("pallas_tpu", d)

    def fwd_bwd(q, k, v, q_ids, kv_ids):
        def attend(q, k, v):
            return pallas_tpu.flash_attention(
                q, k, v, q_ids, kv_ids, spec=spec, scale=0.1, softcap=30.0,
                block_q=blocks.block_q, block_k=blocks.block_k, interpret=False)
        outs, vjp = jax.vjp(attend, q, k, v)
        return vjp(outs)

    lowered = jax.jit(fwd_bwd).trace(q, kv, kv, ids_q, ids_kv).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((64, 64), dict(block_q=0), ValueError, r"block_q must be None or a positive int; got 0"),
    ((64, 64), dict(block_k=-16), ValueError, r"block_k must be None or a positive int; got -16"),
    ((64, 64), dict(local_window=(-5, 0)), ValueError,
     r"local_window must be .* pair \(left, right\) of ints >= 0; got \(-5, 0\)"),
    ((65, 64), {}, ValueError, r"T <= S.*got t=65, s=64"),
    ((0, 64), {}, ValueError, r"t must be a positive int; got 0"),
    ((64, 64), dict(segment_ids=jnp.zeros((2, 63), jnp.int32)), ValueError,
     r"segment_ids must have shape \[batch, S\] = \[2, 64\]; got \[2, 63\]"),
    ((6, 6), dict(segment_ids=jnp.zeros((6,), jnp.int32)), ValueError,
     r"segment_ids must be 2-D \[batch, S\] = \[batch, 6\]; got shape \[6\]$"),
    ((4, 6), dict(segment_ids=(jnp.zeros((1, 4), jnp.int32), jnp.zeros((6,), jnp.int32))),
     ValueError, r"segment_ids\[1\] \(kv_ids\) must be 2-D \[batch, S\] .*; got shape \[6\]"),
    ((64, 64), dict(causal=1), TypeError, r"causal must be a bool; got 1"),
    ((64, 64), dict(head_dim=0), ValueError, r"head_dim must be None or a positive int; got 0"),
])
def test_tile_fraction_rejects_invalid_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tile_fraction(*args, **kwargs)


def test_tile_fraction_window_sides_past_the_keys_are_unbounded_even_near_int32_max():
    """A side >= S is unbounded; one near int32's max once wrapped and left no tile at all."""
    tiles = dict(block_q=2, block_k=2)
    assert tile_fraction(4, 6, local_window=2 ** 31 - 1, **tiles) == 1.0
    # right side unbounded, left 0: the rows at positions 2..5 see keys p..5, 3 of the 6 tiles
    assert tile_fraction(4, 6, local_window=(0, 2 ** 31 - 1), **tiles) == 0.5
    assert (tile_fraction(4, 6, causal=True, local_window=(sys.maxsize, 0), **tiles)
            == tile_fraction(4, 6, causal=True, **tiles))


@pytest.mark.parametrize("block_q,block_k", [(128, 16), (128, 32), (128, 64), (24, 40)])
def test_tpu_kernels_with_segment_ids_lower_to_mosaic_at_narrow_key_tiles(block_q, block_k):
    """The kv segment ids' blocks obey Mosaic's rule below 128 keys a tile too (a (1, block_k)
    block of [batch, 1, S] did not: last dim neither a multiple of 128 nor whole), and so do
    tiles that are multiples of 8 but not powers of two."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 1, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    spec = tiling.MaskSpec(256, 512, True, None, True)

    def fwd_bwd(q, k, v, kv_ids):
        def attend(q, k, v):
            return pallas_tpu.flash_attention(q, k, v, kv_ids[:, 256:], kv_ids, spec=spec,
                                              scale=0.1, softcap=None, block_q=block_q,
                                              block_k=block_k, interpret=False)
        outs, vjp = jax.vjp(attend, q, k, v)
        return vjp(outs)

    lowered = jax.jit(fwd_bwd).trace(q, kv, kv, ids).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3


def _visited_and_nonempty(t, s, causal, window, q_ids, kv_ids, block=16):
    """(tiles the loops visit, tiles holding a visible pair), bool [batch, nq, nk]."""
    spec = tiling.MaskSpec(t, s, causal, window, True)
    t_pad, s_pad = tiling.cdiv(t, block) * block, tiling.cdiv(s, block) * block
    q_pad, kv_pad = (tiling.pad_to(x, 1, n, mode="edge") for x, n in ((q_ids, t_pad),
                                                                      (kv_ids, s_pad)))
    lo, hi = tiling.loop_bounds(tiling.block_visibility(spec, block, block, t_pad, s_pad,
                                                        q_pad, kv_pad))
    cols = np.arange(s_pad // block)
    visited = (cols >= np.asarray(lo)[..., None]) & (cols < np.asarray(hi)[..., None])
    dense = np.zeros((q_ids.shape[0], t_pad, s_pad), bool)
    dense[:, :t, :s] = dense_mask(t, s, causal=causal, local_window=window,
                                  q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    return visited, dense.reshape(-1, t_pad // block, block, s_pad // block, block).any((2, 4))


def test_segment_tile_skipping_is_exact_for_one_sorted_array_and_conservative_for_a_pair():
    """tiling's docstring: one sorted [batch, S] array skips exactly the empty tiles; a pair of
    independently sorted ids (T < S) may keep empty tiles but never skips a non-empty one."""
    rng = np.random.default_rng(9)
    kv_ids = jnp.asarray(np.sort(rng.integers(0, 4, (2, 100)), 1), jnp.int32)
    visited, nonempty = _visited_and_nonempty(40, 100, True, (30, 0), kv_ids[:, 60:], kv_ids)
    np.testing.assert_array_equal(visited, nonempty)
    q_ids = jnp.asarray(np.sort(rng.integers(0, 4, (2, 40)), 1), jnp.int32)
    visited, nonempty = _visited_and_nonempty(40, 100, True, (30, 0), q_ids, kv_ids)
    assert not (nonempty & ~visited).any()
    assert (visited & ~nonempty).any()  # the conservative case does happen
