"""The definition of attention: plain jnp, float32, the full [T, S] score matrix. The oracle.

Materializes scores and probabilities ([batch, Hkv, groups, T, S] float32), so memory is quadratic
in sequence length; it exists to be obviously right and to differentiate through plain autodiff.
The mask is written out densely here, independently of the tiled masks in ``tiling.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_mask(t: int, s: int, *, causal: bool, local_window, q_segment_ids=None,
               kv_segment_ids=None) -> jax.Array:
    """Bool [batch or 1, T, S]. Queries are the last T of S positions (bottom-right alignment)."""
    q_pos = jnp.arange(t)[:, None] + (s - t)  # [T, 1]
    k_pos = jnp.arange(s)[None, :]  # [1, S]
    mask = jnp.ones((t, s), dtype=bool)
    if causal:
        mask &= k_pos <= q_pos
    if local_window is not None:
        left, right = local_window
        mask &= (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    mask = mask[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
              local_window=None, softmax_scale=None, logit_softcap=None):
    """q [batch, T, Hq, D]; k, v [batch, S, Hkv, D] -> (out [batch, T, Hq, D] float32,
    lse [batch, T, Hq] float32). Rows that see no key give out 0 and lse -inf.
    """
    batch, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qg = q.astype(jnp.float32).reshape(batch, t, hkv, hq // hkv, d)  # [batch, T, Hkv, groups, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    mask = dense_mask(t, s, causal=causal, local_window=local_window,
                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)  # [batch, Hkv, groups, T, S]
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # The result does not depend on the shift; a fully masked row (max -inf) shifts by 0.
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.exp(scores - shift)  # masked entries are exactly 0
    denom = jnp.sum(weights, axis=-1)  # [batch, Hkv, groups, T]
    seen = denom > 0
    safe_denom = jnp.where(seen, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(jnp.float32))
    out = out / jnp.moveaxis(safe_denom, -1, 1)[..., None]
    lse = jnp.where(seen, jnp.log(safe_denom) + shift[..., 0], -jnp.inf)
    lse = jnp.moveaxis(lse, -1, 1).reshape(batch, t, hq)  # [batch, T, Hq]
    return out.reshape(batch, t, hq, d), lse


def gather_pages(pages, page_table):
    """pages [num_pages, page_size, Hkv, D], page_table [batch, pages_per_seq] ->
    the contiguous context [batch, pages_per_seq * page_size, Hkv, D]."""
    batch, pages_per_seq = page_table.shape
    gathered = pages[page_table]  # [batch, pages_per_seq, page_size, Hkv, D]
    return gathered.reshape(batch, pages_per_seq * pages.shape[1], *pages.shape[2:])


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, softmax_scale,
                           local_window: int | None = None):
    """q [batch, Hq, D]; pages [num_pages, page_size, Hkv, D]; page_table int32
    [batch, pages_per_seq]; lengths int32 [batch]; local_window None or the keys before the query
    (at position length - 1) it sees -> (out [batch, Hq, D] float32, lse [batch, Hq] float32).

    Gathers every page into a dense context (memory batch x pages_per_seq x page_size) and runs
    dense attention with the keys at positions >= length (and < length - 1 - local_window) masked
    (as a second segment id). Their V rows are zeroed first: slots past a length may hold
    anything, and a masked weight 0 times a NaN there is still NaN.
    """
    k = gather_pages(k_pages, page_table)  # [batch, L, Hkv, D]
    v = gather_pages(v_pages, page_table)
    positions = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]  # [1, L]
    past = positions >= lengths[:, None]  # [batch, L]
    if local_window is not None:  # keys before the window count as unseen too
        past |= positions < lengths[:, None] - 1 - local_window
    v = jnp.where(past[:, :, None, None], jnp.zeros((), v.dtype), v)
    kv_ids = past.astype(jnp.int32)  # 0 valid, 1 past the length
    q_ids = jnp.zeros((q.shape[0], 1), jnp.int32)
    out, lse = attention(q[:, None], k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                         softmax_scale=softmax_scale)
    return out[:, 0], lse[:, 0]
