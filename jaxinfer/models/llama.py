"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a Flax NNX module.

The parameter tree mirrors Hugging Face's module names (`layers[i].self_attn.q_proj.kernel`) so that
checkpoint conversion is a rename plus a transpose. `__call__` is a plain traceable forward pass;
`forward` adds the KV cache that generation uses; `forward_paged` runs a flat batch of tokens from
many sequences over the serving engine's paged KV cache.

Packed sequences: without a cache, `segment_ids` int32 [batch, T] marks contiguous runs of tokens
(documents) that share a row; id 0 is padding. A token attends only within its run and RoPE
positions restart at 0 at each run's start, so each document is computed exactly as if it were
alone. Only runs matter, not the ids' values: an id used again later in the row starts a new
document (`segment_runs`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import LlamaConfig
from jaxinfer.models.attention import (cached_attention, causal_attention, paged_attention,
                                       prefill_attention, ring_shards)
from jaxinfer.models.inputs import check_input_ids, check_segment_ids, known_start
from jaxinfer.models.kv_cache import KVCache, LayerKV
from jaxinfer.models.layers import (LOGITS, RESIDUAL, CausalLM, Linear, RMSNorm, SwiGLU,
                                     column_parallel, output_logits, row_parallel)
from jaxinfer.models.paged_kv import PagedBatch, PagedKVCache, PagedLayerKV
from jaxinfer.models.rope import apply_rotary, inverse_frequencies, rotary_tables
from sharding import constrain, zigzag_permute, zigzag_unpermute

# Logical names of activation dimensions (sharding/rules.py maps them to mesh axes); RESIDUAL,
# the residual stream's, and LOGITS come from layers.py.
Q_AXES = ("batch", "seq", "act_heads", "head_dim")
KV_AXES = ("batch", "seq", "act_kv_heads", "head_dim")
CACHE_AXES = ("batch", "cache_seq", "act_kv_heads", "head_dim")
SEQUENCE_LAYOUTS = ("contiguous", "zigzag")  # token orders forward takes (causal_attention)


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
        """x [batch, T, embed] (residual layout) -> rotated q [batch, T, Hq, D]; rotated k, v
        [batch, T, Hkv, D]. Column-parallel: under tp_sp x is all-gathered once for all three."""
        batch, t, _ = x.shape
        q, k, v = column_parallel((self.q_proj, self.k_proj, self.v_proj), x)
        q = constrain(q.reshape(batch, t, self.num_heads, self.head_dim), Q_AXES)
        k = constrain(k.reshape(batch, t, self.num_kv_heads, self.head_dim), KV_AXES)
        v = constrain(v.reshape(batch, t, self.num_kv_heads, self.head_dim), KV_AXES)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def paged(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv: PagedLayerKV,
              meta: PagedBatch) -> tuple[jax.Array, PagedLayerKV, jax.Array]:
        """x [1, T, embed]: T tokens of many sequences. Writes their K/V into the pages first, then
        each sequence's tokens attend over its own first `meta.kv_lengths` cached keys. Also returns
        the rotated queries [T, Hq, D] (SnapKV's observation window is taken from them)."""
        _, t, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        kv = kv.write(k[0], v[0], meta.write_slots)
        out = paged_attention(q[0], kv, meta, backend=self.attention_backend,
                              sliding_window=self.sliding_window)  # [T, Hq, D]
        return self.o_proj(out.reshape(1, t, self.num_heads * self.head_dim)), kv, q[0]

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 kv: LayerKV | None, start: jax.Array | int, segment_ids: jax.Array | None = None,
                 *, layout: str = "contiguous", prefill: bool = False
                 ) -> tuple[jax.Array, LayerKV | None]:
        """x [batch, T, embed] at `positions` [batch, T]; segment_ids int32 [batch, T] (packed
        documents' run ids, `segment_runs`; no cache) and layout (the token order, see
        `causal_attention`).

        With a cache the K/V are written at `start`. With `prefill` (a static flag: start is 0
        and the cache empty, decided by forward outside any remat, which would trace `start`)
        the queries see only their own K/V, so they attend through `prefill_attention`
        (flash_attention: memory linear in T, the configured backend); later calls (decode,
        chunks) attend over the cache."""
        batch, t, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        if kv is None:
            out = causal_attention(q, k, v, sliding_window=self.sliding_window,
                                   backend=self.attention_backend,
                                   sequence_parallel=self.sequence_parallel,
                                   segment_ids=segment_ids, layout=layout)
        else:
            kv = kv.write(k, v, start)
            kv = LayerKV(constrain(kv.k, CACHE_AXES), constrain(kv.v, CACHE_AXES))
            if prefill:  # the queries see only k, v
                out = prefill_attention(q, k, v, sliding_window=self.sliding_window,
                                        backend=self.attention_backend)
            else:  # cache [batch, max_len, Hkv, D]
                out = cached_attention(q, kv.k.astype(q.dtype), kv.v.astype(q.dtype), positions,
                                       sliding_window=self.sliding_window)
        out = constrain(out, Q_AXES)
        # row-parallel: under tp_sp reduce-scattered onto the sequence-split residual
        out = row_parallel(self.o_proj, out.reshape(batch, t, self.num_heads * self.head_dim),
                           ("batch", "seq", "act_heads"))
        return out, kv


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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 kv: LayerKV | None, start: jax.Array | int, segment_ids: jax.Array | None = None,
                 *, layout: str = "contiguous", prefill: bool = False
                 ) -> tuple[jax.Array, LayerKV | None]:
        """x [batch, T, embed] -> (x after attention and MLP [batch, T, embed], the layer's cache);
        cos, sin float32 [batch, T, head_dim], positions int32 [batch, T], segment_ids int32
        [batch, T] or None; the rest as `SelfAttention.__call__`."""
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, positions, kv, start,
                               segment_ids, layout=layout, prefill=prefill)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def paged(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv: PagedLayerKV,
              meta: PagedBatch) -> tuple[jax.Array, PagedLayerKV, jax.Array]:
        """x [1, T, embed], cos, sin float32 [1, T, head_dim] -> (x [1, T, embed], the layer's
        pages with the T tokens' K/V, rotated queries [T, Hq, D]); as `SelfAttention.paged`."""
        h, kv, q = self.self_attn.paged(self.input_layernorm(x), cos, sin, kv, meta)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv, q


