"""Draft-model speculation in the serving `Engine` (`draft_model=`, `speculative_tokens=`), on CPU.

Oracles (CONVENTIONS.md): `jaxinfer.generate` on each request alone for greedy decoding, and the
non-speculative engine for seeded sampling (drafts are verified by sampling where plain decoding
would, with the same keys, so neither may change). The geometry and the tiny target are
test_engine's: pages are scarce, so preemption (and recomputation of the draft's pages) happens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.generate.scheduler import Scheduler
from tests.jaxinfer.test_engine import (  # noqa: F401  (model, oracle: fixtures)
    CONFIG, ENGINE, ORACLE_NEW, VOCAB, backend_compiles, model, oracle, serve_with_arrivals)
from tests.jaxinfer.test_engine_snapkv import SNAPKV

GAMMA = 3  # guesses per step: with max_batch 4, a step's sampling rows stay <= 16
PROMPT_LENGTH = 13  # one length: the oracle compiles once; 13 + 12 tokens take 7 of the 10 pages


def no_drafts_engine(model, **options) -> jaxinfer.Engine:
    """The engine without speculation, compiled as the speculative ones are: its prompt-lookup
    n-gram is longer than any sequence, so it never drafts, but its step has their row count
    (speculative_tokens=0 would compile a step of max_batch rows for every bucket again)."""
    return jaxinfer.Engine(model, **{**ENGINE, **options}, speculative_tokens=GAMMA,
                           lookup_ngram=CONFIG.max_position_embeddings)


def abstract(config: jaxinfer.LlamaConfig) -> jaxinfer.LlamaForCausalLM:
    """A model of this config with no weights computed (enough for the engine's validation)."""
    return nnx.eval_shape(lambda: jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0)))


def prompts_of(rng: np.random.Generator, count: int) -> list[list[int]]:
    return [rng.integers(0, VOCAB, PROMPT_LENGTH).tolist() for _ in range(count)]


def copy_of(model, config: jaxinfer.LlamaConfig, noise: float = 0.0) -> jaxinfer.LlamaForCausalLM:
    """A model of `config` (the target's but for its depth) holding the target's weights (a
    shallower one keeps the first layers), plus Gaussian noise of this scale."""
    draft = abstract(config)
    source = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(2)

    def take(path, x):
        return jnp.asarray(source[path].value + noise * rng.normal(size=x.shape), x.dtype)

    flat = nnx.to_flat_state(nnx.state(draft, nnx.Param))
    nnx.update(draft, nnx.from_flat_state([(path, var.replace(take(path, var.value)))
                                           for path, var in flat]))
    return draft


@pytest.fixture(scope="module")
def shallow_draft(model):
    """A different, smaller model: the target's first layer alone (its own KV page shapes)."""
    return copy_of(model, CONFIG.replace(num_hidden_layers=1))


@pytest.fixture(scope="module")
def noisy_draft(model):
    """The target's weights plus noise: its samples often, not always, equal the target's."""
    return copy_of(model, CONFIG, noise=0.02)


@pytest.mark.parametrize("which", ["shallow", "self"])
def test_greedy_with_a_draft_model_matches_generate_alone_under_preemption(
        model, oracle, shallow_draft, which):
    """With the target as its own draft every guess must be accepted (the draft's K/V are the
    target's); with the shallow draft rejections roll back and the output is still the oracle's."""
    draft = model if which == "self" else shallow_draft
    rng = np.random.default_rng(12)
    prompts = prompts_of(rng, 8)
    params = [jaxinfer.SamplingParams(max_tokens=int(rng.integers(2, ORACLE_NEW + 1)),
                                      temperature=0.0, ignore_eos=True) for _ in prompts]
    arrivals = [(int(rng.integers(0, 8)), p, sp) for p, sp in zip(prompts, params)]
    engine = jaxinfer.Engine(model, **ENGINE, draft_model=draft, speculative_tokens=GAMMA)
    ids, streamed = serve_with_arrivals(engine, arrivals)
    results = engine.run_until_done()
    assert engine.num_preemptions > 0, "pages were meant to be scarce enough to preempt"
    for rid, (_, prompt, sp) in zip(ids, arrivals):
        assert results[rid] == streamed[rid] == oracle(prompt)[:sp.max_tokens], f"request {rid}"
    assert engine.num_draft_tokens > 0
    if which == "self":
        assert engine.num_accepted_tokens == engine.num_draft_tokens
    else:
        assert engine.num_accepted_tokens < engine.num_draft_tokens


