"""Properties of `jaxinfer.generate` on small random models, and of its top-k / top-p filter.

The oracle for the KV-cache decode loop is the plain full-sequence forward pass `model(ids)`,
recomputed for every new token; the oracle for `filter_logits` is a numpy transcription of
Hugging Face's temperature -> top-k -> top-p rule written here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.generate.sampling import SamplingArrays, filter_logits

# The cached decode path and the full forward pass compute the same float32 sums in different
# shapes; measured differences are at most ~6e-6 on logits of magnitude up to ~7.
FORWARD_ATOL = 1e-4
# Greedy comparisons are only meaningful where the best token wins by more than that noise.
MIN_ARGMAX_MARGIN = FORWARD_ATOL
# filter_logits runs in float32, the numpy reference in float64.
FILTER_ATOL = 1e-5

BATCH = 2
PROMPT_LEN = 6
NEW_TOKENS = 10

CONFIGS = {
    "llama_gqa2": jaxinfer.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    # the window (4) is shorter than prompt + new tokens (16), so decoding must drop old keys
    "mistral_window4_mqa": jaxinfer.LlamaConfig(
        model_type="mistral", vocab_size=80, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=64, sliding_window=4),
    "qwen2_bias_tied": jaxinfer.LlamaConfig(
        model_type="qwen2", vocab_size=112, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, qkv_bias=True, tie_word_embeddings=True),
}


def randomize_parameters(model, seed: int) -> None:
    """O(1) attention scores and logits, random norms and biases.

    The default init (std 0.02, unit norms, zero biases) gives near-uniform attention, under which
    a wrong cache slot, position or window would barely move the logits."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        offset = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(offset + 0.3 * rng.normal(size=x.shape), x.dtype)

    state = nnx.state(model, nnx.Param)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, state))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def jitted_forward(model):
    """model(ids) compiled once per model structure and input shape: the oracle, without a cache."""
    graphdef, state = nnx.split(model)
    return lambda ids: np.asarray(_forward(graphdef, state, jnp.asarray(ids, jnp.int32)))


def full_forward_greedy(model, prompt: np.ndarray, new_tokens: int):
    """Greedy continuation by re-running the full forward pass over the whole sequence per token.

    The sequence lives in a fixed [batch, prompt + new] buffer so that one compilation serves every
    step; the unwritten tail cannot affect logits at earlier positions because the model is causal
    (test_full_forward_is_causal). Returns the tokens and each step's top-2 logit margin."""
    forward = jitted_forward(model)
    batch, prompt_len = prompt.shape
    seq = np.zeros((batch, prompt_len + new_tokens), np.int32)
    seq[:, :prompt_len] = prompt
    margins = []
    for t in range(prompt_len, prompt_len + new_tokens):
        logits = forward(seq)[:, t - 1]  # [batch, vocab]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        seq[:, t] = logits.argmax(-1)
    return seq, np.concatenate(margins)


def make_prompt(vocab_size: int, batch: int = BATCH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, PROMPT_LEN)).astype(np.int32)


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def sharp_model(request):
    model = jaxinfer.LlamaForCausalLM(CONFIGS[request.param], rngs=nnx.Rngs(0))
    randomize_parameters(model, seed=1)
    return model


@pytest.fixture(scope="module")
def flat_model():
    """Default init: near-uniform next-token distributions, so samples vary a lot between seeds."""
    return jaxinfer.LlamaForCausalLM(CONFIGS["llama_gqa2"], rngs=nnx.Rngs(0))


# ----------------------------------------------------------------- greedy against the oracle
def test_full_forward_is_causal(sharp_model):
    """Changing tokens at positions >= t leaves logits at positions < t unchanged."""
    forward = jitted_forward(sharp_model)
    vocab = sharp_model.config.vocab_size
    a = np.random.default_rng(0).integers(0, vocab, (BATCH, 16)).astype(np.int32)
    b = a.copy()
    b[:, 9:] = (b[:, 9:] + 1) % vocab
    la, lb = forward(a), forward(b)
    np.testing.assert_allclose(la[:, :9], lb[:, :9], rtol=0, atol=FORWARD_ATOL)
    assert np.abs(la[:, 9:] - lb[:, 9:]).max() > 100 * FORWARD_ATOL


