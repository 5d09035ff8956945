"""Activation recomputation (remat) of one layer call, the models' `remat` setting."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

# config.remat -> what the backward pass keeps of a layer (None: only the layer's inputs);
# "dots" keeps the projections' outputs, not attention's batched score products
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_call(call: Callable, mode: str) -> Callable:
    """`call(layer, *args)` as it is for mode "none", else under `jax.checkpoint` with the policy
    `mode` names, so that the backward pass recomputes what the policy does not keep.

    The layer's state goes in as an argument (`nnx.split`, merged inside) rather than being
    lifted from the live module as `nnx.remat` does, so the call also runs where an outer
    transform (jax.jit, lax.scan, vmap) captured the model instead of merging it inside; the
    call must not change the layer's state, which holds for a forward without a cache."""
    if mode == "none":
        return call
    policy = REMAT_POLICIES[mode]

    def rematerialized(layer: nnx.Module, *args):
        graphdef, state = nnx.split(layer)
        return jax.checkpoint(lambda s, *a: call(nnx.merge(graphdef, s), *a),
                              policy=policy)(state, *args)

    return rematerialized
