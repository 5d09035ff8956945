"""flash_attention(backend="pallas_mgpu"): the Mosaic GPU (Hopper) forward, run on a CPU in jax's
GPU interpret mode (shared memory, TMA copies, barriers and wgmma simulated), against the float32
reference; its Triton backward through jax.grad; its refusals; and its lowering for CUDA at the
issue's sizes (compiled by Mosaic's MLIR pipeline up to the custom call, without a GPU).

Interpreting costs ~5 s of compilation per shape and ~60 ms per simulated KV step, so the cases
are few and small; together they cover odd T and S (padding), T < S causal (bottom-right), GQA
1/2/4, D 64, 80 (padded) and 128, bfloat16 and float16, block_k 64 and 128, 1-3 pipeline stages,
one warpgroup and two consumers with a producer, local windows and soft-cap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention, paged_decode_attention
from kernels_pallas.attention import BlockSizes
from kernels_pallas.backend import resolve_backend
from tests.kernels_pallas.attention_cases import (BF16_TOL, TOLS, Case, forward_and_grads,
                                                  make_inputs, oracle, rel_err)

# lse is float32, but compiled the kernel uses the GPU's approximate exp2/log2 (approx_math,
# ~2^-22 relative each) on |lse| < ~10; interpreted it measures <= 1e-6. A masking slip moves lse
# by O(0.1), so 1e-4 still catches it.
MGPU_LSE_ATOL = 1e-4


def _gpu_interpreter():
    """jax's GPU interpret-mode module (private in jax 0.10), or None where it has moved."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    except ImportError:
        return None
    return interpret_pallas_call


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """GPU interpret mode keeps global state that a failed kernel leaves dirty (jax's docs)."""
    yield
    if (interpreter := _gpu_interpreter()) is not None:
        interpreter.reset_gpu_interpret_mode_state()


def test_pallas_mgpu_gqa2_causal_prefix_softcap_forward_lse_and_grads_match_reference():
    """bf16, T < S causal (bottom-right) with odd lengths: padded rows and keys, masked diagonal
    tiles, skipped tiles above the diagonal; soft-cap and a custom scale; the gradient runs the
    Triton backward on this forward's O and LSE (soft-cap passed on). Tolerance:
    attention_cases.BF16_TOL (P is rounded to bf16 before P @ V, as in every FlashAttention; the
    gradients are bf16)."""
    case = Case("mgpu_gqa2_causal_prefix_softcap", batch=1, t=70, s=130, hq=2, hkv=1, d=64,
                dtype="bfloat16", causal=True, softcap=5.0, scale=0.3)
    q, k, v, seg, ct_out, ct_lse = make_inputs(case)
    out, lse, grads = forward_and_grads("pallas_mgpu", case, q, k, v, seg, ct_out, ct_lse,
                                        block_q=64, block_k=64)
    ref_out, ref_lse, ref_grads = oracle(case)
    assert rel_err(out, ref_out) < BF16_TOL
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=MGPU_LSE_ATOL, rtol=0)
    for name, g, ref_g, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert rel_err(g, ref_g) < BF16_TOL, name