def test_greedy_matches_argmax_loop_over_full_forward(sharp_model):
    prompt = make_prompt(sharp_model.config.vocab_size)
    want, margins = full_forward_greedy(sharp_model, prompt, NEW_TOKENS)
    assert margins.min() > MIN_ARGMAX_MARGIN  # the comparison is not decided by rounding
    got = np.asarray(jaxinfer.generate(sharp_model, jnp.asarray(prompt), max_new_tokens=NEW_TOKENS,
                                       temperature=0.0))
    np.testing.assert_array_equal(got, want)


# The tests on flat_model share one compiled generate: same batch, prompt length and token count
# (temperature, top-k, top-p and seed are traced arrays and do not recompile).
SAMPLE_TOKENS = 24


# the Pallas case also sets remat, which a cached forward skips (one compile per case either way)
@pytest.mark.parametrize("backend, remat", [("xla", "none"), ("pallas", "full")])
def test_prefill_into_an_empty_cache_runs_flash_attention_with_the_uncached_logits(backend, remat,
                                                                                  monkeypatch):
    """A prefill (start=0 into an empty cache) attends through flash_attention on the model's
    backend, not over the whole cache, with or without remat; its logits and the K/V it leaves
    are those of the uncached forward (a decode step on them continues it). The window (4) cuts
    the prompt."""
    config = dataclasses.replace(CONFIGS["mistral_window4_mqa"], attention_backend=backend,
                                 remat=remat)
    model = jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    randomize_parameters(model, seed=1)
    ids = make_prompt(config.vocab_size, seed=2)
    seq = np.concatenate([ids, ids[:, :1]], axis=1)  # one more token to decode
    want = jitted_forward(model)(seq)  # [batch, PROMPT_LEN + 1, vocab]
    cached_calls, prefill_calls = [], []
    cached, flash = (jaxinfer.models.llama.cached_attention,
                     jaxinfer.models.llama.prefill_attention)
    monkeypatch.setattr(jaxinfer.models.llama, "cached_attention",
                        lambda *a, **k: cached_calls.append(1) or cached(*a, **k))
    monkeypatch.setattr(jaxinfer.models.llama, "prefill_attention",
                        lambda *a, **k: prefill_calls.append(1) or flash(*a, **k))
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda st, x, c: nnx.merge(graphdef, st).forward(x, c, start=0))
    decode = jax.jit(lambda st, x, c: nnx.merge(graphdef, st).forward(x, c, start=PROMPT_LEN))
    logits, cache = prefill(state, jnp.asarray(ids), model.init_cache(BATCH, PROMPT_LEN + 4))
    assert prefill_calls and not cached_calls
    np.testing.assert_allclose(np.asarray(logits), want[:, :PROMPT_LEN], atol=FORWARD_ATOL)
    step, _ = decode(state, jnp.asarray(seq[:, -1:]), cache)
    assert cached_calls  # decode reads the cache
    np.testing.assert_allclose(np.asarray(step)[:, 0], want[:, -1], atol=FORWARD_ATOL)


@pytest.mark.parametrize("config_cls, model_cls, extra", [
    (jaxinfer.LlamaConfig, jaxinfer.LlamaForCausalLM, {}),
    (jaxinfer.MixtralConfig, jaxinfer.MixtralForCausalLM,
     dict(num_local_experts=2, num_experts_per_tok=1)),
])
def test_a_remat_model_generates_as_without_remat(config_cls, model_cls, extra):
    """remat is a training setting: cached forwards (prefill, decode) run their layers directly,
    so generate's decode loop works (nnx.remat inside it raised TraceContextError) and picks
    the same tokens."""
    config = config_cls(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                        **extra)
    model = model_cls(config, rngs=nnx.Rngs(0))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
    want = np.asarray(jaxinfer.generate(model, prompt, max_new_tokens=5))
    model.config = dataclasses.replace(config, remat="full")
    np.testing.assert_array_equal(np.asarray(jaxinfer.generate(model, prompt, max_new_tokens=5)),
                                  want)