def test_steady_decoding_runs_no_draft_pass(model, oracle):
    """The draft's proposal writes the K/V of each drafting sequence's last token and of all its
    guesses, so the draft's pass covers only chunks that did not draft: a step of drafting
    decodes alone runs none. The target as its own draft accepts every guess (the proposal's K/V
    are the ones a pass would write), so one request takes a prefill step (the draft's pass over
    its prompt: the bucket of 16) and then 1 + GAMMA tokens per step."""
    prompt = prompts_of(np.random.default_rng(15), 1)[0]
    engine = jaxinfer.Engine(model, **ENGINE, draft_model=model, speculative_tokens=GAMMA)
    engine.submit(prompt, jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=0.0,
                                                  ignore_eos=True))
    draft_passes, tokens = [], []
    while engine.num_unfinished:
        engine.step()
        draft_passes.append(engine.last_step.draft_pass)
        tokens.append(engine.last_step.tokens)
    assert engine.run_until_done() == {0: oracle(prompt)}
    # ORACLE_NEW = 12 new tokens: 1 from the prompt, then 4 + 4 + 3 (the last draft is trimmed
    # to 2 by max_tokens)
    assert tokens == [PROMPT_LENGTH, 1 + GAMMA, 1 + GAMMA, 1 + 2]
    assert draft_passes == [16, 0, 0, 0]
    assert engine.num_accepted_tokens == engine.num_draft_tokens == GAMMA + GAMMA + 2


def test_seeded_sampling_with_a_draft_model_equals_the_engine_without_drafts(model, noisy_draft):
    """Coupled sampling: the noisy draft's guesses are drawn with the target's keys, so many are
    accepted, and the verified output is the plain engine's whatever is accepted. The request
    with a repetition penalty decodes without drafts; the n = 2 one drafts per sample."""
    rng = np.random.default_rng(13)
    prompts = prompts_of(rng, 4)
    sampled = dict(max_tokens=ORACLE_NEW, temperature=0.8, top_k=40, top_p=0.95, min_p=0.01,
                   ignore_eos=True)
    params = [jaxinfer.SamplingParams(**sampled, seed=1),
              jaxinfer.SamplingParams(**sampled, seed=2, n=2),
              jaxinfer.SamplingParams(**sampled, seed=3, repetition_penalty=1.3),
              jaxinfer.SamplingParams(**sampled, seed=4)]
    plain = no_drafts_engine(model).generate(prompts, params)
    engine = jaxinfer.Engine(model, **ENGINE, draft_model=noisy_draft, speculative_tokens=GAMMA)
    assert engine.generate(prompts, params) == plain
    assert engine.num_preemptions > 0
    # coupled draws agree often (18 of 52 measured); the draft is not the target: some fail
    assert engine.num_draft_tokens // 5 < engine.num_accepted_tokens < engine.num_draft_tokens


