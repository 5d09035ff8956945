"""SnapKV inside the serving `Engine`: a long prompt's K/V compressed at prefill to a budget per
KV head. The oracle is a dense pass that masks every key SnapKV drops (its own selection,
`snapkv_select`, checked in test_snapkv.py), on the tiny model and geometry of test_engine.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.generate.snapkv import snapkv_select
from jaxinfer.models.rope import apply_rotary, inverse_frequencies, rotary_tables
from tests.jaxinfer.test_engine import (  # noqa: F401  (model, oracle: fixtures)
    ENGINE, VOCAB, backend_compiles, model, oracle)

# window 8, the default: every engine's step returns 8 query rows, so this one shares the step
# the other tests compiled
SNAPKV = dict(snapkv_budget=12, snapkv_window=8)


def masked_dense_pass(model, tokens: jax.Array, visible: jax.Array):
    """Logits float32 [L, vocab] of an unpaged pass over tokens int32 [L] in which, in layer i,
    the queries of KV head h see key j iff visible[i, h, query, j] (bool [layers, Hkv, L, L]);
    also every layer's rotated q [L, Hq, D] and k [L, Hkv, D]."""
    c, t = model.config, tokens.shape[0]
    group = c.num_attention_heads // c.num_key_value_heads
    cos, sin = rotary_tables(jnp.arange(t)[None], inverse_frequencies(c))
    x = model.embed_tokens(tokens[None])  # [1, L, embed]
    qs, ks = [], []
    for layer, mask in zip(model.layers, visible):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        split = lambda y, heads: y.reshape(1, t, heads, c.head_dim)  # noqa: E731
        q = apply_rotary(split(attn.q_proj(h), c.num_attention_heads), cos, sin)[0]
        k = apply_rotary(split(attn.k_proj(h), c.num_key_value_heads), cos, sin)[0]
        v = split(attn.v_proj(h), c.num_key_value_heads)[0]
        scores = jnp.einsum("tkgd,skd->kgts", q.reshape(t, -1, group, c.head_dim), k)
        scores = jnp.where(mask[:, None], scores / np.sqrt(c.head_dim), -jnp.inf)
        out = jnp.einsum("kgts,skd->tkgd", jax.nn.softmax(scores, axis=-1), v)
        x = x + attn.o_proj(out.reshape(1, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        qs.append(q)
        ks.append(k)
    return model.logits(x)[0], qs, ks


def snapkv_reference(model, prompts: list[list[int]], new_tokens: int, budget: int,
                     window: int) -> list[list[int]]:
    """Greedy continuations by dense passes (padded to one length: one compilation) where in
    every layer each token after the prompt attends, per KV head, only to the prompt positions
    that `snapkv_select` keeps (from the plain pass's window queries and prompt keys) and to the
    tokens after the prompt; prompt tokens attend causally to the whole prompt."""
    c = model.config
    length = max(map(len, prompts)) + new_tokens
    graphdef, state = nnx.split(model)
    dense = jax.jit(lambda state, tokens, visible: masked_dense_pass(
        nnx.merge(graphdef, state), tokens, visible))
    select = jax.jit(snapkv_select, static_argnames="budget")
    causal = np.broadcast_to(np.tril(np.ones((length, length), bool)),
                             (c.num_hidden_layers, c.num_key_value_heads, length, length))
    outputs = []
    for prompt in prompts:
        s = len(prompt)
        tokens = np.zeros(length, np.int32)
        tokens[:s] = prompt
        logits, qs, ks = jax.device_get(dense(state, tokens, causal))  # numpy: no eager ops
        visible = causal.copy()
        for i, (q, k) in enumerate(zip(qs, ks)):
            kept = np.asarray(select(q[None, s - window:s], k[None, :s], k[None, :s],
                                     budget=budget)[2])  # [1, budget, Hkv]
            dropped = np.ones((c.num_key_value_heads, s), bool)  # [Hkv, S]
            for head in range(c.num_key_value_heads):
                dropped[head, kept[0, :, head]] = False
            visible[i, :, s:, :s] &= ~dropped[:, None, :]
        for t in range(s, s + new_tokens):
            tokens[t] = int(np.argmax(logits[t - 1]))
            logits = np.asarray(dense(state, tokens, visible)[0])
        outputs.append(tokens[s:s + new_tokens].tolist())
    return outputs


def test_snapkv_engine_matches_dense_attention_over_the_kept_positions(model, oracle):
    """Prompts of 18 and 25 tokens (budget 12, window 8) are compressed after prefill: 18 is
    chunked 10 + 8 so that its last chunk holds the window, and pages are scarce enough that the
    second waits for the first's freed pages and preemption happens. Greedy tokens equal the
    dense reference; an 8-token prompt (within the budget) equals the uncompressed oracle. After
    compression a sequence holds only the pages of budget + generated tokens, and a warmed-up
    engine compiles nothing while serving."""
    rng = np.random.default_rng(11)
    long_prompts = [rng.integers(0, VOCAB, n).tolist() for n in (18, 25)]
    short = rng.integers(0, VOCAB, 8).tolist()
    params = jaxinfer.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine = jaxinfer.Engine(model, **ENGINE, **SNAPKV)
    engine.warmup()
    held = []
    with backend_compiles() as compiles:
        ids = [engine.submit(p, params) for p in long_prompts + [short]]
        while engine.num_unfinished:
            engine.step()
            held += [(r.offset, len(r.pages), r.cached) for r in engine._scheduler.running
                     if r.compress and r.computed >= len(r.prompt)]
        results = engine.run_until_done()
    assert compiles == []
    assert engine.num_preemptions > 0
    assert held and {offset for offset, _, _ in held} == {18 - 12, 25 - 12}
    assert all(pages == -(-cached // ENGINE["page_size"]) for _, pages, cached in held)
    assert [results[rid] for rid in ids[:2]] == snapkv_reference(
        model, long_prompts, 8, SNAPKV["snapkv_budget"], SNAPKV["snapkv_window"])
    assert results[ids[2]] == oracle(short)[:8]


def test_snapkv_arguments_are_validated(model):
    with pytest.raises(ValueError, match="snapkv_budget must be None or an integer >= 1; got 0"):
        jaxinfer.Engine(model, **ENGINE, snapkv_budget=0)
    with pytest.raises(ValueError, match="snapkv_window must be an integer >= 1; got 0"):
        jaxinfer.Engine(model, **ENGINE, snapkv_budget=8, snapkv_window=0)
    with pytest.raises(ValueError, match="snapkv_window must be <= snapkv_budget"):
        jaxinfer.Engine(model, **ENGINE, snapkv_budget=4, snapkv_window=5)
    with pytest.raises(ValueError, match="max_tokens_per_step=16"):
        jaxinfer.Engine(model, **ENGINE, snapkv_budget=32, snapkv_window=17)


@pytest.mark.parametrize("budget, max_model_len", [(100, None), (30, 20), (19, 20)])
def test_a_budget_no_prompt_exceeds_warms_up_and_serves_uncompressed_without_compiling(
        model, oracle, budget, max_model_len):
    """A prompt leaves room for a token, so a budget of max_model_len - 1 or more never
    compresses: like vLLM's, it is accepted, warmup() compiles what serving runs (it used to ask
    SnapKV for more positions than a sequence holds) and outputs are the oracle's."""
    prompt = np.random.default_rng(16).integers(0, VOCAB, 13).tolist()
    want = oracle(prompt)[:6]
    engine = jaxinfer.Engine(model, **ENGINE, max_model_len=max_model_len, snapkv_budget=budget)
    engine.warmup()
    with backend_compiles() as compiles:
        out = engine.generate([prompt], jaxinfer.SamplingParams(max_tokens=6, temperature=0.0,
                                                                ignore_eos=True))[0]
    assert compiles == []
    assert out == want


def test_a_snapkv_prompt_is_served_within_a_few_steps_under_steady_decode_traffic(model, oracle):
    """With max_tokens_per_step equal to the window, an 18-token prompt's last chunk (its 8
    window tokens) takes a whole step: it must be scheduled before the decodes, or it waits as
    long as short requests keep decoding. Its first token comes within 4 steps; every greedy
    output still equals its oracle (the dense reference for the compressed prompt)."""
    rng = np.random.default_rng(12)
    engine = jaxinfer.Engine(model, **{**ENGINE, "max_tokens_per_step": 8}, **SNAPKV)
    short = jaxinfer.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = {}  # request id -> prompt of the short requests

    def submit_short() -> None:
        prompt = rng.integers(0, VOCAB, 3).tolist()
        prompts[engine.submit(prompt, short)] = prompt

    long_prompt = rng.integers(0, VOCAB, 18).tolist()
    submit_short()
    long_id = engine.submit(long_prompt, jaxinfer.SamplingParams(max_tokens=8, temperature=0.0,
                                                                 ignore_eos=True))
    submit_short()
    first_token = long_done = None
    for step in range(1, 40):
        for event in engine.step():
            if event.request_id == long_id:
                first_token = first_token or step
                long_done = event.finished
            elif event.finished:  # steady traffic: another short request for each one done
                submit_short()
        if long_done:
            break
    results = engine.run_until_done()
    assert first_token is not None and first_token <= 4, f"first token at step {first_token}"
    assert results[long_id] == snapkv_reference(model, [long_prompt], 8, SNAPKV["snapkv_budget"],
                                                SNAPKV["snapkv_window"])[0]
    assert len(prompts) > 2
    for rid, prompt in prompts.items():
        assert results[rid] == oracle(prompt)[:6], f"request {rid}"
