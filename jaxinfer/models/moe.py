"""Sparse mixture-of-experts feed-forward block (Mixtral) and its load-balancing loss.

Experts are stored stacked, `[num_experts, ...]` with logical axis "expert" first, so a rule
table that maps "expert" to a mesh axis shards them without model changes.

Token dispatch, chosen by `MixtralConfig.moe_impl`:
- "dropless" (default): sort the T*K token-choices by expert, run the experts as grouped matmuls
  (`jax.lax.ragged_dot` over the sorted rows, one group per expert) and unsort. Static shapes
  (T*K rows) make it jit-friendly; it never drops a token, which is HF Mixtral's semantics, and
  costs T*K*D*F per matmul instead of the E*C*D*F of a padded capacity buffer plus the T*E*C*D
  one-hot einsums. This is the path the transformers parity test runs.
- "capacity": GShard one-hot dispatch/combine einsums into fixed [E, C, D] buffers, overflow
  dropped (sharding/expert_parallel.py); the single-device twin of expert parallelism.
- "expert_parallel": the same capacity routing as a shard_map with all_to_all over the mesh axis
  that the active sharding rules (`sharding.use_rules`) assign to the logical "expert" axis; the
  model never names a mesh axis. Without active rules (or with "expert" unsharded, or too few
  tokens to split over the token shards, as in a decode step) it runs as "capacity".
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models.layers import INIT_STDDEV, Linear, param
from jaxinfer.models.mixtral_config import MixtralConfig
from sharding.constraints import active_rules
from sharding.expert_parallel import (MoEResult, capacity_moe, expert_capacity,
                                      expert_parallel_moe, jitter_router_input, route_top_k)

log = logging.getLogger(__name__)


def swiglu_experts(params: dict[str, jax.Array], xs: jax.Array) -> jax.Array:
    """Every expert on its own rows: xs [E, N, D] with params gate/up [E, D, F], down [E, F, D]
    -> [E, N, D]. The expert function handed to capacity and expert-parallel dispatch."""
    dtype = xs.dtype
    gate = jnp.einsum("end,edf->enf", xs, params["gate"].astype(dtype))
    up = jnp.einsum("end,edf->enf", xs, params["up"].astype(dtype))
    return jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, params["down"].astype(dtype))


def dropless_moe(x: jax.Array, weights: jax.Array, expert_ids: jax.Array,
                 params: dict[str, jax.Array]) -> jax.Array:
    """x [T, D]; weights float32 [T, K]; expert_ids int32 [T, K]; params as `swiglu_experts`
    -> [T, D]. Sort-based grouping + ragged_dot: every choice is served.

    Its forward may be vmapped (speculative decoding runs one sequence per vmapped row), although
    `jax.lax.ragged_dot` has no batching rule for weights shared across the batch: routing is
    per token, so a batch of token sets is served as one set of their concatenated tokens
    (`_dropless_batch_rule`), one grouped matmul per expert as without vmap."""
    return _dropless_differentiable(x, weights, expert_ids, params)


def _dropless_tokens(x: jax.Array, weights: jax.Array, expert_ids: jax.Array,
                     params: dict[str, jax.Array]) -> jax.Array:
    """`dropless_moe`'s computation (not batchable by vmap)."""
    t, k = expert_ids.shape
    num_experts = params["gate"].shape[0]
    dtype = x.dtype
    flat = expert_ids.reshape(t * k)  # [T*K], choice (t, j) at row t*K + j
    order = jnp.argsort(flat, stable=True)  # rows grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
    xs = x[order // k]  # [T*K, D]
    gate = jax.lax.ragged_dot(xs, params["gate"].astype(dtype), group_sizes)  # [T*K, F]
    up = jax.lax.ragged_dot(xs, params["up"].astype(dtype), group_sizes)
    ys = jax.lax.ragged_dot(jax.nn.silu(gate) * up, params["down"].astype(dtype),
                            group_sizes)  # [T*K, D]
    ys = ys[jnp.argsort(order)].reshape(t, k, -1)  # back to (token, choice) order
    y = jnp.sum(ys.astype(jnp.float32) * weights[..., None], axis=1)
    return y.astype(dtype)


@jax.custom_batching.custom_vmap
def _dropless_batchable(x, weights, expert_ids, params):
    return _dropless_tokens(x, weights, expert_ids, params)


@_dropless_batchable.def_vmap
def _dropless_batch_rule(axis_size, in_batched, x, weights, expert_ids, params):
    """vmap of `dropless_moe` over B token sets: x [B, T, D], weights [B, T, K], expert_ids
    [B, T, K] (each broadcast where unbatched) are served as B*T tokens in one call."""
    x_b, weights_b, ids_b, params_b = in_batched
    x, weights, expert_ids = (v if b else jnp.broadcast_to(v, (axis_size,) + v.shape)
                              for v, b in ((x, x_b), (weights, weights_b),
                                           (expert_ids, ids_b)))
    if any(jax.tree.leaves(params_b)):  # experts differ per row: nothing to share, row by row
        params = jax.tree.map(lambda v, b: v if b else jnp.broadcast_to(
            v, (axis_size,) + v.shape), params, params_b)
        return jax.lax.map(lambda a: _dropless_batchable(*a),
                           (x, weights, expert_ids, params)), True
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    # the call itself, not _dropless_tokens, so that a vmap nested in this one is handled too
    y = _dropless_batchable(x.reshape(b * t, d), weights.reshape(b * t, k),
                            expert_ids.reshape(b * t, k), params)  # [B*T, D]
    return y.reshape(b, t, d), True


# custom_vmap has no reverse-mode autodiff of its own; the gradient is that of the plain
# computation (its residuals, not a recomputation), so training is unaffected. Not covered:
# forward-mode autodiff (jax.jvp of a custom_vjp) and a gradient taken inside vmap with the
# experts shared by the rows (ragged_dot's batching rule); nothing here uses either.
@jax.custom_vjp
def _dropless_differentiable(x, weights, expert_ids, params):
    return _dropless_batchable(x, weights, expert_ids, params)


def _dropless_fwd(x, weights, expert_ids, params):
    y, vjp = jax.vjp(lambda x, w, p: _dropless_tokens(x, w, expert_ids, p), x, weights, params)
    return y, vjp


def _dropless_bwd(vjp, dy):
    dx, dweights, dparams = vjp(dy)
    return dx, dweights, None, dparams  # expert_ids are integers: no cotangent


_dropless_differentiable.defvjp(_dropless_fwd, _dropless_bwd)


class Experts(nnx.Module):
    """`num_experts` SwiGLU FFNs stacked: gate_proj, up_proj [E, embed, mlp], down_proj
    [E, mlp, embed] (HF's per-expert w1, w3, w2 transposed and stacked)."""

    def __init__(self, num_experts: int, features: int, hidden: int, *, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        def init(shape):
            return (jax.random.normal(rngs.params(), shape, jnp.float32)
                    * INIT_STDDEV).astype(param_dtype)

        self.gate_proj = param(init((num_experts, features, hidden)), ("expert", "embed", "mlp"))
        self.up_proj = param(init((num_experts, features, hidden)), ("expert", "embed", "mlp"))
        self.down_proj = param(init((num_experts, hidden, features)), ("expert", "mlp", "embed"))

    def params(self) -> dict[str, jax.Array]:
        return {"gate": self.gate_proj[...], "up": self.up_proj[...],
                "down": self.down_proj[...]}


class SparseMoE(nnx.Module):
    """Top-k routed SwiGLU experts (HF `MixtralSparseMoeBlock`): x [batch, seq, embed] ->
    MoEResult(y [batch, seq, embed], router_logits float32 [batch * seq, E], dropped).

    Router jitter (`config.router_jitter_noise` = eps, Switch Transformer): in training mode
    (`model.train()`, which clears `deterministic`) and only when a `router_key` is given, the
    router sees its input times Uniform[1-eps, 1+eps] noise; the experts see the clean input.
    (HF Mixtral jitters the experts' input too; both apply it only in training, so inference and
    HF parity are untouched.)"""

    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate = Linear(c.hidden_size, c.num_local_experts, axes=("embed", None),
                           use_bias=False, dtype=jnp.dtype(c.dtype),
                           param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
        self.experts = Experts(c.num_local_experts, c.hidden_size, c.intermediate_size,
                               param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
        self.top_k = c.num_experts_per_tok
        self.impl = c.moe_impl
        self.capacity_factor = c.capacity_factor
        self.router_jitter = c.router_jitter_noise
        self.deterministic = True  # inference mode; nnx's `model.train()` sets it to False
        self.dtype = jnp.dtype(c.dtype)

    def __call__(self, x: jax.Array, router_key: jax.Array | None = None, *,
                 dropless: bool = False) -> MoEResult:
        """x [batch, seq, embed]; router_key: PRNG key for router jitter (used only in training
        mode with router_jitter_noise > 0). dropless: route every token whatever `moe_impl`
        says (serving: capacity is shared by the whole batch, so a token's output would depend
        on what else is in it)."""
        batch, seq, d = x.shape
        tokens = x.reshape(batch * seq, d).astype(self.dtype)  # [T, D]
        router = self.gate.kernel[...]  # [D, E]
        params = self.experts.params()
        jittered = None  # [T, D] the router's input when it differs from tokens
        if not self.deterministic and router_key is not None and self.router_jitter > 0:
            jittered = jitter_router_input(tokens, router_key, self.router_jitter)
        if dropless or self.impl == "dropless":
            logits, weights, ids = route_top_k(tokens if jittered is None else jittered, router,
                                               self.top_k)
            result = MoEResult(dropless_moe(tokens, weights, ids, params), logits,
                               jnp.zeros((), jnp.int32))
        else:
            result = self._capacity_routed(tokens, router, params, jittered)
        return result._replace(y=result.y.reshape(batch, seq, d))

    def _capacity_routed(self, tokens: jax.Array, router: jax.Array,
                         params: dict[str, jax.Array], router_input: jax.Array | None
                         ) -> MoEResult:
        placement = _expert_placement() if self.impl == "expert_parallel" else None
        if placement is not None and tokens.shape[0] % math.prod(
                placement[0].shape[a] for a in placement[2]):
            # a decode step's few tokens cannot split over every token shard: route them on
            # each device redundantly (the same capacity routing as one token group)
            log.debug("%d tokens do not split over mesh axes %s: capacity routing without "
                      "expert parallelism", tokens.shape[0], placement[2])
            placement = None
        if placement is None:
            capacity = expert_capacity(tokens.shape[0], router.shape[1], self.top_k,
                                       self.capacity_factor)
            return capacity_moe(tokens, router, params, swiglu_experts, top_k=self.top_k,
                                capacity=capacity, router_input=router_input)
        mesh, expert_axis, token_axes = placement
        return expert_parallel_moe(tokens, router, params, swiglu_experts, mesh=mesh,
                                   top_k=self.top_k, capacity_factor=self.capacity_factor,
                                   expert_axis=expert_axis, token_axes=token_axes,
                                   router_input=router_input)


def _expert_placement() -> tuple[jax.sharding.Mesh, str, tuple[str, ...]] | None:
    """(mesh, expert mesh axis, token mesh axes) from the active sharding rules, or None when no
    rules are active or they leave "expert" unsharded. Tokens split over the rules' "batch" axes
    plus the expert axis."""
    active = active_rules()
    if active is None:
        return None
    table = active.table
    expert = table.get("expert")
    if isinstance(expert, (tuple, list)):
        if len(expert) != 1:
            raise ValueError(f"expert parallelism needs the logical 'expert' axis on one mesh "
                             f"axis; the rules map it to {expert!r}")
        expert = expert[0]
    if expert is None or active.mesh.shape[expert] == 1:
        log.debug("moe_impl='expert_parallel' without a sharded 'expert' axis: capacity routing")
        return None
    batch = table.get("batch") or ()
    batch = (batch,) if isinstance(batch, str) else tuple(batch)
    token_axes = tuple(a for a in active.mesh.axis_names if a in batch or a == expert)
    return active.mesh, expert, token_axes


def _token_weights(attention_mask: jax.Array | None, rows: int) -> jax.Array:
    """float32 [T]: 1 per real token, 0 per padding position, from attention_mask [batch, seq]
    (None: every token is real), in the router logits' (batch, seq) row order."""
    if attention_mask is None:
        return jnp.ones((rows,), jnp.float32)
    if attention_mask.size != rows:
        raise ValueError(f"attention_mask must hold one entry per router-logit row ({rows}); "
                         f"got shape {tuple(attention_mask.shape)}")
    return attention_mask.reshape(-1).astype(jnp.float32)


def load_balancing_loss(router_logits: Sequence[jax.Array], num_experts: int, top_k: int,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """HF Mixtral's `load_balancing_loss_func` (Switch Transformer eq. 4-6, counting all k
    choices): E * sum_e f_e * P_e over the tokens of all layers, where f_e is the fraction of
    token-choices routed to expert e (divided by tokens, so it sums to k) and P_e the mean router
    probability. router_logits: one [batch * seq, E] array per layer; attention_mask
    [batch, seq] (1 = real token) excludes padding: f_e and P_e are sums over the real tokens
    divided by their count, over the whole (global) batch, so a sharded batch gives the same
    value. Returns a float32 scalar (0 when no token is real). Training weighs it by
    `MixtralConfig.router_aux_loss_coef` (`MixtralForCausalLM.aux_loss_weights`).

    Layers are pooled as HF pools them: counts and probability sums are added per expert index
    over layers before the product, so the value has cross-layer terms f_e(l) * P_e(l') and
    depends on how expert ids line up across layers. Permuting each layer's experts differently
    (`apply_expert_placement`) changes it, though the model's function, its drops, the z-loss,
    each layer's own loss (`load_balancing_loss([logits_l], ...)`) and the pooled loss under one
    permutation shared by every layer are unchanged (up to router ties at the k-th choice, which
    top-k breaks by expert index). Kept as HF defines it, for parity with HF training of the
    same checkpoints."""
    if not router_logits:
        raise ValueError("router_logits must hold one [tokens, experts] array per layer; got none")
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    for logits in router_logits:  # [T, E]
        weight = _token_weights(attention_mask, logits.shape[0])  # [T]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, ids = jax.lax.top_k(probs, top_k)  # [T, K]
        choices = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)  # [T, K, E]
        counts = counts + jnp.einsum("tke,t->e", choices, weight)
        prob_sum = prob_sum + jnp.einsum("te,t->e", probs, weight)
        rows = rows + jnp.sum(weight)
    rows = jnp.maximum(rows, 1.0)  # a batch of padding alone: counts are 0, so is the loss
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(router_logits: Sequence[jax.Array],
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE's router z-loss (weight `MixtralConfig.router_z_loss_coef`; ST-MoE used 1e-3): the
    mean over layers and real tokens of (logsumexp_e logits[t, e])^2, which keeps router logits
    small so the float32 softmax stays well-conditioned. router_logits: one [tokens, E] array
    per layer; attention_mask [batch, seq] (1 = real token; None: all) leaves padding out: a sum
    over the real tokens divided by their global count. Returns a float32 scalar (0 when no
    token is real)."""
    if not router_logits:
        raise ValueError("router_logits must hold one [tokens, experts] array per layer; got none")
    total = jnp.zeros((), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    for logits in router_logits:  # [T, E]
        weight = _token_weights(attention_mask, logits.shape[0])  # [T]
        z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [T]
        total = total + jnp.sum(weight * z * z)
        rows = rows + jnp.sum(weight)
    return total / jnp.maximum(rows, 1.0)
