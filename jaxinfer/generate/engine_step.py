"""The engine's jitted step: one fixed-shape flat batch of tokens through the model, then sampling.

A step takes T token slots (a bucket size) that mix decode tokens of running requests with prompt
chunks of waiting ones (Dynamic SplitFuse), writes their K/V into the pages, lets each token attend
over its own sequence, and samples the next token at R = min(T, max_rows) rows, max_rows =
max_batch * (1 + speculative_tokens): the last token of each sequence in the step and each of its
draft tokens. All sampling settings are [R] arrays, so the compiled step depends only on (T, R):
serving never recompiles after each bucket has run once.

The scheduler gives each request at most one chunk and the engine lays each chunk's tokens out
contiguously in position order, so the step also describes its chunks as sequences, S = min(T,
max_batch) slots of them (`query_starts`, `seq_slot`, `kv_lengths`, `num_seqs`): the layout
`kernels_pallas.ragged_paged_attention` takes, which reads a chunk's pages once per query block
instead of once per token. Whether a bucket attends that way or one decode per token is static
per bucket (`attends_ragged`).

A token's rotary position and its cache slot differ by its sequence's `cache_offset`: a sequence
whose prompt SnapKV compressed keeps `budget` slots for its prompt, so its later tokens sit
prompt_len - budget slots before their positions (and attend over that many fewer keys). The step
also returns every layer's queries at `observe_rows`: the observation window of a prompt that ends
in this step and is compressed after it (`snapkv.compress_sequence`).

Each row's random key is fold_in(fold_in(key(seed), sample_index), position): a request's draws
depend on its own settings and positions, never on what else shares the step. (The logits they
draw from do, in their last bits: the bucket, and so the attention path, follows the step's
whole batch; see `engine.py`.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.generate.sampling import SamplingArrays, sample_next_token, top_k_as_int32
from jaxinfer.generate.sampling_params import SamplingParams
from jaxinfer.models.paged_kv import PagedBatch, PagedKVCache, SharedPrefix

PAGED_ATTENTION = ("auto", "ragged", "per_token")  # the Engine's settings (`attends_ragged`)
RAGGED_MIN_TOKENS_PER_SEQ = 8  # "auto": a step attends ragged from this many token slots per chunk
MIN_BUCKET = 8  # smallest token bucket: fewer compilations; padding a decode step is cheap


def token_buckets(max_tokens_per_step: int) -> tuple[int, ...]:
    """Step sizes compiled: powers of two from MIN_BUCKET, and max_tokens_per_step itself."""
    sizes, size = [], MIN_BUCKET
    while size < max_tokens_per_step:
        sizes.append(size)
        size *= 2
    return (*sizes, max_tokens_per_step)


class StepInputs(NamedTuple):
    """Host-built inputs of one step: T token slots, R sampling rows, B request slots, S chunks."""

    token_ids: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]: rotary position of each token
    cache_offset: np.ndarray  # int32 [T]: position - cache slot (SnapKV-dropped prompt tokens)
    token_slot: np.ndarray  # int32 [T]: request slot of each token
    valid: np.ndarray  # bool [T]: False for padding
    page_table: np.ndarray  # int32 [B, pages_per_seq]
    logit_rows: np.ndarray  # int32 [R]: token index whose logits each sampling row takes
    sample_slot: np.ndarray  # int32 [R]: request slot of each sampling row
    temperature: np.ndarray  # float32 [R]
    top_k: np.ndarray  # int32 [R]
    top_p: np.ndarray  # float32 [R]
    min_p: np.ndarray  # float32 [R]
    repetition_penalty: np.ndarray  # float32 [R]
    seed: np.ndarray  # uint32 [R]
    sample_index: np.ndarray  # int32 [R]: which of a request's n samples
    prefix_pages: np.ndarray  # int32 [P]: pages of a prefix shared by several sequences; P = 0: none
    prefix_len: np.ndarray  # int32 []: its tokens
    prefix_member: np.ndarray  # bool [T]: tokens of the sequences that share it
    observe_rows: np.ndarray  # int32 [W]: tokens whose queries the step returns
    # the step's chunks as sequences (at most one per request), in token order; S = min(T, B)
    query_starts: np.ndarray  # int32 [S + 1]: index of each chunk's first token; then the total
    seq_slot: np.ndarray  # int32 [S]: request slot of each chunk (its page-table row)
    kv_lengths: np.ndarray  # int32 [S]: cache slot + 1 of each chunk's last token
    num_seqs: np.ndarray  # int32 []: chunks in the step


def empty_inputs(tokens: int, rows: int, max_batch: int, pages_per_seq: int,
                 prefix_pages: int = 0, observe: int = 0) -> StepInputs:
    """All-padding inputs of one bucket: writes are dropped, rows are greedy (warm-up, filling).
    prefix_pages > 0 compiles the shared-prefix (Hydragen) variant, with no member yet; observe:
    the tokens whose queries the step returns (the engine's SnapKV window)."""
    zeros_t = np.zeros(tokens, np.int32)
    zeros_r = np.zeros(rows, np.int32)
    seqs = min(tokens, max_batch)  # chunks a step of this many tokens can hold
    zeros_s = np.zeros(seqs, np.int32)
    return StepInputs(
        token_ids=zeros_t, positions=zeros_t.copy(), cache_offset=zeros_t.copy(),
        token_slot=zeros_t.copy(),
        valid=np.zeros(tokens, bool), page_table=np.zeros((max_batch, pages_per_seq), np.int32),
        logit_rows=zeros_r, sample_slot=zeros_r.copy(), temperature=np.zeros(rows, np.float32),
        top_k=zeros_r.copy(), top_p=np.ones(rows, np.float32), min_p=np.zeros(rows, np.float32),
        repetition_penalty=np.ones(rows, np.float32), seed=np.zeros(rows, np.uint32),
        sample_index=zeros_r.copy(), prefix_pages=np.zeros(prefix_pages, np.int32),
        prefix_len=np.zeros((), np.int32), prefix_member=np.zeros(tokens, bool),
        observe_rows=np.zeros(observe, np.int32), query_starts=np.zeros(seqs + 1, np.int32),
        seq_slot=zeros_s, kv_lengths=zeros_s.copy(), num_seqs=np.zeros((), np.int32))


def row_key(seed: jax.Array, sample_index: jax.Array, position: jax.Array) -> jax.Array:
    """The key of the draw of the token at `position`: a function of the request's seed, sample
    and that position only (a draft model samples its guess there with the same key)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), sample_index), position)


def attends_ragged(paged_attention: str, tokens: int, seqs: int) -> bool:
    """Whether a step of `tokens` token slots and `seqs` chunk slots attends with
    `ragged_paged_attention` (`PagedBatch.ragged`), by the Engine's `paged_attention` setting:
    "ragged", "per_token" or "auto".

    "auto" picks from the bucket's static shape, so each bucket still compiles once: ragged iff
    tokens >= RAGGED_MIN_TOKENS_PER_SEQ * seqs. The XLA ragged path walks all T / block_q + S
    query blocks (block_q 8) in lockstep, empty ones too, so its cost is set by (T, S), not by
    how the tokens fall into chunks, while one decode per token costs ~T gathered contexts.
    `python -m experiments.bench_engine_features --repeats 0` (one whole step of the default
    model: 4 layers, Hq 8, Hkv 4, D 32, page 16, max_batch 32, budget 256; median of 15 steps,
    the two paths interleaved; a shared 2-core CPU), per-token time / ragged time, > 1 where
    ragged is faster:
      T = 8, 32 (S = T; decodes alone, or 16 decodes and a 16-token chunk): 0.42-0.77
      T = 64 (S = 32; a 40- or 64-token chunk, 0-24 decodes): 0.64-0.67
      T = 128 (S = 32; a 104- or 128-token chunk): 0.91-1.07
      T = 256 (S = 32; a 225- or 248-token chunk next to 8-31 decodes): 1.37-1.44
    and in a one-off run of such steps at max_batch 8 (S = 8): T = 8..32 0.61-0.84, T = 64
    0.91, T = 128 1.30 (a 121-token chunk and 7 decodes). Ragged wins
    from T ~ 8 S on: the buckets above max_batch that budget-sized prompt chunks fill go ragged,
    decode-heavy buckets stay per token. (Measured on CPU only; on a GPU "ragged" may pay off
    earlier, since the Triton kernel's empty query blocks exit at once.)"""
    if paged_attention == "auto":
        return tokens >= RAGGED_MIN_TOKENS_PER_SEQ * seqs
    return paged_attention == "ragged"


@functools.lru_cache(maxsize=16)
def compiled_step(graphdef: nnx.GraphDef, ragged: bool):
    """The jitted step of one model structure, attending ragged or one decode per token
    (`attends_ragged` picks per bucket), shared by every engine of that structure whatever its
    `paged_attention` setting: an "auto" engine's buckets reuse what a "per_token" or "ragged"
    one compiled.

    Binding the graph definition here, not passing it as a static argument, keeps its (slow)
    hash out of every step's dispatch; the page and `seen` buffers are donated."""
    return jax.jit(functools.partial(_step, graphdef, ragged), donate_argnums=(1, 2))


def step_batch(inputs: StepInputs, cache: PagedKVCache, ragged: bool) -> PagedBatch:
    """The model's view of a step: per token its rotary position and the flat K/V slot it
    writes (padding writes out of the pool, dropped); per chunk its run of tokens, its page row
    (gathered here once for all layers) and the keys its last token attends to; the shared prefix
    when the step has one (a static shape: its own variant)."""
    page_size = cache.page_size
    pos, valid = inputs.positions, inputs.valid
    cached = pos - inputs.cache_offset  # [T]: cache slot of each token in its sequence
    page = inputs.page_table[inputs.token_slot, cached // page_size]  # [T]
    out_of_pool = cache.num_pages * page_size
    shared = None
    if inputs.prefix_pages.shape[0]:
        shared = SharedPrefix(inputs.prefix_pages, inputs.prefix_len, inputs.prefix_member)
    return PagedBatch(positions=pos,
                      write_slots=jnp.where(valid, page * page_size + cached % page_size,
                                            out_of_pool),
                      page_table=inputs.page_table[inputs.seq_slot],  # [S, pages_per_seq]
                      query_starts=inputs.query_starts, kv_lengths=inputs.kv_lengths,
                      num_seqs=inputs.num_seqs, shared=shared,
                      ragged=ragged)


def set_sampling_rows(inputs, rows: slice | int, params: SamplingParams,
                      sample_index: int) -> None:
    """Write one request's sampling settings into rows of the [R] arrays of inputs (a
    `StepInputs`, or a `draft_step.ProposeInputs`, which has every field but the repetition
    penalty: a request with one never drafts)."""
    inputs.temperature[rows] = params.temperature
    inputs.top_k[rows] = top_k_as_int32(params.top_k)
    inputs.top_p[rows] = 1.0 if params.top_p is None else params.top_p
    inputs.min_p[rows] = params.min_p or 0.0
    if isinstance(inputs, StepInputs):
        inputs.repetition_penalty[rows] = params.repetition_penalty
    inputs.seed[rows] = params.seed
    inputs.sample_index[rows] = sample_index


def _step(graphdef: nnx.GraphDef, ragged: bool, state: nnx.State, cache: PagedKVCache,
          seen: jax.Array, inputs: StepInputs) -> tuple[jax.Array, PagedKVCache, jax.Array,
                                                        jax.Array]:
    """One step. seen bool [B, vocab] marks the tokens each slot's sequence holds (for the
    repetition penalty). Returns (next tokens int32 [R], cache, seen, queries at observe_rows
    [layers, W, Hq, D])."""
    model = nnx.merge(graphdef, state)
    max_batch = seen.shape[0]
    pos, slot, valid = inputs.positions, inputs.token_slot, inputs.valid
    logits, cache, queries = model.forward_paged(inputs.token_ids,
                                                 step_batch(inputs, cache, ragged),
                                                 cache,
                                                 inputs.logit_rows, inputs.observe_rows)

    # a sequence at position 0 (new, or recomputed after preemption) drops its slot's past
    seen = seen.at[jnp.where(valid & (pos == 0), slot, max_batch)].set(False, mode="drop")
    seen = seen.at[jnp.where(valid, slot, max_batch), inputs.token_ids].set(True, mode="drop")

    params = SamplingArrays(inputs.temperature, inputs.top_k, inputs.top_p, inputs.min_p,
                            inputs.repetition_penalty)
    new_positions = pos[inputs.logit_rows] + 1  # [R]: position of the token being sampled
    keys = jax.vmap(row_key)(inputs.seed, inputs.sample_index, new_positions)
    tokens = sample_next_token(logits, params, keys, seen[inputs.sample_slot])
    return tokens, cache, seen, queries


@functools.partial(jax.jit, donate_argnums=0)
def mark_seen(seen: jax.Array, slot: jax.Array, token_ids: jax.Array) -> jax.Array:
    """seen bool [B, vocab] with row `slot` replaced by the tokens token_ids int32 [L] (ids >=
    vocab are padding; a slot >= B changes nothing): a sequence whose prefix came from the
    cache starts with it marked."""
    row = jnp.zeros(seen.shape[1], bool).at[token_ids].set(True, mode="drop")
    return seen.at[slot].set(row, mode="drop")
