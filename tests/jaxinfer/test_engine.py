"""Properties of the serving `Engine` on a tiny random Llama, on CPU.

The oracle is `jaxinfer.generate` on each request alone (CONVENTIONS.md): whatever the arrival
times, batch mix, chunk sizes and preemptions, the engine's greedy tokens must equal it. All tests
share one engine geometry (ENGINE) so the step compiles once per bucket for the whole module, and
the pages are deliberately scarce so that preemption happens.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.generate import engine as engine_module
from jaxinfer.models.kv_quant import dequantize_kv
from jaxinfer.models.paged_kv import PagedBatch, PagedKVCache, PagedLayerKV
from tests.jaxinfer.engine_cases import greedy_oracle, peaky_model

VOCAB = 96
EOS = 13  # a token the greedy continuations of the test prompts produce (see test_eos_*)
CONFIG = jaxinfer.LlamaConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    eos_token_id=EOS)
# 10 pages of 4 tokens hold fewer than two of the longest requests (13 + 12 tokens): preemption.
# Buckets of 8 and 16 tokens hold up to 4 chunks: below "auto"'s threshold for ragged attention
# (8 token slots per chunk slot), so the tests ask for it; one test runs the per-token path.
ENGINE = dict(max_batch=4, page_size=4, num_pages=10, max_tokens_per_step=16,
              paged_attention="ragged")
PROMPT_LENGTHS = (3, 8, 13)  # few lengths: each one compiles the oracle once
ORACLE_NEW = 12  # every oracle continuation has this many tokens; requests take a prefix
GREEDY = jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return peaky_model(CONFIG)


@pytest.fixture(scope="module")
def oracle(model):
    return greedy_oracle(model, ORACLE_NEW)


def random_prompts(rng: np.random.Generator, count: int) -> list[list[int]]:
    return [rng.integers(0, VOCAB, size=rng.choice(PROMPT_LENGTHS)).tolist() for _ in range(count)]


class CharTokenizer:
    """Each token id decodes to one letter: enough for stop strings."""

    @staticmethod
    def decode(ids) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def serve_with_arrivals(engine, arrivals: list[tuple[int, list[int], jaxinfer.SamplingParams]]):
    """Submit each (step, prompt, params) once the engine has run `step` steps; serve to the end.
    Returns the request ids (in the order of `arrivals`) and {id: tokens} from stream events."""
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    ids, streamed, step = [None] * len(arrivals), {}, 0
    while pending:
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            ids[i] = engine.submit(arrivals[i][1], arrivals[i][2])
        for event in engine.step():
            streamed.setdefault(event.request_id, []).extend(event.token_ids)
        step += 1
    for event in engine.stream():
        streamed.setdefault(event.request_id, []).extend(event.token_ids)
    return ids, streamed


@pytest.mark.parametrize("paged_attention", ["ragged", "per_token"])
def test_greedy_matches_generate_alone_under_random_schedule_with_preemption(model, oracle,
                                                                             paged_attention):
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 10)
    params = [jaxinfer.SamplingParams(max_tokens=int(rng.integers(1, ORACLE_NEW + 1)),
                                      temperature=0.0, ignore_eos=True) for _ in prompts]
    arrivals = [(int(rng.integers(0, 12)), p, sp) for p, sp in zip(prompts, params)]
    engine = jaxinfer.Engine(model, **{**ENGINE, "paged_attention": paged_attention})
    ids, streamed = serve_with_arrivals(engine, arrivals)
    results = engine.run_until_done()
    assert engine.num_preemptions > 0, "pages were meant to be scarce enough to preempt"
    assert sorted(results) == sorted(ids)
    for rid, (_, prompt, sp) in zip(ids, arrivals):
        assert results[rid] == oracle(prompt)[:sp.max_tokens], f"request {rid}"
        assert streamed[rid] == results[rid]


def test_preemption_evicts_the_newest_request_and_its_recomputed_output_is_exact(model, oracle):
    """When a running request needs a page and none is free, the newest running request is
    preempted (pages freed, recomputed later from its prompt and generated tokens), whichever
    request needed the page: every request preempted in a step arrived after every request
    still running. Three 8-token prompts with 12 new tokens each need 5 pages apiece of the 10:
    the newest is preempted, the oldest never, and every output is the oracle's."""
    rng = np.random.default_rng(17)
    prompts = [rng.integers(0, VOCAB, 8).tolist() for _ in range(3)]
    engine = jaxinfer.Engine(model, **ENGINE)
    ids = [engine.submit(prompt, GREEDY) for prompt in prompts]
    requests = [engine._live[rid][0] for rid in ids]  # in arrival order
    while engine.num_unfinished:
        before = [r.preemptions for r in requests]
        engine.step()
        running = engine._scheduler.running
        for request, count in zip(requests, before):
            if request.preemptions > count:
                assert all(request.arrival > other.arrival for other in running)
    assert requests[0].preemptions == 0 and requests[-1].preemptions > 0
    results = engine.run_until_done()
    assert [results[rid] for rid in ids] == [oracle(prompt) for prompt in prompts]


