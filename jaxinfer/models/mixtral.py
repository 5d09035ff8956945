"""Mixtral-style sparse MoE decoder: Llama/Mistral attention blocks whose MLP is a top-k routed
mixture of SwiGLU experts (jaxinfer/models/moe.py), as a Flax NNX module.

The interface matches `LlamaForCausalLM` (`__call__`, `init_cache`, `forward`), so
`jaxinfer.generate` runs it unchanged. With a KV cache (generation, serving) routing is dropless
whatever `moe_impl`, so a prompt's tokens never depend on the rest of the batch or on the mesh.
`forward_with_routing` also returns every layer's router logits (for routing statistics) and
the capacity-drop counts. Training asks the model for its
auxiliary losses (`forward_with_aux_losses`, `aux_loss_weights`: the router losses of
`jaxinfer.models.moe`, weighted by the config), so jaxinfer.train optimises them without knowing
what a router is.
Parameter names mirror HF's module names (`layers[i].block_sparse_moe.gate.kernel`,
`...experts.gate_proj` stacked over experts); jaxinfer/checkpoint/hf_mixtral.py converts them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.models.kv_cache import KVCache, LayerKV
from jaxinfer.models.layers import RMSNorm
from jaxinfer.models.llama import DecoderLM, SelfAttention
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.models.paged_kv import PagedBatch, PagedLayerKV
from jaxinfer.models.moe import SparseMoE, load_balancing_loss, router_z_loss
from sharding.placement import permute_experts


class RoutingOutput(NamedTuple):
    """A forward pass's routing record: router_logits float32 [layers, batch * seq, E] and
    dropped int32 [layers] (token-choices dropped by capacity routing; 0 when dropless)."""

    router_logits: jax.Array
    dropped: jax.Array


class MixtralDecoderLayer(nnx.Module):
    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.self_attn = SelfAttention(c, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.block_sparse_moe = SparseMoE(c, rngs=rngs)

    def __call__(self, x, cos, sin, positions, kv: LayerKV | None, start,
                 segment_ids: jax.Array | None = None, router_key: jax.Array | None = None, *,
                 layout: str = "contiguous", prefill: bool = False):
        """x [batch, T, embed] -> (x, kv, router_logits [batch * T, E], dropped). router_key:
        this layer's router-jitter key (training only; see SparseMoE); segment_ids, layout,
        prefill: as in `SelfAttention`.

        With a KV cache (inference: `jaxinfer.generate`'s prefill and decode steps, speculative
        decoding) routing is dropless whatever the config's `moe_impl`, as in `paged`: capacity
        is shared by every token of the batch, so under capacity routing a prompt's tokens would
        depend on the other prompts in the batch and on the mesh. Without a cache (training,
        scoring a batch) `moe_impl` applies."""
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, positions, kv, start,
                               segment_ids, layout=layout, prefill=prefill)
        x = x + h
        moe = self.block_sparse_moe(self.post_attention_layernorm(x), router_key,
                                    dropless=kv is not None)
        return x + moe.y, kv, moe.router_logits, moe.dropped

    def paged(self, x, cos, sin, kv: PagedLayerKV, meta: PagedBatch):
        """The serving engine's layer over the paged KV cache (as DecoderLayer.paged): x [1, T,
        embed] -> (x, kv, rotated queries [T, Hq, D]). Routing is dropless and without jitter
        whatever the config's `moe_impl`, so a request's tokens never depend on the rest of the
        step."""
        h, kv, q = self.self_attn.paged(self.input_layernorm(x), cos, sin, kv, meta)
        x = x + h
        moe = self.block_sparse_moe(self.post_attention_layernorm(x), dropless=True)
        return x + moe.y, kv, q


class MixtralForCausalLM(DecoderLM):
    """Token ids [batch, seq] -> next-token logits float32 [batch, seq, vocab]."""

    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MixtralConfig):
            raise TypeError(f"config must be a MixtralConfig; got {type(config).__name__}")
        super().__init__(config, lambda: MixtralDecoderLayer(config, rngs=rngs), rngs=rngs)

    def zigzag_shards(self, seq_len: int) -> int:
        """As `DecoderLM.zigzag_shards`, but 1 (the ring in natural order) unless routing is
        dropless: under capacity routing which tokens overflow an expert depends on their order,
        so only dropless routing computes in the zig-zag layout what the single device does."""
        return super().zigzag_shards(seq_len) if self.config.moe_impl == "dropless" else 1

    def forward(self, input_ids: jax.Array, cache: KVCache | None = None,
                start: jax.Array | int = 0, *, segment_ids: jax.Array | None = None,
                layout: str = "contiguous") -> tuple[jax.Array, KVCache | None]:
        """Logits for input_ids [batch, T] at positions start..start+T-1 (as LlamaForCausalLM,
        segment_ids and layout too). With a cache, routing is dropless whatever `moe_impl`
        (see `MixtralDecoderLayer.__call__`), so `jaxinfer.generate` gives each prompt the
        tokens it gets alone, on any mesh."""
        logits, cache, _ = self.forward_with_routing(input_ids, cache, start,
                                                     segment_ids=segment_ids, layout=layout)
        return logits, cache

    def forward_with_routing(self, input_ids: jax.Array, cache: KVCache | None = None,
                             start: jax.Array | int = 0, *, router_key: jax.Array | None = None,
                             segment_ids: jax.Array | None = None, layout: str = "contiguous"
                             ) -> tuple[jax.Array, KVCache | None, RoutingOutput]:
        """`forward` plus every layer's router logits and capacity-drop count. router_key: PRNG
        key for router jitter (`config.router_jitter_noise`), applied only in training mode
        (`model.train()`); layer i uses fold_in(router_key, i). Without it routing is exact.
        segment_ids int32 [batch, T], layout: packed documents and token order, as in
        `LlamaForCausalLM.forward`."""
        def router_key_of(i: int) -> tuple[jax.Array | None]:
            return (None if router_key is None else jax.random.fold_in(router_key, i),)

        logits, new_cache, outputs = self.run_layers(input_ids, cache, start, segment_ids,
                                                     layout, router_key_of)
        router_logits, dropped = zip(*outputs)  # layers x [batch * T, E], layers x []
        return logits, new_cache, RoutingOutput(jnp.stack(router_logits), jnp.stack(dropped))

    def forward_with_aux_losses(self, input_ids: jax.Array, *, key: jax.Array | None = None,
                                segment_ids: jax.Array | None = None,
                                layout: str = "contiguous",
                                token_mask: jax.Array | None = None
                                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training forward: logits float32 [batch, T, vocab] for input_ids [batch, T] and
        the router losses over all layers' router logits, unweighted float32 scalars:
        {"load_balancing_loss": Switch/HF load balancing, "router_z_loss": ST-MoE z-loss}.
        key: router-jitter key (see `forward_with_routing`); segment_ids, layout: packed
        documents and token order (`LlamaForCausalLM.forward`).

        The router losses count real tokens only: token_mask [batch, T] (bool or 0/1, in the
        order of input_ids; the train step passes it) marks them, and without one the
        non-padding positions of segment_ids (id != 0) are the real tokens, or every position
        when there are none. Padding is routed like any token, but it is not the data whose
        balance or logit scale the losses regularise."""
        if token_mask is None and segment_ids is not None:
            token_mask = segment_ids != 0
        if token_mask is not None and tuple(token_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"token_mask must have input_ids' shape {list(input_ids.shape)}; "
                             f"got {list(token_mask.shape)}")
        logits, _, routing = self.forward_with_routing(input_ids, router_key=key,
                                                       segment_ids=segment_ids, layout=layout)
        router_logits = list(routing.router_logits)  # layers x [batch * T, E]
        c = self.config
        return logits, {
            "load_balancing_loss": load_balancing_loss(router_logits, c.num_local_experts,
                                                       c.num_experts_per_tok, token_mask),
            "router_z_loss": router_z_loss(router_logits, token_mask)}

    def aux_loss_weights(self) -> dict[str, float]:
        """The config's weight of each loss of `forward_with_aux_losses` in the training loss.
        The load-balancing loss counts only when `output_router_logits` is set, as in HF."""
        c = self.config
        return {"load_balancing_loss": c.router_aux_loss_coef if c.output_router_logits else 0.0,
                "router_z_loss": c.router_z_loss_coef}


