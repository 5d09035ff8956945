"""flash_attention: every backend against the float32 reference, forward and all three gradients."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention
from kernels_pallas.backend import resolve_backend
from tests.kernels_pallas.attention_cases import (CASES, F32_TOL, LSE_ATOL, TOLS, Case,
                                                  check_against_oracle, make_inputs, rel_err)

BACKENDS = ["xla", "pallas"]  # pallas runs its kernels with interpret=True on CPU


# The head-dim cases pad D to the kernels' tile widths (96 -> 128, wide-head tiles at 256): code
# the Pallas kernels have and the xla path does not (it never looks at D), so xla skips them.
PALLAS_ONLY = {"head_dim_64_gqa_causal", "head_dim_96_prefix_window", "head_dim_128_causal_bf16",
               "head_dim_256_gqa_prefix_causal"}


@pytest.mark.parametrize("backend, case", [
    pytest.param(b, c, id=f"{b}-{c.name}") for b in BACKENDS for c in CASES
    if b == "pallas" or c.name not in PALLAS_ONLY])
def test_forward_lse_and_grads_match_reference(backend, case):
    check_against_oracle(backend, case, block_q=case.block_q, block_k=case.block_k)


# The TPU (Mosaic) kernel interpreted on a CPU costs ~8-15 s a case, so it runs the cases that
# together cover every feature once: GQA + causal prefix, empty rows through segment ids, bf16 +
# softcap, MQA + window + packed segments + prefix in bf16, and a head dim that is not a multiple
# of 128 (its tile ranges come from the same `tiling` tables the GPU kernel's cases cover in full).
TPU_CASES = ("gqa2_causal_prefix", "segment_pair_empty_rows", "softcap_scale_bf16",
             "mqa_causal_window_segments_prefix_bf16", "head_dim_80_causal")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in TPU_CASES], ids=lambda c: c.name)
def test_tpu_kernel_forward_lse_and_grads_match_reference(case):
    check_against_oracle("pallas_tpu", case, block_q=case.block_q, block_k=case.block_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocks_match_reference(backend):
    """Default tiles (larger than T and S here: one tile, shrunk and padded) are right too."""
    case = Case("defaults_mha_full_odd", batch=2, t=37, s=37, hq=2, hkv=2, d=16)
    check_against_oracle(backend, case)


def test_sweep_includes_rows_that_see_no_key():
    """The empty-row checks in _check_against_oracle are exercised by some case."""
    case = next(c for c in CASES if c.segments == "pair_empty")
    _, _, _, (q_ids, kv_ids), _, _ = make_inputs(case)
    empty = ~np.any(np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :], axis=-1)
    assert empty.any() and not empty.all()


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, (4, 0)),
                                           (False, (3, 2))])
def test_reference_matches_jax_nn_dot_product_attention(causal, window):
    """The oracle agrees with jax.nn's definition where both apply (T == S, GQA, no segments)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 12, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 12, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 12, 2, 8)), jnp.float32)
    ours = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=causal, local_window=window,
                                                    backend="reference"))(q, k, v)
    theirs = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, local_window_size=window))(q, k, v)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)


def test_auto_backend_picks_the_platform_kernel_and_grads_without_lse_match_reference():
    """backend="auto" is xla on CPU and pallas on GPU; jax.grad works when the lse is not returned."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((1, 9, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 9, 1, 8)), jnp.float32)

    def loss(backend):
        return jax.jit(jax.value_and_grad(
            lambda q, k: jnp.sum(jnp.sin(flash_attention(q, k, k, causal=True, backend=backend))),
            argnums=(0, 1)))

    gpu = jax.default_backend() == "gpu"
    assert resolve_backend("auto") == (("pallas", False) if gpu else ("xla", False))
    (value, grads), (ref_value, ref_grads) = loss("auto")(q, k), loss("reference")(q, k)
    np.testing.assert_allclose(value, ref_value, rtol=F32_TOL)
    for g, ref_g in zip(grads, ref_grads):
        assert rel_err(g, ref_g) < F32_TOL


def test_float16_forward_on_xla_matches_reference():
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 17, 2, 16)), jnp.float16)
    k = jnp.asarray(rng.standard_normal((1, 17, 1, 16)), jnp.float16)
    out = jax.jit(lambda q, k: flash_attention(q, k, k, causal=True, backend="xla", block_q=16,
                                               block_k=16))(q, k)
    up = q.astype(jnp.float32), k.astype(jnp.float32)
    ref = jax.jit(lambda q, k: flash_attention(q, k, k, causal=True, backend="reference"))(*up)
    assert out.dtype == jnp.float16
    assert rel_err(out, ref) < TOLS["float16"]


# A window side >= S reaches past every key: unbounded. Sides near or past int32's range (an
# "unbounded" 2**31 - 1 or sys.maxsize) once wrapped position + side in int32 and hid every key.
HUGE = 2 ** 31 - 1
HUGE_WINDOWS = [((0, HUGE), False, (0, 6)), ((HUGE, HUGE), False, None),
                ((2 ** 31, 0), True, None), ((sys.maxsize, sys.maxsize), False, None)]


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas", "pallas_tpu"])
def test_window_sides_past_the_keys_are_unbounded_even_near_int32_max(backend):
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 4, 1, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 6, 1, 16)), jnp.float32) for _ in range(2))
    blocks = {} if backend == "reference" else dict(block_q=16, block_k=16)
    for window, causal, same_as in HUGE_WINDOWS:
        out, lse = flash_attention(q, k, v, causal=causal, local_window=window, return_lse=True,
                                   backend=backend, **blocks)
        ref, ref_lse = flash_attention(q, k, v, causal=causal, local_window=same_as,
                                       return_lse=True, backend="reference")
        assert rel_err(out, ref) < F32_TOL, window
        np.testing.assert_allclose(lse, ref_lse, atol=LSE_ATOL, err_msg=str(window))
