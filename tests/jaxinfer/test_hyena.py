"""Hyena decoder: causal, the same logits on every fftconv backend, right shapes and dtypes,
implicit filters that decay and squash, clear config errors, it trains with the shared step
(remat changing nothing it computes), round-trips through save/load_pretrained, and decodes from
its cache as the full forward scores, also with a cache longer than the context."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxinfer
from jaxinfer.config import HyenaConfig
from jaxinfer.models.hyena import HyenaForCausalLM
from jaxinfer.models.hyena_filter import decay_window, squash
from jaxinfer.train import TrainConfig, train
from jaxinfer.train.step import training_loss

# FFT convolution (xla/pallas) rounds every output with ~eps * log2(M) relative error, so a later
# token perturbs earlier logits by float32 noise only; measured ~3e-8 on these sizes.
FFT_LEAK_ATOL = 1e-6
# Backends differ by FFT rounding through two layers (f32); measured ~1e-6 on these sizes.
BACKEND_ATOL = 2e-5
# Cached decoding sums the long convolutions directly where the full forward uses FFTs (f32);
# measured ~3e-8 on these sizes.
DECODE_ATOL = 1e-5
# remat runs the same ops; XLA may fuse the recomputed forward differently (f32).
REMAT_RTOL, REMAT_ATOL = 1e-5, 1e-7
VOCAB, SEQ = 32, 40


def tiny_config(**changes) -> HyenaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                max_position_embeddings=64, filter_hidden_size=16, filter_emb_dim=5,
                fftconv_backend="xla")
    return HyenaConfig(**(base | changes))


def tiny_model(seed: int = 0, **changes) -> HyenaForCausalLM:
    return HyenaForCausalLM(tiny_config(**changes), rngs=nnx.Rngs(seed))


def jitted(model: HyenaForCausalLM):
    """ids -> logits, compiled once (eager op-by-op dispatch makes these tests slow)."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p).forward(ids)[0])
    return lambda ids: np.asarray(forward(params, jnp.asarray(ids)))


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq), dtype=np.int32)


@pytest.mark.parametrize("backend,atol,order", [
    ("reference", 0.0, 2), ("reference", 0.0, 3), ("xla", FFT_LEAK_ATOL, 2)])
def test_changing_a_token_never_changes_earlier_logits(backend, atol, order):
    model = jitted(tiny_model(fftconv_backend=backend, order=order))
    ids = _ids()
    base = np.asarray(model(ids))
    for t in (0, 17, SEQ - 1):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = np.asarray(model(changed))
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=atol)
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-3  # the token itself does matter


def test_prefix_logits_equal_full_sequence_logits():
    """Filters depend on the context length l_max only, so a prefix is scored identically."""
    model = jitted(tiny_model(fftconv_backend="reference"))
    ids = _ids()
    np.testing.assert_allclose(model(ids[:, :23]), model(ids)[:, :23], rtol=1e-5, atol=1e-6)


def test_fftconv_backends_give_the_same_logits():
    ids = _ids(batch=1, seq=24)
    logits = {b: jitted(tiny_model(fftconv_backend=b, num_hidden_layers=1))(ids)
              for b in ("reference", "xla", "pallas")}
    np.testing.assert_allclose(logits["xla"], logits["reference"], atol=BACKEND_ATOL)
    np.testing.assert_allclose(logits["pallas"], logits["reference"], atol=BACKEND_ATOL)


@pytest.mark.parametrize("dtype,tied", [("float32", False), ("bfloat16", True)])
def test_logits_shape_and_dtype(dtype, tied):
    model = tiny_model(dtype=dtype, param_dtype=dtype, tie_word_embeddings=tied)
    logits = jitted(model)(_ids(batch=3, seq=9))
    assert logits.shape == (3, 9, VOCAB) and logits.dtype == np.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert (model.lm_head is None) == tied
    filt = model.layers[0].mixer.filter(9)
    assert filt.dtype == jnp.float32 and filt.shape == (16, 9)  # (order - 1) * hidden channels