def test_bad_draft_models_are_refused_with_a_clear_error(model, shallow_draft):
    other_vocab = abstract(CONFIG.replace(vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="draft vocab_size 97, model vocab_size 96"):
        jaxinfer.Engine(model, **ENGINE, draft_model=other_vocab, speculative_tokens=GAMMA)
    with pytest.raises(ValueError, match="draft_model needs speculative_tokens >= 1"):
        jaxinfer.Engine(model, **ENGINE, draft_model=shallow_draft)
    short = abstract(CONFIG.replace(max_position_embeddings=32))
    with pytest.raises(ValueError, match="max_model_len must be <= the draft model's context"):
        jaxinfer.Engine(model, **ENGINE, draft_model=short, speculative_tokens=GAMMA)

    class HyenaLike(nnx.Module):  # a model without forward_paged
        config = CONFIG
    with pytest.raises(TypeError, match="draft_model HyenaLike has no paged KV cache"):
        jaxinfer.Engine(model, **ENGINE, draft_model=HyenaLike(), speculative_tokens=GAMMA)


@pytest.mark.parametrize("hydragen", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["paged", "hydragen"])
def test_no_compilation_after_warmup_with_a_draft_model(model, oracle, hydragen):
    """Warm-up compiles the draft's pass for every bucket (and Hydragen variant) and its
    proposal; serving greedy, sampled and n = 2 requests with drafts then compiles nothing, and
    the greedy ones (half of them sharing a prefix: Hydragen steps) keep the oracle's tokens.
    The target is its own draft, so every guess must be accepted: the draft's K/V (from its
    Hydragen passes over prompt chunks and from its proposals) are the target's."""
    engine = jaxinfer.Engine(model, **ENGINE, draft_model=model, speculative_tokens=GAMMA,
                             hydragen=hydragen)
    engine.warmup()
    functions = (*engine._steps, *engine._draft_passes, engine._propose)
    compiled = [f._cache_size() for f in functions]
    rng = np.random.default_rng(14)
    prefix = rng.integers(0, VOCAB, 8).tolist()  # two shared pages
    kinds = [jaxinfer.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
             jaxinfer.SamplingParams(max_tokens=8, temperature=0.7, seed=5, ignore_eos=True),
             jaxinfer.SamplingParams(max_tokens=5, temperature=0.5, n=2)]
    arrivals = [(int(rng.integers(0, 6)), prefix + p[8:] if i % 2 else p, kinds[i % 3])
                for i, p in enumerate(prompts_of(rng, 6))]
    with backend_compiles() as compiles:
        ids, _ = serve_with_arrivals(engine, arrivals)
        results = engine.run_until_done()
    assert compiles == []
    assert [f._cache_size() for f in functions] == compiled
    assert engine.num_draft_tokens > 0
    assert engine.num_accepted_tokens == engine.num_draft_tokens
    for rid, (_, prompt, params) in zip(ids, arrivals):
        if params.temperature == 0:
            assert results[rid] == oracle(prompt)[:params.max_tokens], f"request {rid}"


@pytest.mark.parametrize("which", ["self", "noisy", "shallow"])
def test_snapkv_with_a_draft_model_keeps_the_snapkv_engines_tokens_without_compiling(
        model, noisy_draft, shallow_draft, which):
    """SnapKV compresses the draft's pages of a long prompt too (by the draft's own window
    queries), and its proposals write at cache slot position - offset. The oracle is the SnapKV
    engine without speculation: greedy and seeded sampled requests keep its tokens, with prompts
    of 18 and 25 tokens compressed to the budget of 12 (the 8-token one is not), pages scarce
    enough to preempt, and nothing compiled after warm-up (the draft's compression included:
    the shallow draft's pages have their own shape). The target as its own draft must have every
    guess accepted, greedy or coupled-sampled: its compressed pages must be the target's (when
    SnapKV compressed the target's pages alone, 7 of 35 greedy guesses on these prompts were)."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (18, 25, 8)]
    greedy = jaxinfer.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    params = [greedy, jaxinfer.SamplingParams(max_tokens=8, temperature=0.8, top_k=40, seed=6,
                                              ignore_eos=True), greedy]
    plain = no_drafts_engine(model, **SNAPKV).generate(prompts, params)
    draft = {"self": model, "noisy": noisy_draft, "shallow": shallow_draft}[which]
    engine = jaxinfer.Engine(model, **ENGINE, **SNAPKV, speculative_tokens=GAMMA,
                             draft_model=draft)
    engine.warmup()
    with backend_compiles() as compiles:
        ids = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        results = engine.run_until_done()
    assert [results[rid] for rid in ids] == plain
    assert compiles == []
    assert engine.num_preemptions > 0
    assert engine.num_draft_tokens > 0
    if which == "self":
        assert engine.num_accepted_tokens == engine.num_draft_tokens
    elif which == "noisy":
        assert 0 < engine.num_accepted_tokens < engine.num_draft_tokens


def test_snapkv_request_preempted_after_compression_is_rebuilt_with_its_draft_pages(
        model, monkeypatch):
    """A request preempted after SnapKV compressed it (offset > 0) is recomputed from its prompt
    and compressed again, its draft pages too: its tokens (greedy and seeded sampled) equal the
    SnapKV engine's without speculation on a pool large enough never to preempt, and the target
    as its own draft still has every guess accepted."""
    rng = np.random.default_rng(21)
    prompts = [rng.integers(0, VOCAB, 8).tolist(), rng.integers(0, VOCAB, 20).tolist()]
    params = [jaxinfer.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
              jaxinfer.SamplingParams(max_tokens=16, temperature=0.8, seed=2, ignore_eos=True)]
    plain = no_drafts_engine(model, **SNAPKV, num_pages=40).generate(prompts, params)
    offsets = []  # the offset of each request the scheduler preempts
    preempt = Scheduler._preempt

    def spy(self, request):
        offsets.append(request.offset)
        return preempt(self, request)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    engine = jaxinfer.Engine(model, **ENGINE, **SNAPKV, speculative_tokens=GAMMA,
                             draft_model=model)
    assert engine.generate(prompts, params) == plain
    assert any(offset > 0 for offset in offsets)
    assert 0 < engine.num_accepted_tokens == engine.num_draft_tokens


def test_a_snapkv_window_of_one_leaves_the_last_prompt_token_undrafted(model):
    """With snapkv_window=1, a 17-token prompt in steps of 8 leaves its last token to a chunk of
    its own: a decode in form, but the chunk that compresses must end with the prompt, so it
    must not draft (a draft kept that chunk from sampling: the request never got its first
    token and never finished). Its tokens are the SnapKV engine's without speculation, and
    the target as its own draft has every later guess accepted."""
    options = dict(snapkv_budget=12, snapkv_window=1, max_tokens_per_step=8)  # one bucket
    prompt = np.random.default_rng(3).integers(0, VOCAB, 17).tolist()
    params = jaxinfer.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    plain = no_drafts_engine(model, **options).generate([prompt], params)[0]
    engine = jaxinfer.Engine(model, **{**ENGINE, **options}, draft_model=model,
                             speculative_tokens=GAMMA)
    rid = engine.submit(prompt, params)
    request = engine._live[rid][0]
    for _ in range(10):  # 4 steps: a hang fails here instead
        if not engine.num_unfinished:
            break
        engine.step()
    assert engine.num_unfinished == 0
    assert engine.run_until_done()[rid] == plain
    assert request.offset == len(prompt) - options["snapkv_budget"]
    assert 0 < engine.num_accepted_tokens == engine.num_draft_tokens
