"""Where the tokens of a ragged batch sit: sequences, their query blocks, and the default tiles.

A step's flat batch q [T, Hq, D] holds the query tokens of S sequences, each contiguous and in
position order: sequence s owns tokens ``query_starts[s] : query_starts[s + 1]`` (q_len_s of them)
and has kv_len_s keys cached, its own tokens' included, so its query i sits at position
``kv_len_s - q_len_s + i`` (causal, bottom-right aligned) and sees keys ``0 .. that position``.
With ``num_seqs`` only the first num_seqs sequences are real; the rest own no token (whatever
their query_starts entries say), and tokens owned by no real sequence are padding.

Query blocks. Each sequence's tokens are cut into ceil(q_len / block_q) blocks of block_q tokens
(the last one partial), so no block straddles two sequences: a block reads one sequence's pages.
The blocks of all sequences, in order, number at most ``T // block_q + S`` (sum_s ceil(q_s / b) <=
T / b + S (b - 1) / b), a static count that serves every layout of T tokens in S sequences; the
blocks past the real ones are empty (0 tokens). The XLA path and the Pallas kernels all work on
q gathered into this block layout, [num_blocks * block_q] rows, and gather their outputs back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.attention import paged_xla, tiling

# Per-backend default tiles. xla: every block of a step (empty ones too) walks the pages in
# lockstep, so its cost is ~(T + S * block_q) query rows of scores plus (T / block_q + S) gathered
# contexts; 8 tokens and 128-token KV chunks were fastest on a 2-core CPU for a 128- or 256-token
# chunk next to 4-8 decodes (2.5-6x faster than one decode per token; 16 and 32 were slower).
# Decode-only steps stay faster as one decode per token there (each decode pays a whole block).
# pallas: the kernel's matmul M dimension packs block_q tokens x the (power-of-two padded) query
# heads of one KV head; 64 rows is the FlashAttention forward's q tile, and pages per step follow
# the decode kernel's default (~64 tokens). Empty programs exit at once: S costs little there.
# pallas_tpu: the same 64 rows (tokens x query heads, no power-of-two padding); each empty block
# still walks its grid steps (skipped, ~0.35 us each), so the blocks stay few.
DEFAULT_BLOCK_Q_XLA = 8
DEFAULT_KV_TOKENS_XLA = 128
DEFAULT_ROWS_PALLAS = 64


class RaggedLayout(NamedTuple):
    """The query blocks of a step and each token's row in the block layout."""

    block_seq: jax.Array  # int32 [NB]: the sequence a block belongs to (any valid one if empty)
    block_first: jax.Array  # int32 [NB]: index in q of the block's first token
    block_count: jax.Array  # int32 [NB]: its real tokens, 0 for an empty block
    block_pos0: jax.Array  # int32 [NB]: position of its first token in its sequence
    token_row: jax.Array  # int32 [T]: row of each token in the [NB * block_q] block layout
    token_owned: jax.Array  # bool [T]: owned by a real sequence (else padding: out 0, lse -inf)

    @property
    def num_blocks(self) -> int:
        return self.block_seq.shape[0]

    def key_limit(self) -> jax.Array:
        """int32 [NB]: keys the block's last real query sees (0 for an empty block)."""
        return jnp.where(self.block_count > 0, self.block_pos0 + self.block_count, 0)


def num_blocks(t: int, s: int, block_q: int) -> int:
    """The static number of query blocks: an upper bound on sum_s ceil(q_len_s / block_q)."""
    return t // block_q + s


def sequence_extents(query_starts: jax.Array, num_seqs) -> tuple[jax.Array, jax.Array]:
    """-> (starts int32 [S + 1], q_lens int32 [S]) with the sequences from num_seqs on emptied:
    their starts repeat query_starts[num_seqs], so the starts stay sorted whatever follows it."""
    s = query_starts.shape[0] - 1
    if num_seqs is not None:
        query_starts = query_starts[jnp.minimum(jnp.arange(s + 1), num_seqs)]
    return query_starts, query_starts[1:] - query_starts[:-1]