@pytest.mark.parametrize("case,block_q,block_k,stages,consumers", [
    # GQA 4, f16, one 128 x 128 tile per program, D = 128, no mask but query and key padding
    (Case("mgpu_gqa4_full_f16_d128", batch=1, t=65, s=100, hq=4, hkv=1, d=128, dtype="float16"),
     128, 128, 2, 1),
    # MHA, D = 80 zero-padded to 128, causal T == S over 4 KV tiles through a 3-slot pipeline
    (Case("mgpu_mha_causal_d80", batch=1, t=100, s=200, hq=1, hkv=1, d=80, dtype="bfloat16",
          causal=True), 64, 64, 3, 1),
    # one stage: every TMA copy waited for before its matmul (the pipeline's degenerate case)
    (Case("mgpu_gqa2_full_one_stage", batch=2, t=64, s=192, hq=2, hkv=1, d=64,
          dtype="bfloat16"), 64, 64, 1, 1),
    # warp-specialized (two consumers, a producer refilling both slots twice: 4 KV tiles, 2
    # stages) with a causal window and T < S: the program's range starts past KV block 0 and its
    # consumers' ranges differ at both ends (tiles fully masked for one of them)
    (Case("mgpu_ws_causal_window_prefix", batch=1, t=128, s=300, hq=1, hkv=1, d=64,
          dtype="bfloat16", causal=True, window=(70, 0)), 64, 64, 2, 2),
], ids=lambda x: x.name if isinstance(x, Case) else str(x))
def test_pallas_mgpu_forward_and_lse_match_reference(case, block_q, block_k, stages, consumers,
                                                     monkeypatch):
    """Interpreted against the reference; warp-specialized programs also run jax's dynamic race
    detector (happens-before over TMA copies, barriers and shared-memory loads and stores; jax
    0.10 does not track wgmma operand reads)."""
    from kernels_pallas.attention import pallas_mgpu

    interpreter = _gpu_interpreter()
    check_races = (consumers > 1 and jax.default_backend() != "gpu"  # compiled on a GPU
                   and interpreter is not None)
    if check_races:
        params = dataclasses.replace(pallas_mgpu.interpret_params(), detect_races=True)
        monkeypatch.setattr(pallas_mgpu, "interpret_params", lambda: params)
    q, k, v, _, _, _ = make_inputs(case)
    blocks = BlockSizes(block_q=block_q, block_k=block_k, block_q_bwd=64, block_k_bwd=64,
                        num_stages=stages, num_consumers=consumers)
    out, lse = jax.jit(lambda q, k, v: flash_attention(
        q, k, v, return_lse=True, backend="pallas_mgpu", block_sizes=blocks,
        **case.kwargs(None)))(q, k, v)
    ref_out, ref_lse, _ = oracle(case)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == jnp.float32
    assert rel_err(out, ref_out) < TOLS[case.dtype]
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=MGPU_LSE_ATOL, rtol=0)
    if check_races:
        assert not interpreter.get_races().races_found


Q16 = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
KV16 = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)