def test_decode_only_steps_are_those_of_one_token_decodes_not_cached_recomputes(model):
    """`StepStats.decode_only` iff every chunk is its sequence's last token alone (no drafts
    here), judged from the chunks before the step. A preempted request re-admitted with cache
    hits past its prompt recomputes several generated tokens in one chunk: not a decode."""
    prompts = [np.random.default_rng(i).integers(0, VOCAB, 3).tolist() for i in range(3)]
    engine = jaxinfer.Engine(model, **ENGINE)
    schedule, steps = engine._scheduler.schedule, []

    def recorded():  # (decodes, recomputes past the prompt) of the step, before it runs
        chunks = schedule()
        past = len([c for c in chunks if c.count > 1 and c.start >= len(c.request.prompt)])
        steps.append((all(c.count == 1 and c.start == len(c.request.tokens) - 1
                          for c in chunks), past))
        return chunks

    engine._scheduler.schedule = recorded
    for prompt in prompts:
        engine.submit(prompt, GREEDY)
    labels = []
    while engine.num_unfinished:
        engine.step()
        labels.append(engine.last_step.decode_only)
    assert engine.num_preemptions > 0 and any(past for _, past in steps)
    assert labels == [decodes for decodes, _ in steps]


@pytest.mark.parametrize("hydragen, paged_attention", [
    (False, "ragged"), (True, "ragged"), (True, "per_token")],
    ids=["paged", "hydragen", "hydragen-per_token"])
def test_prefix_cache_hits_serve_the_oracle_tokens_under_preemption(model, oracle, hydragen,
                                                                    paged_attention):
    """Prompts share 8-token prefixes (2 pages); later arrivals find them in the pool. With
    hydragen (one prefix, pages for three sequences at once) the sequences sharing it attend to
    its pages together, by either paged attention path (each skips the prefix's pages per
    sequence)."""
    rng = np.random.default_rng(6)
    prefixes = [rng.integers(0, VOCAB, 8).tolist() for _ in range(1 if hydragen else 2)]
    prompts = [prefixes[i % len(prefixes)] + rng.integers(0, VOCAB, 5).tolist() for i in range(8)]
    arrivals = [(2 * i, p, GREEDY) for i, p in enumerate(prompts)]
    engine = jaxinfer.Engine(model, **{**ENGINE, "num_pages": 16 if hydragen else 10,
                                       "paged_attention": paged_attention}, hydragen=hydragen)
    shared, step = [], engine.step

    def recording_step():
        events = step()
        shared.append(engine.last_step.shared_prefix if events else 0)
        return events

    engine.step = recording_step
    ids, _ = serve_with_arrivals(engine, arrivals)
    results = engine.run_until_done()
    assert engine.num_cached_tokens >= 8 and (hydragen or engine.num_preemptions > 0)
    assert max(shared) == (8 if hydragen else 0)
    for rid, prompt in zip(ids, prompts):
        assert results[rid] == oracle(prompt), f"request {rid}"


