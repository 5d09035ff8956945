"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a Flax NNX module.

The parameter tree mirrors Hugging Face's module names (`layers[i].self_attn.q_proj.kernel`) so that
checkpoint conversion is a rename plus a transpose. `__call__` is a plain traceable forward pass;
`forward` adds the KV cache that generation uses; `forward_paged` runs a flat batch of tokens from
many sequences over the serving engine's paged KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import LlamaConfig
from jaxinfer.models.attention import cached_attention, causal_attention, paged_attention
from jaxinfer.models.inputs import check_input_ids
from jaxinfer.models.kv_cache import KVCache, LayerKV
from jaxinfer.models.layers import Embedding, Linear, RMSNorm, SwiGLU
from jaxinfer.models.paged_kv import PagedBatch, PagedKVCache, PagedLayerKV
from jaxinfer.models.rope import apply_rotary, inverse_frequencies, rotary_tables
from sharding import constrain

# Logical names of activation dimensions (sharding/rules.py maps them to mesh axes).
RESIDUAL = ("batch", "res_seq", "act_embed")
Q_AXES = ("batch", "seq", "act_heads", "head_dim")
KV_AXES = ("batch", "seq", "act_kv_heads", "head_dim")
CACHE_AXES = ("batch", "cache_seq", "act_kv_heads", "head_dim")
LOGITS = ("batch", "seq", "act_vocab")
# LlamaConfig.remat -> what the backward pass keeps of a layer (None: only the layer's inputs);
# "dots" keeps the projections' outputs, not attention's batched score products
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class SelfAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim,
                             axes=("embed", "heads"), use_bias=c.qkv_bias, **kw)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim,
                             axes=("embed", "kv_heads"), use_bias=c.qkv_bias, **kw)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim,
                             axes=("embed", "kv_heads"), use_bias=c.qkv_bias, **kw)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size,
                             axes=("heads", "embed"), use_bias=c.o_bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.sliding_window = c.sliding_window
        self.attention_backend = c.attention_backend
        self.sequence_parallel = c.sequence_parallel

    def _project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [batch, T, embed] -> rotated q [batch, T, Hq, D]; rotated k, v [batch, T, Hkv, D]."""
        batch, t, _ = x.shape
        q = constrain(self.q_proj(x).reshape(batch, t, self.num_heads, self.head_dim), Q_AXES)
        k = constrain(self.k_proj(x).reshape(batch, t, self.num_kv_heads, self.head_dim), KV_AXES)
        v = constrain(self.v_proj(x).reshape(batch, t, self.num_kv_heads, self.head_dim), KV_AXES)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def paged(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv: PagedLayerKV,
              meta: PagedBatch) -> tuple[jax.Array, PagedLayerKV, jax.Array]:
        """x [1, T, embed]: T tokens of many sequences. Writes their K/V into the pages first, then
        each sequence's tokens attend over its own first `meta.kv_lengths` cached keys. Also returns
        the rotated queries [T, Hq, D] (SnapKV's observation window is taken from them)."""
        _, t, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        kv = kv.write(k[0], v[0], meta.write_slots)
        out = paged_attention(q[0], kv, meta, backend=self.attention_backend)  # [T, Hq, D]
        return self.o_proj(out.reshape(1, t, self.num_heads * self.head_dim)), kv, q[0]

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 kv: LayerKV | None, start: jax.Array) -> tuple[jax.Array, LayerKV | None]:
        batch, t, _ = x.shape  # x [batch, T, embed]
        q, k, v = self._project(x, cos, sin)
        if kv is None:
            out = causal_attention(q, k, v, sliding_window=self.sliding_window,
                                   backend=self.attention_backend,
                                   sequence_parallel=self.sequence_parallel)
        else:
            kv = kv.write(k, v, start)
            kv = LayerKV(constrain(kv.k, CACHE_AXES), constrain(kv.v, CACHE_AXES))
            out = cached_attention(q, kv.k.astype(q.dtype), kv.v.astype(q.dtype), positions,
                                   sliding_window=self.sliding_window)  # cache [batch, max_len, Hkv, D]
        out = constrain(out, Q_AXES)
        return self.o_proj(out.reshape(batch, t, self.num_heads * self.head_dim)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps,
                                       param_dtype=jnp.dtype(c.param_dtype))
        self.self_attn = SelfAttention(c, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps,
                                                param_dtype=jnp.dtype(c.param_dtype))
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias,
                          dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)

    def __call__(self, x, cos, sin, positions, kv, start):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, positions, kv, start)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def paged(self, x, cos, sin, kv: PagedLayerKV, meta: PagedBatch):
        h, kv, q = self.self_attn.paged(self.input_layernorm(x), cos, sin, kv, meta)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv, q


def _call_layer(layer: nnx.Module, *args):
    return layer(*args)


