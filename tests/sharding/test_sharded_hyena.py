"""A tiny Hyena under Megatron-SP ("tp_sp") equals the single-device run (logits, loss,
gradients), and its vocab-parallel embedding never all-gathers the whole table (the bug the
Llama family had; the control is the lookup constrained straight to the sequence-split
residual). Greedy generation under "tp" and "tp_sp" gives the single-device tokens."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxinfer
import sharding
from jaxinfer.config import HyenaConfig
from jaxinfer.models import hyena
from jaxinfer.models.hyena import HyenaForCausalLM

# Split contractions (row-parallel out_proj and down, vocab-parallel logits) add the same float32
# terms in another order; measured <= 3e-7 on the logits and 5e-8 on the gradients here.
FWD_ATOL = FWD_RTOL = 1e-5
GRAD_RTOL = 1e-4  # atol scales with the largest gradient of the parameter
GRAD_ATOL_SCALE = 1e-5
HIDDEN, BATCH, LENGTH = 16, 8, 33  # 32 positions: at 8 the partitioner gathered the ids instead


def tiny_model(vocab: int, order: int = 2) -> HyenaForCausalLM:
    config = HyenaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=32,
                         num_hidden_layers=1, max_position_embeddings=64, filter_hidden_size=16,
                         filter_emb_dim=5, fftconv_backend="xla", order=order)
    return HyenaForCausalLM(config, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnames="graphdef")
def loss_logits_grads(params: nnx.State, ids: jax.Array, graphdef: nnx.GraphDef):
    def loss_fn(p):
        logits, _ = nnx.merge(graphdef, p).forward(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads


def tp_sp_run(model: HyenaForCausalLM, ids: jax.Array):
    """(loss, logits, grads) and the compiled HLO text under tp_sp on (data=2, tensor=4)."""
    mesh, rules = sharding.make_mesh(data=2, tensor=4), sharding.rules_for("tp_sp")
    graphdef, params = nnx.split(sharding.shard(model, mesh, rules))
    ids = jax.device_put(ids, sharding.batch_sharding(mesh, rules, ("batch", None)))
    with sharding.use_rules(mesh, rules):
        compiled = loss_logits_grads.lower(params, ids, graphdef=graphdef).compile()
    return compiled(params, ids), compiled.as_text()


def gathers_full_table(hlo: str, vocab: int) -> bool:
    table = f"f32[{vocab},{HIDDEN}]"
    return any("all-gather" in line and table in line for line in hlo.splitlines())


def fft_channels(hlo: str) -> set[int]:
    """The channel counts (the dimension before the transformed one) of the HLO's FFTs."""
    shapes = re.findall(r"= \w+\[([\d,]+)\]\S* fft\(", hlo)
    return {int(shape.split(",")[-2]) for shape in shapes}


def test_tp_sp_hyena_matches_single_device_without_gathering_the_table():
    vocab = 40  # a vocabulary no other compile of this file uses: the table's shape is its own
    model = tiny_model(vocab)
    ids = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, vocab, jnp.int32)
    ref_loss, ref_logits, ref_grads = loss_logits_grads(nnx.state(model), ids,
                                                        graphdef=nnx.graphdef(model))
    (loss, logits, grads), hlo = tp_sp_run(model, ids)
    np.testing.assert_allclose(loss, ref_loss, rtol=FWD_RTOL, atol=FWD_ATOL)
    np.testing.assert_allclose(logits, ref_logits, rtol=FWD_RTOL, atol=FWD_ATOL)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
        atol = GRAD_ATOL_SCALE * max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g), r, rtol=GRAD_RTOL, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))
    assert not gathers_full_table(hlo, vocab)
    # every FFT (forward and backward, inputs and filters) transforms this device's channels
    # only: the partitioner would gather all of them (`hyena.local_fftconv`)
    assert fft_channels(hlo) == {HIDDEN // 4}
    assert "reduce-scatter" in hlo  # out_proj and down land on the residual by reduce-scatter


def test_control_lookup_straight_into_the_residual_gathers_the_table(monkeypatch):
    """The check above can fail: the lookup constrained straight to tp_sp's sequence-split
    residual (Hyena's embedding before the fix) made the partitioner gather the whole table."""
    vocab = 44
    monkeypatch.setattr(HyenaForCausalLM, "embed", lambda self, ids: sharding.constrain(
        self.embed_tokens(ids), hyena.RESIDUAL))
    ids = jnp.zeros((BATCH, LENGTH), jnp.int32)
    _, hlo = tp_sp_run(tiny_model(vocab), ids)
    assert gathers_full_table(hlo, vocab)


@pytest.mark.parametrize("preset", ["tp", "tp_sp"])
def test_greedy_generation_with_tensor_parallelism_matches_unsharded(preset):
    """The prefill's long convolutions run per device (`sharding.local_map`); left to the
    partitioner, each FFT's operand was all-gathered into a layout XLA:CPU's FFT refused at run
    time. Order 3: the first of its two convolutions has no post-gate."""
    vocab = 48
    model = tiny_model(vocab, order=3)
    prompts = jax.random.randint(jax.random.key(2), (2, 5), 0, vocab, jnp.int32)
    want = jaxinfer.generate(model, prompts, max_new_tokens=6)
    mesh, rules = sharding.make_mesh(data=2, tensor=4), sharding.rules_for(preset)
    sharded = sharding.shard(model, mesh, rules)
    with sharding.use_rules(mesh, rules):
        got = jaxinfer.generate(sharded, prompts, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
