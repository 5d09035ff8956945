"""The jitted train and eval steps: pure functions of (params, optimizer state, batch)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def next_token_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]; batch int32 [B, L+1]."""
    model = nnx.merge(graphdef, params)
    logits, _ = model.forward(batch[:, :-1])  # [B, L, vocab] float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
    """step(params, opt_state, batches [accum, B, L+1]) -> (params, opt_state, loss, grad_norm).

    Gradients are averaged over the `accum` micro-batches (a scan, so memory holds one micro-batch)
    before a single optimizer update."""
    grad_fn = jax.value_and_grad(lambda p, b: next_token_loss(graphdef, p, b))

    @jax.jit
    def step(params, opt_state, batches):
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

    return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    return jax.jit(lambda params, batch: next_token_loss(graphdef, params, batch))