def test_hydragen_serves_a_shared_prefix_step_larger_than_the_context(model, oracle):
    """A step may hold more tokens than a sequence has positions (max_tokens_per_step 8 >
    max_model_len 6, as vLLM allows): warmup compiles the 8-token bucket with a whole-context
    prefix, and a step of cache-hit prompts attends to their shared prefix page with more query
    slots than the prefix has. Outputs stay the oracle's."""
    rng = np.random.default_rng(11)
    prefix = rng.integers(0, VOCAB, 2).tolist()
    prompts = [prefix + [token] for token in rng.integers(0, VOCAB, 3).tolist()]
    params = jaxinfer.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine = jaxinfer.Engine(model, max_batch=3, page_size=2, num_pages=12, max_tokens_per_step=8,
                             max_model_len=6, hydragen=True, paged_attention="ragged")
    engine.warmup()
    first = engine.submit(prompts[0], params)
    engine.step()  # computes and caches the prefix page
    ids = [first] + [engine.submit(p, params) for p in prompts[1:]]
    engine.step()
    assert engine.last_step.bucket == 8 and engine.last_step.shared_prefix == 2
    results = engine.run_until_done()
    for rid, prompt in zip(ids, prompts):
        assert results[rid] == oracle(prompt)[:3], f"request {rid}"


def test_prompt_lookup_drafts_keep_greedy_and_seeded_outputs_and_get_accepted(model, oracle):
    """Drafts are verified by sampling where plain decoding would (same logits and keys): greedy
    stays the oracle's, seeded sampling the non-speculative engine's, with scarce pages."""
    rng = np.random.default_rng(8)
    motifs = [rng.integers(0, VOCAB, 4).tolist() for _ in range(4)]
    prompts = [m + m[:4] if i % 2 else (m * 4)[:13] for i, m in enumerate(motifs)]  # repetitive
    prompts += random_prompts(rng, 3)
    arrivals = [(int(rng.integers(0, 6)), p, GREEDY) for p in prompts]
    engine = jaxinfer.Engine(model, **ENGINE, speculative_tokens=3)
    ids, streamed = serve_with_arrivals(engine, arrivals)
    results = engine.run_until_done()
    assert 0 < engine.num_accepted_tokens <= engine.num_draft_tokens
    for rid, prompt in zip(ids, prompts):
        assert results[rid] == streamed[rid] == oracle(prompt), f"request {rid}"

    sampled = jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=0.5, seed=5,
                                      ignore_eos=True)
    plain = jaxinfer.Engine(model, **ENGINE).generate(prompts[:4], sampled)
    speculative = jaxinfer.Engine(model, **ENGINE, speculative_tokens=3, lookup_ngram=1)
    assert speculative.generate(prompts[:4], sampled) == plain
    assert speculative.num_accepted_tokens > 0


def test_generate_batch_returns_outputs_in_prompt_order_with_exact_max_tokens(model, oracle):
    rng = np.random.default_rng(2)
    prompts = random_prompts(rng, 5)
    params = [jaxinfer.SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (1, 2, 5, 11, 12)]
    outputs = jaxinfer.Engine(model, **ENGINE).generate(prompts, params)
    assert [len(o) for o in outputs] == [1, 2, 5, 11, 12]
    for prompt, sp, out in zip(prompts, params, outputs):
        assert out == oracle(prompt)[:sp.max_tokens]


def prompt_logits(model, prompt: list[int], cache: PagedKVCache, write: bool = True):
    """Next-token logits at every prompt position from one paged pass over pages 0, 1, ... of a
    pool of 1-token pages; write=False attends over the cache as it is (writes dropped)."""
    t = len(prompt)
    positions = jnp.arange(t, dtype=jnp.int32)
    meta = PagedBatch(positions=positions, write_slots=positions if write else positions + t,
                      page_table=positions[None], query_starts=jnp.array([0, t], jnp.int32),
                      kv_lengths=jnp.array([t], jnp.int32), num_seqs=jnp.int32(1))
    logits, cache = model.forward_paged(jnp.asarray(prompt, jnp.int32), meta, cache, positions)
    return np.asarray(logits), cache


# int8 K/V move a logit by at most this fraction of the float logits' range on this deliberately
# peaky model (4.7% measured over a prompt, 2.9% along greedy continuations): scores of O(10)
# amplify the scale/2 per-element error that test_kv_quant bounds for one attention
INT8_LOGIT_ERROR = 0.1