def apply_expert_placement(model: MixtralForCausalLM, perm: np.ndarray) -> None:
    """Reorder every layer's experts in place so that new expert s of layer l is old expert
    perm[l, s] (router columns and stacked weights together: the model computes the same
    function, tied routes aside, below). With perm =
    sharding.placement.placement_permutation(device_of), contiguous sharding of the "expert"
    axis puts each expert on the device the placement chose.

    Unchanged: logits, router choices (under new ids), capacity drops, the router z-loss and
    each layer's own load-balancing loss. Changed where layers get different permutations: the
    pooled load-balancing loss of `forward_with_aux_losses`, HF's definition, which multiplies
    expert s's statistics of one layer by expert s's of another (`moe.load_balancing_loss`).

    Tied routes: "unchanged" holds for every token whose router probabilities do not tie across
    its k-th choice. Top-k breaks a tie by the lower expert index, which a permutation changes,
    so a tied token can be served by another of the tied experts and the logits change (a
    zero-initialised router ties everywhere; trained or random float routers practically never
    tie exactly). Routing is left as it is.

    The model is mutated, not copied, and nothing else is permuted: apply a placement before
    training starts (or before serving), not mid-run. An optimizer state made earlier holds
    moments in the old expert order; permute its expert leaves ([E, ...] and the router's
    [D, E] columns) by the same perm per layer, or re-create it. The model cannot tell whether
    such a state exists, so this is not checked."""
    perm = np.asarray(perm)
    want = (model.config.num_hidden_layers, model.config.num_local_experts)
    if perm.shape != want:
        raise ValueError(f"perm must be [layers, experts] = {list(want)}; got {list(perm.shape)}")
    for layer, p in zip(model.layers, perm):
        moe = layer.block_sparse_moe
        names = ("gate_proj", "up_proj", "down_proj")
        router, experts = permute_experts(
            moe.gate.kernel[...], {n: getattr(moe.experts, n)[...] for n in names}, p)
        moe.gate.kernel[...] = router
        for n in names:
            getattr(moe.experts, n)[...] = experts[n]