@pytest.mark.parametrize("config_cls, model_cls, extra", [
    (jaxinfer.LlamaConfig, jaxinfer.LlamaForCausalLM, {}),
    (jaxinfer.MixtralConfig, jaxinfer.MixtralForCausalLM,
     dict(num_local_experts=2, num_experts_per_tok=1)),
])
def test_a_cache_write_past_max_len_is_refused_not_clamped(config_cls, model_cls, extra):
    """XLA clamps an out-of-range dynamic_update_slice: positions 3..5 in a 4-slot cache would
    overwrite slots 1..3 and give wrong logits, so a known start (Python, NumPy or concrete JAX
    integer) is checked."""
    config = config_cls(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                        **extra)
    model = model_cls(config, rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 3), jnp.int32)
    cache = model.init_cache(1, 4)
    for start in (3, 2, -1, np.int64(3), jnp.int32(2)):
        with pytest.raises(ValueError, match=rf"positions start..start\+T-1 = {start}\.\.\d+ "
                                             rf"must lie in the cache's \[0, 4\)"):
            model.forward(ids, cache, start=start)
    _, cache = model.forward(ids, cache, start=0)
    model.forward(ids[:, :1], cache, start=3)  # the last slot: fits
    model.forward(ids[:, :1], cache, start=jnp.int32(3))
    # a traced start of another integer type indexes the cache writes as int32
    jax.jit(lambda s: model.forward(ids[:, :1], cache, start=s)[0])(jnp.uint32(3))


def test_greedy_rows_do_not_depend_on_the_rest_of_the_batch(flat_model):
    prompt = make_prompt(flat_model.config.vocab_size)
    batched = np.asarray(jaxinfer.generate(flat_model, prompt, max_new_tokens=SAMPLE_TOKENS))
    alone = np.asarray(jaxinfer.generate(flat_model, prompt[1:], max_new_tokens=SAMPLE_TOKENS))
    np.testing.assert_array_equal(batched[1:], alone)


def test_output_shape_dtype_and_prompt_preserved(flat_model):
    prompt = make_prompt(flat_model.config.vocab_size)
    out = jaxinfer.generate(flat_model, jnp.asarray(prompt), max_new_tokens=SAMPLE_TOKENS,
                            temperature=1.0, seed=3)
    assert out.shape == (BATCH, PROMPT_LEN + SAMPLE_TOKENS)
    assert out.dtype == jnp.int32
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:, :PROMPT_LEN], prompt)
    assert out.min() >= 0 and out.max() < flat_model.config.vocab_size


def test_numpy_int64_prompt_gives_the_same_result_as_int32(flat_model):
    prompt = make_prompt(flat_model.config.vocab_size)
    a = jaxinfer.generate(flat_model, prompt.astype(np.int64), max_new_tokens=SAMPLE_TOKENS)
    b = jaxinfer.generate(flat_model, jnp.asarray(prompt, jnp.int32), max_new_tokens=SAMPLE_TOKENS)
    assert a.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_max_new_tokens_zero_returns_the_prompt(flat_model):
    prompt = make_prompt(flat_model.config.vocab_size)
    out = jaxinfer.generate(flat_model, prompt, max_new_tokens=0, temperature=1.0)
    assert out.shape == prompt.shape and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), prompt)


def test_single_new_token_is_the_greedy_next_token(flat_model):
    """max_new_tokens=1: prefill only, the decode scan runs zero steps."""
    prompt = make_prompt(flat_model.config.vocab_size)
    out = np.asarray(jaxinfer.generate(flat_model, prompt, max_new_tokens=1))
    assert out.shape == (BATCH, PROMPT_LEN + 1)
    want = jitted_forward(flat_model)(prompt)[:, -1].argmax(-1)
    np.testing.assert_array_equal(out[:, -1], want)