@pytest.mark.parametrize("q,kv,kwargs,match", [
    (Q16.astype(jnp.float32), KV16.astype(jnp.float32), {},
     r"needs bfloat16 or float16 .*got float32"),
    (jnp.zeros((1, 64, 2, 256), jnp.bfloat16), jnp.zeros((1, 64, 1, 256), jnp.bfloat16), {},
     r"head dims up to 128; got D=256"),
    (Q16, KV16, dict(segment_ids=jnp.zeros((1, 64), jnp.int32)), r"does not support segment_ids"),
    (Q16, KV16, dict(block_q=32), r"block_q must be 64 or 128 .*got 32"),
    (Q16, KV16, dict(block_k=256), r"block_k must be 64 or 128 .*got 256"),
    (Q16, KV16, dict(block_k=48), r"block_k must be a power of two"),
    (Q16, KV16, dict(block_sizes=BlockSizes(64, 64, 64, 64, num_stages=0)),
     r"block_sizes.num_stages must be None or a positive int; got 0"),
    (Q16, KV16, dict(block_sizes=BlockSizes(64, 64, 64, 64, num_consumers=3)),
     r"num_consumers must be 1 or 2 .*got 3"),
])
def test_pallas_mgpu_unsupported_inputs_raise_value_error(q, kv, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(q, kv, kv, backend="pallas_mgpu", **kwargs)


def test_pallas_mgpu_refuses_a_pipeline_over_hopper_shared_memory():
    """Three 128-wide K/V slots beside two consumers' q tiles at D = 128 need ~229 KiB; Mosaic's
    lowering measured 232,568 bytes against its 232,448 limit. Refused at dispatch, not in Mosaic."""
    q = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
    kv = jnp.zeros((1, 512, 1, 128), jnp.bfloat16)
    blocks = BlockSizes(64, 128, 64, 64, num_stages=3, num_consumers=2)
    with pytest.raises(ValueError, match=r"need \d+ bytes of shared memory .*lower num_stages"):
        flash_attention(q, kv, kv, backend="pallas_mgpu", block_sizes=blocks)


def test_pallas_mgpu_masked_columns_add_nothing_even_when_v_is_huge():
    """A consumer walks tiles that are fully masked for its rows (the other consumer's, under a
    window); their columns must carry p = 0, not exp2(0) = 1 times V (3e37 rows overflow f32)."""
    q, k = (jax.random.normal(jax.random.key(i), (1, 128, 1, 64)).astype(jnp.bfloat16)
            for i in range(2))
    v = jnp.full((1, 128, 1, 64), 3e37, jnp.bfloat16)
    blocks = BlockSizes(64, 64, 64, 64, num_stages=2, num_consumers=2)
    out = flash_attention(q, k, v, local_window=(0, 0), backend="pallas_mgpu", block_sizes=blocks)
    ref = flash_attention(q, k, v, local_window=(0, 0), backend="reference")
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < BF16_TOL


def test_pallas_mgpu_padding_q_block_does_not_widen_its_programs_kv_range():
    """A q block of padding alone visits no KV block; under a local window the program's union of
    KV blocks must still start at its real block's window, not at block 0."""
    from kernels_pallas.attention import pallas_mgpu, tiling
    t = s = 4160  # the last program pairs one real q block with one of padding
    spec = tiling.MaskSpec(t, s, True, (256, 0), False)
    bq, bk, consumers = 64, 128, 2
    cfg = pallas_mgpu._Config(spec, 1.0, None, bq, bk, 2, consumers,
                              tiling.cdiv(t, bq * consumers) * bq * consumers,
                              tiling.cdiv(s, bk) * bk, 1, True)
    _, union = pallas_mgpu._kv_bounds(cfg)
    steps = np.asarray(union[1] - union[0])
    assert steps.max() <= 4, steps  # a 256-key window over 64 + 64 rows spans <= 4 blocks of 128


def test_other_attention_ops_refuse_the_flash_only_pallas_mgpu_backend():
    pages = jnp.zeros((4, 16, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"backend must be one of .*; got 'pallas_mgpu'"):
        paged_decode_attention(Q16[:, 0], pages, pages, jnp.zeros((1, 2), jnp.int32),
                               jnp.ones((1,), jnp.int32), backend="pallas_mgpu")


def test_auto_keeps_triton_on_gpu_and_pallas_mgpu_is_interpreted_off_gpu(monkeypatch):
    assert resolve_backend("pallas_mgpu") == ("pallas_mgpu", True)  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_backend("auto", tpu_kernel=True) == ("pallas", False)
    assert resolve_backend("pallas_mgpu", tpu_kernel=True) == ("pallas_mgpu", False)


@pytest.mark.parametrize("causal,block_q,block_k,stages,consumers,options", [
    (True, None, None, None, None, {}),  # block_sizes=None: the table's default (warp-specialized)
    (False, 64, 128, 2, 2, {}),
    (False, 128, 128, 2, 2, {}),  # the largest pipeline dispatch accepts at D = 128 (~197 KiB)
    (True, 64, 64, 3, 1, dict(local_window=(1000, 0), logit_softcap=30.0)),  # one warpgroup
])
def test_pallas_mgpu_forward_and_grad_lower_for_cuda_at_4k(causal, block_q, block_k, stages,
                                                           consumers, options, monkeypatch):
    """The issue's shape (S = 4096, D = 128, bf16, GQA 2) through Mosaic GPU's lowering (layout
    inference, TMA and wgmma checks) and the Triton backward's, cross-compiled from this CPU. The
    dispatch is told it runs on a GPU, so the compiled (not the interpreted) kernels are lowered.
    PTX assembly happens later, when XLA compiles the custom call: only a GPU checks that."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jax.ShapeDtypeStruct((1, 4096, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
    blocks = None if block_q is None else BlockSizes(
        block_q=block_q, block_k=block_k, block_q_bwd=64, block_k_bwd=64, num_stages=stages,
        num_consumers=consumers)

    def attend(q, k, v):
        return flash_attention(q, k, v, causal=causal, backend="pallas_mgpu", block_sizes=blocks,
                               **options)

    text = jax.jit(attend).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    grad = jax.jit(jax.grad(lambda *x: attend(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    text = grad.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" in text.lower()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernel: needs a Hopper GPU")
@pytest.mark.parametrize("consumers", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_pallas_mgpu_compiled_matches_reference_at_4k_on_gpu(causal, consumers):
    """On a GPU the compiled kernel at the issue's size (S = 4096, D = 128, bf16, GQA 2): many
    programs, long pipelines and the approximate exp2/log2 that interpretation never sees."""
    case = Case(f"mgpu_gpu_4k_{causal}_{consumers}", batch=1, t=4096, s=4096, hq=4, hkv=2,
                d=128, dtype="bfloat16", causal=causal)
    q, k, v, _, _, _ = make_inputs(case)
    blocks = BlockSizes(block_q=64, block_k=128 if consumers == 2 else 64, block_q_bwd=64,
                        block_k_bwd=64, num_stages=2, num_consumers=consumers)
    out, lse = jax.jit(lambda q, k, v: flash_attention(
        q, k, v, causal=causal, return_lse=True, backend="pallas_mgpu",
        block_sizes=blocks))(q, k, v)
    ref_out, ref_lse = jax.jit(lambda q, k, v: flash_attention(
        q, k, v, causal=causal, return_lse=True, backend="reference"))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    assert rel_err(out, ref_out) < BF16_TOL
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=MGPU_LSE_ATOL, rtol=0)
