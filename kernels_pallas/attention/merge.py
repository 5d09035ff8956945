"""Exact combination of two partial attentions over disjoint key sets, from outputs and lse."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.attention import checks


def merge_attention(o1, lse1, o2, lse2):
    """(o1, lse1) over keys K1 and (o2, lse2) over keys K2 -> (o, lse) over K1 ∪ K2.

    o1, o2 [..., D] of one shape, e.g. [batch, T, H, D] (any float dtypes; the result has their
    promoted dtype, ``jnp.result_type(o1, o2)``, whatever the argument order); lse1, lse2 float
    [...] = o1.shape[:-1], -inf where a part saw no key. Weights exp(lse_i - lse) are computed in
    float32; a row neither part saw stays o = 0, lse = -inf.
    Differentiable (no NaN gradients at -inf). Mismatched shapes or non-float dtypes raise
    ValueError (broadcasting would silently give a wrong-shaped result).
    """
    checks.check_merge(o1, lse1, o2, lse2)
    lse1 = lse1.astype(jnp.float32)
    lse2 = lse2.astype(jnp.float32)
    top = jnp.maximum(lse1, lse2)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    w1 = jnp.exp(lse1 - shift)  # 0 where lse1 is -inf
    w2 = jnp.exp(lse2 - shift)
    total = w1 + w2
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    out = (w1[..., None] * o1.astype(jnp.float32) + w2[..., None] * o2.astype(jnp.float32))
    out = out / safe_total[..., None]
    lse = jnp.where(seen, shift + jnp.log(safe_total), -jnp.inf)
    return out.astype(jnp.result_type(o1, o2)), lse