def test_every_parameter_carries_logical_axes():
    state = nnx.state(tiny_model(), nnx.Param)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for path, var in jax.tree.leaves_with_path(state, is_leaf=is_var):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, path


def test_implicit_filters_decay_and_squash_zeroes_small_taps():
    window = np.asarray(decay_window(64, 64, 4, fast=0.3, slow=1.5, target=1e-2))
    assert np.all(np.diff(window, axis=1) < 0)  # every channel's window decays in time
    np.testing.assert_allclose(window[-1, round(0.3 * 63)], 1e-2, rtol=0.1)  # fastest channel
    k = jnp.asarray([-0.3, -0.05, 0.0, 0.02, 0.5])
    np.testing.assert_allclose(squash(k, 0.1), [-0.2, 0.0, 0.0, 0.0, 0.4], atol=1e-7)
    plain = tiny_model().layers[0].mixer.filter(64)
    squashed = tiny_model(filter_squash=0.01).layers[0].mixer.filter(64)
    assert np.mean(np.asarray(squashed) == 0) > np.mean(np.asarray(plain) == 0)


def test_inputs_are_checked():
    model = tiny_model(num_hidden_layers=1)
    assert model([[1, 2, 3]]).shape == (1, 3, VOCAB)  # nested lists are accepted
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, 65), np.int32))
    with pytest.raises(ValueError, match="vocab_size"):
        model(np.full((1, 4), VOCAB, np.int32))
    with pytest.raises(TypeError, match="HyenaCache"):
        model.forward(jnp.zeros((1, 4), jnp.int32), cache=object())
    with pytest.raises(ValueError, match="without a cache, start must be 0"):
        model.forward(jnp.zeros((1, 4), jnp.int32), start=3)
    cache = jax.eval_shape(lambda: model.init_cache(1, 8))
    for start in (6, np.int64(6), jnp.int32(6)):  # a NumPy or concrete JAX start is known too
        with pytest.raises(ValueError, match="init_cache max_len"):
            model.forward(jnp.zeros((1, 4), jnp.int32), cache, start=start)
    with pytest.raises(TypeError, match="HyenaConfig"):
        HyenaForCausalLM(dataclasses.asdict(tiny_config()), rngs=nnx.Rngs(0))


def test_a_cache_longer_than_the_context_pads_the_filters_with_zero_taps():
    """Speculative decoding sizes its cache past max_position_embeddings (scratch slots): the
    filters there are zero, the real taps those of the full-context filter, and a static start
    may still not reach past the context."""
    model = tiny_model(num_hidden_layers=1, max_position_embeddings=16)
    mixer = model.layers[0].mixer
    cache = model.init_cache(1, 21)
    k = np.asarray(cache.layers[0].filter)  # [N-1, D, 21]
    np.testing.assert_array_equal(k[..., :16], np.asarray(mixer.long_filters(16)))
    np.testing.assert_array_equal(k[..., 16:], 0.0)
    with pytest.raises(ValueError, match="below max_position_embeddings = 16"):
        model.forward(jnp.zeros((1, 17), jnp.int32), cache, 0)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("order", 1), ("filter_emb_dim", 4), ("filter_squash", -1.0),
    ("filter_decay_fast", 2.0), ("filter_decay_target", 1.5), ("fftconv_backend", "cuda"),
    ("dtype", "float16"), ("model_type", "llama"), ("short_filter_size", 0), ("remat", "some"),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_config_round_trips_through_hf_dict():
    config = tiny_config(order=3, eos_token_id=[2], fftconv_backend="reference")
    again = HyenaConfig.from_hf_config(config.to_hf_config(), fftconv_backend="reference")
    assert again == config


