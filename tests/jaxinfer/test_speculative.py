"""Speculative decoding: greedy output equals `jaxinfer.generate`, the acceptance rule is lossless.

Oracles: `jaxinfer.generate` greedy on the target alone (end to end, with a draft model and with
prompt lookup); the target's exact distribution of the first two tokens on a Markov toy model with
an 8-token vocabulary (the acceptance rule, checked with a chi-square statistic on 200k samples);
a numpy transcription of prompt lookup.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.generate.prompt_lookup import lookup_draft_traced
from jaxinfer.generate.speculative import accept_greedy, accept_sampled, speculative_generate

CONFIG = jaxinfer.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
PROMPT_LEN = 7
NEW_TOKENS = 20
GAMMA = 3
# The target's chunked verification pass and generate's one-token decode sum the same float32
# terms in different shapes (~1e-6 apart, test_generate.py); greedy equality is meaningful when
# every argmax wins by more than that.
MIN_ARGMAX_MARGIN = 1e-4


def randomize(model, seed: int, scale: float = 0.3) -> None:
    """O(1) logits (the default init is near-uniform, where argmax ties would decide greedy)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        offset = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(offset + scale * rng.normal(size=x.shape), x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model, nnx.Param)))


def perturb(model, seed: int, scale: float):
    """A copy of model with Gaussian noise on every parameter: a draft that often agrees."""
    rng = np.random.default_rng(seed)
    copy = nnx.clone(model)
    state = nnx.state(copy, nnx.Param)
    nnx.update(copy, jax.tree.map(
        lambda x: x + jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), state))
    return copy


@pytest.fixture(scope="module")
def target():
    model = jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    randomize(model, seed=1)
    return model


def greedy_margins(model, sequence: np.ndarray) -> np.ndarray:
    """Top-2 logit margin at each position of sequence [batch, seq] (full forward pass)."""
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, jnp.asarray(sequence))
    top2 = np.sort(np.asarray(logits), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def assert_greedy_equal(target, prompt, out):
    want = np.asarray(jaxinfer.generate(target, prompt, max_new_tokens=NEW_TOKENS))
    assert greedy_margins(target, want)[:, PROMPT_LEN - 1:-1].min() > MIN_ARGMAX_MARGIN
    np.testing.assert_array_equal(np.asarray(out.tokens), want)


# ----------------------------------------------------------------- end to end, greedy


def test_greedy_with_draft_model_equals_target_greedy(target):
    draft = perturb(target, seed=2, scale=0.1)
    prompt = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, PROMPT_LEN))
    out = speculative_generate(target, prompt, NEW_TOKENS, draft=draft, gamma=GAMMA)
    assert_greedy_equal(target, prompt, out)
    # both branches of the rollback ran: some drafts were accepted, some rejected
    assert 0 < out.acceptance_rate < 1
    assert out.target_passes[0] < NEW_TOKENS


def test_greedy_with_prompt_lookup_equals_target_greedy_batched(target):
    """Prompts that repeat a phrase, so lookup finds matches; two rows run as a vmapped batch."""
    rng = np.random.default_rng(3)
    phrases = rng.integers(0, CONFIG.vocab_size, (2, 3))
    prompt = np.concatenate([phrases, phrases, phrases[:, :1]], axis=1)  # [2, PROMPT_LEN]
    out = speculative_generate(target, prompt, NEW_TOKENS, lookup_ngram=2, gamma=GAMMA)
    assert_greedy_equal(target, prompt, out)
    assert out.accepted.sum() > 0 and out.target_passes.shape == (2,)


