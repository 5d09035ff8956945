"""SnapKV: compress a long prompt's K/V to a fixed budget per KV head at prefill.

The last `window` prompt queries (the observation window) predict which earlier positions later
queries will attend to. Per layer and KV head:

1. A = softmax(Q_window K^T / sqrt(D)), causal inside the window, in float32.
2. votes = A summed over the window rows (and over the query heads of a GQA group), for the
   positions before the window.
3. Smooth the votes with a 1-D pool (kernel `kernel_size`, stride 1) so that neighbours of a
   voted position are kept too (a token's meaning spans a few tokens).
4. Keep the top (budget - window) positions, sorted, plus the window itself.

Decode then appends to the compressed cache. Prompts no longer than the budget stay whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("avg", "max")


def observation_votes(q_window: jax.Array, k: jax.Array, *, kernel_size: int = 5,
                      pooling: str = "avg") -> jax.Array:
    """Pooled attention votes of the observation window for every position before it.

    q_window [batch, W, Hq, D] are the queries of the last W of the S positions of k
    [batch, S, Hkv, D]. Returns float32 [batch, Hkv, S - W] (summed over each GQA group)."""
    batch, w, hq, d = q_window.shape
    s, hkv = k.shape[1], k.shape[2]
    qg = q_window.reshape(batch, w, hkv, hq // hkv, d)  # [batch, W, Hkv, groups, D]
    scores = jnp.einsum("bwkgd,bskd->bkgws", qg, k, preferred_element_type=jnp.float32)
    scores = scores * d ** -0.5
    visible = jnp.arange(s)[None, :] <= (s - w + jnp.arange(w))[:, None]  # [W, S] causal
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # [batch, Hkv, groups, W, S]
    votes = probs[..., :s - w].sum(axis=(2, 3))  # [batch, Hkv, S - W]
    if pooling == "max":
        return jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, (1, 1, kernel_size),
                                     (1, 1, 1), "SAME")
    # avg pool with zero padding counted, as torch's avg_pool1d(padding=kernel//2) in SnapKV
    return jax.lax.reduce_window(votes, 0.0, jax.lax.add, (1, 1, kernel_size), (1, 1, 1),
                                 "SAME") / kernel_size


def snapkv_select(q_window: jax.Array, k: jax.Array, v: jax.Array, *, budget: int,
                  kernel_size: int = 5, pooling: str = "avg"):
    """Keep `budget` of the S prompt positions per KV head: the observation window plus the
    best-voted earlier positions.

    Args:
      q_window: [batch, W, Hq, D], queries of the last W prompt positions (rotary applied, as
        the cache's keys), Hq % Hkv == 0.
      k, v: [batch, S, Hkv, D], the prompt's K/V.
      budget: positions to keep per KV head, >= W. budget >= S returns the input unchanged.
      kernel_size: odd pooling width >= 1. pooling: "avg" or "max".

    Returns (k_kept, v_kept [batch, min(budget, S), Hkv, D], positions int32
    [batch, min(budget, S), Hkv]): per head the kept positions, ascending, the last W of which
    are the window S-W .. S-1.
    """
    if q_window.ndim != 4:
        raise ValueError(f"q_window must be [batch, W, Hq, D]; got {list(q_window.shape)}")
    batch, w, hq, d = q_window.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != d:
        raise ValueError(f"k and v must both be [batch={batch}, S, Hkv, D={d}]; got k "
                         f"{list(k.shape)} and v {list(v.shape)}")
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads must be a multiple of KV heads; got Hq={hq}, Hkv={hkv}")
    if not 1 <= w <= s:
        raise ValueError(f"the observation window must hold 1..S={s} queries; got W={w}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < w:
        raise ValueError(f"budget must be an integer >= the window W={w}; got {budget!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1; got {kernel_size!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    if budget >= s:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None],
                                     (batch, s, hkv))
        return k, v, positions

    votes = observation_votes(q_window, k, kernel_size=kernel_size, pooling=pooling)
    _, top = jax.lax.top_k(votes, budget - w)  # [batch, Hkv, budget - W]
    window = jnp.broadcast_to(jnp.arange(s - w, s, dtype=jnp.int32), (batch, hkv, w))
    positions = jnp.concatenate([jnp.sort(top.astype(jnp.int32), axis=-1), window], axis=-1)
    positions = positions.transpose(0, 2, 1)  # [batch, budget, Hkv]
    index = positions[..., None]  # [batch, budget, Hkv, 1]
    return (jnp.take_along_axis(k, index, axis=1), jnp.take_along_axis(v, index, axis=1),
            positions)
