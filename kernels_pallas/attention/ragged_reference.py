"""The definition of ragged paged attention: every query token on its own, plain jnp, float32.

Token t of sequence s (index i among its q_len tokens) sits at position kv_len - q_len + i and
sees keys 0 .. that position (with a window, position - local_window .. position): one decode over
its sequence's page-table row with length position + 1. The reference gathers each token's whole
row ([T, pages_per_seq * page_size, Hkv, D]) and materializes its [T, keys] mask
(``reference.paged_decode_attention``); padding tokens get length 0, hence out 0 and lse -inf.
Memory grows with T x context: the oracle, not a fast path.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.attention import reference
from kernels_pallas.attention.ragged_blocks import token_owners


def ragged_paged_attention(q, k_pages, v_pages, page_table, query_starts, kv_lengths, num_seqs,
                           *, softmax_scale: float, local_window: int | None = None):
    """q [T, Hq, D]; float pages [num_pages, page_size, Hkv, D]; page_table int32 [S, P];
    query_starts int32 [S + 1]; kv_lengths int32 [S]; local_window None or the keys before its
    position each token sees -> (out [T, Hq, D] float32, lse [T, Hq] float32)."""
    seq, _, position, owned = token_owners(query_starts, kv_lengths, num_seqs, q.shape[0])
    lengths = jnp.where(owned, position + 1, 0)  # [T] keys each token sees
    return reference.paged_decode_attention(q, k_pages, v_pages, page_table[seq], lengths,
                                            softmax_scale=softmax_scale,
                                            local_window=local_window)
