"""Mixture-of-experts routing, capacity dispatch and expert parallelism over a mesh axis.

Routing is HF Mixtral's: logits = x @ W_r, softmax over all experts in float32, top-k, weights
renormalised over the k. Capacity dispatch (GShard / Switch): every expert takes at most
`capacity` token-choices per token group; a choice past that is dropped (its output is 0 and the
residual stream carries the token). Priority is choice-major, as in GShard: all tokens' first
choices claim slots (in token order) before any second choice does, so a token loses its top-1
expert only when that expert is full of other tokens' top-1 choices.

`expert_parallel_moe` runs this as a `shard_map`: each device routes its own tokens into a fixed
[E, C, D] buffer, `all_to_all` over the expert axis sends each expert's slots to the device that
owns it ([E/P, P*C, D] there), the local experts run, and the inverse `all_to_all` brings results
back to be combined. Fixed shapes everywhere: jit never sees a data-dependent size. On GPU/TPU the
exchange sends only the filled slots (`ragged_all_to_all`, sharding/expert_exchange.py); XLA:CPU
does not implement it, so there the padded `all_to_all` moves the whole buffer, same result.

The expert computation is an argument (`expert_fn(params, xs [E_local, N, D]) -> [E_local, N, D]`)
so this package stays free of model code.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from sharding.expert_exchange import from_experts, resolve_exchange, to_experts
from sharding.mesh import check_auto_mesh
from sharding.sp_common import shard_map

ExpertFn = Callable[[Any, jax.Array], jax.Array]


class MoEResult(NamedTuple):
    """y [T, D] in x's dtype; router_logits float32 [T, E]; dropped: int32 count of token-expert
    choices that found their expert full (summed over all token groups)."""

    y: jax.Array
    router_logits: jax.Array
    dropped: jax.Array


def check_routing(top_k: Any, num_experts: int, capacity_factor: Any = None) -> None:
    """The routing arguments every public function here takes, checked in one place: an int
    top_k in [1, num_experts] and, where given, a finite positive capacity_factor."""
    if (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
            or not 1 <= top_k <= num_experts):
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}]; got "
                         f"{top_k!r}")
    if capacity_factor is not None and (
            isinstance(capacity_factor, bool)
            or not isinstance(capacity_factor, (int, float, np.integer, np.floating))
            or not (math.isfinite(capacity_factor) and capacity_factor > 0)):
        raise ValueError(f"capacity_factor must be a finite positive number; got "
                         f"{capacity_factor!r}")


def route_top_k(x: jax.Array, router_kernel: jax.Array, top_k: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [T, D], router_kernel [D, E] -> logits float32 [T, E], weights float32 [T, K] (summing to
    1 per token), expert ids int32 [T, K] (best first)."""
    check_routing(top_k, router_kernel.shape[-1])
    logits = jnp.dot(x, router_kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [T, E]
    weights, ids = jax.lax.top_k(probs, top_k)  # [T, K]
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits.astype(jnp.float32), weights, ids.astype(jnp.int32)


def jitter_router_input(x: jax.Array, key: jax.Array, eps: float) -> jax.Array:
    """Switch Transformer's router input jitter: x [T, D] times independent Uniform[1-eps, 1+eps]
    noise per element (drawn in float32), in x's dtype. Only the router sees the jittered copy:
    the experts still get x, so training-time exploration of routes does not perturb the expert
    computation. A training-time regulariser; inference routes the clean input."""
    if not 0 <= eps < 1:
        raise ValueError(f"router jitter eps must lie in [0, 1); got {eps}")
    noise = jax.random.uniform(key, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)  # [T, D]
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert for a group of `num_tokens` tokens: ceil(cf * T * K / E), at least 1."""
    check_routing(top_k, num_experts, capacity_factor)
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_dispatch(expert_ids: jax.Array, weights: jax.Array, num_experts: int, capacity: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One-hot dispatch and combine tensors for a capacity of `capacity` slots per expert.

    expert_ids int32 [T, K] (distinct per token), weights float32 [T, K] ->
    dispatch float32 [T, E, C] (1 where token t sits in slot c of expert e), combine float32
    [T, E, C] (its routing weight there), dropped int32 (choices that found their expert full).
    Choice-major priority (module docstring)."""
    t, k = expert_ids.shape
    onehot = jax.nn.one_hot(expert_ids.T, num_experts, dtype=jnp.int32)  # [K, T, E]
    # slot of each choice in its expert = number of earlier choices (choice-major) for it
    position = jnp.cumsum(onehot.reshape(k * t, num_experts), axis=0).reshape(k, t, num_experts)
    position = jnp.sum((position - 1) * onehot, axis=-1)  # [K, T]
    kept = position < capacity  # [K, T]
    slots = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity,
                           dtype=jnp.float32)  # [K, T, C]; a dropped choice gets no slot
    experts = onehot.astype(jnp.float32)  # [K, T, E]
    # contractions over k (batched over t): never the [K, T, E, C] product of the two one-hots
    dispatch = jnp.einsum("kte,ktc->tec", experts, slots)  # [T, E, C]
    # HIGHEST: the weights must not round to TF32 / bf16 on the way through a GPU / TPU matmul
    combine = jnp.einsum("kte,ktc->tec", experts, slots * weights.T[..., None],
                         precision=jax.lax.Precision.HIGHEST)  # [T, E, C]
    dropped = jnp.sum(~kept).astype(jnp.int32)
    return dispatch, combine, dropped


