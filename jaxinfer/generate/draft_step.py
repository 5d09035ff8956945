"""The engine's jitted draft-model work: keep the draft's paged KV in step, and propose γ tokens.

A draft model (a smaller model of the target's vocabulary) keeps its own K/V pages, shaped by its
own config, under the SAME page ids as the target: a page the scheduler gives a sequence holds
the target's K/V in the target's pool and the draft's K/V in the draft's pool. So the draft needs
no bookkeeping of its own: allocation, prefix-cache hits, preemption and rollback after a
rejection (rejected slots are overwritten later, as the target's are) all follow the target.
SnapKV compresses the draft's pages of a prompt with the target's, in the same page row to the same
budget, so a sequence's cache offset (position - cache slot) is one for both; the draft keeps the
positions its own window queries vote for (its layers and heads are not the target's).

Two functions, each of fixed shape; between them every token the target keeps gets the draft's
K/V too, computed once:

* `compiled_propose`: γ autoregressive draft decode steps (one `lax.scan`) for up to B sequences,
  one token each per step, starting from each sequence's last token, then one more forward that
  writes the last guess's K/V. The token guessed for position p is drawn with the key the target
  samples position p with (`engine_step.row_key`), after the same temperature / top-k / top-p /
  min-p filters (greedy at temperature 0): coupled sampling, so where the draft's distribution is
  close to the target's the two draws coincide. The target's exact-match verification keeps the
  output identical to decoding without drafts. Every token of a drafting sequence's chunk (its
  last token and its guesses) then has the draft's K/V: those the target accepts are the true
  tokens at their positions, computed over the draft's cache of the tokens before them.
* `compiled_draft_pass`: the draft's forward over the step's other chunks (prompt chunks,
  decodes without a draft), in their own token bucket; a step whose every chunk drafted skips it.
  It takes step inputs and attends as the target's step of that bucket does (ragged query runs or one decode per token), and returns the
  draft's queries at their `observe_rows`: a prompt chunk that SnapKV compresses after the step
  never drafts, so the pass holds its observation window.

The proposal's B one-token sequences always attend one decode per token: a query block would hold
one real query, so `ragged_paged_attention` could only add work.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.generate.engine_step import StepInputs, row_key, step_batch
from jaxinfer.generate.sampling import SamplingArrays, sample_next_token
from jaxinfer.models.paged_kv import PagedBatch, PagedKVCache


class ProposeInputs(NamedTuple):
    """Host-built inputs of one proposal, one row per request slot (B rows)."""

    token_ids: np.ndarray  # int32 [B]: each drafting sequence's last token (not yet in the cache)
    positions: np.ndarray  # int32 [B]: its rotary position
    cache_offset: np.ndarray  # int32 [B]: position - cache slot (SnapKV-dropped prompt tokens)
    active: np.ndarray  # bool [B]: the slot drafts this step
    page_table: np.ndarray  # int32 [B, pages_per_seq]: its pages, then num_pages (no page)
    temperature: np.ndarray  # float32 [B]
    top_k: np.ndarray  # int32 [B]
    top_p: np.ndarray  # float32 [B]
    min_p: np.ndarray  # float32 [B]  (no repetition penalty: a request with one never drafts)
    seed: np.ndarray  # uint32 [B]
    sample_index: np.ndarray  # int32 [B]


def empty_propose_inputs(max_batch: int, pages_per_seq: int, num_pages: int) -> ProposeInputs:
    """No slot drafting, no page: every write is dropped (warm-up, filling)."""
    zeros = np.zeros(max_batch, np.int32)
    return ProposeInputs(
        token_ids=zeros, positions=zeros.copy(), cache_offset=zeros.copy(),
        active=np.zeros(max_batch, bool),
        page_table=np.full((max_batch, pages_per_seq), num_pages, np.int32),
        temperature=np.zeros(max_batch, np.float32), top_k=zeros.copy(),
        top_p=np.ones(max_batch, np.float32), min_p=np.zeros(max_batch, np.float32),
        seed=np.zeros(max_batch, np.uint32), sample_index=zeros.copy())


@functools.lru_cache(maxsize=16)
def compiled_draft_pass(graphdef: nnx.GraphDef, ragged: bool):
    """The jitted draft pass of one draft structure, attending ragged or not (as the target's
    step of the same bucket does: the pass takes step inputs; its page buffers donated)."""
    return jax.jit(functools.partial(_draft_pass, graphdef, ragged), donate_argnums=1)


@functools.lru_cache(maxsize=8)
def compiled_propose(graphdef: nnx.GraphDef, gamma: int):
    """The jitted γ-token proposal of one draft structure (its page buffers donated)."""
    return jax.jit(functools.partial(_propose, graphdef, gamma), donate_argnums=1)


def _draft_pass(graphdef: nnx.GraphDef, ragged: bool, state: nnx.State, cache: PagedKVCache,
                inputs: StepInputs) -> tuple[PagedKVCache, jax.Array]:
    """Write the draft's K/V of the T tokens of `inputs` (the step's chunks that did not draft);
    its logits are not needed (one row is projected, the least forward_paged allows). Returns
    the cache and the draft's queries at `observe_rows` [draft layers, W, draft Hq, draft D], for
    SnapKV to compress the draft's pages of a prompt that ends in this pass."""
    model = nnx.merge(graphdef, state)
    _, cache, queries = model.forward_paged(inputs.token_ids,
                                            step_batch(inputs, cache, ragged), cache,
                                            inputs.logit_rows[:1], inputs.observe_rows)
    return cache, queries