def token_owners(query_starts: jax.Array, kv_lengths: jax.Array, num_seqs,
                 t: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """-> per token of q: (seq int32 [T], index within its sequence int32 [T], position int32 [T],
    owned bool [T]). A zero-length sequence owns nothing (the search skips it)."""
    starts, q_lens = sequence_extents(query_starts, num_seqs)
    s = q_lens.shape[0]
    tokens = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(starts, tokens, side="right") - 1, 0, s - 1).astype(jnp.int32)
    owned = (tokens >= starts[0]) & (tokens < starts[s])
    index = tokens - starts[seq]
    return seq, index, kv_lengths[seq] - q_lens[seq] + index, owned


def ragged_layout(query_starts: jax.Array, kv_lengths: jax.Array, num_seqs, t: int,
                  block_q: int) -> RaggedLayout:
    """The block layout of a step: query_starts int32 [S + 1], kv_lengths int32 [S], num_seqs
    None or an int32 scalar (traced or not)."""
    starts, q_lens = sequence_extents(query_starts, num_seqs)
    s = q_lens.shape[0]
    per_seq = (q_lens + block_q - 1) // block_q  # [S] blocks of each sequence
    block_starts = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                    jnp.cumsum(per_seq).astype(jnp.int32)])  # [S + 1]
    blocks = jnp.arange(num_blocks(t, s, block_q), dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(block_starts, blocks, side="right") - 1, 0, s - 1)
    offset = (blocks - block_starts[seq]) * block_q  # index in its sequence of the first token
    count = jnp.clip(q_lens[seq] - offset, 0, block_q)
    tok_seq, index, _, owned = token_owners(query_starts, kv_lengths, num_seqs, t)
    return RaggedLayout(
        block_seq=seq.astype(jnp.int32), block_first=starts[seq] + offset,
        block_count=count.astype(jnp.int32), block_pos0=kv_lengths[seq] - q_lens[seq] + offset,
        token_row=block_starts[tok_seq] * block_q + index, token_owned=owned)


def blocks_from_tokens(x: jax.Array, layout: RaggedLayout, block_q: int) -> jax.Array:
    """x [T, ...] -> [NB, block_q, ...]: each block's tokens, zeros past its count."""
    rows = layout.block_first[:, None] + jnp.arange(block_q, dtype=jnp.int32)[None, :]
    valid = jnp.arange(block_q)[None, :] < layout.block_count[:, None]  # [NB, block_q]
    taken = jnp.take(x, jnp.clip(rows, 0, x.shape[0] - 1), axis=0)  # [NB, block_q, ...]
    return jnp.where(valid.reshape(*valid.shape, *[1] * (x.ndim - 1)), taken, 0).astype(x.dtype)


def tokens_from_blocks(y: jax.Array, layout: RaggedLayout, fill: float) -> jax.Array:
    """y [NB * block_q, ...] in the block layout -> [T, ...]; padding tokens get ``fill``."""
    taken = jnp.take(y, layout.token_row, axis=0, mode="clip")
    owned = layout.token_owned.reshape(-1, *[1] * (y.ndim - 1))
    return jnp.where(owned, taken, jnp.asarray(fill, y.dtype))


def default_block_q(impl: str, groups: int) -> int:
    """Tokens per query block: xla's table entry; for pallas DEFAULT_ROWS_PALLAS rows of the
    matmul, block_q tokens x the query group padded to a power of two (at least one token); for
    pallas_tpu the same rows with the group unpadded."""
    if impl == "xla":
        return DEFAULT_BLOCK_Q_XLA
    if impl == "pallas_tpu":
        return max(1, DEFAULT_ROWS_PALLAS // groups)
    return max(1, DEFAULT_ROWS_PALLAS // tiling.next_power_of_2(groups))


def default_pages_per_block_xla(page_size: int, pages_per_seq: int) -> int:
    """Pages per step of the XLA path: the paged decode's rule at DEFAULT_KV_TOKENS_XLA tokens."""
    return paged_xla.default_pages_per_block(page_size, pages_per_seq, DEFAULT_KV_TOKENS_XLA)
