"""The dense per-layer KV cache that the decoders read and write during generation.

Each layer holds K and V for `max_len` absolute positions. A forward pass writes its new tokens at
`start` and attends over the whole buffer; slots not yet written lie beyond every query position,
so the causal mask hides them without a separate length mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.models.inputs import known_start


@struct.dataclass
class LayerKV:
    k: jax.Array  # [batch, max_len, kv_heads, head_dim]
    v: jax.Array  # [batch, max_len, kv_heads, head_dim]

    def write(self, k_new: jax.Array, v_new: jax.Array, start: jax.Array) -> "LayerKV":
        """Store k_new, v_new [batch, T, kv_heads, head_dim] at positions start..start+T-1."""
        index = (0, start, 0, 0)
        return LayerKV(
            k=jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), index),
            v=jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), index),
        )


@struct.dataclass
class KVCache:
    layers: tuple[LayerKV, ...]

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
              dtype: jnp.dtype) -> "KVCache":
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                         for _ in range(num_layers)))

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[1]

    def check_positions(self, start: jax.Array | int, length: int) -> None:
        """Refuse a known `start` (a Python, NumPy or concrete JAX integer) whose positions
        start..start+length-1 leave [0, max_len): `dynamic_update_slice` would clamp the write
        and the logits would be silently wrong. A traced start cannot be checked here."""
        start = known_start(start)
        if isinstance(start, int):
            end = start + length
            if not 0 <= start <= end <= self.max_len:
                raise ValueError(f"positions start..start+T-1 = {start}..{end - 1} must lie in "
                                 f"the cache's [0, {self.max_len}) (init_cache max_len)")
