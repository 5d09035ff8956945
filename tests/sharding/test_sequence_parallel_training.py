"""Sequence-parallel training of a tiny Llama against the single device: under sp_ring a causal
model trains in the ring's zig-zag layout (packed documents too) with the single device's loss
and gradients; a batch that the data axes do not divide still runs (replicated in attention).
The mesh is data=2 x sequence=2 on 4 devices: the smallest ring that permutes, quick to compile."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
import sharding
from jaxinfer.models import attention
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.train.step import training_loss

# Ring attention merges per-block softmax partials (another summation order) and the sharded
# matmuls all-reduce partial sums: float32 reorderings, ~1e-6 relative.
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # the backward chains more reordered sums

CONFIG = jaxinfer.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, attention_backend="xla")
SEQ = 12  # divisible by 2 x 2: the zig-zag layout's two chunks per device of the sequence axis


def make_mesh():
    return sharding.make_mesh(data=2, sequence=2, devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def model():
    return jaxinfer.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))


def loss_and_grads(model, batch, segs, mesh=None, rules=None):
    graphdef, params = nnx.split(model if mesh is None else sharding.shard(model, mesh, rules))
    fn = jax.jit(jax.value_and_grad(
        lambda p, b, s: training_loss(graphdef, p, b, segment_ids=s)[0]))
    if mesh is None:
        return jax.tree.map(np.asarray, fn(params, batch, segs))
    with sharding.use_rules(mesh, rules):
        return jax.tree.map(np.asarray, fn(params, batch, segs))


def test_causal_ring_training_runs_zigzag_and_matches_single_device(model, monkeypatch):
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, SEQ + 1)), jnp.int32)
    # the first row's third document reuses id 1: its run, not its id, is the document
    segs = jnp.asarray([[1] * 4 + [2] * 5 + [1] * 4, [1] * 7 + [2] * 4 + [0] * 2], jnp.int32)
    want_loss, want_grads = loss_and_grads(model, batch, segs)
    layouts = []
    ring = sharding.sequence_parallel_attention

    def spy(*args, **kwargs):
        layouts.append((kwargs["impl"], kwargs["layout"]))
        return ring(*args, **kwargs)

    monkeypatch.setattr(sharding, "sequence_parallel_attention", spy)
    loss, grads = loss_and_grads(model, batch, segs, make_mesh(), "sp_ring")
    assert layouts and set(layouts) == {("ring", "zigzag")}
    np.testing.assert_allclose(loss, want_loss, rtol=LOSS_RTOL)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("moe_impl, shards", [("dropless", 2), ("capacity", 1)])
def test_only_dropless_mixtral_trains_zigzag_under_a_causal_ring(moe_impl, shards):
    """Capacity routing drops the tokens that overflow an expert in their order, so a
    capacity-routed Mixtral keeps the natural order (a contiguous ring) to match one device."""
    config = MixtralConfig(**{f.name: getattr(CONFIG, f.name)
                              for f in dataclasses.fields(jaxinfer.LlamaConfig)
                              if f.name != "model_type"},
                           num_local_experts=4, num_experts_per_tok=2, moe_impl=moe_impl)
    model = nnx.eval_shape(lambda: MixtralForCausalLM(config, rngs=nnx.Rngs(0)))
    with sharding.use_rules(make_mesh(), "sp_ring"):
        assert model.zigzag_shards(SEQ) == shards


@pytest.mark.parametrize("preset", [pytest.param("sp_ring", marks=pytest.mark.slow), "sp_ulysses"])
def test_batch_the_data_axes_do_not_divide_matches_single_device(model, preset):
    """One packed row (batch 1) on data=2 x sequence=2: logits as on a single device."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (1, SEQ)),
                      jnp.int32)
    segs = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    want = np.asarray(model(ids, segment_ids=segs))
    mesh = make_mesh()
    graphdef, params = nnx.split(sharding.shard(model, mesh, preset))
    with sharding.use_rules(mesh, preset):
        got = jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(x, segment_ids=s))(params, ids, segs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=LOSS_RTOL, atol=LOSS_RTOL)


@pytest.mark.parametrize("preset", ["sp_ring", "sp_ulysses"])
def test_sequence_length_the_sequence_axis_does_not_divide_matches_single_device(model, preset,
                                                                                  caplog):
    """T = 7 on sequence=2: attention runs whole (as `constrain` leaves the dimension whole)
    instead of refusing the length, and says so; logits, loss and gradients as on a single
    device."""
    attention._warn_whole_sequence.cache_clear()  # it warns once per (T, P) and process
    rng = np.random.default_rng(2)
    seq = 7
    batch = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, seq + 1)), jnp.int32)
    segs = jnp.asarray([[1] * 3 + [2] * 5, [1] * 8], jnp.int32)
    mesh = make_mesh()
    want = np.asarray(model(batch[:, :seq]))
    graphdef, params = nnx.split(sharding.shard(model, mesh, preset))
    with sharding.use_rules(mesh, preset):
        got = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, batch[:, :seq])
    np.testing.assert_allclose(np.asarray(got), want, rtol=LOSS_RTOL, atol=LOSS_RTOL)
    assert "sequence length 7 is not divisible by the 2 devices" in caplog.text
    want_loss, want_grads = loss_and_grads(model, batch, segs)
    loss, grads = loss_and_grads(model, batch, segs, mesh, preset)
    np.testing.assert_allclose(loss, want_loss, rtol=LOSS_RTOL)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_a_window_whose_heads_the_sequence_axis_cannot_split_says_ring_cannot_take_it():
    """A sliding window runs only through Ulysses, even under sp_ring: the error names that
    and a sequence axis that splits the heads, not the ring (which cannot carry a window)."""
    config = dataclasses.replace(CONFIG, sliding_window=4)  # 4 query heads over sequence=8
    model = nnx.eval_shape(lambda: jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(sequence=8)
    with pytest.raises(ValueError, match=r"heads must be divisible by 8; got heads=4\. "
                                         r"Sliding-window attention runs sequence-parallel only "
                                         r"through Ulysses.*sequence axis that meets it") as info:
        with sharding.use_rules(mesh, "sp_ring"):
            jax.eval_shape(lambda m: m(jnp.zeros((1, 16), jnp.int32)), model)
    assert "impl='ring'" not in str(info.value)