def test_greedy_on_mixtral_batch_equals_target_greedy():
    """Mixtral's dropless experts (jax.lax.ragged_dot, which has no vmap rule of its own for
    weights shared by the rows) under the per-row vmap of a batch of two, draft and target both
    Mixtral."""
    config = jaxinfer.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2)
    assert config.moe_impl == "dropless"
    target = jaxinfer.MixtralForCausalLM(config, rngs=nnx.Rngs(0))
    randomize(target, seed=4)
    draft = perturb(target, seed=5, scale=0.1)
    prompt = np.random.default_rng(6).integers(0, config.vocab_size, (2, PROMPT_LEN))
    out = speculative_generate(target, prompt, NEW_TOKENS, draft=draft, gamma=GAMMA)
    assert_greedy_equal(target, prompt, out)
    assert 0 < out.acceptance_rate < 1


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_greedy_on_hyena_equals_target_greedy(drafter):
    """Hyena's decoding cache (short-convolution inputs and gated long-convolution inputs by
    position) rolls back as a KV cache does: a rejected draft's records are overwritten before
    they are read, so verification passes after a rejection see the accepted tokens only.
    Prompt and new tokens fill the context exactly, so the last rounds run in the cache's
    scratch slots past max_position_embeddings (gamma + 1 of them), where the filters' taps
    are zero padding."""
    config = jaxinfer.HyenaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        max_position_embeddings=PROMPT_LEN + NEW_TOKENS, filter_hidden_size=16,
        filter_emb_dim=5, fftconv_backend="xla")
    target = jaxinfer.HyenaForCausalLM(config, rngs=nnx.Rngs(0))
    randomize(target, seed=7)
    rng = np.random.default_rng(8)
    if drafter == "draft":
        prompt = rng.integers(0, config.vocab_size, (1, PROMPT_LEN))
        kwargs = dict(draft=perturb(target, seed=9, scale=0.1))
    else:
        phrase = rng.integers(0, config.vocab_size, (1, 3))
        prompt = np.concatenate([phrase, phrase, phrase[:, :1]], axis=1)  # [1, PROMPT_LEN]
        kwargs = dict(lookup_ngram=1)
    out = speculative_generate(target, prompt, NEW_TOKENS, gamma=GAMMA, **kwargs)
    assert_greedy_equal(target, prompt, out)
    assert 0 < out.acceptance_rate < 1  # rollbacks happened after accepted drafts


# ----------------------------------------------------------------- end to end, sampling


def test_sampling_is_reproducible_and_keeps_the_prompt(target):
    """The same settings give the same tokens, also given as NumPy scalars (one compile)."""
    draft = perturb(target, seed=2, scale=0.1)
    prompt = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, PROMPT_LEN))
    a = speculative_generate(target, prompt, NEW_TOKENS, draft=draft, gamma=GAMMA,
                             temperature=1.0, seed=5)
    b = speculative_generate(target, prompt, np.int64(NEW_TOKENS), draft=draft,
                             gamma=np.int32(GAMMA), temperature=np.float32(1.0), seed=np.int64(5))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    tokens = np.asarray(a.tokens)
    assert tokens.shape == (1, PROMPT_LEN + NEW_TOKENS) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[:, :PROMPT_LEN], prompt)
    assert tokens.min() >= 0 and tokens.max() < CONFIG.vocab_size


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.719 is p = 1e-4."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.slow  # one vmapped compile of the whole loop: ~15 s CPU, 20-40 s on a shared machine
def test_sampled_generation_follows_the_target_distribution_end_to_end():
    """20k independent rows (a vmapped batch, one key each) of a vocab-8 model with top-k 6: the
    joint law of the first two generated tokens matches the target's exact law (full forward
    passes), cells outside top-k never occur. Checks the loop's plumbing: q rows, keys, filters."""
    config = dataclasses.replace(CONFIG, vocab_size=8, num_hidden_layers=1)
    small = jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    randomize(small, seed=4)
    draft = perturb(small, seed=5, scale=0.3)
    rows, prompt = 20_000, np.array([[1, 5, 2]])
    params = dict(temperature=1.0, top_k=6)
    out = speculative_generate(small, np.repeat(prompt, rows, axis=0), 2, draft=draft, gamma=2,
                               seed=0, **params)
    x1, x2 = np.asarray(out.tokens[:, 3]), np.asarray(out.tokens[:, 4])
    assert 0.1 < out.acceptance_rate < 0.95  # both acceptance and rejection paths ran

    def law(logits):  # [n, vocab] -> sampling probabilities after temperature and top-k
        logits = np.asarray(logits, np.float64) / params["temperature"]
        kth = np.sort(logits, axis=-1)[:, -params["top_k"]][:, None]
        p = np.where(logits >= kth, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
        return p / p.sum(-1, keepdims=True)

    p1 = law(small(jnp.asarray(prompt))[:, -1])[0]  # [vocab]
    both = np.concatenate([np.repeat(prompt, 8, axis=0), np.arange(8)[:, None]], axis=1)
    expected = rows * p1[:, None] * law(small(jnp.asarray(both))[:, -1])  # [x1, x2]
    counts = np.zeros((8, 8))
    np.add.at(counts, (x1, x2), 1)
    assert counts[expected == 0].sum() == 0
    big = expected >= 5  # cells below 5 expected are pooled into one (chi-square approximation)
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    chi2 = ((observed - wanted) ** 2 / wanted).sum()
    assert chi2 < chi_square_critical(len(wanted) - 1)


# ----------------------------------------------------------------- the acceptance rule

VOCAB = 8
SAMPLES = 200_000
# Chi-square critical value for df = 63 (64 cells of (x1, x2)) at p = 1e-4: 113.7. The seed is
# fixed, so the test is deterministic; a correct rule passes with room, a biased rule fails by far.
CHI2_CRITICAL = chi_square_critical(63)


def markov_tables(seed: int):
    """Row-stochastic [VOCAB, VOCAB] target P and draft Q: token t+1 ~ P[token t]."""
    rng = np.random.default_rng(seed)
    p = jax.nn.softmax(jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32), axis=-1)
    q = jax.nn.softmax(jnp.asarray(1.5 * rng.normal(size=(VOCAB, VOCAB)), jnp.float32), axis=-1)
    return p, q


