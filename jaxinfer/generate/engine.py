"""`Engine`: continuous-batching generation over a paged KV cache.

    engine = Engine(model, max_batch=64, page_size=16, num_pages=None, max_tokens_per_step=512)
    rid = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, seed=0))
    for request_id, new_token_ids, finished in engine.stream():
        ...
    results = engine.run_until_done()        # {request id: generated token ids}
    outputs = engine.generate([prompt_a, prompt_b], params)

Also: `abort(request_id)`, `step()` (one step by hand), `warmup()` (compile every token bucket so
serving never compiles), `last_step` (what the last step computed), `num_preemptions`.

A Python scheduler (`scheduler.py`) picks each step's tokens; one jitted, fixed-shape step
(`engine_step.py`) runs them. Requests are validated completely at `submit`, so a bad request is
refused there and never reaches a step shared with others. With `n > 1` a request runs as n
sequences sharing the prompt; its events and result then hold one token list per sample (with
`first_finish`, First Finish Search, the result is the shortest finished sample's list alone: a
sample stops once it is as long as one already finished, so the result does not depend on how
the batch staggers the samples).

What else runs changes a request's output only through float rounding. Its sampling keys depend
on its own seed, sample and positions, so greedy tokens equal `jaxinfer.generate`'s and a seed
repeats its samples whatever the batch, except where rounding flips a near-tie (after which the
sequence goes its own way). The logits move in their last bits (~1e-5 on the default model) with
the batch: the other requests set the step's token bucket, and XLA rounds a matmul differently
at each shape (padding alone does it); with paged_attention "auto" the bucket also picks ragged
or per-token attention, "ragged" packs the step's chunks into shared query blocks, and hydragen's
path depends on whether another sequence shares the prefix. For logits bit-identical whatever
else runs (measured on CPU across arrivals, prompt chunkings and shared prefixes): one token
bucket (max_tokens_per_step <= 8, `engine_step.MIN_BUCKET`), paged_attention="per_token" and
hydragen=False, at the cost of steps of at most 8 tokens.

Draft-model speculation (`draft_model`, `speculative_tokens`=γ): a small model of the same
vocabulary guesses γ tokens per decoding request each step (`draft_step.py`), and the target
verifies them in the same step as its other work. Lossless by construction: the target samples at
every guessed position with the key plain decoding would use there, and a guess stands only while
it equals that sample, so the output is token for token the non-speculative engine's (greedy: the
target's argmax). The draft samples its guesses with those same keys (coupled sampling), so a
guess is accepted with probability P(draft sample == target sample), high when the two models
agree. The draft's K/V pages share the target's page ids (see `draft_step.py`).

SnapKV (`snapkv_budget`): a prompt longer than the budget is prefilled whole, its last chunk
holding the observation window (scheduled before the step's decodes, so they never starve it);
right after that step `snapkv.compress_sequence` keeps `budget` of its cached tokens per KV
head, in place in its first pages, and frees the rest. Its later tokens keep their true rotary
positions but attend over budget + (tokens since the prompt) keys.
With a draft model the draft's pages of that prompt are compressed too, right after the target's,
by the draft's own window queries (from its pass over the prompt's last chunk).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.generate.checks import (check_context, check_draft_model, check_int,
                                       check_paged_model, check_prompt, check_snapkv_window)
from jaxinfer.generate.draft_step import (compiled_draft_pass, compiled_propose,
                                          empty_propose_inputs)
from jaxinfer.generate.engine_step import (PAGED_ATTENTION, StepInputs, attends_ragged,
                                           compiled_step, empty_inputs, mark_seen,
                                           set_sampling_rows, token_buckets)
from jaxinfer.generate.paged_cache import default_num_pages, pages_for
from jaxinfer.generate.prefix_sharing import shared_prefix
from jaxinfer.generate.prompt_lookup import lookup_draft
from jaxinfer.generate.sampling_params import SamplingParams
from jaxinfer.generate.scheduler import Chunk, Request, Scheduler
from jaxinfer.generate.snapkv import compress_sequence
from jaxinfer.generate.stopping import (Tokenizer, aborted_first_finish, decide_tokens,
                                        first_finish)

if TYPE_CHECKING:
    from jaxinfer.models.llama import DecoderLM

log = logging.getLogger(__name__)

DEFAULT_SNAPKV_WINDOW = 8  # SnapKV's observation window (Engine's snapkv_window; the CLI's too)

# a draft model's guesses are computed after scheduling; until then the draft holds this token
# (never verified: `_fill_drafts` replaces every placeholder of a scheduled request)
PLACEHOLDER = 0


class Event(NamedTuple):
    """New tokens of one request from one step (a list per sample when the request has n > 1)."""

    request_id: int
    token_ids: list
    finished: bool


class StepStats(NamedTuple):
    """What the last step computed (for benchmarks and logs)."""

    tokens: int  # real tokens in the step
    bucket: int  # token slots compiled for (tokens + padding)
    sampled: int  # sampling rows: the last token of each finished chunk, plus its draft tokens
    # every chunk was one decode: its sequence's last token plus its draft, all sampled at (so
    # tokens == sampled; the case the decode roofline models). A recompute chunk is not one
    decode_only: bool
    kv_tokens: int  # keys attended in all, sum of (cache slot + 1) over the tokens
    shared_prefix: int  # tokens of the prefix attended Hydragen-style (0: none this step)
    # token slots of the draft model's pass over the chunks that did not draft (0: no pass: no
    # draft model, or every chunk drafted, so its proposal wrote all the draft's K/V)
    draft_pass: int = 0


class Engine:
    """Serve many requests at once on one model (see the module docstring for the API).

    max_batch: sequences in flight at once. page_size: tokens per KV page. num_pages: pages in the
    pool, None to size it from device memory (logged). max_tokens_per_step: the token budget of one
    step (decodes plus prompt chunks). tokenizer: needed only for stop strings. max_model_len: the
    longest sequence served (default: the model's context); it sizes the page tables.
    kv_dtype: None stores K/V in the model's dtype; "int8" stores int8 values with a float32
    scale per (token, KV head) (`jaxinfer.models.kv_quant`), which fits about twice the pages in
    the same memory at head_dim 64 (3.8x against float32 at 128) for a bounded attention error.
    speculative_tokens: prompt-lookup drafts of up to this many tokens per decode step (0: off),
    found from the last `lookup_ngram` tokens (`prompt_lookup.py`); verified in the same step, so
    outputs are unchanged and a step may emit several tokens of a request. Counts:
    `num_draft_tokens`, `num_accepted_tokens`.
    draft_model: propose the speculative_tokens (>= 1) guesses with this model instead of prompt
    lookup (lookup_ngram is then unused): a paged model with the target's vocab_size and a context
    of at least max_model_len; its KV pages (in kv_dtype) take num_pages pages of its own size. A
    request with a repetition penalty decodes without drafts (with either drafter: a drafted
    token would count as seen before it is accepted). Works with hydragen (the draft's pass over
    the step's chunks that did not draft shares their prefix pages too) and with snapkv_budget
    (the draft's pages of a compressed prompt are compressed as well, by its own votes).
    hydragen: in a step where several sequences start with the same cached pages, attend to those
    pages once for all their tokens (one dense attention, Hydragen) and page through only the rest
    of each sequence; costs one more compiled variant per token bucket; off for a sliding-window
    model (the shared prefix has no per-query window to cut). Any max_tokens_per_step
    works, also one above max_model_len (vLLM allows a step budget beyond the context, and a
    step of many short sequences uses it): a step's tokens then attend to the prefix in rows of
    the context's size (`attention_over_keys`), reading the prefix once per row.
    prefix_caching: reuse the K/V pages of prompt blocks already computed (hashed by content and
    position; see `scheduler.py`): a shared system prompt is computed once while it stays cached.
    snapkv_budget: None (off), or compress each prompt longer than this to this many cached
    tokens per KV head once it is prefilled (SnapKV: the votes of its last `snapkv_window` tokens'
    attention, avg-pooled over 5 positions, pick them; the window is always kept). Such prompts
    take no part in prefix caching; their tokens' K/V no longer depend on the prompt alone.
    A budget of max_model_len - 1 or more is accepted and never compresses (a prompt is shorter).
    paged_attention: how a step's tokens attend over their pages: "ragged" (each chunk as a run
    of queries, `kernels_pallas.ragged_paged_attention`: its pages are read once per query block),
    "per_token" (one decode per token) or "auto", by the bucket's size: ragged from 8 token slots
    per chunk slot on (`engine_step.attends_ragged`, where the CPU measurements are), so
    prompt-heavy large buckets go ragged and decode-heavy small ones per token. Outputs agree
    either way up to float rounding (see the module docstring: which path a request takes, and
    so its logits' last bits, then depends on the batch); only speed differs.
    """

    def __init__(self, model: DecoderLM, max_batch: int = 64, page_size: int = 16,
                 num_pages: int | None = None, max_tokens_per_step: int = 512, *,
                 tokenizer: Tokenizer | None = None, max_model_len: int | None = None,
                 kv_dtype: str | None = None, prefix_caching: bool = True,
                 speculative_tokens: int = 0, lookup_ngram: int = 3, hydragen: bool = False,
                 snapkv_budget: int | None = None, snapkv_window: int = DEFAULT_SNAPKV_WINDOW,
                 draft_model: DecoderLM | None = None, paged_attention: str = "auto"):
        check_paged_model("model", model)
        config = model.config
        max_batch = check_int("max_batch", max_batch, low=1)
        page_size = check_int("page_size", page_size, low=1)
        max_tokens_per_step = check_int("max_tokens_per_step", max_tokens_per_step, low=1)
        if max_model_len is None:
            max_model_len = config.max_position_embeddings
        max_model_len = check_int("max_model_len", max_model_len, low=1)
        check_context("the model's", config, max_model_len)
        if paged_attention not in PAGED_ATTENTION:
            raise ValueError(f"paged_attention must be one of {PAGED_ATTENTION}; got "
                             f"{paged_attention!r}")
        if kv_dtype not in (None, "int8"):
            raise ValueError(f"kv_dtype must be None (the model's dtype) or 'int8'; got "
                             f"{kv_dtype!r}")
        speculative_tokens = check_int("speculative_tokens", speculative_tokens, low=0)
        lookup_ngram = check_int("lookup_ngram", lookup_ngram, low=1)
        snapkv_window = check_int("snapkv_window", snapkv_window, low=1)
        snapkv_budget = check_int("snapkv_budget", snapkv_budget, low=1, optional=True)
        if snapkv_budget is not None:
            if snapkv_window > min(snapkv_budget, max_tokens_per_step):
                raise ValueError(f"snapkv_window must be <= snapkv_budget and <= "
                                 f"max_tokens_per_step (the window's queries come from one step);"
                                 f" got snapkv_window={snapkv_window}, snapkv_budget="
                                 f"{snapkv_budget}, max_tokens_per_step={max_tokens_per_step}")
        check_snapkv_window(config, snapkv_budget)
        if draft_model is not None:
            check_draft_model(draft_model, config, max_model_len, speculative_tokens)
            check_snapkv_window(draft_model.config, snapkv_budget, "the draft model's")
        # the step returns the queries of snapkv_window tokens even when SnapKV is off (a few
        # rows), so that engines of one geometry share one compiled step either way
        self.snapkv_budget, self.snapkv_window = snapkv_budget, snapkv_window
        self.speculative_tokens, self.lookup_ngram = speculative_tokens, lookup_ngram
        self.num_draft_tokens = self.num_accepted_tokens = 0
        self.hydragen = bool(hydragen) and config.sliding_window is None
        if hydragen and not self.hydragen:
            log.info("hydragen is off: a sliding-window model attends page by page")
        self.config = config
        self.tokenizer = tokenizer
        self.max_batch, self.page_size = max_batch, page_size
        self.max_model_len = max_model_len
        self.pages_per_seq = pages_for(self.max_model_len, self.page_size)
        if num_pages is None:
            num_pages = default_num_pages(config, self.page_size, self.max_batch,
                                          self.max_model_len, kv_dtype,
                                          None if draft_model is None else draft_model.config)
        self.num_pages = check_int("num_pages", num_pages, low=1)
        self.buckets = token_buckets(max_tokens_per_step)
        self.max_rows = self.max_batch * (1 + speculative_tokens)  # sampling rows of a step
        graphdef, self._state = nnx.split(model)
        self.paged_attention = paged_attention
        self._steps = tuple(compiled_step(graphdef, ragged) for ragged in (False, True))
        self._cache = model.init_paged_cache(self.num_pages, self.page_size, kv_dtype)
        self._draft = draft_model
        if draft_model is not None:
            draft_graphdef, self._draft_state = nnx.split(draft_model)
            self._draft_passes = tuple(compiled_draft_pass(draft_graphdef, ragged)
                                       for ragged in (False, True))
            self._propose = compiled_propose(draft_graphdef, speculative_tokens)
            self._draft_cache = draft_model.init_paged_cache(self.num_pages, self.page_size,
                                                             kv_dtype)
        self._seen = jnp.zeros((self.max_batch, config.vocab_size), bool)  # [B, vocab]
        self._scheduler = Scheduler(self.max_batch, self.page_size, self.num_pages,
                                    max_tokens_per_step, bool(prefix_caching),
                                    self.snapkv_window)
        self._live: dict[int, list[Request]] = {}  # request id -> its samples, until finished
        self._results: dict[int, list] = {}  # finished, not yet returned by run_until_done
        # First Finish Search: request id -> its shortest finished sample so far, while live
        self._shortest: dict[int, Request] = {}
        self._next_id = 0
        self._arrivals = 0
        self.last_step: StepStats | None = None

    @property
    def num_preemptions(self) -> int:
        """Preemptions so far (each one recomputes a request from its tokens)."""
        return self._scheduler.num_preemptions

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens so far whose K/V came from the prefix cache instead of being computed."""
        return self._scheduler.num_cached_tokens

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and neither finished nor aborted."""
        return len(self._live)

    def submit(self, prompt_ids: Sequence[int] | np.ndarray,
               params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError (TypeError) for anything that could
        never be served: empty or out-of-vocabulary prompt, prompt + max_tokens beyond the context
        or the page pool, stop strings without a tokenizer."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams; got {type(params).__name__}")
        prompt = check_prompt(prompt_ids, self.config.vocab_size)
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens plus max_tokens={params.max_tokens} "
                             f"exceeds max_model_len={self.max_model_len}")
        needed = pages_for(total - 1, self.page_size)  # the last token's K/V is never written
        if needed > self.num_pages:
            raise ValueError(f"prompt of {len(prompt)} tokens plus max_tokens={params.max_tokens} "
                             f"needs {needed} KV pages of {self.page_size} tokens; the pool has "
                             f"{self.num_pages}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop!r} need a tokenizer: "
                             f"Engine(model, tokenizer=...)")
        bad = [t for t in params.stop_token_ids if t >= self.config.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must lie in [0, {self.config.vocab_size}) "
                             f"(vocab_size); got {bad}")
        request_id = self._next_id
        self._next_id += 1
        samples = []
        for i in range(params.n):
            compress = self.snapkv_budget is not None and len(prompt) > self.snapkv_budget
            samples.append(Request(request_id, i, prompt, params, self._arrivals,
                                   compress=compress))
            self._arrivals += 1
            self._scheduler.add(samples[-1])
        self._live[request_id] = samples
        return request_id

    def abort(self, request_id: int) -> list:
        """Stop a queued or running request; returns what it generated so far, in the form of
        its result: a list per sample when n > 1; with first_finish one list, the shortest
        finished sample's or, while none has finished, that of the sample furthest along."""
        samples = self._live.pop(request_id, None)
        if samples is None:
            raise KeyError(f"unknown request id {request_id!r}: never submitted, already finished "
                           f"or already aborted")
        shortest = self._shortest.pop(request_id, None)
        for request in samples:
            self._scheduler.finish(request)
        if samples[0].params.first_finish:
            return aborted_first_finish(samples, shortest)
        return self._output(samples)

    def step(self) -> list[Event]:
        """Run one scheduled step; returns the events it produced (empty when idle). A step that
        raises (say a tokenizer's decode, for stop strings) changes no request's output or
        computed position (its scheduling, drafts and written KV may have moved): the exception
        propagates, and the next step computes the same tokens again (abort a request whose
        tokenizer keeps raising)."""
        if self.speculative_tokens:
            self._propose_drafts()
        chunks = self._scheduler.schedule()
        if not chunks:
            return []
        if self._draft is not None:
            self._fill_drafts(chunks)
        for chunk in chunks:
            if chunk.request.from_cache:  # its cached tokens never pass through a step
                self._mark_seen(chunk.request)
        inputs, rows = self._build_inputs(chunks)
        draft_inputs = self._draft_pass_inputs(chunks)
        real = int(inputs.valid.sum())  # tokens, not padding
        self.last_step = StepStats(
            tokens=real, bucket=len(inputs.valid), sampled=rows, decode_only=rows == real,
            kv_tokens=int((inputs.positions - inputs.cache_offset + 1)[inputs.valid].sum()),
            shared_prefix=int(inputs.prefix_len),
            draft_pass=0 if draft_inputs is None else len(draft_inputs.valid))
        tokens, queries = self._step(inputs)
        draft_queries = None
        if draft_inputs is not None:  # the proposal wrote the drafting chunks' draft K/V
            draft_queries = self._draft_pass(draft_inputs)
        # every request's tokens are decided before any request changes: a stop-string check
        # may raise (a user's tokenizer), and a step that raises then leaves every request as it
        # was (the next step computes the same tokens again), so stream() misses none
        tokens, decided, row = np.asarray(tokens).tolist(), [], 0
        for chunk in chunks:
            decision = None  # (kept tokens, stops) of a chunk that samples
            if chunk.samples:
                sampled = tokens[row:row + len(chunk.request.draft) + 1]
                row += len(sampled)
                decision = decide_tokens(chunk.request, sampled, self.config.eos_token_id,
                                         self.tokenizer)
            decided.append(decision)
        for chunk in chunks:
            if chunk.compresses:  # before the chunk's request may finish and free its pages
                self._compress(chunk.request, queries, draft_queries)
        new: dict[int, list[tuple[Request, int]]] = {}
        for chunk, decision in zip(chunks, decided):
            request = chunk.request
            if decision is None:
                request.computed += chunk.count
                self._scheduler.register_computed(request)
            else:
                self._accept(request, chunk, *decision)
                new.setdefault(request.request_id, []).extend((request, t) for t in decision[0])
        return [self._event(request_id, produced) for request_id, produced in new.items()]

    def _accept(self, request: Request, chunk: Chunk, kept: list[int], stop: bool) -> None:
        """Append the tokens `decide_tokens` kept; finish the request if it stops."""
        draft, request.draft = request.draft, []
        request.output.extend(kept)
        accepted = len(kept) - 1  # draft tokens whose K/V this step computed correctly
        request.computed = chunk.start + chunk.count - len(draft) + accepted
        self.num_draft_tokens += len(draft)
        self.num_accepted_tokens += accepted
        self._scheduler.register_computed(request)  # before finish frees the pages
        if stop:
            self._scheduler.finish(request)

    def _propose_drafts(self) -> None:
        """Drafts of up to speculative_tokens tokens (never past max_tokens) for running requests
        that decode, except those with a repetition penalty (a draft token would count as seen
        before it is accepted) and those whose prompt SnapKV has yet to compress (with
        snapkv_window 1 the last prompt token may be left alone, a decode in form, but the chunk
        that compresses must end with the prompt: a draft there would stop it sampling). Prompt
        lookup finds the tokens here; a draft model's are placeholders until `_fill_drafts`: the
        scheduler first trims each draft to the step's budget and to the pages it can get, so
        the draft model writes only into given pages."""
        for request in self._scheduler.running:
            request.draft = []  # one left from a step that did not schedule the request
            p = request.params
            if (not request.decoding or p.repetition_penalty != 1.0
                    or (request.compress and request.computed < len(request.prompt))):
                continue
            room = min(self.speculative_tokens, p.max_tokens - len(request.output) - 1)
            if self._draft is None:
                request.draft = lookup_draft(request.tokens, self.lookup_ngram, room)
            else:
                request.draft = [PLACEHOLDER] * room

    def _fill_drafts(self, chunks: list[Chunk]) -> None:
        """Replace the scheduled placeholder drafts by the draft model's guesses (one proposal
        for every drafting request of the step)."""
        drafting = [chunk.request for chunk in chunks if chunk.request.draft]
        if not drafting:
            return
        inputs = empty_propose_inputs(self.max_batch, self.pages_per_seq, self.num_pages)
        for request in drafting:
            slot = request.slot
            inputs.token_ids[slot] = request.tokens[request.computed]  # the last real token
            inputs.positions[slot] = request.computed
            inputs.cache_offset[slot] = request.offset
            inputs.active[slot] = True
            inputs.page_table[slot, :len(request.pages)] = request.pages
            set_sampling_rows(inputs, slot, request.params, request.sample_index)
        guesses, self._draft_cache = self._propose(self._draft_state, self._draft_cache, inputs)
        guesses = np.asarray(guesses)  # [B, speculative_tokens]
        for request in drafting:
            request.draft = guesses[request.slot, :len(request.draft)].tolist()

    def _draft_pass_inputs(self, chunks: list[Chunk]) -> StepInputs | None:
        """Inputs of the draft model's pass: the step's chunks that did not draft (prompt chunks,
        decodes without a draft) in their own token bucket, since a drafting chunk's tokens (its
        last token and guesses) got the draft's K/V from its proposal. None (no pass) without a
        draft model or when every chunk drafted, as in steady decoding."""
        if self._draft is None:
            return None
        undrafted = [chunk for chunk in chunks if not chunk.request.draft]
        return self._build_inputs(undrafted)[0] if undrafted else None

    def stream(self) -> Iterator[Event]:
        """Step until every submitted request has finished, yielding events as tokens appear."""
        while self._scheduler.has_work():
            yield from self.step()

    def run_until_done(self) -> dict[int, list]:
        """Finish every request; returns {request id: generated token ids} of every request that
        finished since the last call (including ones already partly read through stream())."""
        for _ in self.stream():
            pass
        results, self._results = self._results, {}
        return results

    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None
                 = None) -> list[list]:
        """Submit a batch of prompts and serve until they finish; their outputs in prompt order.
        Other requests progress meanwhile; their results stay for run_until_done."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params must be one SamplingParams or one per prompt; got "
                             f"{len(params)} for {len(prompts)} prompts")
        ids: list[int] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.submit(prompt, p))
        except (TypeError, ValueError):
            for request_id in ids:  # all or nothing: no half-submitted batch keeps running
                self.abort(request_id)
            raise
        while any(i in self._live for i in ids):
            self.step()
        return [self._results.pop(i) for i in ids]

    def _ragged(self, inputs: StepInputs) -> bool:
        """Whether this bucket's step attends ragged (`attends_ragged`, by its static shape)."""
        return attends_ragged(self.paged_attention, inputs.token_ids.shape[0],
                              inputs.seq_slot.shape[0])

    def _step(self, inputs: StepInputs) -> tuple[jax.Array, jax.Array]:
        """One jitted step over `inputs` (K/V into the cache) -> (sampled tokens, queries)."""
        tokens, self._cache, self._seen, queries = self._steps[self._ragged(inputs)](
            self._state, self._cache, self._seen, inputs)
        return tokens, queries

    def _draft_pass(self, inputs: StepInputs) -> jax.Array:
        """The draft's K/V of `inputs`' tokens (into its cache) -> its observed queries."""
        self._draft_cache, queries = self._draft_passes[self._ragged(inputs)](
            self._draft_state, self._draft_cache, inputs)
        return queries

    def warmup(self) -> None:
        """Compile the step for every token bucket, the prefix-cache hit's `mark_seen`, with
        SnapKV the compression (of the draft's pages too) and with a draft model its pass for
        every bucket and its proposal (all-padding steps, an out-of-range slot and a page row of
        out-of-range pages change nothing)."""
        padding = np.full(self.pages_per_seq * self.page_size, self.config.vocab_size, np.int32)
        self._seen = mark_seen(self._seen, np.int32(self.max_batch), padding)
        for tokens in self.buckets:
            for prefix_pages in (0, self.pages_per_seq) if self.hydragen else (0,):
                inputs = empty_inputs(tokens, min(tokens, self.max_rows), self.max_batch,
                                      self.pages_per_seq, prefix_pages, self.snapkv_window)
                _, queries = self._step(inputs)
                if self._draft is not None:
                    draft_queries = self._draft_pass(inputs)
        if self._draft is not None:
            _, self._draft_cache = self._propose(
                self._draft_state, self._draft_cache,
                empty_propose_inputs(self.max_batch, self.pages_per_seq, self.num_pages))
        # a budget of max_model_len - 1 or more never compresses: a prompt leaves room for a token
        if self.snapkv_budget is not None and self.snapkv_budget < self.max_model_len - 1:
            self._compress_pages(np.full(self.pages_per_seq, self.num_pages, np.int32),
                                 self.snapkv_budget + 1, queries,
                                 None if self._draft is None else draft_queries)

    def _compress(self, request: Request, queries: jax.Array,
                  draft_queries: jax.Array | None) -> None:
        """SnapKV on the request's just-computed prompt: queries [layers, W, Hq, D] are its
        window's (the step's observe_rows), draft_queries the draft pass's (None: no draft
        model). Frees the pages past the budget."""
        page_row = np.full(self.pages_per_seq, self.num_pages, np.int32)  # padding: never written
        page_row[:len(request.pages)] = request.pages
        self._compress_pages(page_row, len(request.prompt), queries, draft_queries)
        self._scheduler.compressed(request, self.snapkv_budget)

    def _compress_pages(self, page_row: np.ndarray, length: int, queries: jax.Array,
                        draft_queries: jax.Array | None) -> None:
        """Compress the first `length` tokens on page_row int32 [pages_per_seq] to the budget in
        the target's pages and, given its queries, in the draft's pages of the same ids."""
        self._cache = compress_sequence(self._cache, queries, page_row, np.int32(length),
                                        budget=self.snapkv_budget)
        if draft_queries is not None:
            self._draft_cache = compress_sequence(self._draft_cache, draft_queries, page_row,
                                                  np.int32(length), budget=self.snapkv_budget)

    def _mark_seen(self, request: Request) -> None:
        """Set the slot's repetition-penalty row to the request's cached tokens."""
        ids = np.full(self.pages_per_seq * self.page_size, self.config.vocab_size, np.int32)  # [L]
        ids[:request.computed] = request.tokens[:request.computed]
        self._seen = mark_seen(self._seen, np.int32(request.slot), ids)
        request.from_cache = False

    def _build_inputs(self, chunks: list[Chunk]) -> tuple[StepInputs, int]:
        """The step's arrays: each chunk's tokens contiguous and in position order (one query run
        per chunk, as `StepInputs.query_starts` records); sampling rows follow the chunks' order,
        one per token sampled at (a chunk's last token and its draft tokens). Returns the inputs
        and the number of rows."""
        total = sum(chunk.count for chunk in chunks)
        tokens = next(b for b in self.buckets if b >= total)
        prefix, group = shared_prefix(chunks, self.page_size) if self.hydragen else ([], [])
        inputs = empty_inputs(tokens, min(tokens, self.max_rows), self.max_batch,
                              self.pages_per_seq, self.pages_per_seq if prefix else 0,
                              self.snapkv_window)
        inputs.prefix_pages[:len(prefix)] = prefix
        inputs.prefix_len[...] = len(prefix) * self.page_size
        inputs.num_seqs[...] = len(chunks)
        inputs.query_starts[len(chunks):] = total
        i = row = 0
        for k, chunk in enumerate(chunks):
            request, end = chunk.request, chunk.start + chunk.count
            inputs.query_starts[k], inputs.seq_slot[k] = i, request.slot
            inputs.kv_lengths[k] = end - request.offset  # its last token's cache slot + 1
            span = slice(i, i + chunk.count)
            inputs.token_ids[span] = request.tokens[chunk.start:end]
            inputs.positions[span] = np.arange(chunk.start, end)
            inputs.cache_offset[span] = request.offset
            inputs.token_slot[span] = request.slot
            inputs.valid[span] = True
            inputs.prefix_member[span] = any(chunk is member for member in group)
            inputs.page_table[request.slot, :len(request.pages)] = request.pages
            i += chunk.count
            if chunk.compresses:  # the scheduler lets one chunk per step do so
                inputs.observe_rows[:] = np.arange(i - self.snapkv_window, i)
            if chunk.samples:
                rows = slice(row, row + len(request.draft) + 1)
                inputs.logit_rows[rows] = np.arange(i - len(request.draft) - 1, i)
                inputs.sample_slot[rows] = request.slot
                set_sampling_rows(inputs, rows, request.params, request.sample_index)
                row = rows.stop
        return inputs, row

    def _event(self, request_id: int, produced: list[tuple[Request, int]]) -> Event:
        samples = self._live[request_id]
        shortest = (self._first_finish(request_id, produced) if samples[0].params.first_finish
                    else None)
        done = all(r.finished for r in samples)
        if done:
            del self._live[request_id]
            self._shortest.pop(request_id, None)
            self._results[request_id] = (list(shortest.output) if shortest is not None
                                         else self._output(samples))
        if len(samples) == 1:
            return Event(request_id, [token for _, token in produced], done)
        per_sample: list[list[int]] = [[] for _ in samples]
        for request, token in produced:
            per_sample[request.sample_index].append(token)
        return Event(request_id, per_sample, done)

    def _first_finish(self, request_id: int,
                      produced: list[tuple[Request, int]]) -> Request | None:
        """First Finish Search after a step (`stopping.first_finish`): stops the samples that can
        no longer beat the shortest finished one; returns that one (None: none finished yet)."""
        shortest, beaten = first_finish(self._live[request_id], self._shortest.get(request_id),
                                        [request for request, _ in produced if request.finished])
        if shortest is not None:
            self._shortest[request_id] = shortest
        for request in beaten:
            self._scheduler.finish(request)
        return shortest

    @staticmethod
    def _output(samples: list[Request]) -> list:
        return list(samples[0].output) if len(samples) == 1 else [list(r.output) for r in samples]
