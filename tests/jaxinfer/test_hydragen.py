"""Hydragen shared-prefix attention equals plain causal attention over concat(prefix, suffix).

Oracle: `flash_attention(backend="reference")` (the float32 materialized definition) on each
sequence's full key set prefix + suffix, causal with the queries at the last T positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.generate.hydragen import shared_prefix_attention
from kernels_pallas import flash_attention

# Two online-softmax passes and an exact merge reorder float32 sums; observed ~1e-6.
F32_ATOL = 2e-5

# jitted: eager dispatch of the online-softmax loop op by op costs tens of seconds on this CPU
hydragen = jax.jit(shared_prefix_attention, static_argnames=("backend", "return_lse"))


def random_case(seed, batch, t, s, prefix, hq, hkv, d=16):
    """numpy draws: eager jax.random compiles per shape, seconds each on a loaded CPU."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return (normal(batch, t, hq, d), normal(prefix, hkv, d), normal(prefix, hkv, d),
            normal(batch, s, hkv, d), normal(batch, s, hkv, d))


@jax.jit
def plain_attention(q, pk, pv, sk, sv):
    """Reference attention of each sequence over its own concat(prefix, suffix)."""
    batch = q.shape[0]
    k = jnp.concatenate([jnp.broadcast_to(pk, (batch, *pk.shape)), sk], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(pv, (batch, *pv.shape)), sv], axis=1)
    return flash_attention(q, k, v, causal=True, return_lse=True, backend="reference")


@pytest.mark.parametrize("batch, t, s, prefix, hq, hkv", [
    (4, 1, 5, 40, 4, 2),  # decode, GQA
    (3, 4, 9, 33, 4, 4),  # chunk of 4 queries, MHA, prefix not a multiple of any block
    (2, 6, 6, 64, 8, 1),  # the whole suffix is the chunk, MQA
    (1, 1, 1, 17, 2, 2),  # one sequence, one suffix token
    (4, 6, 6, 10, 4, 2),  # more queries (24) than prefix keys: in rows over the same keys
])
def test_equals_attention_over_prefix_plus_suffix(batch, t, s, prefix, hq, hkv):
    q, pk, pv, sk, sv = random_case(0, batch, t, s, prefix, hq, hkv)
    out, lse = hydragen(q, pk, pv, sk, sv, return_lse=True)
    want, want_lse = plain_attention(q, pk, pv, sk, sv)
    np.testing.assert_allclose(out, want, atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=F32_ATOL, rtol=0)


def test_ragged_suffixes_equal_each_sequence_alone():
    """Left-padded suffixes of lengths 5, 2 and 3 in a buffer of 5: each row equals its own
    unpadded attention (decode, GQA)."""
    lengths = [5, 2, 3]
    q, pk, pv, sk, sv = random_case(1, 3, 1, 5, 24, 4, 2)
    out = hydragen(q, pk, pv, sk, sv, suffix_lengths=jnp.array(lengths))
    for b, n in enumerate(lengths):
        want, _ = plain_attention(q[b:b + 1], pk, pv, sk[b:b + 1, 5 - n:], sv[b:b + 1, 5 - n:])
        np.testing.assert_allclose(out[b:b + 1], want, atol=F32_ATOL, rtol=0)


def test_mismatched_shapes_raise_value_error():
    q, pk, pv, sk, sv = random_case(3, 2, 1, 3, 8, 4, 2)
    with pytest.raises(ValueError, match="prefix_k and prefix_v"):
        shared_prefix_attention(q, pk[None], pv[None], sk, sv)
    with pytest.raises(ValueError, match="S >= T"):
        shared_prefix_attention(jnp.concatenate([q] * 4, axis=1), pk, pv, sk, sv)
    with pytest.raises(ValueError, match="suffix_lengths"):
        shared_prefix_attention(q, pk, pv, sk, sv, suffix_lengths=jnp.array([1, 2, 3]))
