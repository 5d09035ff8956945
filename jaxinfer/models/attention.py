"""The one attention entry point of the models.

Without a cache (training, scoring a whole sequence) it is `kernels_pallas.flash_attention`, causal,
with Mistral's sliding window as a local window and packed documents' segment ids; the backend is
configuration. Where the sharding rules split the sequence it is ring or Ulysses attention, and
training under a causal ring feeds the sequence in the zig-zag layout (`causal_attention`).

With a dense KV cache keys live at absolute slots 0..S-1 and unwritten slots lie beyond every
query's position, so a position-based mask expresses causality, cache validity and the window at
once (until the paged decode kernel replaces this path); a prefill into an empty cache sees only
its own keys and takes `flash_attention` instead (`prefill_attention`). Query heads are grouped
over KV heads by a reshape: K/V are never repeated in memory.

The serving engine's paged path (`paged_attention`) takes a flat batch of tokens from many
sequences, each sequence's tokens a contiguous run, and attends each run over its own sequence's
pages: as ragged query runs or as one decode per token (`PagedBatch.ragged`), with the sliding
window as the kernels' left window.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

import sharding
from jaxinfer.models.paged_kv import PagedBatch, PagedLayerKV
from kernels_pallas import (flash_attention, merge_attention, paged_decode_attention,
                            ragged_paged_attention)
from kernels_pallas.attention import MASK_VALUE, dequantize, token_owners

log = logging.getLogger(__name__)

# Context tokens the XLA paged path gathers per loop step when every token of a step is a query
# (`paged_decode_attention`'s xla_chunk_tokens; the kernels pick the backend and the Pallas ones
# ignore it): its gather is [T, chunk, Hkv, D], so a short chunk keeps it near each token's real
# context (the kernel's decode default, ~512, made a 256-token step of short prompts 3-9x slower
# on CPU).
PAGED_XLA_CHUNK_TOKENS = 64


def attention_mask(q_positions: jax.Array, kv_len: int, sliding_window: int | None) -> jax.Array:
    """Boolean [batch, T, S]: query at position p sees key slot j iff j <= p (and
    p - j < window)."""
    slots = jnp.arange(kv_len)[None, None, :]
    pos = q_positions[:, :, None]
    mask = slots <= pos
    if sliding_window is not None:
        mask &= pos - slots < sliding_window
    return mask


def local_window(sliding_window: int | None) -> tuple[int, int] | None:
    """flash_attention's (left, right) local window of a causal sliding window: HF's query p sees
    key j iff p - j < sliding_window, i.e. left = sliding_window - 1 (None: no window)."""
    return None if sliding_window is None else (sliding_window - 1, 0)


def ring_shards(sliding_window: int | None, sequence_parallel: str) -> int:
    """How many devices causal self-attention runs a ring over under the active sharding rules:
    P > 1 where "seq" is split over one mesh axis of P devices, the impl is the ring and there is
    no sliding window (which takes Ulysses); 1 otherwise. Training permutes its sequences into
    the zig-zag layout only when this is > 1 (and more: `DecoderLM.zigzag_shards` has the exact
    condition)."""
    active = sharding.active_rules()
    if active is None or sliding_window is not None or sequence_parallel != "ring":
        return 1
    (seq_axes,) = sharding.logical_to_mesh_axes(("seq",), active.table)
    return sharding.axis_size(active.mesh, seq_axes) if len(seq_axes) == 1 else 1


@functools.cache
def _warn_whole_sequence(seq_len: int, shards: int) -> None:
    """Once per (T, P): attention over a sequence the sequence axis does not divide runs whole."""
    log.warning("sequence length %d is not divisible by the %d devices of the sequence axis: "
                   "attention runs on the whole sequence on every one of them; pad the length "
                   "to a multiple of %d to split it", seq_len, shards, shards)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sliding_window: int | None,
                     backend: str, sequence_parallel: str = "ring",
                     segment_ids: jax.Array | None = None,
                     layout: str = "contiguous") -> jax.Array:
    """Self-attention over one whole sequence: q [batch, T, Hq, D]; k, v [batch, T, Hkv, D];
    segment_ids None or int32 [batch, T] (packed sequences: a token sees only earlier tokens
    with its own id; the models pass run ids, `llama.segment_runs`, so each id is one run).

    Where the active sharding rules split "seq" over a mesh axis of P > 1 devices, it runs as
    ring or Ulysses attention (`sequence_parallel`) over that axis; a sliding window always
    takes Ulysses, since the ring's blocks cannot carry one. A batch or sequence length the
    mesh does not divide is left whole rather than refused, as `sharding.constrain` leaves such
    a dimension whole (heads Ulysses cannot split are still refused): a batch that the rules' batch axes do not divide (a single sequence on a data x sequence mesh)
    is replicated over them inside the shard_map, and a sequence length P does not divide runs
    as `flash_attention` on the whole sequence, replicated over the sequence devices, with a
    warning, since at long context that costs P times the memory (zig-zag never arises there:
    training takes it only when 2P divides T, `DecoderLM.zigzag_shards`).

    layout: the order of the T tokens. "contiguous" (natural order) everywhere except in
    training under a causal ring: there `jaxinfer.train.step.training_loss` permutes tokens,
    positions, segment ids and targets once into the ring's "zigzag" layout (every device then
    does the same causal work instead of device P-1 doing P times device 0's), and passes
    layout="zigzag" down to here. The mean loss does not depend on the token order, so nothing
    is permuted back. Generation, evaluation, windows and unsplit sequences stay contiguous."""
    window = local_window(sliding_window)
    active = sharding.active_rules()
    if active is not None:
        seq_axes, batch_axes = sharding.logical_to_mesh_axes(("seq", "batch"), active.table)
        shards = sharding.axis_size(active.mesh, seq_axes) if len(seq_axes) == 1 else 1
        if shards > 1 and q.shape[1] % shards == 0:
            impl = "ulysses" if window is not None else sequence_parallel
            if batch_axes and q.shape[0] % sharding.axis_size(active.mesh, batch_axes):
                batch_axes = ()
            return sharding.sequence_parallel_attention(
                q, k, v, mesh=active.mesh, impl=impl, causal=True, axis=seq_axes[0],
                layout=layout, segment_ids=segment_ids, local_window=window, backend=backend,
                batch_axes=batch_axes or None)
        if shards > 1:
            _warn_whole_sequence(q.shape[1], shards)
    if layout != "contiguous":
        raise ValueError(f"layout={layout!r} needs the active sharding rules to split the "
                         f"sequence over P > 1 devices, P dividing its length {q.shape[1]}; "
                         f"without that use layout='contiguous'")
    return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, local_window=window,
                           backend=backend)


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sliding_window: int | None,
                      backend: str) -> jax.Array:
    """Causal attention of a prompt over its own K/V (a prefill into an empty cache): q
    [batch, T, Hq, D]; k, v [batch, T, Hkv, D] -> [batch, T, Hq, D]. `flash_attention` on the
    model's backend, memory linear in T, instead of scores over the whole cache; never sequence
    parallel, since a prompt's length need not split over a ring (as the cached path)."""
    return flash_attention(q, k, v, causal=True, local_window=local_window(sliding_window),
                           backend=backend)


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


