"""The jitted train and eval steps: pure functions of (params, optimizer state, batch).

The model structure (`graphdef`) and the optimizer are static arguments, so every run with the
same architecture and optimizer settings reuses one compiled step (optimizers come from a cached
factory).

The training loss is the model's business: mean next-token cross-entropy plus, for a model that
carries auxiliary losses (Mixtral's router losses), each of them times its weight. Such a model
defines

    forward_with_aux_losses(input_ids, *, key[, segment_ids, layout, token_mask])
        -> (logits [B, L, vocab], {name: float32 scalar})
    aux_loss_weights() -> {name: weight}        # from its config

and a model without them (Llama, Hyena) trains on next-token loss through its `forward`. The
weights can be overridden per call (`loss_weights`); they are traced, so runs that differ only in
loss weights share one compile. The step runs the model in training mode (nnx `train()`) with a
PRNG `key` for its stochastic layers (Mixtral's router jitter). Evaluation stays next-token loss
alone (perplexity).

Packed batches: with `segment_ids` int32 [B, L+1] beside the tokens (jaxinfer.train.data's
`PackedDocuments`), the model attends within each document and the mean cross-entropy counts only
targets in their input's document: the first token of a document (its target position belongs to
the previous one) and padding (segment id 0) are left out, so the loss is the token-weighted mean
of the documents' own losses. Without segment ids every target counts, as before. Auxiliary
losses get `token_mask` [B, L], the inputs that are not padding, so that statistics over tokens
(Mixtral's router losses) count real tokens only: sums over them divided by their global count.

Zig-zag: when the active sharding rules run causal attention as a ring over P > 1 devices
(`DecoderLM.zigzag_shards`), `training_loss` permutes inputs, targets, segment ids and loss
weights once into the ring's zig-zag layout and the model runs with layout="zigzag"; the mean
loss does not depend on the order of its terms, so nothing is permuted back. (A capacity-routed
MoE keeps the natural order: which tokens overflow an expert depends on it; see
`MixtralForCausalLM.zigzag_shards`.)
"""

from __future__ import annotations

import functools
import inspect
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sharding import zigzag_permute

LossWeights = Mapping[str, float | jax.Array]  # auxiliary-loss name -> weight (a scalar)


class StepOutput(NamedTuple):
    """`train_step_with_losses`' result: the updated params and optimizer state, the loss the
    update optimised and the gradient's global norm (as `train_step`), and that loss's parts,
    unweighted: "next_token_loss" and each auxiliary loss of the model. Losses are means over the
    micro-batches."""

    params: nnx.State
    opt_state: optax.OptState
    loss: jax.Array
    grad_norm: jax.Array
    losses: dict[str, jax.Array]


def target_weights(segment_ids: jax.Array) -> jax.Array:
    """float32 [..., L] from segment_ids int [..., L+1]: 1 where target t+1 lies in the document
    of input t (same id, not padding 0), else 0."""
    same = segment_ids[..., 1:] == segment_ids[..., :-1]
    return (same & (segment_ids[..., :-1] != 0)).astype(jnp.float32)


