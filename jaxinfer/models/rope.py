"""Rotary position embeddings (RoPE) with the rescalings the Llama family uses.

The rotation follows Hugging Face's "rotate half" layout (the first and second halves of each head
are the real and imaginary parts), so checkpoints load without permuting q/k weights.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxinfer.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies, float32 [head_dim // 2], after any rope scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type == "default":
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend in between
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_tables(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables, float32 [batch, seq, head_dim], for integer positions [batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [batch, seq, dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, seq, dim]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [batch, seq, heads, head_dim] by the tables [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
