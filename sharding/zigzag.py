"""Zig-zag ("dual chunk swap") sequence layout that balances causal ring attention.

With a contiguous layout, device i of P holds tokens [i N/P, (i+1) N/P); under a causal mask it
attends to i+1 of the P key blocks, so the last device does P times the work of the first and
every ring step waits for it. The zig-zag layout cuts the sequence into 2P chunks of N/(2P) tokens
and gives device i the chunks i and 2P-1-i (an early chunk and its mirror-image late one):

    N = 16, P = 4, chunks of 2:    0 1 | 2 3 | 4 5 | 6 7 | 8 9 | 10 11 | 12 13 | 14 15
    device 0: chunks 0 and 7  ->   0 1 14 15
    device 1: chunks 1 and 6  ->   2 3 12 13
    device 2: chunks 2 and 5  ->   4 5 10 11
    device 3: chunks 3 and 4  ->   6 7  8  9

Each device then does the same amount of causal work. Permute tokens (and positions, segment ids
and targets) once into this layout in the input pipeline with `zigzag_permute`, shard the
sequence dimension over the ring's mesh axis, and restore the natural order with
`zigzag_unpermute`. Drive RoPE from `zigzag_positions`, the global position of each slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_zigzag_length(seq_len: int, num_shards: int, *, name: str = "seq_len") -> None:
    """The zig-zag layout needs the sequence to split into 2 * num_shards equal chunks."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    if seq_len % (2 * num_shards):
        raise ValueError(
            f"{name} must be divisible by 2 * num_shards = {2 * num_shards} for the zig-zag "
            f"layout (2 chunks per device); got {name}={seq_len} with num_shards={num_shards}")


def zigzag_positions(seq_len: int, num_shards: int) -> np.ndarray:
    """int32 [seq_len]: the global position held at each slot of the zig-zag layout, devices in
    order (slot s of the laid-out sequence holds token zigzag_positions(...)[s])."""
    check_zigzag_length(seq_len, num_shards)
    chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * num_shards, -1)
    order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
    return chunks[order].reshape(-1)


def zigzag_permute(x: jax.Array | np.ndarray, num_shards: int, axis: int = 1) -> jax.Array:
    """Natural token order -> zig-zag layout along `axis` (the sequence dimension).

    x: e.g. [batch, seq, heads, head_dim] or segment ids [batch, seq]. Exact (a gather)."""
    x = jnp.asarray(x)
    return jnp.take(x, zigzag_positions(x.shape[axis], num_shards), axis=axis)


def zigzag_unpermute(x: jax.Array | np.ndarray, num_shards: int, axis: int = 1) -> jax.Array:
    """Zig-zag layout -> natural token order along `axis`; the inverse of `zigzag_permute`."""
    x = jnp.asarray(x)
    inverse = np.argsort(zigzag_positions(x.shape[axis], num_shards))
    return jnp.take(x, inverse, axis=axis)
