"""The jitted train and eval steps: pure functions of (params, optimizer state, batch).

The model structure (`graphdef`) and the optimizer are static arguments, so every run with the same
architecture and optimizer settings reuses one compiled step (optimizers come from a cached factory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def next_token_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]; batch int32 [B, L+1]."""
    model = nnx.merge(graphdef, params)
    logits, _ = model.forward(batch[:, :-1])  # [B, L, vocab] float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State,
               opt_state: optax.OptState, batches: jax.Array):
    """One optimizer update from batches int32 [accum, B, L+1] -> (params, opt_state, loss, grad_norm).

    Gradients are averaged over the `accum` micro-batches (a scan, so activations of one micro-batch
    are live at a time) before the single update."""
    grad_fn = jax.value_and_grad(lambda p, b: next_token_loss(graphdef, p, b))

    def accumulate(carry, batch):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, batch)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.float32(0), zeros), batches)
    n = batches.shape[0]
    loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_step(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
    return next_token_loss(graphdef, params, batch)
