"""The serving `Engine` on a sliding-window (Mistral) model whose window is shorter than the served
context: the paged kernels' left window (`local_window` = sliding_window - 1) must reproduce what
`jaxinfer.generate` computes alone (its dense and flash paths mask with the same window), with
chunked prefill, prefix caching, preemption, every paged-attention mode and Hydragen.

Window 8 with 20-token prompts and 16 new tokens: every token past position 7 drops keys, and
(test_the_window_changes_the_greedy_tokens) the greedy tokens differ from full attention's, so an
engine that ignored the window would fail.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

import jaxinfer
from tests.jaxinfer.engine_cases import greedy_oracle, peaky_model

VOCAB = 96
WINDOW = 8
CONFIG = jaxinfer.LlamaConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    model_type="mistral", sliding_window=WINDOW)
NEW = 16
GREEDY = jaxinfer.SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
# 4-token pages, 8-token steps (a 20-token prompt prefills in 3 chunks) and 14 pages: three
# requests of 36 tokens need 27, so the newest are preempted and recomputed.
ENGINE = dict(max_batch=3, page_size=4, num_pages=14, max_tokens_per_step=8)


@pytest.fixture(scope="module")
def model():
    return peaky_model(CONFIG)


@pytest.fixture(scope="module")
def oracle(model):
    return greedy_oracle(model, NEW)


def prompts_with_shared_prefixes(seed: int, count: int) -> list[list[int]]:
    """20-token prompts; pairs share a 12-token prefix (3 pages: prefix-cache hits)."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(0, VOCAB, 12).tolist() for _ in range(count // 2 + 1)]
    return [prefixes[i // 2] + rng.integers(0, VOCAB, 8).tolist() for i in range(count)]


def test_the_window_changes_the_greedy_tokens(model, oracle):
    """The same weights without the window continue differently: the tests below can tell."""
    full = greedy_oracle(peaky_model(dataclasses.replace(CONFIG, sliding_window=None)), NEW)
    prompts = prompts_with_shared_prefixes(3, 4)
    assert any(oracle(p) != full(p) for p in prompts)


@pytest.mark.parametrize("paged_attention", ["per_token", "ragged", "auto"])
def test_greedy_matches_generate_with_chunks_prefix_hits_and_preemption(model, oracle,
                                                                        paged_attention):
    prompts = prompts_with_shared_prefixes(1, 6)
    engine = jaxinfer.Engine(model, **ENGINE, paged_attention=paged_attention)
    ids = []
    for prompt in prompts:  # two at a time, so later pairs find their prefix cached
        ids.append(engine.submit(prompt, GREEDY))
        engine.step()
    results = engine.run_until_done()
    assert engine.num_preemptions > 0, "pages were meant to be scarce enough to preempt"
    assert engine.num_cached_tokens > 0, "pairs were meant to share cached prefix pages"
    for rid, prompt in zip(ids, prompts):
        assert results[rid] == oracle(prompt), f"request {rid}"


@pytest.mark.parametrize("paged_attention", ["per_token", "ragged"])
def test_hydragen_is_off_with_a_window(model, oracle, paged_attention, caplog):
    """Sequences that share a cached 12-token prefix in one step: the shared prefix has no
    per-query window to cut, so a windowed engine attends page by page and outputs stay the
    oracle's."""
    rng = np.random.default_rng(5)
    prefix = rng.integers(0, VOCAB, 12).tolist()
    prompts = [prefix + rng.integers(0, VOCAB, 8).tolist() for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="jaxinfer.generate.engine"):
        engine = jaxinfer.Engine(model, **{**ENGINE, "num_pages": 30, "max_tokens_per_step": 32},
                                 hydragen=True, paged_attention=paged_attention)
    assert "hydragen is off" in caplog.text
    ids = [engine.submit(prompts[0], GREEDY)]
    engine.step()  # prefills the first prompt whole, caching the prefix's pages
    ids += [engine.submit(p, GREEDY) for p in prompts[1:]]
    engine.step()
    assert not engine.hydragen and engine.last_step.shared_prefix == 0
    results = engine.run_until_done()
    for rid, prompt in zip(ids, prompts):
        assert results[rid] == oracle(prompt), f"request {rid}"


def test_mixtral_with_a_window_matches_generate():
    """Mixtral's layers attend through the same paged layer: windowed, ragged and chunked."""
    config = jaxinfer.MixtralConfig(**{f.name: getattr(CONFIG, f.name)
                                       for f in dataclasses.fields(CONFIG)
                                       if f.name not in ("model_type", "rope_theta",
                                                         "rms_norm_eps")},
                                    num_local_experts=4, num_experts_per_tok=2)
    model = peaky_model(config, jaxinfer.MixtralForCausalLM)
    oracle = greedy_oracle(model, NEW)
    prompts = prompts_with_shared_prefixes(7, 3)
    engine = jaxinfer.Engine(model, **{**ENGINE, "num_pages": 30}, paged_attention="ragged")
    assert engine.generate(prompts, GREEDY) == [oracle(p) for p in prompts]


def test_snapkv_with_a_window_is_refused(model):
    """SnapKV compacts a prompt's kept tokens into consecutive slots, so a window over slots
    would not be the window over positions: the combination is refused."""
    with pytest.raises(ValueError, match=r"snapkv_budget .*sliding_window"):
        jaxinfer.Engine(model, **ENGINE, snapkv_budget=12)


def test_snapkv_with_a_windowed_draft_is_refused(model):
    target = peaky_model(dataclasses.replace(CONFIG, sliding_window=None))
    with pytest.raises(ValueError, match=r"snapkv_budget .*the draft model's sliding_window"):
        jaxinfer.Engine(target, **ENGINE, snapkv_budget=12, draft_model=model,
                        speculative_tokens=2)
