"""GPTQ's layer Hessian ``H = 2 X^T X / n`` from calibration activations, as a running mean."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HessianState:
    """Running mean of ``2 x^T x`` over ``count`` samples: h float32 [K, K], count float32 []."""

    h: jax.Array
    count: jax.Array

    @classmethod
    def zeros(cls, k: int) -> "HessianState":
        return cls(jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.float32))


@jax.jit
def accumulate_hessian(state: HessianState, x: jax.Array) -> HessianState:
    """Fold a batch ``x`` [..., K] (all leading axes are samples) into the running mean.

    Equivalent to GPTQ's ``H <- H n/(n+b) + 2/(n+b) X_b X_b^T``. GPTQ counts sequences where
    this counts tokens; dampening is relative to mean(diag H), so the overall scale is irrelevant.
    """
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [b, K]
    b = jnp.float32(x.shape[0])
    total = state.count + b
    xtx = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return HessianState(state.h * (state.count / total) + (2.0 / total) * xtx, total)


def hessian_from_activations(x: jax.Array) -> jax.Array:
    """``2 X^T X / n`` for activations x [n, K] (or [..., K]) -> float32 [K, K]."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must be activations [..., K]; got shape {list(x.shape)}")
    return accumulate_hessian(HessianState.zeros(x.shape[-1]), x).h
