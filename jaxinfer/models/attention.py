"""The one attention entry point of the models.

Keys and values live at absolute slots 0..S-1 (a whole sequence, or a KV cache whose unwritten slots
lie beyond every query's position), so a single position-based mask expresses causality, cache
validity and Mistral's sliding window. Query heads are grouped over KV heads by a reshape: K/V are
never repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative: fully masked rows stay finite instead of producing NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_positions: jax.Array, kv_len: int, sliding_window: int | None) -> jax.Array:
    """Boolean [batch, T, S]: query at position p sees key slot j iff j <= p (and p - j < window)."""
    slots = jnp.arange(kv_len)[None, None, :]
    pos = q_positions[:, :, None]
    mask = slots <= pos
    if sliding_window is not None:
        mask &= pos - slots < sliding_window
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *,
              sliding_window: int | None = None, softmax_scale: float | None = None) -> jax.Array:
    """Causal grouped-query attention.

    q [batch, T, Hq, D]; k, v [batch, S, Hkv, D]; q_positions int32 [batch, T] -> [batch, T, Hq, D].
    Scores, softmax and the weighted sum accumulate in float32.
    """
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qg = q.reshape(batch, t, hkv, hq // hkv, d)  # [batch, T, Hkv, groups, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_positions, k.shape[1], sliding_window)  # [batch, T, S]
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [batch, Hkv, groups, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, t, hq, d).astype(q.dtype)