def accept_naive(p, q, drafts, key):
    """A biased rule for the power check: resample from p (not the residual) after a rejection."""
    n, _ = accept_sampled(p, q, drafts, key)
    return n, jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(p[n])).astype(jnp.int32)


def first_two_tokens(rule, p_table, q_table, key, gamma: int = 3):
    """Speculative sampling of the Markov chain from token 0 until two tokens exist."""
    def one_round(last, key):
        key_draft, key_accept = jax.random.split(key)

        def draw(prev, k):
            token = jax.random.categorical(k, jnp.log(q_table[prev])).astype(jnp.int32)
            return token, (token, q_table[prev])

        _, (drafts, q) = jax.lax.scan(draw, last, jax.random.split(key_draft, gamma))
        context = jnp.concatenate([last[None], drafts])  # [gamma + 1]
        n, token = rule(p_table[context], q, drafts, key_accept)
        produced = jnp.concatenate([drafts, jnp.zeros((1,), jnp.int32)]).at[n].set(token)
        return produced, n + 1

    def sample(key):
        k1, k2 = jax.random.split(key)
        first, count = one_round(jnp.int32(0), k1)
        second, _ = one_round(first[0], k2)
        return first[0], jnp.where(count >= 2, first[1], second[0])

    return jax.jit(jax.vmap(sample))(jax.random.split(key, SAMPLES))


def chi_square_against_target(x1, x2, p_table) -> float:
    expected = SAMPLES * np.asarray(p_table[0])[:, None] * np.asarray(p_table)  # [x1, x2]
    counts = np.zeros((VOCAB, VOCAB))
    np.add.at(counts, (np.asarray(x1), np.asarray(x2)), 1)
    assert expected.min() > 5  # the chi-square approximation holds
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_acceptance_gives_the_target_distribution_of_two_tokens():
    p, q = markov_tables(seed=0)
    x1, x2 = first_two_tokens(accept_sampled, p, q, jax.random.key(0))
    assert chi_square_against_target(x1, x2, p) < CHI2_CRITICAL


def test_the_statistical_test_detects_a_biased_rule():
    p, q = markov_tables(seed=0)
    x1, x2 = first_two_tokens(accept_naive, p, q, jax.random.key(0))
    assert chi_square_against_target(x1, x2, p) > 10 * CHI2_CRITICAL