class DecoderLM(nnx.Module):
    """What every decoder here shares: token embedding, a stack of layers (``make_layer()`` each),
    the final norm and the tied or untied LM head, the checked ``__call__``, the dense KV cache and
    the paged forward the serving engine runs (each layer's ``paged`` method). Subclasses define
    ``forward``."""

    def __init__(self, config: LlamaConfig, make_layer, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype),
                                      param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
        self.layers = nnx.List([make_layer() for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=jnp.dtype(c.param_dtype))
        self.lm_head = None if c.tie_word_embeddings else Linear(
            c.hidden_size, c.vocab_size, axes=("embed", "vocab"), use_bias=False,
            dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)

    def layer_caller(self):
        """How forward calls a decoder layer, `call(layer, *args)`: directly, or under `nnx.remat`
        with the policy `config.remat` names, so that the backward pass recomputes what the
        policy does not keep."""
        if self.config.remat == "none":
            return _call_layer
        return nnx.remat(_call_layer, policy=REMAT_POLICIES[self.config.remat])

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        input_ids = check_input_ids(input_ids, self.config)
        logits, _ = self.forward(jnp.asarray(input_ids))
        return logits

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        cache = KVCache.zeros(c.num_hidden_layers, batch, max_len, c.num_key_value_heads,
                              c.head_dim, jnp.dtype(c.dtype))
        return jax.tree.map(lambda a: constrain(a, CACHE_AXES), cache)

    def positions_and_rotary(self, batch: int, t: int, start: jax.Array | int):
        """int32 positions [batch, T] = start..start+T-1 and their rotary tables (cos, sin)."""
        start = jnp.asarray(start, jnp.int32)
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (batch, t))
        return start, positions, rotary_tables(positions, inverse_frequencies(self.config))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: x [batch, T, embed] -> float32 logits [batch, T, vocab]."""
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits, LOGITS).astype(jnp.float32)

    def init_paged_cache(self, num_pages: int, page_size: int,
                         kv_dtype: jnp.dtype | str | None = None) -> PagedKVCache:
        """An empty page pool in kv_dtype (None: the model's dtype; "int8": quantized pages)."""
        c = self.config
        return PagedKVCache.zeros(c.num_hidden_layers, num_pages, page_size,
                                  c.num_key_value_heads, c.head_dim,
                                  jnp.dtype(c.dtype if kv_dtype is None else kv_dtype))

    def forward_paged(self, input_ids: jax.Array, meta: PagedBatch, cache: PagedKVCache,
                      logit_rows: jax.Array, observe_rows: jax.Array | None = None) -> tuple:
        """One flat batch of T tokens from many sequences over the paged KV cache.

        input_ids int32 [T]; meta: positions (for RoPE) and K/V write slots per token, runs of
        tokens, page-table rows and attention lengths per sequence (a SnapKV-compressed sequence
        attends over fewer cached keys than its position); logit_rows int32 [R]: the tokens
        whose next-token logits are wanted (the last token of each sequence in the batch), so
        the vocabulary projection runs on R rows, not T. Returns logits float32 [R, vocab] and the cache with the T tokens' K/V
        written; with observe_rows int32 [W] also every layer's rotated queries of those tokens,
        [layers, W, Hq, D] (SnapKV's observation window)."""
        positions = meta.positions[None]  # [1, T]
        cos, sin = rotary_tables(positions, inverse_frequencies(self.config))
        x = self.embed_tokens(input_ids[None])  # [1, T, embed]
        new_layers, queries = [], []
        for layer, kv in zip(self.layers, cache.layers):
            x, kv, q = layer.paged(x, cos, sin, kv, meta)
            new_layers.append(kv)
            if observe_rows is not None:
                queries.append(q[observe_rows])  # [W, Hq, D]
        x = self.norm(x[:, logit_rows])  # [1, R, embed]
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        out = logits[0].astype(jnp.float32), PagedKVCache(tuple(new_layers))
        return out if observe_rows is None else (*out, jnp.stack(queries))


class LlamaForCausalLM(DecoderLM):
    """Token ids [batch, seq] -> next-token logits float32 [batch, seq, vocab]."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, lambda: DecoderLayer(config, rngs=rngs), rngs=rngs)

    def forward(self, input_ids: jax.Array, cache: KVCache | None = None,
                start: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        """Logits for input_ids [batch, T] at positions start..start+T-1, reading and extending
        `cache` when given (prefill: start=0 with the whole prompt; decode: one token at a time)."""
        start, positions, (cos, sin) = self.positions_and_rotary(*input_ids.shape, start)
        x = constrain(self.embed_tokens(input_ids), RESIDUAL)  # [batch, T, embed]
        new_layers, call = [], self.layer_caller()
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layers[i]
            x, kv = call(layer, x, cos, sin, positions, kv, start)
            x = constrain(x, RESIDUAL)
            new_layers.append(kv)
        new_cache = None if cache is None else KVCache(tuple(new_layers))
        return self.logits(x), new_cache

