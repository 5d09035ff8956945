"""The one attention entry point of the models.

Without a cache (training, scoring a whole sequence) it is `kernels_pallas.flash_attention`, causal,
with Mistral's sliding window as a local window; the backend is configuration. With a dense KV cache
keys live at absolute slots 0..S-1 and unwritten slots lie beyond every query's position, so a
position-based mask expresses causality, cache validity and the window at once (until the paged
decode kernel replaces this path). Query heads are grouped over KV heads by a reshape: K/V are never
repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import flash_attention

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


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sliding_window: int | None,
                     backend: str) -> jax.Array:
    """Self-attention over one whole sequence: q [batch, T, Hq, D]; k, v [batch, T, Hkv, D]."""
    # HF's window: query p sees key j iff p - j < sliding_window, i.e. left = sliding_window - 1
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return flash_attention(q, k, v, causal=True, local_window=window, backend=backend)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *,
                     sliding_window: int | None = None) -> jax.Array:
    """Causal grouped-query attention over a dense KV cache.

    q [batch, T, Hq, D]; k, v [batch, S, Hkv, D]; q_positions int32 [batch, T] -> [batch, T, Hq, D].
    Scores, softmax and the weighted sum accumulate in float32.
    """
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5
    qg = q.reshape(batch, t, hkv, hq // hkv, d)  # [batch, T, Hkv, groups, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_positions, k.shape[1], sliding_window)  # [batch, T, S]
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [batch, Hkv, groups, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, t, hq, d).astype(q.dtype)
