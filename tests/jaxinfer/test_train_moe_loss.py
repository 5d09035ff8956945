"""Mixtral's router losses in jaxinfer.train's ordinary step: the optimised loss is next-token
cross-entropy plus the config's weights times `moe.load_balancing_loss` and `moe.router_z_loss`
of the router logits (HF semantics: the load-balancing term only with output_router_logits),
their gradients reach the routers, the step's key drives router jitter, and the train loop logs
the parts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.models.moe import load_balancing_loss, router_z_loss
from jaxinfer.train import TrainConfig, train
from jaxinfer.train.optimizer import make_optimizer
from jaxinfer.train.step import held_out_loss, train_step_with_losses, training_loss

LAYERS, EXPERTS, TOP_K, VOCAB, BATCH, SEQ = 2, 4, 2, 48, 2, 8
AUX_COEF, Z_COEF, JITTER = 0.5, 0.01, 0.1
STEPS, LR = 8, 3e-2  # the train loop's run; the step test uses its optimizer (one compile)
LOSS_RTOL = 1e-6  # the same float32 losses, summed in another order or another program
ZERO_GRAD_ATOL = 1e-7  # the router losses do not depend on the LM head: exactly 0 up to rounding


def tiny_config(**overrides) -> MixtralConfig:
    return MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=SEQ, num_local_experts=EXPERTS,
                         num_experts_per_tok=TOP_K, **overrides)


def abstract_model(config: MixtralConfig) -> MixtralForCausalLM:
    """A Mixtral with `config` and abstract weights: its graphdef and methods, no init program."""
    return nnx.eval_shape(lambda: MixtralForCausalLM(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, batch): a tiny Mixtral that trains with both router losses, random
    weights drawn in numpy (O(1) router logits, no init program), and a batch int32 [B, SEQ+1].
    Every token embedding shares one direction and every layer has the same sharp router, so
    routing leans to the same experts in each layer: the load-balancing loss (pooled over
    layers) sits well above its balanced value k, and its gradient is far from 0."""
    config = tiny_config(output_router_logits=True, router_aux_loss_coef=AUX_COEF,
                         router_z_loss_coef=Z_COEF)
    graphdef, abstract = nnx.split(abstract_model(config))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype),
                          abstract)
    embedding = params.embed_tokens.embedding
    embedding.value = embedding.value + jnp.asarray(rng.normal(size=embedding.shape[1]),
                                                    jnp.float32)
    router = 3 * params.layers[0].block_sparse_moe.gate.kernel.value  # [embed, E]
    for layer in params.layers.values():
        layer.block_sparse_moe.gate.kernel.value = router
    batch = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ + 1)), jnp.int32)
    return graphdef, params, batch


def loop_optimizer():
    """The optimizer `train` builds for `loop_config()` (make_optimizer caches it)."""
    c = loop_config()
    return make_optimizer(learning_rate=c.learning_rate, total_steps=c.steps,
                          warmup_steps=c.warmup_steps, weight_decay=c.weight_decay,
                          clip_norm=c.clip_norm)


def loop_config() -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=BATCH, seq_len=SEQ, learning_rate=LR,
                       warmup_steps=1, eval_every=STEPS, eval_batches=1, checkpoint_every=STEPS)


@functools.partial(jax.jit, static_argnames="graphdef")
def router_losses(params: nnx.State, batch: jax.Array, graphdef: nnx.GraphDef):
    """The oracle: moe.py's losses of the router logits of an exact (eval-mode) forward."""
    _, _, routing = nnx.merge(graphdef, params).forward_with_routing(batch[:, :-1])
    router_logits = list(routing.router_logits)  # layers x [B * SEQ, E]
    return (load_balancing_loss(router_logits, EXPERTS, TOP_K), router_z_loss(router_logits))


@functools.partial(jax.jit, static_argnames="graphdef")
def loss_and_grads(params: nnx.State, batch: jax.Array, weights: dict[str, float] | None,
                   graphdef: nnx.GraphDef):
    """((loss, parts), grads) of the training loss without a jitter key; `weights` traced."""
    return jax.value_and_grad(lambda p: training_loss(graphdef, p, batch, None, weights),
                              has_aux=True)(params)


