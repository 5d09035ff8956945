"""Shared inputs for the attention tests: a seeded case table, input builders, the oracle."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import flash_attention

# Comparisons are max|actual - expected| / max|expected| (error relative to the largest entry, so
# one constant serves outputs and gradients of any magnitude).
# float32: the tiled paths reorder the softmax sums and rescale the accumulator once per KV block;
# measured errors are ~1e-6, so 1e-5 leaves 10x headroom while catching any masking slip.
F32_TOL = 1e-5
# bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3). Out, dq, dk, dv are rounded to
# bf16, and like FlashAttention the kernels round P and dS to bf16 before their matmuls; the
# cotangent of a bf16 output is itself rounded. Measured 2e-3..5e-3; 1.5e-2 allows ~3x.
BF16_TOL = 1.5e-2
# lse is float32 in every path (scores accumulate in f32 even from bf16 inputs); only the order of
# the f32 sums differs. |lse| < ~10 here, whose f32 ulp is ~1e-6; measured <= 5e-7.
LSE_ATOL = 1e-5

TOLS = {"float32": F32_TOL, "bfloat16": BF16_TOL, "float16": BF16_TOL}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    t: int
    s: int
    hq: int
    hkv: int
    d: int
    dtype: str = "float32"
    causal: bool = False
    window: tuple[int, int] | None = None
    # None | "packed" (sorted ids, one [batch, S] array) | "pair_empty" (q ids include ids absent
    # from kv ids: rows that see nothing) | "random" (unsorted ids, one array)
    segments: str | None = None
    softcap: float | None = None
    scale: float | None = None
    block_q: int = 16
    block_k: int = 16

    def kwargs(self, segment_ids):
        return dict(causal=self.causal, local_window=self.window, segment_ids=segment_ids,
                    logit_softcap=self.softcap, softmax_scale=self.scale)


# Odd lengths pad every tile edge; block 16 gives several tiles per axis so the block-sparse loop
# bounds (and their skipping) matter. Every feature runs on both the xla and pallas backends.
CASES = [
    Case("gqa2_causal_prefix", batch=1, t=17, s=33, hq=4, hkv=2, d=16, causal=True),
    Case("gqa4_window", batch=1, t=33, s=33, hq=8, hkv=2, d=16, window=(5, 3)),
    Case("gqa8_causal", batch=1, t=17, s=17, hq=16, hkv=2, d=16, causal=True),
    Case("mqa3_prefix_window_causal", batch=1, t=33, s=100, hq=3, hkv=1, d=16, causal=True,
         window=(20, 0)),
    Case("packed_segments_causal", batch=2, t=100, s=100, hq=2, hkv=2, d=16, causal=True,
         segments="packed", block_q=32, block_k=32),
    Case("segment_pair_empty_rows", batch=2, t=17, s=33, hq=4, hkv=2, d=16, segments="pair_empty"),
    Case("unsorted_segments_window", batch=2, t=33, s=33, hq=2, hkv=1, d=16, window=(4, 4),
         segments="random"),
    Case("softcap_scale_bf16", batch=1, t=33, s=33, hq=4, hkv=2, d=32, dtype="bfloat16",
         softcap=5.0, scale=0.3),
    Case("mqa_causal_window_segments_prefix_bf16", batch=2, t=33, s=100, hq=4, hkv=1, d=32,
         dtype="bfloat16", causal=True, window=(7, 0), segments="packed"),
    Case("head_dim_80_causal", batch=1, t=33, s=33, hq=2, hkv=1, d=80, causal=True,
         block_q=32, block_k=32),
    # The head dims, small in T and S (a few tiles) to stay cheap: 64 and 128 fill the
    # Pallas tiles exactly, 96 is zero-padded to 128, 256 is the widest.
    Case("head_dim_64_gqa_causal", batch=1, t=17, s=17, hq=2, hkv=1, d=64, causal=True),
    Case("head_dim_96_prefix_window", batch=1, t=9, s=20, hq=2, hkv=1, d=96, window=(6, 2)),
    Case("head_dim_128_causal_bf16", batch=1, t=17, s=17, hq=2, hkv=2, d=128, dtype="bfloat16",
         causal=True),
    Case("head_dim_256_gqa_prefix_causal", batch=1, t=9, s=20, hq=2, hkv=1, d=256, causal=True),
]


def make_inputs(case: Case, seed: int = 0):
    """-> q, k, v in case.dtype, the segment_ids argument, and f32 cotangents for out and lse."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((case.batch, case.t, case.hq, case.d)), dt)
    k = jnp.asarray(rng.standard_normal((case.batch, case.s, case.hkv, case.d)), dt)
    v = jnp.asarray(rng.standard_normal((case.batch, case.s, case.hkv, case.d)), dt)
    seg = None
    if case.segments == "packed":
        starts = np.sort(rng.integers(1, case.s, (case.batch, 3)), axis=1)
        seg = (np.arange(case.s)[None, :, None] >= starts[:, None, :]).sum(-1)
        seg = jnp.asarray(seg, jnp.int32)
    elif case.segments == "random":
        seg = jnp.asarray(rng.integers(0, 3, (case.batch, case.s)), jnp.int32)
    elif case.segments == "pair_empty":
        kv_ids = rng.integers(0, 2, (case.batch, case.s))
        q_ids = rng.integers(0, 3, (case.batch, case.t))  # id 2 never occurs among the keys
        seg = (jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32))
    ct_out = jnp.asarray(rng.standard_normal((case.batch, case.t, case.hq, case.d)), jnp.float32)
    ct_lse = jnp.asarray(rng.standard_normal((case.batch, case.t, case.hq)), jnp.float32)
    return q, k, v, seg, ct_out, ct_lse