# ----------------------------------------------------------------- sampling


def sample(model, prompt, seed, **kwargs):
    return np.asarray(jaxinfer.generate(model, prompt, max_new_tokens=SAMPLE_TOKENS,
                                        temperature=kwargs.pop("temperature", 1.0), seed=seed,
                                        **kwargs))


def test_same_seed_gives_same_samples(flat_model):
    prompt = make_prompt(flat_model.config.vocab_size)
    np.testing.assert_array_equal(sample(flat_model, prompt, seed=7), sample(flat_model, prompt, seed=7))


def test_different_seeds_give_different_samples(flat_model):
    prompt = make_prompt(flat_model.config.vocab_size)
    a, b = sample(flat_model, prompt, seed=7), sample(flat_model, prompt, seed=8)
    # Premise: every sampled step is spread out (no token above 10% probability), so two seeds
    # agree on all 2 x 24 tokens with probability below 0.1**48.
    probs = jax.nn.softmax(jitted_forward(flat_model)(a)[:, PROMPT_LEN - 1:-1], axis=-1)
    assert float(probs.max()) < 0.1
    assert not np.array_equal(a[:, PROMPT_LEN:], b[:, PROMPT_LEN:])


def test_identical_prompts_in_one_batch_are_sampled_independently(flat_model):
    prompt = np.repeat(make_prompt(flat_model.config.vocab_size, batch=1), 2, axis=0)
    out = sample(flat_model, prompt, seed=7)
    assert not np.array_equal(out[0, PROMPT_LEN:], out[1, PROMPT_LEN:])


@pytest.mark.parametrize("temperature", [0.7, 1.0, 5.0])
def test_top_k_1_equals_greedy(flat_model, temperature):
    prompt = make_prompt(flat_model.config.vocab_size)
    greedy = np.asarray(jaxinfer.generate(flat_model, prompt, max_new_tokens=SAMPLE_TOKENS))
    np.testing.assert_array_equal(sample(flat_model, prompt, seed=5, temperature=temperature,
                                         top_k=1), greedy)


def test_tiny_top_p_equals_greedy(flat_model):
    prompt = make_prompt(flat_model.config.vocab_size)
    greedy = np.asarray(jaxinfer.generate(flat_model, prompt, max_new_tokens=SAMPLE_TOKENS))
    np.testing.assert_array_equal(sample(flat_model, prompt, seed=5, top_p=1e-6), greedy)


def test_top_p_below_float32s_smallest_number_equals_greedy(flat_model):
    """1e-46 is 0 in float32: the nucleus must still keep the most probable token."""
    prompt = make_prompt(flat_model.config.vocab_size)
    greedy = np.asarray(jaxinfer.generate(flat_model, prompt, max_new_tokens=SAMPLE_TOKENS))
    np.testing.assert_array_equal(sample(flat_model, prompt, seed=5, top_p=1e-46), greedy)


def test_a_top_k_beyond_int32_samples_as_no_top_k(flat_model):
    """A top_k at or above the vocabulary keeps every token, also one int32 cannot hold."""
    prompt = make_prompt(flat_model.config.vocab_size)
    np.testing.assert_array_equal(sample(flat_model, prompt, seed=5, top_k=2**31),
                                  sample(flat_model, prompt, seed=5))


@pytest.mark.parametrize("top_k", [3, 10])
def test_top_k_samples_lie_in_the_top_k_of_full_forward_logits(flat_model, top_k):
    prompt = make_prompt(flat_model.config.vocab_size)
    out = sample(flat_model, prompt, seed=11, top_k=top_k)
    logits = jitted_forward(flat_model)(out)[:, PROMPT_LEN - 1:-1]  # [batch, new, vocab]
    chosen = np.take_along_axis(logits, out[:, PROMPT_LEN:, None], axis=-1)[..., 0]
    kth = np.sort(logits, axis=-1)[..., -top_k]
    assert (chosen >= kth - FORWARD_ATOL).all()
    # without the filter a flat model would leave the top-k set most of the time
    assert top_k / flat_model.config.vocab_size < 0.15