def test_remat_is_a_run_setting_kept_out_of_config_json():
    config = tiny_config(remat="dots")
    hf = config.to_hf_config()
    assert "remat" not in hf and "fftconv_backend" not in hf
    assert HyenaConfig.from_hf_config(hf | {"remat": "full"}, fftconv_backend="xla") == (
        config.replace(remat="none"))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_recomputes_blocks_and_keeps_loss_and_gradients(remat):
    """`remat` changes what the backward pass stores, never what it computes."""
    batch = jnp.asarray(_ids(batch=2, seq=17, seed=4))  # [batch, seq + 1]
    results = []
    for mode in ("none", remat):
        model = tiny_model()
        model.config = model.config.replace(remat=mode)
        graphdef, params = nnx.split(model)
        grad_fn = jax.value_and_grad(lambda p: training_loss(graphdef, p, batch)[0])
        # one rematerialized call per block, and none without remat
        assert str(jax.make_jaxpr(grad_fn)(params)).count("remat") == (
            0 if mode == "none" else model.config.num_hidden_layers)
        results.append(jax.jit(grad_fn)(params))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=REMAT_RTOL, atol=REMAT_ATOL)


@pytest.mark.slow  # compiles a train and an eval step: ~30-80 s on a shared 2-core CPU
def test_shared_train_loop_lowers_loss_and_writes_a_loadable_config(tmp_path):
    tokens = np.tile(np.arange(8, dtype=np.int32), 200)  # the next token is always predictable
    config = TrainConfig(steps=25, batch_size=4, seq_len=32, learning_rate=1e-2, warmup_steps=1,
                         weight_decay=0.0, eval_every=25, eval_batches=1, checkpoint_every=25)
    result = train(tiny_model(num_hidden_layers=1), tokens, tokens, config, tmp_path,
                   progress=False)
    losses = [r["loss"] for r in result.history]
    assert losses[0] > np.log(VOCAB) - 1.0 and losses[-1] < 0.5 * losses[0]
    assert isinstance(result.model, HyenaForCausalLM)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert HyenaConfig.from_hf_config(saved, fftconv_backend="xla") == result.model.config



@pytest.fixture(scope="module")
def decoder() -> HyenaForCausalLM:
    """One order-3 model (two chained long convolutions) for the checkpoint and decoding tests:
    eager initialization dominates their time on a shared CPU. Its fftconv backend is the one
    load_pretrained picks, so a loaded copy has the same graph and reuses `_logits`' compile."""
    return tiny_model(order=3, num_hidden_layers=1, fftconv_backend="auto")


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).forward(ids)[0]


def logits_of(model: HyenaForCausalLM, ids: np.ndarray) -> np.ndarray:
    """The full (uncached) forward's logits [batch, seq, vocab]."""
    return np.asarray(_logits(*nnx.split(model), jnp.asarray(ids)))


def test_save_and_load_pretrained_give_identical_logits(decoder, tmp_path):
    out = jaxinfer.save_pretrained(decoder, tmp_path / "hyena")
    assert json.loads((out / "config.json").read_text())["model_type"] == "hyena"
    loaded = jaxinfer.load_pretrained(out)
    assert isinstance(loaded, HyenaForCausalLM) and loaded.config == decoder.config
    saved, again = (nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (decoder, loaded))
    for (path, a), (_, b) in zip(saved, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(path))
    ids = _ids(batch=2, seq=14)
    np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(decoder, ids))


def test_tampered_checkpoint_names_the_missing_or_misshapen_tensor(decoder, tmp_path):
    out = jaxinfer.save_pretrained(decoder, tmp_path / "hyena")
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mixer.filter.out"
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(ValueError, match=f"missing 1 tensor.*{name}"):
        jaxinfer.load_pretrained(out)
    name = "model.layers.0.mixer.short_conv.weight"  # [(N+1) D, taps] = [64, 3]
    save_file(tensors | {name: tensors[name][:, :2].copy()}, weights)
    with pytest.raises(ValueError, match=rf"{name}.*shape \[64, 2\].*implies \[64, 3\]"):
        jaxinfer.load_pretrained(out)