def loss_fn(backend: str, case: Case, seg, ct_out, ct_lse, **blocks):
    """Scalar loss touching out and lse, whose gradient gives dq, dk, dv; aux = (out, lse)."""
    def loss(q, k, v):
        out, lse = flash_attention(q, k, v, return_lse=True, backend=backend, **case.kwargs(seg),
                                   **blocks)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        value = jnp.sum(out.astype(jnp.float32) * ct_out) + jnp.sum(finite_lse * ct_lse)
        return value, (out, lse)
    return loss


def forward_and_grads(backend: str, case: Case, q, k, v, seg, ct_out, ct_lse, **blocks):
    """-> (out, lse, (dq, dk, dv)) from one jitted jax.grad."""
    grad = jax.grad(loss_fn(backend, case, seg, ct_out, ct_lse, **blocks), argnums=(0, 1, 2),
                    has_aux=True)
    grads, (out, lse) = jax.jit(grad)(q, k, v)
    return out, lse, grads


@functools.lru_cache(maxsize=None)
def oracle(case: Case, seed: int = 0):
    """Reference out, lse and grads on the f32 upcast of the case's inputs (computed once)."""
    q, k, v, seg, ct_out, ct_lse = make_inputs(case, seed)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.device_get(forward_and_grads("reference", case, *up, seg, ct_out, ct_lse))


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| in float64 (inf entries must match exactly)."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    inf = np.isinf(e)
    np.testing.assert_array_equal(a[inf], e[inf])
    a, e = a[~inf], e[~inf]
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)) if e.size else 0.0


def check_against_oracle(backend: str, case: Case, **blocks):
    """Forward, lse and the three gradients of ``backend`` on ``case`` within the dtype's
    tolerance of the float32 reference; rows that see no key exactly 0 / -inf; grads finite."""
    q, k, v, seg, ct_out, ct_lse = make_inputs(case)
    out, lse, grads = forward_and_grads(backend, case, q, k, v, seg, ct_out, ct_lse, **blocks)
    ref_out, ref_lse, ref_grads = oracle(case)
    tol = TOLS[case.dtype]
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert lse.shape == (case.batch, case.t, case.hq)
    assert rel_err(out, ref_out) < tol, "out"
    # Rows that see no key (segment ids absent from the keys): out exactly 0, lse exactly -inf.
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    assert np.all(np.asarray(out, np.float32)[np.isinf(ref_lse)] == 0)
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], atol=LSE_ATOL, rtol=0)
    for name, g, ref_g, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert rel_err(g, ref_g) < tol, name
