"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import functools

import jax
import optax


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int,
                           min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine decay to `peak * min_lr_ratio` at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=max(warmup_steps, 1),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * min_lr_ratio)


@functools.cache  # equal settings -> the same object, so jitted steps that take it stay cached
def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int,
                   weight_decay: float, clip_norm: float, min_lr_ratio: float = 0.1
                   ) -> optax.GradientTransformation:
    """Decay applies to matrices only: norms and biases (1-D) are not pulled toward zero."""
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps, min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask),
    )
