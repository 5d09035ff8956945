"""Hydragen: exact attention for a batch of sequences that share one prompt prefix.

Attention over prefix + suffix splits into two attentions over disjoint key sets, merged exactly
from their outputs and log-sum-exps (`kernels_pallas.merge_attention`):

1. prefix: the queries of all B sequences are folded into the query axis of ONE non-causal
   `flash_attention` call against the single prefix K/V ([1, B*T, Hq, D] x [1, P, Hkv, D]; in
   rows of P queries when B*T > P, `attention_over_keys`). The prefix K/V is read once for the
   whole batch and B matrix-vector products become one matmul.
2. suffix: causal attention of each sequence over its own suffix K/V.
3. merge: w_x = exp(lse_x - max lse), O = (w_P O_P + w_S O_S) / (w_P + w_S).

This is the dense-batch form (the prefix and suffixes as dense K/V arrays). The Engine's
`hydragen=True` runs the paged form, over pages a step's sequences share:
`models.attention.paged_attention`, with the prefix chosen by `prefix_sharing.shared_prefix`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.models.attention import attention_over_keys
from kernels_pallas import flash_attention, merge_attention


def shared_prefix_attention(q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array,
                            suffix_k: jax.Array, suffix_v: jax.Array, *,
                            suffix_lengths: jax.Array | None = None, backend: str = "auto",
                            return_lse: bool = False):
    """Causal attention of each sequence's queries over shared prefix + its own suffix.

    Args:
      q: [batch, T, Hq, D], the queries of the last T suffix positions of each sequence (T = 1
        for decode, a chunk otherwise).
      prefix_k, prefix_v: [P, Hkv, D], the prefix K/V shared by every sequence (stored once).
      suffix_k, suffix_v: [batch, S, Hkv, D], S >= T, each sequence's K/V after the prefix; the
        queries sit at its last T positions (bottom-right causal alignment, as `flash_attention`).
      suffix_lengths: optional int [batch]: sequence b's suffix is its LAST suffix_lengths[b]
        slots (left padding; the earlier slots are masked). None: all S slots are valid.
      backend: `flash_attention` backend for both parts.
      return_lse: also return the float32 log-sum-exp [batch, T, Hq] of the whole attention.

    Returns out [batch, T, Hq, D] in q's dtype (and lse with return_lse).
    """
    batch, t, hq, d = q.shape
    if prefix_k.ndim != 3 or prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must both be [P, Hkv, D]; got prefix_k "
                         f"{list(prefix_k.shape)} and prefix_v {list(prefix_v.shape)}")
    if suffix_k.ndim != 4 or suffix_k.shape != suffix_v.shape or suffix_k.shape[0] != batch:
        raise ValueError(f"suffix_k and suffix_v must both be [batch={batch}, S, Hkv, D]; got "
                         f"suffix_k {list(suffix_k.shape)} and suffix_v {list(suffix_v.shape)}")
    if prefix_k.shape[1:] != suffix_k.shape[2:]:
        raise ValueError(f"prefix and suffix K/V must have the same [Hkv, D]; got prefix "
                         f"{list(prefix_k.shape[1:])} and suffix {list(suffix_k.shape[2:])}")
    if suffix_k.shape[1] < t:
        raise ValueError(f"the suffix must hold the queries' own positions: S >= T; got "
                         f"S={suffix_k.shape[1]}, T={t}")
    if suffix_lengths is not None and jnp.shape(suffix_lengths) != (batch,):
        raise ValueError(f"suffix_lengths must be [batch={batch}]; got shape "
                         f"{jnp.shape(suffix_lengths)}")

    # one matmul over the prefix: sequences folded into the query axis, no mask (all see it all)
    folded = q.reshape(1, batch * t, hq, d)  # [1, batch*T, Hq, D]
    out_p, lse_p = attention_over_keys(folded, prefix_k[None], prefix_v[None], backend=backend)
    out_p = out_p.reshape(batch, t, hq, d)
    lse_p = lse_p.reshape(batch, t, hq)

    segment_ids = None
    if suffix_lengths is not None:
        s = suffix_k.shape[1]
        valid = jnp.arange(s)[None, :] >= s - jnp.asarray(suffix_lengths)[:, None]  # [batch, S]
        segment_ids = (jnp.ones((batch, t), jnp.int32), valid.astype(jnp.int32))
    out_s, lse_s = flash_attention(q, suffix_k, suffix_v, causal=True, segment_ids=segment_ids,
                                   return_lse=True, backend=backend)
    out, lse = merge_attention(out_p, lse_p, out_s, lse_s)
    return (out, lse) if return_lse else out