def _propose(graphdef: nnx.GraphDef, gamma: int, state: nnx.State, cache: PagedKVCache,
             inputs: ProposeInputs) -> tuple[jax.Array, PagedKVCache]:
    """γ draft tokens per slot, int32 [B, γ] (rows of inactive slots are meaningless), and the
    cache with the draft's K/V of the last token and of all γ guesses written, so that whatever
    prefix of the draft the target accepts already has the draft's K/V (the engine's draft pass
    skips drafting sequences).

    Step k < γ feeds token k (the last token, then guess k) at position + k and draws guess k + 1
    with the key of position + k + 1; a last forward feeds guess γ at position + γ for its K/V
    alone (one logit row, unused). A position on a page the scheduler has not given the sequence
    writes nowhere; the guesses that would read it lie past the draft the step keeps. Positions
    past a trimmed draft's end, like rejected ones, lie past what the step computes: the draft's
    K/V there are overwritten when the target computes those positions."""
    model = nnx.merge(graphdef, state)
    num_pages, page_size = cache.num_pages, cache.page_size
    pages_per_seq = inputs.page_table.shape[1]
    page_rows = jnp.minimum(inputs.page_table, num_pages - 1)  # [B, pages_per_seq]: readable
    params = SamplingArrays(inputs.temperature, inputs.top_k, inputs.top_p, inputs.min_p)
    rows = jnp.arange(inputs.token_ids.shape[0])  # [B]: every slot's logits
    query_starts = jnp.arange(rows.shape[0] + 1, dtype=jnp.int32)  # [B + 1]: a token per slot

    def batch_at(k: jax.Array | int) -> PagedBatch:
        """Where each slot's token k (at position + k, in cache slot position + k - offset) is
        written and what it attends to."""
        pos = inputs.positions + k  # [B]
        cached = pos - inputs.cache_offset  # [B]
        col = cached // page_size  # [B]: past the table for guesses beyond max_model_len
        page = jnp.take_along_axis(inputs.page_table, jnp.minimum(col, pages_per_seq - 1)[:, None],
                                   axis=1)[:, 0]  # [B]
        write = jnp.where(inputs.active & (col < pages_per_seq),
                          page * page_size + cached % page_size,
                          num_pages * page_size)  # [B]: page == num_pages is out of the pool too
        # an inactive slot (position 0, its row clamped into the pool) attends over whatever its
        # row points at: a meaningless output, as its guesses are
        return PagedBatch(positions=pos, write_slots=write, page_table=page_rows,
                          query_starts=query_starts,
                          kv_lengths=jnp.minimum(cached + 1, pages_per_seq * page_size),
                          num_seqs=jnp.int32(rows.shape[0]), ragged=False)

    def decode(carry, k):
        tokens, cache = carry  # [B]
        logits, cache = model.forward_paged(tokens, batch_at(k), cache, rows)  # [B, vocab]
        keys = jax.vmap(row_key)(inputs.seed, inputs.sample_index, inputs.positions + k + 1)
        guess = sample_next_token(logits, params, keys)  # [B]
        return (guess, cache), guess

    (last, cache), guesses = jax.lax.scan(decode, (jnp.asarray(inputs.token_ids), cache),
                                          jnp.arange(gamma))  # guesses [γ, B]
    _, cache = model.forward_paged(last, batch_at(gamma), cache, rows[:1])  # guess γ's K/V
    return guesses.T, cache  # [B, γ]
