"""The Hyena decoder's decoding cache: what one new token needs from the past, in fixed shapes.

A Hyena layer mixes tokens in two places (``hyena.py``): the short depthwise convolution (a few
taps) and the N - 1 gated long convolutions, whose filters are as long as the context. To decode
the token at position p, a layer keeps

* ``short``: the short convolution's inputs (in_proj outputs) by position, in a buffer of
  ``short_filter_size - 1 + max_len`` slots: slot ``size - 1 + p`` holds position p, and the first
  ``size - 1`` slots stand for positions -size+1 .. -1 and stay zero (the causal zero padding).
  The short convolution at start reads the window of positions start-size+1 .. start-1 with one
  ``dynamic_slice`` (``short_window``);
* ``long``: per long convolution, its gated input w = x_i * v at every position so far, stored at
  its absolute position in a buffer preallocated to ``max_len`` (like the Llama ``KVCache``);
* ``filter``: the implicit filter's taps for all ``max_len`` lags, materialized once by
  ``HyenaForCausalLM.init_cache`` so that decoding never reruns the sine network; lags from
  max_position_embeddings on (a buffer longer than the context: speculative decoding's scratch
  slots) are zero, and only positions past the context, whose outputs are discarded, reach them.

The long convolution's output at p is then y[p] = sum_{s <= p} k[p - s] w[s] + bias * w[p]: one
dot product of length ``max_len`` per channel (``cached_long_conv``), O(max_len * D) per token
rather than an FFT over the whole sequence. Every shape is fixed by (batch, max_len), so a decode
loop compiles once. Slots after p (not yet written, or stale) meet zero taps and never leak in.

Both records are indexed by absolute position, never running state: a forward pass at start
reads positions < start only and writes start..start+T-1, so going back to an earlier start (a
fresh prefill at 0, or speculative decoding's rollback) is exact, like keeping a KV cache's
length. Memory per layer and sequence: ``short`` (N+1)·D·(max_len + size - 1) values and
``long`` (N-1)·D·max_len, in the compute dtype (order 2: the short record is 3x the long one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class HyenaLayerCache:
    short: jax.Array  # [batch, size - 1 + max_len, (N+1) D]: in_proj outputs, slot size-1+p
    long: tuple[jax.Array, ...]  # N-1 x [batch, D, max_len]: gated long-conv inputs by position
    filter: jax.Array  # [N-1, D, max_len] float32: the long filters' taps, zero from l_max on


@struct.dataclass
class HyenaCache:
    layers: tuple[HyenaLayerCache, ...]

    @property
    def max_len(self) -> int:
        return self.layers[0].filter.shape[-1]


def write_positions(history: jax.Array, w: jax.Array, start: jax.Array | int) -> jax.Array:
    """history [batch, D, max_len] with w [batch, D, T] stored at positions start..start+T-1."""
    return jax.lax.dynamic_update_slice(history, w.astype(history.dtype), (0, 0, start))


def short_window(history: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
    """The inputs at positions start-size+1 .. start-1 (zero before 0), oldest first:
    history [batch, size - 1 + max_len, C] -> [batch, size - 1, C]."""
    return jax.lax.dynamic_slice_in_dim(history, start, size - 1, axis=1)


def write_short(history: jax.Array, u: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
    """history [batch, size - 1 + max_len, C] with u [batch, T, C] stored at positions
    start..start+T-1 (slots size-1+start ..)."""
    return jax.lax.dynamic_update_slice_in_dim(history, u.astype(history.dtype), start + size - 1,
                                               axis=1)


def causal_taps(k: jax.Array, positions: jax.Array) -> jax.Array:
    """taps[c, i, s] = k[c, positions[i] - s] for s <= positions[i], else 0.

    k [D, max_len] float32, positions int32 [T] -> [D, T, max_len]: row i weights the stored
    inputs w[s] of every position s into the causal convolution's output at positions[i]."""
    lag = positions[:, None] - jnp.arange(k.shape[-1])[None, :]  # [T, max_len]
    taps = jnp.take(k, jnp.maximum(lag, 0), axis=-1)  # [D, T, max_len]
    return jnp.where(lag >= 0, taps, 0.0)


def cached_long_conv(history: jax.Array, w: jax.Array, k: jax.Array, start: jax.Array | int,
                     bias: jax.Array, post_gate: jax.Array | None) -> jax.Array:
    """The causal long convolution at positions start..start+T-1 as direct sums over the stored
    inputs: what ``kernels_pallas.fftconv`` computes there, at O(max_len) per token.

    history [batch, D, max_len]: gated inputs with positions <= start+T-1 already written;
    w float32 [batch, D, T]: the gated inputs at the new positions (the skip term's input);
    k float32 [D, max_len]; bias [D]; post_gate [batch, D, T] or None.
    Returns float32 y [batch, D, T] = post_gate * (sum_s k[t - s] history[s] + bias * w)."""
    positions = start + jnp.arange(w.shape[-1], dtype=jnp.int32)  # [T]
    y = jnp.einsum("bcs,cts->bct", history.astype(jnp.float32), causal_taps(k, positions),
                   precision=jax.lax.Precision.HIGHEST)  # accumulate in float32, no TF32
    y = y + bias.astype(jnp.float32)[:, None] * w
    return y if post_gate is None else y * post_gate.astype(jnp.float32)