def test_int8_pages_attend_over_the_dequantized_values_within_the_stated_error(model):
    """The int8 pass equals a float pass over the dequantized pages (so values and scales land in
    the right slots and are dequantized where read). Against float pages, logits move by at most
    INT8_LOGIT_ERROR of their range."""
    prompt = np.random.default_rng(3).integers(0, VOCAB, 13).tolist()
    t = len(prompt)
    exact, _ = prompt_logits(model, prompt, model.init_paged_cache(t, 1))
    approx, int8_cache = prompt_logits(model, prompt, model.init_paged_cache(t, 1, "int8"))
    assert int8_cache.layers[0].k.dtype == jnp.int8
    dequantized = PagedKVCache(tuple(
        PagedLayerKV(dequantize_kv(layer.k, layer.k_scale), dequantize_kv(layer.v, layer.v_scale))
        for layer in int8_cache.layers))
    replayed, _ = prompt_logits(model, prompt, dequantized, write=False)
    np.testing.assert_allclose(approx, replayed, rtol=1e-5, atol=1e-5 * np.ptp(exact))
    assert np.abs(approx - exact).max() < INT8_LOGIT_ERROR * np.ptp(exact)
    with pytest.raises(ValueError, match="kv_dtype must be None"):
        jaxinfer.Engine(model, **ENGINE, kv_dtype="fp8")