def capacity_moe(x: jax.Array, router_kernel: jax.Array, expert_params: Any, expert_fn: ExpertFn,
                 *, top_k: int, capacity: int, router_input: jax.Array | None = None
                 ) -> MoEResult:
    """Single-device capacity-routed MoE (the per-device body of `expert_parallel_moe` without the
    exchange). x [T, D]; router_kernel [D, E]; expert_params: pytree of [E, ...] arrays;
    router_input [T, D]: what the router sees instead of x (e.g. `jitter_router_input(x)`).
    top_k in [1, E]; capacity: slots per expert, a positive int (`expert_capacity`)."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive int (slots per expert); got {capacity!r}")
    logits, weights, ids = route_top_k(x if router_input is None else router_input,
                                       router_kernel, top_k)
    dispatch, combine, dropped = capacity_dispatch(ids, weights, router_kernel.shape[1], capacity)
    xs = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)  # [E, C, D]
    ys = expert_fn(expert_params, xs)  # [E, C, D]
    y = jnp.einsum("tec,ecd->td", combine, ys, preferred_element_type=jnp.float32)
    return MoEResult(y.astype(x.dtype), logits, dropped)


def _check_inputs(x, router_kernel, expert_params, mesh: Mesh, expert_axis: str,
                  token_axes: tuple[str, ...]) -> tuple[int, int]:
    """Validate at the public boundary; returns (expert shards P, token shards)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    for name in (expert_axis, *token_axes):
        if name not in mesh.axis_names:
            raise ValueError(f"mesh axis {name!r} is not in the mesh; its axes are "
                             f"{tuple(mesh.axis_names)}")
    check_auto_mesh(mesh)  # as sharding.shard and use_rules: shard_map would blame in_specs
    if expert_axis not in token_axes:
        raise ValueError(f"token_axes must include expert_axis={expert_axis!r} (tokens are "
                         f"exchanged over it); got {token_axes}")
    if x.ndim != 2 or router_kernel.ndim != 2 or router_kernel.shape[0] != x.shape[1]:
        raise ValueError(f"x must be [tokens, D] and router_kernel [D, experts]; got x "
                         f"{list(x.shape)} and router_kernel {list(router_kernel.shape)}")
    num_experts = router_kernel.shape[1]
    for leaf in jax.tree.leaves(expert_params):
        if leaf.shape[0] != num_experts:
            raise ValueError(f"every expert parameter must lead with num_experts={num_experts}; "
                             f"got shape {list(leaf.shape)}")
    p = int(mesh.shape[expert_axis])
    if num_experts % p:
        raise ValueError(f"num_experts={num_experts} must be divisible by the size {p} of mesh "
                         f"axis {expert_axis!r}")
    shards = math.prod(int(mesh.shape[a]) for a in token_axes)
    if x.shape[0] % shards:
        raise ValueError(f"the token count {x.shape[0]} must be divisible by the {shards} token "
                         f"shards of mesh axes {token_axes}")
    return p, shards