def _cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array | None
                       ) -> tuple[jax.Array, jax.Array | float]:
    """(sum, count): the cross-entropy of logits float32 [B, L, vocab] against targets int
    [B, L] summed over the targets with weight 1 (all of them when weights is None), and how
    many those are. A mean divides one by the other."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
    if weights is None:
        return jnp.sum(ce), float(ce.size)
    return jnp.sum(ce * weights), jnp.sum(weights)


def _mean(total: jax.Array, count: jax.Array | float) -> jax.Array:
    """total / count, 0 where nothing was counted (a packed batch of padding alone)."""
    return total / jnp.maximum(count, 1.0)


def takes_segment_ids(model) -> bool:
    """Whether the model's forward takes `segment_ids`, so that it can train on packed
    documents (Llama, Mixtral; not Hyena)."""
    return "segment_ids" in inspect.signature(model.forward).parameters


def check_packing_support(model) -> None:
    """ValueError unless the model can train on packed documents (`takes_segment_ids`)."""
    if not takes_segment_ids(model):
        raise ValueError(f"segment_ids (packed documents) need a model whose forward takes them; "
                         f"{type(model).__name__} does not")


def _check_packing(model, batch: jax.Array, segment_ids: jax.Array | None) -> dict:
    """forward's packing keyword ({} or {"segment_ids": inputs' ids}) after checking them."""
    if segment_ids is None:
        return {}
    if tuple(segment_ids.shape) != tuple(batch.shape):
        raise ValueError(f"segment_ids must have the batch's shape {list(batch.shape)}; got "
                         f"{list(segment_ids.shape)}")
    check_packing_support(model)
    return {"segment_ids": segment_ids[:, :-1]}


def _next_token_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array,
                     segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array | float]:
    """(sum, count) of the cross-entropies of predicting batch[:, 1:] from batch[:, :-1] over
    the counted targets (`_cross_entropy_sum`); batch int32 [B, L+1], segment_ids None or int32
    [B, L+1] (packed documents; see the module docstring)."""
    model = nnx.merge(graphdef, params)
    packing = _check_packing(model, batch, segment_ids)
    logits, _ = model.forward(batch[:, :-1], **packing)  # [B, L, vocab] float32
    weights = None if segment_ids is None else target_weights(segment_ids)
    return _cross_entropy_sum(logits, batch[:, 1:], weights)


def _resolve_loss_weights(defaults: Mapping[str, float], overrides: LossWeights | None
                          ) -> dict[str, float | jax.Array]:
    """The model's auxiliary-loss weights with `overrides` replacing some of them."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"loss_weights must name auxiliary losses of the model, "
                         f"{sorted(defaults)}; got {unknown}")
    return {**defaults, **overrides}


def _loss_terms(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array,
                key: jax.Array | None, loss_weights: LossWeights | None,
                segment_ids: jax.Array | None):
    """The parts `training_loss` and the accumulating step combine, for batch int32 [B, L+1]:
    (cross-entropy sum, counted targets, sum of weight * auxiliary loss, {aux name: unweighted
    aux loss}), the model in training mode (arguments as `training_loss`)."""
    model = nnx.merge(graphdef, params)
    model.train()
    has_aux = hasattr(model, "forward_with_aux_losses")
    weights = _resolve_loss_weights(model.aux_loss_weights() if has_aux else {}, loss_weights)
    packing = _check_packing(model, batch, segment_ids)
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, L] each
    token_weights = None if segment_ids is None else target_weights(segment_ids)  # [B, L]
    shards = model.zigzag_shards(inputs.shape[1]) if hasattr(model, "zigzag_shards") else 1
    if shards > 1:  # the ring's balanced layout: permute once, the mean needs no way back
        inputs, targets, token_weights, packing = jax.tree.map(
            lambda x: zigzag_permute(x, shards), (inputs, targets, token_weights, packing))
        packing["layout"] = "zigzag"
    if has_aux:  # auxiliary losses over real input tokens only: padding (id 0) is left out
        real = {} if segment_ids is None else {"token_mask": packing["segment_ids"] != 0}
        logits, aux = model.forward_with_aux_losses(inputs, key=key, **packing,
                                                    **real)  # [B, L, vocab]
    else:
        (logits, _), aux = model.forward(inputs, **packing), {}
    ce_sum, count = _cross_entropy_sum(logits, targets, token_weights)
    weighted_aux = sum((weights[name] * value for name, value in aux.items()), jnp.float32(0))
    return ce_sum, count, weighted_aux, aux