def test_step_loss_is_next_token_loss_plus_config_weighted_router_losses(tiny):
    graphdef, params, batch = tiny
    tx = loop_optimizer()
    # with a key, as the train loop calls it (this config has no jitter: the key is unused)
    out = train_step_with_losses(graphdef, tx, params, tx.init(params), batch[None],
                                 jax.random.key(0))
    lb, z = router_losses(params, batch, graphdef=graphdef)
    ce = held_out_loss(graphdef, params, [(batch, None)])
    assert set(out.losses) == {"next_token_loss", "load_balancing_loss", "router_z_loss"}
    np.testing.assert_allclose(out.losses["next_token_loss"], ce, rtol=LOSS_RTOL)
    np.testing.assert_allclose(out.losses["load_balancing_loss"], lb, rtol=LOSS_RTOL)
    np.testing.assert_allclose(out.losses["router_z_loss"], z, rtol=LOSS_RTOL)
    np.testing.assert_allclose(out.loss, ce + AUX_COEF * lb + Z_COEF * z, rtol=LOSS_RTOL)
    assert float(lb) > TOP_K + 0.2 and float(z) > 0  # unbalanced routing: the terms count


def test_hf_semantics_weigh_load_balancing_only_with_output_router_logits():
    hf = {"model_type": "mixtral", "vocab_size": VOCAB, "hidden_size": 16,
          "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 2}
    default = MixtralConfig.from_hf_config(hf)  # HF defaults: coef 0.001, output_router_logits off
    assert (default.router_aux_loss_coef, default.output_router_logits) == (0.001, False)
    on = MixtralConfig.from_hf_config({**hf, "output_router_logits": True,
                                       "router_aux_loss_coef": 0.02})
    assert abstract_model(default).aux_loss_weights() == {"load_balancing_loss": 0.0,
                                                          "router_z_loss": 0.0}
    assert abstract_model(on).aux_loss_weights() == {"load_balancing_loss": 0.02,
                                                     "router_z_loss": 0.0}
    with_z = on.replace(router_z_loss_coef=1e-3)
    assert MixtralConfig.from_hf_config(with_z.to_hf_config()) == with_z
    with pytest.raises(ValueError, match="router_z_loss_coef must be a finite number >= 0"):
        on.replace(router_z_loss_coef=-1.0)


def test_zero_weights_give_next_token_loss_exactly_and_router_gradients_come_from_the_aux_terms(
        tiny):
    """Weights are traced: one compile serves every setting. With both at 0 the loss is the
    next-token loss; each router loss alone adds a gradient that reaches every router, never
    the LM head, and a small step against it lowers that loss."""
    graphdef, params, batch = tiny
    zero = {"load_balancing_loss": 0.0, "router_z_loss": 0.0}
    (loss, parts), base = loss_and_grads(params, batch, zero, graphdef=graphdef)
    assert float(loss) == float(parts["next_token_loss"])
    np.testing.assert_allclose(loss, held_out_loss(graphdef, params, [(batch, None)]),
                               rtol=LOSS_RTOL)
    before = dict(zip(zero, router_losses(params, batch, graphdef=graphdef)))
    for name in zero:
        _, grads = loss_and_grads(params, batch, {**zero, name: 1.0}, graphdef=graphdef)
        aux_grads = jax.tree.map(jnp.subtract, grads, base)  # the gradient of the aux term
        for layer in aux_grads.layers.values():
            assert np.abs(layer.block_sparse_moe.gate.kernel.value).max() > 1e-4, name
        assert np.abs(aux_grads.lm_head.kernel.value).max() < ZERO_GRAD_ATOL, name
        lr = 1e-2 / optax.global_norm(aux_grads)
        stepped = jax.tree.map(lambda p, g: p - lr * g, params, aux_grads)
        after = dict(zip(zero, router_losses(stepped, batch, graphdef=graphdef)))
        assert after[name] < before[name], name


def test_step_key_jitters_the_router(tiny):
    """With router_jitter_noise > 0 the training loss (the model in training mode) follows the
    step's key; the same weights without jitter give the exact loss."""
    graphdef, params, batch = tiny
    jitter_graphdef = nnx.graphdef(abstract_model(
        tiny_config(output_router_logits=True, router_aux_loss_coef=AUX_COEF,
                    router_z_loss_coef=Z_COEF, router_jitter_noise=JITTER)))
    loss_with_key = jax.jit(lambda p, k: training_loss(jitter_graphdef, p, batch, k)[0])
    weights = {"load_balancing_loss": AUX_COEF, "router_z_loss": Z_COEF}
    (exact, _), _ = loss_and_grads(params, batch, weights, graphdef=graphdef)
    jittered = [float(loss_with_key(params, jax.random.key(i))) for i in (0, 0, 1)]
    assert jittered[0] == jittered[1] != jittered[2]  # reproducible, and follows the key
    assert jittered[0] != float(exact)
    np.testing.assert_allclose(jittered[0], exact, rtol=0.1)  # a perturbation


def test_unknown_loss_weight_is_rejected(tiny):
    graphdef, params, batch = tiny
    with pytest.raises(ValueError, match="loss_weights must name auxiliary losses of the model"):
        training_loss(graphdef, params, batch, None, {"load_balance": 1.0})


def test_train_loop_optimises_and_logs_the_router_losses(tiny, tmp_path):
    """jaxinfer.train on a Mixtral: each record's loss is the config-weighted sum of its logged
    parts. (Whether 8 steps balance routing better than coefficient 0 is noise at this size:
    the gradient test above checks the aux term's direction.)"""
    graphdef, params, _ = tiny
    tokens = np.random.default_rng(1).integers(0, VOCAB, 4000).astype(np.int32)
    result = train(nnx.merge(graphdef, params), tokens[:3000], tokens[3000:], loop_config(),
                   tmp_path, progress=False)
    for r in result.history:
        np.testing.assert_allclose(r["loss"], r["next_token_loss"] + AUX_COEF
                                   * r["load_balancing_loss"] + Z_COEF * r["router_z_loss"],
                                   rtol=LOSS_RTOL)
    assert len(result.history) == STEPS and "eval_loss" in result.history[-1]


# A document alone vs packed with others: attention runs over other key blocks (masked ones
# included), so the router logits differ by float32 reordering; measured ~1e-7 relative.
PACKED_RTOL = 1e-5
# segment ids [BATCH, SEQ + 1] of the packed test: row 0 two documents then padding, row 1 one
# document then padding. Input position t counts when its id is not 0 (padding).
PACKED_SEGMENTS = ((1, 1, 1, 2, 2, 0, 0, 0, 0), (3, 3, 3, 3, 3, 3, 0, 0, 0))


def document_runs(segments) -> list[tuple[int, int, int]]:
    """(row, start, end) of each document among the inputs (the first SEQ positions)."""
    runs = []
    for row, ids in enumerate(segments):
        ids, start = ids[:SEQ], 0
        for t in range(1, SEQ + 1):
            if t == SEQ or ids[t] != ids[start]:
                if ids[start] != 0:
                    runs.append((row, start, t))
                start = t
    return runs


@functools.partial(jax.jit, static_argnames=("graphdef", "runs"))
def packed_router_losses(params: nnx.State, batch: jax.Array, segment_ids: jax.Array,
                         graphdef: nnx.GraphDef, runs: tuple[tuple[int, int, int], ...]):
    """(the training loss's parts on the packed batch, the router losses of the logits of each
    document run alone (`runs`, `document_runs`): the oracle, the router losses of every packed
    input position's logits, padding included: the control). One program, one compile."""
    _, parts = training_loss(graphdef, params, batch, None, None, segment_ids)
    model = nnx.merge(graphdef, params)
    alone = [model.forward_with_routing(batch[row:row + 1, start:end])[2].router_logits
             for row, start, end in runs]  # [layers, n, E] each
    oracle = list(jnp.concatenate(alone, axis=1))  # layers x [real tokens, E]
    routing = model.forward_with_routing(batch[:, :-1], segment_ids=segment_ids[:, :-1])[2]
    padded = list(routing.router_logits)  # layers x [B * SEQ, E]
    return parts, *((load_balancing_loss(logits, EXPERTS, TOP_K), router_z_loss(logits))
                    for logits in (oracle, padded))


def test_router_losses_of_padded_packed_rows_count_the_real_tokens_alone(tiny):
    """With packed documents and padding, the step's router losses equal those of the router
    logits of each document run alone (the unpadded tokens, no other row): padding is left out
    of the sums and of the counts they are divided by. The control, the same logits with the
    padding counted, is far off."""
    graphdef, params, batch = tiny
    runs = tuple(document_runs(PACKED_SEGMENTS))
    assert sum(end - start for _, start, end in runs) == 11
    parts, want, padded = packed_router_losses(
        params, batch, jnp.asarray(PACKED_SEGMENTS, jnp.int32), graphdef=graphdef, runs=runs)
    for name, ref, control in zip(("load_balancing_loss", "router_z_loss"), want, padded):
        np.testing.assert_allclose(parts[name], ref, rtol=PACKED_RTOL, err_msg=name)
        assert abs(float(control) - float(ref)) > 100 * PACKED_RTOL * abs(float(ref)), name


def test_router_losses_of_a_batch_of_padding_alone_are_zero():
    logits = [jnp.ones((6, EXPERTS), jnp.float32)]
    nothing = jnp.zeros((2, 3), bool)
    assert float(load_balancing_loss(logits, EXPERTS, TOP_K, nothing)) == 0.0
    assert float(router_z_loss(logits, nothing)) == 0.0
    with pytest.raises(ValueError, match="one entry per router-logit row"):
        router_z_loss(logits, jnp.ones((2, 4), bool))