def test_sampled_acceptance_with_a_one_hot_draft_is_lossless():
    """Prompt lookup's q is one-hot at the proposed tokens: acceptance with probability p(x)."""
    p, _ = markov_tables(seed=1)
    drafts = jnp.array([3, 5], jnp.int32)
    q = jax.nn.one_hot(drafts, VOCAB)
    p_rows = p[jnp.array([0, 3, 5])]  # [gamma + 1, VOCAB]
    n, token = jax.jit(jax.vmap(lambda k: accept_sampled(p_rows, q, drafts, k)))(
        jax.random.split(jax.random.key(1), SAMPLES))
    first = np.where(np.asarray(n) >= 1, 3, np.asarray(token))
    freq = np.bincount(first, minlength=VOCAB) / SAMPLES
    # 4 binomial standard errors of the largest probability bound every cell's deviation
    np.testing.assert_allclose(freq, np.asarray(p_rows[0]), atol=4 * np.sqrt(0.25 / SAMPLES))


def test_greedy_acceptance_stops_at_the_first_mismatch():
    logits = jnp.eye(5)[jnp.array([1, 2, 3, 4])] * 3.0  # argmax per row: 1, 2, 3, 4
    assert tuple(map(int, accept_greedy(logits, jnp.array([1, 2, 3])))) == (3, 4)
    assert tuple(map(int, accept_greedy(logits, jnp.array([1, 0, 3])))) == (1, 2)
    assert tuple(map(int, accept_greedy(logits, jnp.array([0, 2, 3])))) == (0, 1)


# ----------------------------------------------------------------- prompt lookup


def lookup_oracle(tokens: list[int], ngram: int, gamma: int) -> list[int]:
    """Latest earlier occurrence of the last n-gram; continuation read as a repeating pattern."""
    length = len(tokens)
    for i in range(length - ngram - 1, -1, -1):
        if tokens[i:i + ngram] == tokens[length - ngram:]:
            extended = list(tokens)
            for _ in range(gamma):
                extended.append(extended[len(extended) - (length - ngram - i)])
            return extended[length:]
    return [tokens[-1]] * gamma


@pytest.mark.parametrize("tokens, ngram", [
    ([5, 6, 7, 1, 5, 6, 9, 5, 6], 2),  # two matches: the latest (at 4) wins -> 9, 5, 6, 9
    ([1, 2, 3, 1, 2], 2),  # continuation runs into the present: periodic 3, 1, 2, 3
    ([4, 4, 4], 1),  # period 1
    ([1, 2, 3, 4], 2),  # no match: repeat the last token
    ([7], 3),  # shorter than the n-gram
])
def test_lookup_draft_traced_matches_the_oracle(tokens, ngram):
    buffer = jnp.zeros((16,), jnp.int32).at[:len(tokens)].set(jnp.asarray(tokens))
    got = jax.jit(lookup_draft_traced, static_argnums=(2, 3))(buffer, jnp.int32(len(tokens)), ngram, 4)
    assert list(map(int, got)) == lookup_oracle(tokens, ngram, gamma=4)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(lookup_ngram=2, gamma=0), "gamma"),
    (dict(lookup_ngram=0), "lookup_ngram"),
    (dict(), "exactly one drafter"),
    (dict(lookup_ngram=2, temperature=-1.0), "temperature"),
    (dict(lookup_ngram=2, max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arguments_raise_value_error(target, kwargs, match):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, np.zeros((1, 3), np.int32), **kwargs)


def test_zero_new_tokens_returns_the_prompts_as_generate_does(target):
    prompts = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = speculative_generate(target, prompts, 0, lookup_ngram=2)
    np.testing.assert_array_equal(out.tokens, jaxinfer.generate(target, prompts, 0))
    assert out.target_passes.tolist() == [0, 0] and out.acceptance_rate == 0.0


def test_draft_with_another_vocabulary_is_rejected(target):
    # speculative_generate reads only .config before it rejects the draft: no weights needed
    other = nnx.eval_shape(lambda: jaxinfer.LlamaForCausalLM(
        dataclasses.replace(CONFIG, vocab_size=32), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, np.zeros((1, 3), np.int32), 4, draft=other)


def test_a_path_in_place_of_a_model_is_refused(target):
    with pytest.raises(TypeError, match="draft must be a jaxinfer model.*got str"):
        speculative_generate(target, np.zeros((1, 3), np.int32), 4, draft="draft_dir")
    with pytest.raises(TypeError, match="model must be a jaxinfer model.*got str"):
        jaxinfer.generate("model_dir", np.zeros((1, 3), np.int32), 4)