def teacher_forced_logits(model, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token logits float32 [N, L, vocab] of sequences int32 [N, L] (one jitted call): from
    the float model without a cache, and from one paged pass over int8 pages of 1 token."""
    n, t = sequences.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):  # ids [N, L]
        model = nnx.merge(graphdef, state)
        slots = jnp.arange(n * t, dtype=jnp.int32)  # [N * L]: token i of sequence s on page s*L+i
        meta = PagedBatch(positions=slots % t, write_slots=slots, page_table=slots.reshape(n, t),
                          query_starts=jnp.arange(n + 1, dtype=jnp.int32) * t,
                          kv_lengths=jnp.full(n, t, jnp.int32), num_seqs=jnp.int32(n))
        int8, _ = model.forward_paged(ids.reshape(-1), meta,
                                      model.init_paged_cache(n * t, 1, "int8"), slots)
        return model.forward(ids)[0], int8.reshape(n, t, -1)

    return jax.device_get(run(state, jnp.asarray(sequences)))


def test_int8_engine_keeps_the_float_oracles_tokens_until_int8_flips_a_near_tie(model, oracle):
    """Engine(kv_dtype="int8") greedy, with preemption, against the float `jaxinfer.generate`.
    Along each oracle sequence a teacher-forced int8 pass moves no logit by more than
    INT8_LOGIT_ERROR of the float range, and the engine keeps the oracle's tokens up to the first
    position where that pass's argmax differs (a near tie: top-2 margins of 0.03 and 0.31 flipped
    in a range of ~14), where it takes the int8 argmax: it decodes over int8 pages exactly as
    the int8 pass does. That covers most tokens: 90 of the 96 measured."""
    prompts = random_prompts(np.random.default_rng(16), 8)
    # steps of 8 tokens: one bucket, so one compilation of the int8 step
    engine = jaxinfer.Engine(model, **{**ENGINE, "max_tokens_per_step": 8}, kv_dtype="int8")
    outputs = engine.generate(prompts, GREEDY)
    assert engine.num_preemptions > 0
    wants = [oracle(prompt) for prompt in prompts]
    sequences = np.zeros((len(prompts), max(PROMPT_LENGTHS) + ORACLE_NEW), np.int32)
    for row, prompt, want in zip(sequences, prompts, wants):
        row[:len(prompt) + ORACLE_NEW] = prompt + want  # padded after: causal, never attended
    exact, approx = teacher_forced_logits(model, sequences)
    checked = 0
    for i, (prompt, want, out) in enumerate(zip(prompts, wants, outputs)):
        rows = slice(len(prompt) - 1, len(prompt) - 1 + ORACLE_NEW)  # logits of each new token
        assert np.abs(approx[i, rows] - exact[i, rows]).max() < INT8_LOGIT_ERROR * np.ptp(
            exact[i, rows])
        int8_argmax = approx[i, rows].argmax(-1)  # [ORACLE_NEW]
        flips = np.flatnonzero(int8_argmax != want)
        first = int(flips[0]) if flips.size else ORACLE_NEW
        assert out[:first] == want[:first], f"prompt {i}"
        if first < ORACLE_NEW:
            assert out[first] == int8_argmax[first], f"prompt {i}"
        checked += first
    assert checked >= 80


SAMPLED = jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=1.0, top_k=40, top_p=0.95,
                                  min_p=0.01, repetition_penalty=1.3, seed=123, ignore_eos=True)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    prompt = np.random.default_rng(3).integers(0, VOCAB, size=8).tolist()
    alone = jaxinfer.Engine(model, **ENGINE).generate([prompt], SAMPLED)[0]
    assert jaxinfer.Engine(model, **ENGINE).generate([prompt], SAMPLED)[0] == alone

    rng = np.random.default_rng(4)
    others = [(int(rng.integers(0, 4)), p, jaxinfer.SamplingParams(
        max_tokens=ORACLE_NEW, temperature=0.7, seed=int(rng.integers(0, 100)), ignore_eos=True))
        for p in random_prompts(rng, 4)]
    engine = jaxinfer.Engine(model, **ENGINE)
    ids, _ = serve_with_arrivals(engine, others + [(2, prompt, SAMPLED)])
    results = engine.run_until_done()
    assert engine.num_preemptions > 0
    assert results[ids[-1]] == alone

    other_seed = jaxinfer.Engine(model, **ENGINE).generate(
        [prompt], jaxinfer.SamplingParams(**{**SAMPLED.__dict__, "seed": 124}))[0]
    assert other_seed != alone


def test_a_prefix_cache_hit_keeps_seeded_sampling_with_repetition_penalty_exact(model):
    """The cached prompt tokens never pass through a step, yet the penalty must see them."""
    prompt = np.random.default_rng(7).integers(0, VOCAB, size=13).tolist()
    uncached = jaxinfer.Engine(model, **ENGINE, prefix_caching=False).generate([prompt], SAMPLED)
    engine = jaxinfer.Engine(model, **ENGINE)
    first = engine.generate([prompt], SAMPLED)
    again = engine.generate([prompt], SAMPLED)
    assert engine.num_cached_tokens == 12  # 3 full pages; the last token is always computed
    assert first == again == uncached


def test_n_samples_share_the_prompt_and_sample_zero_matches_n_equals_one(model):
    prompt = np.random.default_rng(5).integers(0, VOCAB, size=3).tolist()
    engine = jaxinfer.Engine(model, **ENGINE)
    single = engine.generate([prompt], SAMPLED)[0]
    three = engine.generate([prompt], jaxinfer.SamplingParams(**{**SAMPLED.__dict__, "n": 3}))[0]
    assert len(three) == 3 and all(len(s) == ORACLE_NEW for s in three)
    assert three[0] == single
    assert three[1] != three[0] and three[2] != three[0]

    rid = engine.submit(prompt, jaxinfer.SamplingParams(**{**SAMPLED.__dict__, "n": 3}))
    per_sample, finished = [[], [], []], []
    for event in engine.stream():
        assert event.request_id == rid and len(event.token_ids) == 3
        for sample, new in zip(per_sample, event.token_ids):
            sample.extend(new)
        finished.append(event.finished)
    assert finished[-1] and not any(finished[:-1])
    assert per_sample == three == engine.run_until_done()[rid]


@contextlib.contextmanager
def backend_compiles():
    """A list of the XLA compilations that run inside the block: their durations, and a
    "cache hit" for each program read back from the persistent compilation cache instead
    (tests/conftest.py shares one across the run; a hit is a program built all the same)."""
    compiles = []

    def on_duration(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    def on_event(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            compiles.append("cache hit")

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)


def test_no_compilation_after_warmup(model):
    engine = jaxinfer.Engine(model, **ENGINE)
    engine.warmup()
    with backend_compiles() as compiles:
        cache_entries = [step._cache_size() for step in engine._steps]
        rng = np.random.default_rng(6)
        kinds = [GREEDY, SAMPLED, jaxinfer.SamplingParams(max_tokens=5, temperature=0.5, n=2)]
        arrivals = [(int(rng.integers(0, 10)), p, kinds[i % 3])
                    for i, p in enumerate(random_prompts(rng, 9))]
        serve_with_arrivals(engine, arrivals)
        assert len(engine.run_until_done()) == 9
    assert compiles == []
    assert [step._cache_size() for step in engine._steps] == cache_entries


def test_stop_token_ids_end_the_request_and_are_kept(model, oracle):
    prompt = np.random.default_rng(7).integers(0, VOCAB, size=8).tolist()
    want = oracle(prompt)
    stop = want[4]
    params = jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=0.0,
                                     stop_token_ids=(stop,), ignore_eos=True)
    out = jaxinfer.Engine(model, **ENGINE).generate([prompt], params)[0]
    assert out == want[:want.index(stop) + 1]


def test_stop_strings_end_the_request_once_the_text_contains_them(model, oracle):
    prompt = np.random.default_rng(8).integers(0, VOCAB, size=13).tolist()
    want = oracle(prompt)
    text = CharTokenizer.decode(want)
    stop = text[5:8]
    end = text.index(stop) + len(stop)  # one letter per token
    params = jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=0.0, stop=[stop],
                                     ignore_eos=True)
    engine = jaxinfer.Engine(model, **ENGINE, tokenizer=CharTokenizer())
    assert engine.generate([prompt], params)[0] == want[:end]


def test_eos_ends_the_request_unless_ignore_eos(model, oracle):
    prompts = random_prompts(np.random.default_rng(9), 6)
    hits = [p for p in prompts if EOS in oracle(p)]
    assert hits, f"precondition: some greedy continuation should contain EOS={EOS}"
    engine = jaxinfer.Engine(model, **ENGINE)
    stopped = engine.generate(hits, jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=0))
    ignored = engine.generate(hits, GREEDY)
    for prompt, out, full in zip(hits, stopped, ignored):
        want = oracle(prompt)
        assert out == want[:want.index(EOS) + 1]
        assert full == want


BAD_PARAMS = {
    "max_tokens": 0, "temperature": -0.5, "top_k": 0, "top_p": 1.5, "min_p": -0.1,
    "repetition_penalty": 0.0, "stop_token_ids": (-1,), "stop": ("",), "seed": -3, "n": 0,
    "ignore_eos": "yes", "first_finish": 1,
}


@pytest.mark.parametrize("field", list(BAD_PARAMS))
def test_invalid_sampling_value_names_the_field_and_the_value(field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be .*; got"):
        jaxinfer.SamplingParams(**{field: BAD_PARAMS[field]})


def test_numpy_scalar_settings_are_accepted_and_stored_as_python_numbers():
    params = jaxinfer.SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5),
                                     top_k=np.int32(5), top_p=np.float64(0.9), min_p=np.float32(0),
                                     repetition_penalty=np.float16(1.5), seed=np.uint32(7),
                                     n=np.int8(2), stop_token_ids=[np.int64(3)],
                                     ignore_eos=np.bool_(True))
    assert params == jaxinfer.SamplingParams(max_tokens=4, temperature=0.5, top_k=5, top_p=0.9,
                                             min_p=0.0, repetition_penalty=1.5, seed=7, n=2,
                                             stop_token_ids=(3,), ignore_eos=True)
    assert all(type(getattr(params, name)) in (int, float, bool) for name in
               ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                "seed", "n", "ignore_eos"))


def test_bad_requests_are_refused_and_the_engine_keeps_serving(model, oracle):
    engine = jaxinfer.Engine(model, **ENGINE)
    rng = np.random.default_rng(10)
    good = random_prompts(rng, 3)
    first = engine.submit(good[0], GREEDY)
    cases = [
        ([], GREEDY, "non-empty"),
        ([[1, 2], [3, 4]], GREEDY, "1-D"),
        ([1, VOCAB], GREEDY, r"\[0, 96\)"),
        ([1.5, 2.0], GREEDY, "integer token ids"),
        (list(range(60)), GREEDY, "exceeds max_model_len=64"),
        (list(range(40)), jaxinfer.SamplingParams(max_tokens=10), "needs 13 KV pages"),
        ([1, 2], jaxinfer.SamplingParams(stop=["x"]), "need a tokenizer"),
        ([1, 2], jaxinfer.SamplingParams(stop_token_ids=(VOCAB,)), "stop_token_ids"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.submit(prompt, params)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.submit([1, 2], {"max_tokens": 3})
    with pytest.raises(KeyError, match="unknown request id 999"):
        engine.abort(999)
    second = engine.submit(good[1], GREEDY)
    aborted = engine.submit(good[2], GREEDY)
    engine.step()
    engine.abort(aborted)
    with pytest.raises(KeyError, match="unknown request id"):
        engine.abort(aborted)
    with pytest.raises(ValueError, match="non-empty"):
        engine.generate([good[2], []], GREEDY)  # refused as a whole: good[2] is not left running
    results = engine.run_until_done()
    assert sorted(results) == [first, second]
    assert results[first] == oracle(good[0]) and results[second] == oracle(good[1])


@pytest.mark.parametrize("top_k", [2**31, 10**12])
def test_a_top_k_beyond_int32_samples_as_no_top_k_and_the_others_finish(model, oracle, top_k):
    """Every valid top_k serves: one at or above the vocabulary is no filter, also when int32
    cannot hold it (it once raised inside every step, so that no request finished)."""
    rng = np.random.default_rng(12)
    good, prompt = random_prompts(rng, 2)
    huge = jaxinfer.SamplingParams(**{**SAMPLED.__dict__, "top_k": top_k})
    engine = jaxinfer.Engine(model, **ENGINE)
    first = engine.submit(good, GREEDY)
    second = engine.submit(prompt, huge)
    results = engine.run_until_done()
    assert results[first] == oracle(good)
    no_top_k = jaxinfer.SamplingParams(**{**SAMPLED.__dict__, "top_k": None})
    assert results[second] == jaxinfer.Engine(model, **ENGINE).generate([prompt], no_top_k)[0]


def test_a_step_whose_inputs_fail_to_build_leaves_its_requests_to_the_next_step(model, oracle,
                                                                                 monkeypatch):
    """Scheduling gives pages and slots but advances no request, so after a step that raises
    while building its inputs the next step serves the same requests to the same outputs."""
    prompts = random_prompts(np.random.default_rng(13), 3)
    engine = jaxinfer.Engine(model, **ENGINE)
    ids = [engine.submit(p, GREEDY) for p in prompts]
    engine.step()
    fill_rows = engine_module.set_sampling_rows

    def fail_once(*args):
        monkeypatch.setattr(engine_module, "set_sampling_rows", fill_rows)
        raise RuntimeError("building the step's inputs failed")

    monkeypatch.setattr(engine_module, "set_sampling_rows", fail_once)
    with pytest.raises(RuntimeError, match="failed"):
        engine.step()
    results = engine.run_until_done()
    assert [results[i] for i in ids] == [oracle(p) for p in prompts]
    assert engine.num_unfinished == 0


def test_engine_arguments_are_validated(model):
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1; got 0"):
        jaxinfer.Engine(model, max_batch=0)
    with pytest.raises(ValueError, match="max_model_len must be <= the model's context"):
        jaxinfer.Engine(model, max_model_len=65)
    with pytest.raises(ValueError, match="snapkv_budget needs a model without sliding_window"):
        windowed = jaxinfer.LlamaForCausalLM(CONFIG.replace(model_type="mistral", sliding_window=8),
                                             rngs=nnx.Rngs(0))
        jaxinfer.Engine(windowed, num_pages=4, snapkv_budget=12)
    class HyenaLike(nnx.Module):  # a model without forward_paged (as HyenaForCausalLM)
        config = CONFIG
    with pytest.raises(TypeError, match="HyenaLike has no paged KV cache: use jaxinfer.generate"):
        jaxinfer.Engine(HyenaLike())
    with pytest.raises(TypeError, match="model must be a jaxinfer model.*got str"):
        jaxinfer.Engine("path/to/model")
    with pytest.raises(ValueError, match="speculative_tokens must be an integer >= 0; got True"):
        jaxinfer.Engine(model, speculative_tokens=True)
    with pytest.raises(ValueError, match="paged_attention must be one of .*; got 'dense'"):
        jaxinfer.Engine(model, paged_attention="dense")
    sizes = {name: np.int64(value) for name, value in ENGINE.items() if isinstance(value, int)}
    engine = jaxinfer.Engine(model, **sizes, speculative_tokens=np.int32(2))  # NumPy ints are ints
    assert engine.buckets == (8, 16) and engine.max_rows == 4 * 3


def test_pool_size_from_memory_is_logged_and_bounded_by_what_max_batch_can_use(model, caplog):
    with caplog.at_level(logging.INFO, logger="jaxinfer.generate.paged_cache"):
        engine = jaxinfer.Engine(model, max_batch=2, page_size=8, max_tokens_per_step=8)
    # on CPU the 1 GiB cap is far above 2 sequences x 64 positions, so those bound the pool
    assert engine.num_pages == 2 * (CONFIG.max_position_embeddings // 8)
    assert f"KV pool: {engine.num_pages} pages of 8 tokens" in caplog.text
