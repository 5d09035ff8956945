"""The jitted train and eval steps: pure functions of (params, optimizer state, batch).

The model structure (`graphdef`) and the optimizer are static arguments, so every run with the same
architecture and optimizer settings reuses one compiled step (optimizers come from a cached factory).

The training loss is the model's business: mean next-token cross-entropy plus, for a model that
carries auxiliary losses (Mixtral's router losses), each of them times its weight. Such a model
defines

    forward_with_aux_losses(input_ids, *, key) -> (logits [B, L, vocab], {name: float32 scalar})
    aux_loss_weights() -> {name: weight}        # from its config

and a model without them (Llama, Hyena) trains on next-token loss through its `forward`. The
weights can be overridden per call (`loss_weights`); they are traced, so runs that differ only in
loss weights share one compile. The step runs the model in training mode (nnx `train()`) with a
PRNG `key` for its stochastic layers (Mixtral's router jitter). Evaluation stays next-token loss
alone (perplexity).
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossWeights = Mapping[str, float | jax.Array]  # auxiliary-loss name -> weight (a scalar)


class StepOutput(NamedTuple):
    """`train_step_with_losses`' result: the updated params and optimizer state, the loss the
    update optimised and the gradient's global norm (as `train_step`), and that loss's parts,
    unweighted: "next_token_loss" and each auxiliary loss of the model. Losses are means over the
    micro-batches."""

    params: nnx.State
    opt_state: optax.OptState
    loss: jax.Array
    grad_norm: jax.Array
    losses: dict[str, jax.Array]


def _cross_entropy(logits: jax.Array, batch: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits float32 [B, L, vocab] against the targets batch[:, 1:]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def next_token_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]; batch int32 [B, L+1]."""
    model = nnx.merge(graphdef, params)
    logits, _ = model.forward(batch[:, :-1])  # [B, L, vocab] float32
    return _cross_entropy(logits, batch)


def _resolve_loss_weights(defaults: Mapping[str, float], overrides: LossWeights | None
                          ) -> dict[str, float | jax.Array]:
    """The model's auxiliary-loss weights with `overrides` replacing some of them."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"loss_weights must name auxiliary losses of the model, "
                         f"{sorted(defaults)}; got {unknown}")
    return {**defaults, **overrides}


def training_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array,
                  key: jax.Array | None = None, loss_weights: LossWeights | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss `train_step` optimises on batch int32 [B, L+1] -> (loss, parts): mean next-token
    cross-entropy + sum over the model's auxiliary losses of weight * loss, the model in training
    mode. parts: {"next_token_loss": cross-entropy, <aux name>: unweighted aux loss, ...}.
    key: PRNG key for the model's stochastic layers (None: they run deterministically);
    loss_weights: overrides of `model.aux_loss_weights()`."""
    model = nnx.merge(graphdef, params)
    model.train()
    has_aux = hasattr(model, "forward_with_aux_losses")
    weights = _resolve_loss_weights(model.aux_loss_weights() if has_aux else {}, loss_weights)
    if has_aux:
        logits, aux = model.forward_with_aux_losses(batch[:, :-1], key=key)  # [B, L, vocab]
    else:
        (logits, _), aux = model.forward(batch[:, :-1]), {}
    ce = _cross_entropy(logits, batch)
    loss = ce
    for name, value in aux.items():
        loss = loss + weights[name] * value
    return loss, {"next_token_loss": ce, **aux}


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def train_step_with_losses(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                           params: nnx.State, opt_state: optax.OptState, batches: jax.Array,
                           key: jax.Array | None = None,
                           loss_weights: LossWeights | None = None) -> StepOutput:
    """One optimizer update on `training_loss` from batches int32 [accum, B, L+1] -> StepOutput.

    Gradients and losses are averaged over the `accum` micro-batches (a scan, so activations of
    one micro-batch are live at a time) before the single update; each micro-batch gets its own
    split of `key`. A loss that is not a mean over tokens (load balancing) is thus averaged per
    micro-batch, as HF's gradient accumulation does."""
    grad_fn = jax.value_and_grad(
        lambda p, batch, k: training_loss(graphdef, p, batch, k, loss_weights), has_aux=True)
    n = batches.shape[0]
    keys = None if key is None else jax.random.split(key, n)  # [accum]

    def accumulate(grad_sum, micro):
        batch, micro_key = micro
        (loss, parts), grads = grad_fn(params, batch, micro_key)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, parts)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, parts) = jax.lax.scan(accumulate, zeros, (batches, keys))  # losses [accum]
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return StepOutput(optax.apply_updates(params, updates), opt_state, jnp.mean(losses),
                      optax.global_norm(grads), jax.tree.map(jnp.mean, parts))


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State,
               opt_state: optax.OptState, batches: jax.Array, key: jax.Array | None = None,
               loss_weights: LossWeights | None = None):
    """One optimizer update from batches int32 [accum, B, L+1] -> (params, opt_state, loss,
    grad_norm): `train_step_with_losses` without the breakdown of the loss."""
    return tuple(train_step_with_losses(graphdef, tx, params, opt_state, batches, key,
                                        loss_weights)[:4])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_step(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of batch int32 [B, L+1] (no auxiliary losses, no jitter)."""
    return next_token_loss(graphdef, params, batch)
