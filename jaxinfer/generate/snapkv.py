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

`snapkv_select` works on dense K/V; `compress_sequence` is the serving engine's form: it rewrites
one sequence's pages in place so that slots 0..budget-1 of each KV head hold that head's kept
tokens (K is stored after RoPE, so a key's slot need not match its position, and heads may keep
different positions in the same slot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer.generate.checks import is_int
from jaxinfer.models.paged_kv import PagedKVCache, PagedLayerKV
from kernels_pallas.attention import dequantize

POOLINGS = ("avg", "max")


def _pooled_votes(q_window: jax.Array, k: jax.Array, length: jax.Array | int, kernel_size: int,
                  pooling: str) -> jax.Array:
    """Pooled votes for every slot of k [batch, S, Hkv, D] whose first `length` slots hold the
    prompt (the rest is padding, unseen): float32 [batch, Hkv, S], -inf from the window on.

    Votes at and past the window count as zero padding for "avg" and -inf for "max", exactly as
    pooling the S - W votes alone with SAME padding: a padded k selects what the unpadded does."""
    batch, w, hq, d = q_window.shape
    s, hkv = k.shape[1], k.shape[2]
    first = length - w  # the window's first position
    qg = q_window.reshape(batch, w, hkv, hq // hkv, d)  # [batch, W, Hkv, groups, D]
    scores = jnp.einsum("bwkgd,bskd->bkgws", qg, k, preferred_element_type=jnp.float32)
    scores = scores * d ** -0.5
    visible = jnp.arange(s)[None, :] <= (first + jnp.arange(w))[:, None]  # [W, S] causal
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # [batch, Hkv, groups, W, S]
    before = jnp.arange(s) < first  # [S]
    if pooling == "max":
        votes = jnp.where(before, probs.sum(axis=(2, 3)), -jnp.inf)  # [batch, Hkv, S]
        pooled = jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, (1, 1, kernel_size),
                                       (1, 1, 1), "SAME")
    else:  # avg pool with zero padding counted, as torch's avg_pool1d(padding=kernel//2) in SnapKV
        votes = jnp.where(before, probs.sum(axis=(2, 3)), 0.0)
        pooled = jax.lax.reduce_window(votes, 0.0, jax.lax.add, (1, 1, kernel_size), (1, 1, 1),
                                       "SAME") / kernel_size
    return jnp.where(before, pooled, -jnp.inf)


def observation_votes(q_window: jax.Array, k: jax.Array, *, kernel_size: int = 5,
                      pooling: str = "avg") -> jax.Array:
    """Pooled attention votes of the observation window for every position before it.

    q_window [batch, W, Hq, D] are the queries of the last W of the S positions of k
    [batch, S, Hkv, D]. Returns float32 [batch, Hkv, S - W] (summed over each GQA group)."""
    s, w = k.shape[1], q_window.shape[1]
    return _pooled_votes(q_window, k, s, kernel_size, pooling)[..., :s - w]


def kept_positions(q_window: jax.Array, k: jax.Array, length: jax.Array | int, *, budget: int,
                   kernel_size: int = 5, pooling: str = "avg") -> jax.Array:
    """Per KV head, the `budget` of the first `length` positions of k [batch, S, Hkv, D] that
    SnapKV keeps: the best-voted (budget - W) before the window, ascending, then the window
    length - W .. length - 1. q_window [batch, W, Hq, D]; needs W <= budget < length <= S
    (`length` may be traced: the engine pads a sequence to its page table).
    Returns int32 [batch, Hkv, budget]."""
    batch, w = q_window.shape[:2]
    votes = _pooled_votes(q_window, k, length, kernel_size, pooling)
    _, top = jax.lax.top_k(votes, budget - w)  # [batch, Hkv, budget - W]
    window = jnp.broadcast_to(length - w + jnp.arange(w, dtype=jnp.int32),
                              (batch, k.shape[2], w))
    return jnp.concatenate([jnp.sort(top.astype(jnp.int32), axis=-1), window], axis=-1)


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
    if not is_int(budget) or budget < w:
        raise ValueError(f"budget must be an integer >= the window W={w}; got {budget!r}")
    if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1; got {kernel_size!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    if budget >= s:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None],
                                     (batch, s, hkv))
        return k, v, positions

    positions = kept_positions(q_window, k, s, budget=budget, kernel_size=kernel_size,
                               pooling=pooling).transpose(0, 2, 1)  # [batch, budget, Hkv]
    index = positions[..., None]  # [batch, budget, Hkv, 1]
    return (jnp.take_along_axis(k, index, axis=1), jnp.take_along_axis(v, index, axis=1),
            positions)


@functools.partial(jax.jit, static_argnames=("budget", "kernel_size", "pooling"),
                   donate_argnums=0)
def compress_sequence(cache: PagedKVCache, queries: jax.Array, page_row: jax.Array,
                      length: jax.Array, *, budget: int, kernel_size: int = 5,
                      pooling: str = "avg") -> PagedKVCache:
    """Compress one sequence's first `length` cached tokens to `budget` slots per KV head.

    queries [layers, W, Hq, D]: each layer's rotated queries of the prompt's last W tokens;
    page_row int32 [pages_per_seq]: the sequence's pages (entries >= num_pages are padding: read
    as anything, never written); length int32 []: its prompt length, W <= budget < length.
    Afterwards slot j < budget of head h holds the j-th of head h's `kept_positions`; the slots
    from `budget` on are free for the tokens that follow."""
    num_pages, page_size = cache.num_pages, cache.page_size
    slots = jnp.arange(budget)  # [budget]: the slots the kept tokens move to
    flat_slots = page_row[slots // page_size] * page_size + slots % page_size

    def sequence(pages: jax.Array) -> jax.Array:  # [num_pages, P, Hkv, ...] -> [L, Hkv, ...]
        return pages[page_row].reshape(-1, *pages.shape[2:])

    layers = []
    for layer, q in zip(cache.layers, queries):
        k = dequantize(sequence(layer.k), None if layer.k_scale is None
                       else sequence(layer.k_scale), q.dtype)  # [L, Hkv, D]
        keep = kept_positions(q[None], k[None], length, budget=budget, kernel_size=kernel_size,
                              pooling=pooling)[0].T  # [budget, Hkv]

        def move(pages: jax.Array | None) -> jax.Array | None:
            if pages is None:
                return None
            seq = sequence(pages)  # [L, Hkv, ...]
            index = keep.reshape(keep.shape + (1,) * (seq.ndim - 2))
            kept = jnp.take_along_axis(seq, index, axis=0)  # [budget, Hkv, ...]
            flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
            return flat.at[flat_slots].set(kept, mode="drop").reshape(pages.shape)

        layers.append(PagedLayerKV(move(layer.k), move(layer.v), move(layer.k_scale),
                                   move(layer.v_scale)))
    return PagedKVCache(tuple(layers))