def paged_attention(q: jax.Array, kv: PagedLayerKV, meta: PagedBatch, *, backend: str,
                    sliding_window: int | None = None) -> jax.Array:
    """Each sequence's tokens of a flat batch attend causally over its own cached keys.

    q [T, Hq, D]; kv: one layer's pages [num_pages, page_size, Hkv, D] (float, or int8 with
    scales); meta: the batch's sequences (runs of tokens, page-table rows, lengths) -> [T, Hq, D].
    The tokens' own K/V must already be in the pages. With `meta.ragged` the sequences go to
    `ragged_paged_attention` as query runs (pages read once per query block), else each token is a
    decode over its sequence's pages with length position + 1 (pages read once per token). Both
    have Pallas kernels for GPU and TPU. With `meta.shared`, member sequences read the
    shared prefix once for all their tokens (Hydragen) and page through only the rest of their
    sequence: their table rows start after the prefix's pages and their lengths drop by its
    tokens, which keeps the bottom-right causal alignment of their queries.

    sliding_window: None, or W: the token at position p sees keys p - W + 1 .. p (HF Mistral's
    mask), the kernels' `local_window` W - 1. With a window the shared prefix is not split off:
    its non-causal read has no per-query positions to cut a window by, so members attend over
    their whole rows like every other sequence (the same result, without Hydragen's saving).
    """
    k_pages, v_pages = kv.k, kv.v
    if not kv.quantized:
        k_pages, v_pages = k_pages.astype(q.dtype), v_pages.astype(q.dtype)
    table, kv_lengths, shared = meta.page_table, meta.kv_lengths, meta.shared
    window = None if sliding_window is None else local_window(sliding_window)[0]  # left side
    if window is not None:
        shared = None
    if shared is not None:  # members start paging after the prefix
        first_tokens = meta.query_starts[:-1]  # [S]; padding sequences point past the tokens
        member = jnp.take(shared.member, first_tokens, mode="fill", fill_value=False)  # [S]
        skip = jnp.where(member, shared.length, 0)  # [S] tokens
        page_size, pages_per_seq = kv.k.shape[1], table.shape[1]
        cols = jnp.arange(pages_per_seq)[None, :] + (skip // page_size)[:, None]
        table = jnp.take_along_axis(table, jnp.minimum(cols, pages_per_seq - 1), axis=1)
        kv_lengths = kv_lengths - skip
    scales = dict(k_scales=kv.k_scale, v_scales=kv.v_scale, return_lse=True)
    if meta.ragged:
        out, lse = ragged_paged_attention(q, k_pages, v_pages, table, meta.query_starts,
                                          kv_lengths, num_seqs=meta.num_seqs, backend=backend,
                                          local_window=window, **scales)
    else:
        seq, _, position, owned = token_owners(meta.query_starts, kv_lengths, meta.num_seqs,
                                               q.shape[0])  # [T] each
        out, lse = paged_decode_attention(q, k_pages, v_pages, table[seq],
                                          jnp.where(owned, position + 1, 0), backend=backend,
                                          xla_chunk_tokens=PAGED_XLA_CHUNK_TOKENS,
                                          local_window=window, **scales)
    if shared is None:
        return out
    prefix_k, prefix_v = (dequantize(pages[shared.pages], None if s is None else s[shared.pages],
                                     q.dtype).reshape(1, -1, *pages.shape[2:])
                          for pages, s in ((kv.k, kv.k_scale), (kv.v, kv.v_scale)))
    in_prefix = jnp.arange(prefix_k.shape[1]) < shared.length  # [prefix_pages * page_size]
    segments = (shared.member.astype(jnp.int32)[None], jnp.where(in_prefix, 1, 2)[None])
    out_p, lse_p = attention_over_keys(q[None], prefix_k, prefix_v, segment_ids=segments,
                                       backend=backend)  # non-members see nothing
    return merge_attention(out_p[0], lse_p[0], out, lse)[0]


def attention_over_keys(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        segment_ids: tuple[jax.Array, jax.Array] | None = None,
                        backend: str) -> tuple[jax.Array, jax.Array]:
    """Non-causal attention of any number of queries over one set of keys (a shared prefix).

    q [1, T, Hq, D]; k, v [1, S, Hkv, D]; segment_ids None or (q_ids [1, T], kv_ids [1, S]) ->
    out [1, T, Hq, D], lse float32 [1, T, Hq]. `flash_attention` takes at most S queries per
    batch row (its queries are the last T of S positions), but a serving step may hold more tokens
    than a prefix has slots; those queries go in rows of S over the same keys (broadcast), so the
    work stays T x S rather than growing to T x T as padding the keys would.
    """
    t, s = q.shape[1], k.shape[1]
    if t <= s:
        return flash_attention(q, k, v, segment_ids=segment_ids, return_lse=True, backend=backend)
    rows = -(-t // s)
    pad = rows * s - t  # padded queries (id 0 where ids are given) are dropped below
    q_rows = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(rows, s, *q.shape[2:])
    k_rows, v_rows = (jnp.broadcast_to(x, (rows, *x.shape[1:])) for x in (k, v))
    ids = None
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        ids = (jnp.pad(q_ids, ((0, 0), (0, pad))).reshape(rows, s),
               jnp.broadcast_to(kv_ids, (rows, s)))
    out, lse = flash_attention(q_rows, k_rows, v_rows, segment_ids=ids, return_lse=True,
                               backend=backend)  # [rows, S, Hq, D], [rows, S, Hq]
    return out.reshape(1, rows * s, *out.shape[2:])[:, :t], lse.reshape(1, rows * s, -1)[:, :t]