def training_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array,
                  key: jax.Array | None = None, loss_weights: LossWeights | None = None,
                  segment_ids: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss `train_step` optimises on batch int32 [B, L+1] -> (loss, parts): mean next-token
    cross-entropy + sum over the model's auxiliary losses of weight * loss, the model in training
    mode. parts: {"next_token_loss": cross-entropy, <aux name>: unweighted aux loss, ...}.
    key: PRNG key for the model's stochastic layers (None: they run deterministically);
    loss_weights: overrides of `model.aux_loss_weights()`; segment_ids: None or int32 [B, L+1],
    packed documents (module docstring). Under a causal ring the tokens run in the zig-zag
    layout (module docstring)."""
    ce_sum, count, weighted_aux, aux = _loss_terms(graphdef, params, batch, key, loss_weights,
                                                   segment_ids)
    ce = _mean(ce_sum, count)
    return ce + weighted_aux, {"next_token_loss": ce, **aux}


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def train_step_with_losses(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                           params: nnx.State, opt_state: optax.OptState, batches: jax.Array,
                           key: jax.Array | None = None,
                           loss_weights: LossWeights | None = None,
                           segment_ids: jax.Array | None = None) -> StepOutput:
    """One optimizer update on `training_loss` over all of batches int32 [accum, B, L+1] ->
    StepOutput, the `accum` micro-batches run one at a time (a scan, so activations of one
    micro-batch are live at a time) and their gradients summed before the single update; each
    micro-batch gets its own split of `key`. segment_ids: None or int32 [accum, B, L+1].

    The cross-entropy is the mean over every counted target of the step, as one batch of
    accum * B rows gives: each micro-batch's cross-entropy sum is divided by the step's count of
    targets, known from segment_ids before the scan (without them every micro-batch counts
    B * L), so packed micro-batches with unequal counts weigh by their tokens. A loss that is not
    a mean over tokens (load balancing) is averaged per micro-batch, as HF's gradient
    accumulation does."""
    n, b, width = batches.shape
    counted = (float(n * b * (width - 1)) if segment_ids is None
               else jnp.sum(target_weights(segment_ids)))  # targets over all micro-batches

    def micro_loss(p, batch, k, segs):
        ce_sum, _, weighted_aux, aux = _loss_terms(graphdef, p, batch, k, loss_weights, segs)
        return _mean(ce_sum, counted) + weighted_aux / n, (ce_sum, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    keys = None if key is None else jax.random.split(key, n)  # [accum]

    def accumulate(grad_sum, micro):
        batch, micro_key, segs = micro
        (loss, (ce_sum, aux)), grads = grad_fn(params, batch, micro_key, segs)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, ce_sum, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, ce_sums, aux) = jax.lax.scan(
        accumulate, zeros, (batches, keys, segment_ids))  # losses, ce_sums [accum]
    parts = {"next_token_loss": _mean(jnp.sum(ce_sums), counted), **jax.tree.map(jnp.mean, aux)}
    updates, opt_state = tx.update(grads, opt_state, params)
    return StepOutput(optax.apply_updates(params, updates), opt_state, jnp.sum(losses),
                      optax.global_norm(grads), parts)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State,
               opt_state: optax.OptState, batches: jax.Array, key: jax.Array | None = None,
               loss_weights: LossWeights | None = None, segment_ids: jax.Array | None = None):
    """One optimizer update from batches int32 [accum, B, L+1] (and their segment_ids, packed)
    -> (params, opt_state, loss, grad_norm): `train_step_with_losses` without the breakdown of
    the loss."""
    return tuple(train_step_with_losses(graphdef, tx, params, opt_state, batches, key,
                                        loss_weights, segment_ids)[:4])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy of batch int32 [B, L+1] (no auxiliary losses, no jitter;
    segment_ids None or int32 [B, L+1] for a packed batch) as (sum, count) float32 scalars, the
    cross-entropy summed over the counted targets and their number, so that a held-out loss over
    several batches is the mean over all their targets: sum of sums / sum of counts."""
    total, count = _next_token_sums(graphdef, params, batch, segment_ids)
    return total, jnp.asarray(count, jnp.float32)


def held_out_loss(graphdef: nnx.GraphDef, params: nnx.State,
                  batches: list[tuple[jax.Array, jax.Array | None]]) -> float:
    """Mean next-token cross-entropy over every counted target of `batches`, each (tokens int32
    [B, L+1], segment ids int32 [B, L+1] or None): packed batches weigh by their targets."""
    sums = [eval_sums(graphdef, params, *b) for b in batches]
    return float(sum(s for s, _ in sums) / max(float(sum(c for _, c in sums)), 1.0))
