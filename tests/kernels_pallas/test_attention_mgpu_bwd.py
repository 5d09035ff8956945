"""The Mosaic GPU backward of flash_attention(backend="pallas_mgpu") (``pallas_mgpu_bwd.py``,
selected by ``BlockSizes(mgpu_backward="mosaic")``): dq, dk, dv through jax.grad against the
float32 reference's, run on a CPU in jax's GPU interpret mode; the selection's refusals; and the
forward + backward lowered for CUDA at the issue's size (Mosaic's MLIR pipeline, layout inference
and wgmma shape checks included; only a GPU assembles the PTX).

Interpreted, the kernels write transposed and register operands through scratch shared memory
where the GPU reads transposed views and registers (the module docstring lists every difference):
the cross-lowering test is what checks the compiled forms. Interpreting costs seconds per shape,
so the cases are few and small: odd T and S (padding), T < S causal (bottom-right), GQA 1/2,
D 64 and 128, bfloat16 and float16, local windows, soft-cap, dk/dv and dq tiles of 64 and 128,
1-3 pipeline stages, one warpgroup per program and two consumers with a TMA producer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention
from kernels_pallas.attention import DEFAULT_BLOCK_SIZES, BlockSizes, tiling
from tests.kernels_pallas.attention_cases import (BF16_TOL, TOLS, Case, forward_and_grads,
                                                  make_inputs, oracle, rel_err)


def _mosaic(**tiles) -> BlockSizes:
    """64 x 64 tiles, one warpgroup per program (the cheapest to interpret), Mosaic GPU backward."""
    base = dict(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_stages=2,
                num_stages_bwd=2, num_consumers=1, mgpu_backward="mosaic")
    return BlockSizes(**{**base, **tiles})


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """GPU interpret mode keeps global state that a failed kernel leaves dirty (jax's docs)."""
    yield
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    except ImportError:  # moved in a later jax
        return
    interpret_pallas_call.reset_gpu_interpret_mode_state()


GRAD_CASES = [
    # GQA 2, T < S causal with odd lengths (padded rows and keys, masked diagonal tiles, skipped
    # tiles above it), soft-cap and a custom scale, 64 x 64 tiles, 2 stages
    (Case("mosaic_bwd_gqa2_causal_prefix_softcap", batch=1, t=70, s=130, hq=2, hkv=1, d=64,
          dtype="bfloat16", causal=True, softcap=5.0, scale=0.3), _mosaic()),
    # MHA, D = 128, a two-sided window (both ends of each band masked), dq tiles 128 x 64 beside
    # 64 x 64 dk/dv tiles (T padded to the larger), one stage: every copy waited for at once
    (Case("mosaic_bwd_mha_window_d128", batch=1, t=65, s=100, hq=1, hkv=1, d=128,
          dtype="bfloat16", window=(40, 10)), _mosaic(block_q_dq=128, num_stages_bwd=1)),
    # GQA 2 over 2 KV heads, float16, causal window with T < S (keys before every window get
    # zero dk/dv inside a visited tile), 128-row dk/dv tiles, a 3-slot pipeline across group heads
    pytest.param(Case("mosaic_bwd_gqa2x2_causal_window_f16", batch=1, t=100, s=260, hq=4, hkv=2,
                      d=64, dtype="float16", causal=True, window=(60, 0)),
                 _mosaic(block_k_bwd=128, num_stages_bwd=3), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case,blocks", GRAD_CASES, ids=lambda x: getattr(x, "name", ""))
def test_mosaic_backward_grads_match_reference(case, blocks):
    """Tolerance: attention_cases' dtype tolerance (BF16_TOL for 16-bit inputs: P and dS are
    rounded to the input dtype before their matmuls, as in every FlashAttention, and the
    gradients themselves are 16-bit; measured 2.5e-3..5e-3)."""
    q, k, v, seg, ct_out, ct_lse = make_inputs(case)
    out, lse, grads = forward_and_grads("pallas_mgpu", case, q, k, v, seg, ct_out, ct_lse,
                                        block_sizes=blocks)
    ref_out, _, ref_grads = oracle(case)
    tol = TOLS[case.dtype]
    assert rel_err(out, ref_out) < tol
    for name, g, ref_g, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert rel_err(g, ref_g) < tol, name


@pytest.mark.parametrize("case", [
    # causal T == S over two 64-row blocks: one dq program (two q blocks) and one dk/dv program
    # (two KV blocks), each with a diagonal and an empty tile for one consumer
    Case("mosaic_bwd_ws_causal", batch=1, t=128, s=128, hq=1, hkv=1, d=64, dtype="bfloat16",
         causal=True),
    # GQA 2, T < S causal window with soft-cap: the producer refills slots across group heads and
    # the consumers' ranges differ at both ends
    pytest.param(Case("mosaic_bwd_ws_gqa2_causal_window_softcap", batch=1, t=128, s=300, hq=2,
                      hkv=1, d=64, dtype="bfloat16", causal=True, window=(70, 0), softcap=5.0),
                 marks=pytest.mark.slow),
], ids=lambda case: case.name)
def test_warp_specialized_mosaic_backward_grads_match_reference_without_races(case,
                                                                              monkeypatch):
    """Two consumer warpgroups and a TMA producer per program (num_consumers_bwd=2), with jax's
    dynamic race detector on (happens-before over TMA copies, barriers and shared-memory loads
    and stores; jax 0.10 does not track wgmma operand reads). Tolerance as above."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    from kernels_pallas.attention import pallas_mgpu_bwd

    params = dataclasses.replace(pallas_mgpu_bwd.interpret_params(), detect_races=True)
    monkeypatch.setattr(pallas_mgpu_bwd, "interpret_params", lambda: params)
    q, k, v, seg, ct_out, ct_lse = make_inputs(case)
    _, _, grads = forward_and_grads("pallas_mgpu", case, q, k, v, seg, ct_out, ct_lse,
                                    block_sizes=_mosaic(num_consumers_bwd=2, num_stages_bwd=3))
    _, _, ref_grads = oracle(case)
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(g, ref_g) < TOLS[case.dtype], name
    assert not interpret_pallas_call.get_races().races_found


def test_program_bounds_tile_each_programs_union_and_ignore_empty_rows():
    """Under a causal window with T < S (KV blocks before every window, a q block of padding
    alone), per program: masked, unmasked and masked loops tile the union of its consumers'
    visited tiles; every visible tile is inside; unmasked tiles are fully visible; empty rows do
    not pull the union back to tile 0."""
    spec = tiling.MaskSpec(t=130, s=600, causal=True, window=(100, 0), segments=False)
    bq, bk, consumers, t_pad, s_pad = 64, 64, 2, 256, 640
    vis = np.asarray(tiling.block_visibility(spec, bq, bk, t_pad, s_pad)[0])  # [4, 10]
    full = np.asarray(tiling.full_visibility(spec, bq, bk, t_pad, s_pad)[0])
    for v, f in ((vis, full), (vis.T, full.T)):  # dq's rows are q blocks, dk/dv's KV blocks
        rows, union = (np.asarray(x) for x in tiling.program_bounds(v, f, consumers))
        for r in range(v.shape[0]):
            lo, hi = union[:, r // consumers]
            full_lo, full_hi = rows[:, r]
            assert lo <= full_lo <= full_hi <= hi
            assert not v[r, :lo].any() and not v[r, hi:].any()
            assert f[r, full_lo:full_hi].all()
        for lo, hi, group in zip(*union, v.reshape(-1, consumers, v.shape[1])):
            seen = np.flatnonzero(group.any(0))
            assert (lo, hi) == ((seen[0], seen[-1] + 1) if seen.size else (0, 0))


def test_triton_backward_stays_the_default_until_measured():
    assert DEFAULT_BLOCK_SIZES["pallas_mgpu"].mgpu_backward == "triton"
    assert BlockSizes(64, 64, 64, 64).mgpu_backward == "triton"


Q16 = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
KV16 = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)


@pytest.mark.parametrize("blocks,match", [
    (_mosaic(mgpu_backward="cudnn"), r"mgpu_backward must be 'triton' or 'mosaic'; got 'cudnn'"),
    (_mosaic(block_q_bwd=32), r"block_sizes.block_q_bwd must be 64 or 128 .*got 32"),
    (_mosaic(block_k_dq=256), r"block_sizes.block_k_dq must be 64 or 128 .*got 256"),
    (_mosaic(num_consumers_bwd=3), r"num_consumers_bwd must be 1 or 2 .*got 3"),
])
def test_mosaic_backward_unsupported_block_sizes_raise_value_error(blocks, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(Q16, KV16, KV16, backend="pallas_mgpu", block_sizes=blocks)


def test_mosaic_backward_refuses_a_pipeline_over_hopper_shared_memory():
    """At D = 128, two consumers' resident 64 x 128 tiles and 5 slots of streamed ones: Mosaic's
    own count when lowered is 233608 bytes, over the 232448 a Hopper CTA may take; dispatch says
    so (before any differentiation) and what to change. Short sequences clamp the slots to the
    steps there are, so the refusal needs enough q blocks to fill them."""
    q = jax.ShapeDtypeStruct((1, 640, 2, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 640, 1, 128), jnp.bfloat16)
    blocks = _mosaic(num_consumers_bwd=2, num_stages_bwd=5)
    with pytest.raises(ValueError, match=r"dk/dv kernel .*needs \d+ bytes of shared memory .*"
                                         r"lower num_stages_bwd"):
        jax.jit(lambda q, k, v: flash_attention(q, k, v, backend="pallas_mgpu",
                                                block_sizes=blocks)).trace(q, kv, kv)


def test_triton_backward_tiles_are_not_held_to_mosaic_rules():
    """32-row backward tiles are fine for Triton: the 64/128 rule binds only the Mosaic one."""
    blocks = dataclasses.replace(_mosaic(block_q_bwd=32), mgpu_backward="triton")
    traced = jax.jit(lambda q, k, v: flash_attention(q, k, v, backend="pallas_mgpu",
                                                     block_sizes=blocks)).trace(Q16, KV16, KV16)
    assert traced.out_info.shape == Q16.shape


@pytest.mark.parametrize("causal,blocks,options", [
    # the table's tiles, forward and backward both warp-specialized (two consumers + a producer)
    (True, dataclasses.replace(DEFAULT_BLOCK_SIZES["pallas_mgpu"], mgpu_backward="mosaic"), {}),
    # one warpgroup per backward program, 128-row dq tiles, a 3-slot pipeline, window, soft-cap
    (False, _mosaic(block_q_dq=128, num_stages_bwd=3),
     dict(local_window=(1000, 200), logit_softcap=30.0)),
    # the deepest pipeline dispatch accepts at 64 x 64 with two consumers: fits Mosaic's count
    (True, _mosaic(num_consumers_bwd=2, num_stages_bwd=4), {}),
    # two consumers under a causal soft-cap (the tanh tile's derivative folded into P early)
    (True, _mosaic(num_consumers_bwd=2), dict(logit_softcap=20.0)),
])
def test_mosaic_backward_lowers_for_cuda_at_4k(causal, blocks, options, monkeypatch):
    """The issue's shape (S = 4096, D = 128, bf16, GQA 2): the gradient's program holds the Mosaic
    GPU forward and the dq and dk/dv kernels, and no Triton kernel. The dispatch is told it runs
    on a GPU, so the compiled forms (transposed views, register operands, in-place accumulation,
    layout-carrying loads) are what is lowered."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jax.ShapeDtypeStruct((1, 4096, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)

    def loss(q, k, v):
        out, lse = flash_attention(q, k, v, causal=causal, backend="pallas_mgpu",
                                   block_sizes=blocks, return_lse=True, **options)
        return out.astype(jnp.float32).sum() + lse.sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3 and "triton" not in text.lower()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernels: need a Hopper GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_mosaic_backward_compiled_matches_reference_at_4k_on_gpu(causal):
    """On a GPU the compiled kernels at the issue's size (S = 4096, D = 128, bf16, GQA 2): many
    programs, long pipelines, transposed views and register operands that interpretation never
    sees."""
    case = Case(f"mosaic_bwd_gpu_4k_{causal}", batch=1, t=4096, s=4096, hq=4, hkv=2, d=128,
                dtype="bfloat16", causal=causal)
    q, k, v, seg, ct_out, ct_lse = make_inputs(case)
    blocks = dataclasses.replace(DEFAULT_BLOCK_SIZES["pallas_mgpu"], mgpu_backward="mosaic")
    _, _, grads = forward_and_grads("pallas_mgpu", case, q, k, v, seg, ct_out, ct_lse,
                                    block_sizes=blocks)
    _, _, ref_grads = forward_and_grads("reference", case,
                                        *(x.astype(jnp.float32) for x in (q, k, v)), seg,
                                        ct_out, ct_lse)
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(g, ref_g) < BF16_TOL, name