def segment_runs(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(run ids, positions) int32 [batch, T] each, of segment_ids int [batch, T] in natural order.

    A document is a contiguous run of equal ids, whatever the ids' values: run ids number the
    runs of a row 1, 2, ... (padding, id 0, stays 0), so attention on them never joins two runs
    that share an id; positions are each token's offset from its run's start (the RoPE position
    it had if its document were alone). Attention and RoPE thus agree on what a document is."""
    t = segment_ids.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)  # [batch, T]
    runs = jnp.where(segment_ids == 0, 0, jnp.cumsum(starts, axis=1, dtype=jnp.int32))
    run_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # [batch, T]
    return runs, index - run_start


def check_no_cache_for_packing(cache: KVCache | None, segment_ids: jax.Array | None,
                               layout: str) -> None:
    """Packed documents and the zig-zag layout are whole-sequence (training) inputs: a KV cache
    holds one sequence per row in natural order. segment_ids: int32 [batch, T] or None."""
    if layout not in SEQUENCE_LAYOUTS:
        raise ValueError(f"layout must be one of {SEQUENCE_LAYOUTS}; got {layout!r}")
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed documents) cannot be used with a KV cache; call "
                         "forward without a cache, or generate each document in its own row")
    if cache is not None and layout != "contiguous":
        raise ValueError(f"layout={layout!r} cannot be used with a KV cache; a cache needs "
                         f"layout='contiguous'")


def is_prefill(cache: KVCache | None, start: jax.Array | int) -> bool:
    """Whether a forward is a prefill: a cache given and start the Python int 0, so the queries
    see only their own K/V (`SelfAttention`'s `prefill`)."""
    return cache is not None and isinstance(start, int) and start == 0


class DecoderLM(CausalLM):
    """What every attention decoder here shares beyond `CausalLM` (embedding, layers, norm, head):
    the checked ``__call__``, RoPE positions, the dense KV cache and the layer loop over it
    (``run_layers``), and the paged forward the serving engine runs (each layer's ``paged``
    method). Subclasses define ``forward``."""

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None
                 ) -> jax.Array:
        """Logits float32 [batch, T, vocab] of input_ids [batch, T]; segment_ids int32
        [batch, T]: packed documents (see the module docstring)."""
        input_ids = check_input_ids(input_ids, self.config)
        if segment_ids is not None:
            segment_ids = check_segment_ids(segment_ids, input_ids.shape)
        logits, _ = self.forward(jnp.asarray(input_ids), segment_ids=segment_ids)
        return logits

    def zigzag_shards(self, seq_len: int) -> int:
        """P > 1 when causal attention over seq_len tokens runs a ring over P devices under the
        active sharding rules and the sequence splits into the 2P chunks of the zig-zag layout:
        training then feeds the tokens in that layout (`forward(..., layout="zigzag")`); 1
        otherwise."""
        c = self.config
        p = ring_shards(c.sliding_window, c.sequence_parallel)
        return p if p > 1 and seq_len % (2 * p) == 0 else 1

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        cache = KVCache.zeros(c.num_hidden_layers, batch, max_len, c.num_key_value_heads,
                              c.head_dim, jnp.dtype(c.dtype))
        return jax.tree.map(lambda a: constrain(a, CACHE_AXES), cache)

    def positions_and_rotary(self, batch: int, t: int, start: jax.Array | int,
                             segment_ids: jax.Array | None = None, layout: str = "contiguous"):
        """(positions int32 [batch, T] = start..start+T-1, their rotary tables (cos, sin), the
        run ids int32 [batch, T] that attention takes, or None without segment_ids).

        With segment_ids [batch, T] (no cache, start 0) each run of equal ids is a document
        counting from 0 (`segment_runs`). With layout "zigzag" the T slots hold the tokens in
        the ring's zig-zag order (segment ids too), and each slot gets its token's position and
        run id."""
        whole = isinstance(start, int) and start == 0
        if not whole and segment_ids is not None:
            raise ValueError(f"segment_ids (packed documents) need start=0, whole sequences; "
                             f"got start={start!r}")
        if not whole and layout != "contiguous":
            raise ValueError(f"layout={layout!r} needs start=0, whole sequences; got "
                             f"start={start!r}")
        p = self.zigzag_shards(t) if layout == "zigzag" else 1
        if layout == "zigzag" and p == 1:
            raise ValueError(f"layout='zigzag' needs the active sharding rules to run causal "
                             f"attention as a ring over P > 1 devices with {t} tokens divisible "
                             f"by 2P; they do not (see DecoderLM.zigzag_shards)")
        if layout == "zigzag" and segment_ids is not None:
            segment_ids = zigzag_unpermute(segment_ids, p)  # natural order: runs are contiguous
        runs = None
        if segment_ids is None:
            positions = jnp.broadcast_to(jnp.asarray(start, jnp.int32)
                                         + jnp.arange(t, dtype=jnp.int32), (batch, t))
        else:
            runs, positions = segment_runs(segment_ids)
        if layout == "zigzag":
            positions, runs = jax.tree.map(lambda a: zigzag_permute(a, p), (positions, runs))
        return positions, rotary_tables(positions, inverse_frequencies(self.config)), runs

    def run_layers(self, input_ids: jax.Array, cache: KVCache | None, start: jax.Array | int,
                   segment_ids: jax.Array | None, layout: str,
                   layer_args: Callable[[int], tuple] = lambda i: ()
                   ) -> tuple[jax.Array, KVCache | None, list[tuple]]:
        """The forward pass every decoder runs: (logits float32 [batch, T, vocab], the cache with
        the T tokens' K/V or None, each layer's outputs after (x, kv)) for input_ids [batch, T]
        at positions start..start+T-1, as `LlamaForCausalLM.forward` describes its arguments.

        Layer i is called `layer(x, cos, sin, positions, kv, start, runs, *layer_args(i))`
        (Mixtral's router key is such an argument)."""
        start = known_start(start)  # a NumPy or concrete JAX start checks and runs as an int
        if not isinstance(start, int):  # traced: as int32, the type the cache writes index with
            start = jnp.asarray(start, jnp.int32)
        check_no_cache_for_packing(cache, segment_ids, layout)
        if cache is not None:
            cache.check_positions(start, input_ids.shape[1])
        positions, (cos, sin), runs = self.positions_and_rotary(*input_ids.shape, start,
                                                                segment_ids, layout)
        x = self.embed(input_ids)  # [batch, T, embed]
        new_layers, outputs = [], []
        call = self.layer_caller(cache is not None, layout=layout,
                                 prefill=is_prefill(cache, start))
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layers[i]
            x, kv, *rest = call(layer, x, cos, sin, positions, kv, start, runs, *layer_args(i))
            x = constrain(x, RESIDUAL)
            new_layers.append(kv)
            outputs.append(tuple(rest))
        new_cache = None if cache is None else KVCache(tuple(new_layers))
        return self.logits(x), new_cache, outputs

    def init_paged_cache(self, num_pages: int, page_size: int,
                         kv_dtype: jnp.dtype | str | None = None) -> PagedKVCache:
        """An empty page pool in kv_dtype (None: the model's dtype; "int8": quantized pages)."""
        c = self.config
        return PagedKVCache.zeros(c.num_hidden_layers, num_pages, page_size,
                                  c.num_key_value_heads, c.head_dim,
                                  jnp.dtype(c.dtype if kv_dtype is None else kv_dtype))

    def forward_paged(self, input_ids: jax.Array, meta: PagedBatch, cache: PagedKVCache,
                      logit_rows: jax.Array, observe_rows: jax.Array | None = None
                      ) -> (tuple[jax.Array, PagedKVCache]
                            | tuple[jax.Array, PagedKVCache, jax.Array]):
        """One flat batch of T tokens from many sequences over the paged KV cache.

        input_ids int32 [T]; meta: positions (for RoPE) and K/V write slots per token, runs of
        tokens, page-table rows and attention lengths per sequence (a SnapKV-compressed sequence
        attends over fewer cached keys than its position); logit_rows int32 [R]: the tokens
        whose next-token logits are wanted (the last token of each sequence in the batch), so
        the vocabulary projection runs on R rows, not T. Returns logits float32 [R, vocab] and the
        cache with the T tokens' K/V written; with observe_rows int32 [W] also every layer's
        rotated queries of those tokens, [layers, W, Hq, D] (SnapKV's observation window)."""
        positions = meta.positions[None]  # [1, T]
        cos, sin = rotary_tables(positions, inverse_frequencies(self.config))
        x = self.embed_tokens(input_ids[None])  # [1, T, embed]
        new_layers, queries = [], []
        for layer, kv in zip(self.layers, cache.layers):
            x, kv, q = layer.paged(x, cos, sin, kv, meta)
            new_layers.append(kv)
            if observe_rows is not None:
                queries.append(q[observe_rows])  # [W, Hq, D]
        logits = output_logits(self.embed_tokens, self.lm_head,
                               self.norm(x[:, logit_rows]))  # [1, R, vocab]
        out = logits[0].astype(jnp.float32), PagedKVCache(tuple(new_layers))
        return out if observe_rows is None else (*out, jnp.stack(queries))


class LlamaForCausalLM(DecoderLM):
    """Token ids [batch, seq] -> next-token logits float32 [batch, seq, vocab]."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, lambda: DecoderLayer(config, rngs=rngs), rngs=rngs)

    def forward(self, input_ids: jax.Array, cache: KVCache | None = None,
                start: jax.Array | int = 0, *, segment_ids: jax.Array | None = None,
                layout: str = "contiguous") -> tuple[jax.Array, KVCache | None]:
        """Logits for input_ids [batch, T] at positions start..start+T-1, reading and extending
        `cache` when given (prefill: start=0 with the whole prompt; decode: one token at a time).

        Without a cache: segment_ids int32 [batch, T] packs documents into a row (the module
        docstring), and layout="zigzag" says the tokens (and segment ids) come in the ring's
        zig-zag order (training under a causal ring; `zigzag_shards`)."""
        logits, new_cache, _ = self.run_layers(input_ids, cache, start, segment_ids, layout)
        return logits, new_cache