def test_cached_decode_logits_match_full_forward(decoder):
    """Prefill 4 tokens (FFT path), then 4 chunks of 2 tokens from the cache (direct path at a
    traced start): every chunk's logits equal the full forward's there. One-token steps are
    what `generate` runs (next test)."""
    graphdef, state = nnx.split(decoder)

    @jax.jit
    def cached(state: nnx.State, ids: jax.Array) -> jax.Array:  # ids [batch, 12]
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(ids.shape[0], 14)
        prefill, cache = model.forward(ids[:, :4], cache, 0)

        def step(cache, start):
            chunk = jax.lax.dynamic_slice_in_dim(ids, start, 2, axis=1)  # [batch, 2]
            logits, cache = model.forward(chunk, cache, start)
            return cache, logits

        _, chunks = jax.lax.scan(step, cache, jnp.arange(4, 12, 2))  # [4, batch, 2, vocab]
        chunks = chunks.transpose(1, 0, 2, 3).reshape(ids.shape[0], 8, -1)
        return jnp.concatenate([prefill, chunks], axis=1)  # [batch, 12, vocab]

    ids = _ids(batch=2, seq=14)
    full = logits_of(decoder, ids)[:, :12]
    np.testing.assert_allclose(np.asarray(cached(state, jnp.asarray(ids[:, :12]))), full,
                               rtol=0, atol=DECODE_ATOL)


def test_cached_forward_restarted_at_an_earlier_position_equals_a_clean_cache(decoder):
    """The cache holds records by position, not running state: after a chunk of wrong tokens at
    6..10, a forward restarted at 6 (a speculative rollback) or at 0 (a re-prefill into a used
    cache) gives the logits a clean cache gives, i.e. the full forward's."""
    graphdef, state = nnx.split(decoder)

    @jax.jit
    def restarted(state: nnx.State, ids: jax.Array, wrong: jax.Array):  # ids [batch, 10]
        model = nnx.merge(graphdef, state)
        _, cache = model.forward(ids[:, :6], model.init_cache(ids.shape[0], 14), 0)
        _, used = model.forward(wrong, cache, jnp.int32(6))  # wrong [batch, 5] at 6..10
        rewound, _ = model.forward(ids[:, 6:], used, jnp.int32(6))  # [batch, 4, vocab]
        again, _ = model.forward(ids[:, :6], used, 0)  # [batch, 6, vocab]
        return jnp.concatenate([again, rewound], axis=1)  # [batch, 10, vocab]

    ids, wrong = _ids(batch=2, seq=10, seed=2), _ids(batch=2, seq=5, seed=3)
    np.testing.assert_allclose(np.asarray(restarted(state, jnp.asarray(ids), jnp.asarray(wrong))),
                               logits_of(decoder, ids), rtol=0, atol=DECODE_ATOL)


def test_greedy_generate_equals_token_by_token_recomputation(decoder):
    """Each token generate picks from its cache is the argmax of the full forward over the
    sequence so far (one full forward of the result scores every step: the model is causal)."""
    prompt = _ids(batch=2, seq=6, seed=1)
    out = np.asarray(jaxinfer.generate(decoder, prompt, max_new_tokens=8))
    np.testing.assert_array_equal(out[:, :6], prompt)
    logits = logits_of(decoder, out)  # [batch, 14, vocab]
    np.testing.assert_array_equal(out[:, 6:], logits[:, 5:-1].argmax(-1))


def test_a_remat_model_decodes_as_without_remat(decoder):
    """remat is a training setting: a cached forward (never differentiated) runs its blocks
    directly, so generate's decode loop works and picks the same tokens."""
    model = nnx.clone(decoder)
    model.config = model.config.replace(remat="full")
    prompt = _ids(batch=2, seq=6, seed=1)
    np.testing.assert_array_equal(np.asarray(jaxinfer.generate(model, prompt, max_new_tokens=4)),
                                  np.asarray(jaxinfer.generate(decoder, prompt, max_new_tokens=4)))
