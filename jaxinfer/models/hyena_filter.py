"""Hyena's implicit long filters: a small sine network over positions, times a decay window.

A long convolution with a free filter per channel would need seq_len parameters per channel and
learns rough, noisy filters. Hyena instead *generates* the filter h[c, t] = FFN(z(t))[c] * w_c(t):

* z(t): positional features of t in [0, l_max): t / (l_max - 1) and (emb_dim - 1) / 2 sin/cos
  bands of 2*pi*f*t/l_max (``positional_features``);
* FFN: Linear -> sin(freq * .) -> (Linear -> sin)* -> Linear, with learnable per-unit
  frequencies (``ImplicitFilter``), so the filter is smooth at a parameter cost independent of the
  sequence length;
* w_c(t) = exp(-|delta_c| t / (l_max - 1)): a fixed per-channel exponential decay whose rates are
  spread so that channel filters fade to ``decay_target`` between ``decay_fast`` and
  ``decay_slow`` of the context (``decay_window``), a bias toward recent tokens.

The "Simple Hardware-Efficient Long Convolutions" paper's squash regularizer (a soft threshold,
``squash``) can be applied on top; it zeroes small taps so that the filter stays sparse and smooth.
Everything here is float32: ``kernels_pallas.fftconv`` takes float32 filters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models.layers import param


def positional_features(length: int, l_max: int, emb_dim: int) -> jax.Array:
    """[length, emb_dim] float32 features of positions 0..length-1 of a context of l_max.

    Features depend on l_max only, so a prefix of a longer sequence sees the same filter taps."""
    bands = (emb_dim - 1) // 2
    pos = jnp.arange(length, dtype=jnp.float32)  # [length]
    t = pos / max(l_max - 1, 1)
    freqs = jnp.linspace(1e-4, bands - 1, bands, dtype=jnp.float32)  # [bands]
    angle = 2 * math.pi * pos[:, None] * freqs[None, :] / l_max  # [length, bands]
    return jnp.concatenate([t[:, None], jnp.cos(angle), -jnp.sin(angle)], axis=-1)


def decay_window(length: int, l_max: int, channels: int, *, fast: float, slow: float,
                 target: float) -> jax.Array:
    """[channels, length] float32: exp(-|delta_c| t) with t = position / (l_max - 1) and rates
    delta_c spread linearly so that channel 0 reaches `target` at t = slow and the last channel at
    t = fast (safari's ExponentialModulation)."""
    rates = jnp.linspace(-math.log(target) / slow, -math.log(target) / fast, channels,
                         dtype=jnp.float32)  # [channels]
    t = jnp.arange(length, dtype=jnp.float32) / max(l_max - 1, 1)  # [length]
    return jnp.exp(-rates[:, None] * t[None, :])


def squash(k: jax.Array, lam: float) -> jax.Array:
    """Soft threshold sign(k) * max(|k| - lam, 0): the squash operator of "Simple
    Hardware-Efficient Long Convolutions" (Fu et al. 2023); lam = 0 is the identity."""
    if lam == 0:
        return k
    return jnp.sign(k) * jnp.maximum(jnp.abs(k) - lam, 0.0)


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the sine network needs
    pre-activations of order one (a 0.02-normal init would make every filter nearly zero)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)


class SineLayer(nnx.Module):
    """sin(freq * (x @ kernel + bias)) with a learnable frequency per output unit."""

    def __init__(self, in_features: int, out_features: int, *, freq: float, rngs: nnx.Rngs):
        self.kernel = param(_uniform(rngs, (in_features, out_features), in_features),
                            (None, None))
        self.bias = param(_uniform(rngs, (out_features,), in_features), (None,))
        self.freq = param(jnp.full((out_features,), freq, jnp.float32), (None,))

    def __call__(self, x: jax.Array) -> jax.Array:  # [length, in] -> [length, out]
        return jnp.sin(self.freq[...] * (x @ self.kernel[...] + self.bias[...]))


class ImplicitFilter(nnx.Module):
    """Generates `channels` causal filters of any length <= l_max from a sine FFN (float32).

    Parameters are float32 whatever the model's param_dtype: the filter is a few thousand
    weights and its FFT convolution runs in float32."""

    def __init__(self, channels: int, *, l_max: int, emb_dim: int, hidden: int, inner_layers: int,
                 sine_freq: float, decay_fast: float, decay_slow: float, decay_target: float,
                 squash_lambda: float, rngs: nnx.Rngs):
        sizes = [emb_dim] + [hidden] * (inner_layers + 1)
        self.sines = nnx.List([SineLayer(a, b, freq=sine_freq, rngs=rngs)
                               for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = param(_uniform(rngs, (hidden, channels), hidden), (None, "heads"))
        self.channels, self.l_max, self.emb_dim = channels, l_max, emb_dim
        self.decay = (decay_fast, decay_slow, decay_target)
        self.squash_lambda = squash_lambda

    def __call__(self, length: int) -> jax.Array:  # -> [channels, length] float32
        if not 1 <= length <= self.l_max:
            raise ValueError(f"filter length must lie in [1, l_max = {self.l_max}] "
                             f"(max_position_embeddings); got {length}")
        h = positional_features(length, self.l_max, self.emb_dim)  # [length, emb_dim]
        for layer in self.sines:
            h = layer(h)  # [length, hidden]
        k = (h @ self.out[...]).T  # [channels, length]
        fast, slow, target = self.decay
        k = k * decay_window(length, self.l_max, self.channels, fast=fast, slow=slow,
                             target=target)
        return squash(k, self.squash_lambda)