def expert_parallel_moe(x: jax.Array, router_kernel: jax.Array, expert_params: Any,
                        expert_fn: ExpertFn, *, mesh: Mesh, top_k: int, capacity_factor: float,
                        expert_axis: str = "expert",
                        token_axes: Sequence[str] | None = None,
                        router_input: jax.Array | None = None,
                        exchange: str = "auto") -> MoEResult:
    """Capacity-routed MoE with experts sharded over `expert_axis` and tokens over `token_axes`.

    x [T, D]: tokens, split evenly over `token_axes` (default: the expert axis alone; it must
    include it). router_kernel [D, E], replicated. expert_params: pytree of [E, ...] arrays,
    split contiguously over `expert_axis` (expert e lives on device e // (E / P)). Each device's
    tokens form one capacity group of ceil(cf * T_local * K / E) slots per expert, so the result
    equals `capacity_moe` applied to each device's token slice; with ample capacity it equals
    dropless routing. router_input [T, D] (optional, sharded as x): what the router sees instead
    of x, e.g. `jitter_router_input(x)`. exchange: "padded" (all_to_all of the whole [E, C, D]
    buffer), "ragged" (ragged_all_to_all of the filled slots only; GPU/TPU) or "auto" (ragged
    where the mesh's platform implements it); both give the same result (expert_exchange.py).
    Returns MoEResult with `dropped` summed over all devices."""
    token_axes = (expert_axis,) if token_axes is None else tuple(token_axes)
    p, shards = _check_inputs(x, router_kernel, expert_params, mesh, expert_axis, token_axes)
    check_routing(top_k, router_kernel.shape[1], capacity_factor)
    if router_input is not None and router_input.shape != x.shape:
        raise ValueError(f"router_input must have x's shape {list(x.shape)}; got "
                         f"{list(router_input.shape)}")
    exchange = resolve_exchange(exchange, mesh)
    num_experts = router_kernel.shape[1]
    capacity = expert_capacity(x.shape[0] // shards, num_experts, top_k, capacity_factor)

    def body(x, routed, router_kernel, expert_params):  # x, routed [T_local, D]; params [E/P, ...]
        logits, weights, ids = route_top_k(routed, router_kernel, top_k)
        dispatch, combine, dropped = capacity_dispatch(ids, weights, num_experts, capacity)
        xs = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)  # [E, C, D]
        send_counts = jnp.sum(dispatch, axis=(0, 2)).astype(jnp.int32)  # [E] filled slots
        xs, layouts = to_experts(xs, send_counts, axis=expert_axis, num_shards=p,
                                 exchange=exchange)  # [E/P, P*C, D]: own experts' slots
        ys = expert_fn(expert_params, xs)  # [E/P, P*C, D]
        ys = from_experts(ys, layouts, axis=expert_axis, num_shards=p)  # [E, C, D]: own slots
        y = jnp.einsum("tec,ecd->td", combine, ys, preferred_element_type=jnp.float32)
        return y.astype(x.dtype), logits, jax.lax.psum(dropped, token_axes)

    tokens = PartitionSpec(token_axes, None)
    param_specs = jax.tree.map(lambda _: PartitionSpec(expert_axis), expert_params)
    fn = shard_map(body, mesh=mesh, in_specs=(tokens, tokens, PartitionSpec(), param_specs),
                   out_specs=(tokens, tokens, PartitionSpec()))
    return MoEResult(*fn(x, x if router_input is None else router_input, router_kernel,
                         expert_params))