def test_top_p_samples_lie_in_the_nucleus_of_full_forward_logits(flat_model):
    top_p = 0.3
    prompt = make_prompt(flat_model.config.vocab_size)
    out = sample(flat_model, prompt, seed=13, top_p=top_p)
    logits = jitted_forward(flat_model)(out)[:, PROMPT_LEN - 1:-1].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.take_along_axis(probs, out[:, PROMPT_LEN:, None], axis=-1)
    mass_strictly_above = np.where(probs > chosen, probs, 0).sum(-1)
    assert (mass_strictly_above < top_p + FORWARD_ATOL).all()


# ----------------------------------------------------------------- filter_logits vs numpy
def reference_filter(logits: np.ndarray, temperature: float, top_k: int | None,
                     top_p: float | None) -> np.ndarray:
    """HF's order: divide by temperature, keep the top_k largest (ties kept), then the smallest
    prefix of the renormalized sorted distribution whose mass reaches top_p. float64."""
    x = logits.astype(np.float64) / temperature
    out = np.empty_like(x)
    for row, values in enumerate(x):
        values = values.copy()
        if top_k is not None and top_k < values.size:
            kth = np.sort(values)[::-1][top_k - 1]
            values[values < kth] = -np.inf
        if top_p is not None and top_p < 1.0:
            order = np.argsort(-values, kind="stable")
            probs = np.exp(values[order] - values[order][0])
            probs /= probs.sum()
            mass_before = np.cumsum(probs) - probs
            drop = order[mass_before >= top_p]
            values[drop] = -np.inf
        out[row] = values
    return out


FILTER_CASES = {
    "temperature_only": (1.0, None, None),
    "cold_top_k": (0.7, 5, None),
    "top_k_1": (1.0, 1, None),
    "top_k_above_vocab": (1.0, 500, None),
    "hot_top_p": (1.3, None, 0.9),
    "top_p_tiny": (1.0, None, 1e-6),
    "top_k_then_top_p": (0.5, 10, 0.8),
    "top_k_then_small_top_p": (2.0, 3, 0.3),
}


@pytest.mark.parametrize("temperature,top_k,top_p", list(FILTER_CASES.values()),
                         ids=list(FILTER_CASES))
def test_filter_logits_matches_numpy_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0.0, 3.0, (4, 50)).astype(np.float32)
    params = SamplingArrays(jnp.float32(temperature), jnp.int32(top_k or 0),
                            jnp.float32(1.0 if top_p is None else top_p))
    got = np.asarray(filter_logits(jnp.asarray(logits), params))
    want = reference_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    kept = ~np.isneginf(want)
    assert kept.sum(-1).min() >= 1
    np.testing.assert_allclose(got[kept], want[kept], rtol=FILTER_ATOL, atol=FILTER_ATOL)


def test_filter_logits_top_k_keeps_exactly_k_without_ties():
    logits = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
    params = SamplingArrays(jnp.float32(1.0), jnp.int32(7), jnp.float32(1.0))
    got = np.asarray(filter_logits(jnp.asarray(logits), params))
    assert ((~np.isneginf(got)).sum(-1) == 7).all()


def test_filter_logits_top_p_one_masks_nothing():
    """top_p = 1 (what top_p=None becomes) must keep every token, as HF does by skipping top-p."""
    logits = np.array([[30.0, 0.0, -1.0, -2.0], [1.0, 0.5, 0.0, -0.5]], np.float32)
    params = SamplingArrays(jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    got = np.asarray(filter_logits(jnp.asarray(logits), params))
    np.testing.assert_array_equal(got, logits)
