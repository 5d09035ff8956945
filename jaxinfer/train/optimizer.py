"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import functools
import logging

import jax
import optax

log = logging.getLogger(__name__)


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int,
                           min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over warmup_steps (0: `peak` from the first step), then
    cosine decay to `peak * min_lr_ratio` at total_steps. The learning rate reaches `peak` at
    step warmup_steps, so a run of at most that many steps never does: logged as a warning."""
    if warmup_steps >= total_steps:
        log.warning("warmup_steps (%d) >= total steps (%d): the learning rate never reaches "
                    "its peak %g", warmup_steps, total_steps, peak)
    end = peak * min_lr_ratio
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(peak, decay_steps=max(total_steps, 1),
                                           alpha=min_lr_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=end)


# Equal settings -> the same objects, so jitted steps that take them stay cached. functools.cache
# keys on how the arguments were spelled (keywords, defaults left out), so both public functions
# call this one with every argument, positionally.
@functools.cache
def _build(learning_rate: float, total_steps: int, warmup_steps: int, weight_decay: float,
           clip_norm: float, min_lr_ratio: float
           ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps, min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask),
    ), schedule


def make_optimizer_and_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int,
                                weight_decay: float, clip_norm: float, min_lr_ratio: float = 0.1
                                ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer`'s optimizer and the learning-rate schedule it follows (the same object,
    so that a log of the learning rate shows what the updates used)."""
    return _build(learning_rate, total_steps, warmup_steps, weight_decay, clip_norm, min_lr_ratio)


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int,
                   weight_decay: float, clip_norm: float, min_lr_ratio: float = 0.1
                   ) -> optax.GradientTransformation:
    """AdamW on `learning_rate_schedule`, after clipping the gradient's global norm to
    clip_norm. Decay applies to matrices only: norms and biases (1-D) are not pulled toward
    zero. Equal settings give the same object (cached)."""
    return _build(learning_rate, total_steps, warmup_steps, weight_decay, clip_norm,
                  min_lr_ratio)[0]
