"""Hyena decoder (Poli et al. 2023) as a Flax NNX module: attention replaced by gated long
convolutions with implicit filters, computed by ``kernels_pallas.fftconv``.

Hyena operator of order N on x [batch, seq, D] (the safari reference implementation):

    x_0, .., x_{N-1}, v = split(short_conv(in_proj(x)))     N + 1 streams of D channels
    for i = N-1 .. 1:  v = h_i * (x_i ⊙ v) + bias_i ⊙ (x_i ⊙ v)   causal long convolution
    y = out_proj(x_0 ⊙ v)

The short convolution is depthwise and causal (a few taps, local token mixing); the long filters
h_i [D, seq] come from ``hyena_filter.ImplicitFilter``. Each step is one ``fftconv`` call with the
gates fused (pre_gate = x_i; post_gate = x_0 on the last step); under sharding rules each device
convolves its own rows and channels (``sharding.local_map``: the partitioner shards no FFT).
Every operation is causal, so logits at t depend on tokens <= t only. Blocks are pre-norm like Llama: RMSNorm -> Hyena mixer,
RMSNorm -> SwiGLU MLP.

`forward(input_ids, cache, start)` has the Llama decoders' signature, so the training step and
``jaxinfer.generate`` drive either model; `config.remat` recomputes each block in the backward
pass with Llama's policies. With a ``HyenaCache`` (``init_cache``, see
``hyena_cache.py``) the prefill (a static start of 0) runs the FFT path and records each layer's
short-convolution inputs and gated long-convolution inputs by position; every later call computes
its tokens' long convolutions as direct sums over those records, O(context) per token instead of
an FFT over the whole sequence. The records are position-indexed, so a call may restart at any
earlier position (a rollback), as with a KV cache.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import HyenaConfig
from jaxinfer.models.hyena_cache import (HyenaCache, HyenaLayerCache, cached_long_conv,
                                         short_window, write_positions, write_short)
from jaxinfer.models.hyena_filter import ImplicitFilter
from jaxinfer.models.inputs import check_input_ids, known_start
from jaxinfer.models.layers import (RESIDUAL, CausalLM, Linear, RMSNorm, SwiGLU, column_parallel,
                                     param, row_parallel)
from kernels_pallas import fftconv
from sharding import constrain, local_map

# Logical names of activation dimensions (sharding/rules.py maps them to mesh axes); RESIDUAL,
# the residual stream's, comes from layers.py.
# Decoding cache: the short-conv inputs [batch, taps - 1 + max_len, channels], gated inputs
# [batch, D, max_len] and filters [N-1, D, max_len]; channels split like the in_proj outputs
# they come from.
SHORT_CACHE_AXES = ("batch", "cache_seq", "act_heads")
LONG_CACHE_AXES = ("batch", "act_heads", "cache_seq")
FILTER_CACHE_AXES = (None, "act_heads", None)
# A long convolution's input and gates [batch, D, T]: rows and channels split like the in_proj
# outputs they come from, the convolved (FFT) axis whole; its filter [D, T] and bias [D].
LONG_CONV_AXES = ("batch", "act_heads", None)
LONG_CONV_IN_AXES = (LONG_CONV_AXES, ("act_heads", None), LONG_CONV_AXES, LONG_CONV_AXES,
                     ("act_heads",))


def gated_long_conv(u: jax.Array, k: jax.Array, pre_gate: jax.Array,
                    post_gate: jax.Array | None, bias: jax.Array, *, backend: str) -> jax.Array:
    """post_gate * (k * (pre_gate * u) + bias * pre_gate * u): u, gates [batch, D, T], k [D, T],
    bias [D] -> [batch, D, T] (positional, for ``sharding.local_map``)."""
    return fftconv(u, k, pre_gate=pre_gate, post_gate=post_gate, bias=bias, backend=backend)


class ShortConv(nnx.Module):
    """Depthwise causal convolution with `size` taps: y[t] = b + sum_j w[j] x[t - size + 1 + j]."""

    def __init__(self, channels: int, size: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(size)  # PyTorch's Conv1d init (fan_in = size for depthwise)
        w = jax.random.uniform(rngs.params(), (size, channels), jnp.float32, -bound, bound)
        b = jax.random.uniform(rngs.params(), (channels,), jnp.float32, -bound, bound)
        self.kernel = param(w.astype(param_dtype), (None, "heads"))
        self.bias = param(b.astype(param_dtype), ("heads",))
        self.size, self.dtype = size, dtype

    def __call__(self, x: jax.Array, history: jax.Array | None = None) -> jax.Array:
        """x [batch, seq, channels] following `history` [batch, size - 1, channels], the inputs
        just before it (None: the sequence starts here, zeros) -> y [batch, seq, channels]."""
        batch, seq, channels = x.shape
        if history is None:
            history = jnp.zeros((batch, self.size - 1, channels), self.dtype)
        xp = jnp.concatenate([history.astype(self.dtype), x.astype(self.dtype)], axis=1)
        w = self.kernel[...].astype(self.dtype)  # [size, channels]
        y = sum(w[j] * xp[:, j:j + seq] for j in range(self.size))
        return y + self.bias[...].astype(self.dtype)


class HyenaOperator(nnx.Module):
    """The Hyena mixer: x [batch, seq, D] -> [batch, seq, D] (see the module docstring)."""

    def __init__(self, config: HyenaConfig, *, rngs: nnx.Rngs):
        c = config
        d, n = c.hidden_size, c.order
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
        self.in_proj = Linear(d, (n + 1) * d, axes=("embed", "heads"), use_bias=True, **kw)
        self.short_conv = ShortConv((n + 1) * d, c.short_filter_size, **kw)
        self.filter = ImplicitFilter(
            (n - 1) * d, l_max=c.max_position_embeddings, emb_dim=c.filter_emb_dim,
            hidden=c.filter_hidden_size, inner_layers=c.filter_inner_layers,
            sine_freq=c.filter_sine_freq, decay_fast=c.filter_decay_fast,
            decay_slow=c.filter_decay_slow, decay_target=c.filter_decay_target,
            squash_lambda=c.filter_squash, rngs=rngs)
        skip = jax.random.normal(rngs.params(), (n - 1, d), jnp.float32)  # safari: randn
        self.filter_bias = param(skip.astype(kw["param_dtype"]), (None, "heads"))
        self.out_proj = Linear(d, d, axes=("heads", "embed"), use_bias=True, **kw)
        self.order, self.hidden_size = n, d
        self.backend = c.fftconv_backend
        self.dtype = kw["dtype"]

    def long_filters(self, length: int) -> jax.Array:
        """[N-1, D, length] float32: the taps of each long convolution."""
        return self.filter(length).reshape(self.order - 1, self.hidden_size, length)

    def init_cache(self, batch: int, max_len: int) -> HyenaLayerCache:
        """An empty decoding cache for `batch` sequences of `max_len` slots (``hyena_cache.py``).

        Memory per sequence: the short-convolution record (N+1)·D·(max_len + taps - 1) values
        and the long-convolution records (N-1)·D·max_len, in the compute dtype, so about
        (N+1)/(N-1) times the long state (order 2: 3x; D = 768 in bfloat16 at max_len 8192:
        about 38 MB short + 13 MB long per layer), plus the float32 filters (N-1)·D·max_len
        shared by the batch.

        `max_len` may exceed the filters' l_max (max_position_embeddings), as speculative
        decoding's scratch slots past the last real position do: taps at lags >= l_max are
        zero. Real positions lie below l_max, so every lag they read is a real tap."""
        n, d = self.order, self.hidden_size
        short = jnp.zeros((batch, self.short_conv.size - 1 + max_len, (n + 1) * d), self.dtype)
        long = tuple(constrain(jnp.zeros((batch, d, max_len), self.dtype), LONG_CACHE_AXES)
                     for _ in range(n - 1))
        taps = min(max_len, self.filter.l_max)
        k = jnp.pad(self.long_filters(taps), ((0, 0), (0, 0), (0, max_len - taps)))
        return HyenaLayerCache(short=constrain(short, SHORT_CACHE_AXES), long=long,
                               filter=constrain(k, FILTER_CACHE_AXES))  # k [N-1, D, max_len]

    def __call__(self, x: jax.Array, cache: HyenaLayerCache | None = None,
                 start: jax.Array | int = 0) -> tuple[jax.Array, HyenaLayerCache | None]:
        """x [batch, T, D] at positions start..start+T-1 -> (y [batch, T, D], extended cache).

        Without a cache, or with one at a static start of 0 (prefill), each long convolution is
        one FFT over the T tokens; otherwise it is a direct sum over the cached inputs."""
        batch, seq, d = x.shape
        n = self.order
        (u,) = column_parallel((self.in_proj,), x)  # [batch, T, (N+1) D]; tp_sp: x gathered
        if cache is None:
            u = self.short_conv(u)  # [batch, T, (N+1) D]
        else:
            size = self.short_conv.size
            window = short_window(cache.short, start, size)  # [batch, size - 1, (N+1) D]
            short = write_short(cache.short, u, start, size)
            u = self.short_conv(u, window)
        u = u.transpose(0, 2, 1).reshape(batch, n + 1, d, seq)  # [batch, N+1, D, T]
        gates, v = [u[:, i] for i in range(n)], u[:, n]  # each [batch, D, T]
        k = self.long_filters(seq) if cache is None else cache.filter  # [N-1, D, T or max_len]
        use_fft = cache is None or (isinstance(start, int) and start == 0)
        long = []
        for step in range(n - 1):
            gate, post_gate = gates[n - 1 - step], gates[0] if step == n - 2 else None
            if cache is not None:
                w = gate.astype(jnp.float32) * v.astype(jnp.float32)  # [batch, D, T]
                long.append(write_positions(cache.long[step], w, start))
            if use_fft:
                conv = functools.partial(gated_long_conv, backend=self.backend)
                v = local_map(conv, LONG_CONV_IN_AXES, LONG_CONV_AXES)(
                    v, k[step, :, :seq], gate, post_gate, self.filter_bias[step].astype(v.dtype))
            else:
                v = cached_long_conv(long[-1], w, k[step], start, self.filter_bias[step],
                                     post_gate).astype(v.dtype)
        new_cache = None if cache is None else HyenaLayerCache(short, tuple(long), cache.filter)
        # row-parallel: under tp_sp reduce-scattered onto the sequence-split residual
        y = row_parallel(self.out_proj, v.transpose(0, 2, 1), ("batch", "seq", "act_heads"))
        return y, new_cache  # [batch, T, D]


class HyenaBlock(nnx.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)): a Llama decoder layer with Hyena for attention."""

    def __init__(self, config: HyenaConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.mixer_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.mixer = HyenaOperator(c, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, use_bias=False,
                          dtype=jnp.dtype(c.dtype), param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array, cache: HyenaLayerCache | None = None,
                 start: jax.Array | int = 0) -> tuple[jax.Array, HyenaLayerCache | None]:
        h, cache = self.mixer(self.mixer_norm(x), cache, start)  # [batch, T, D]
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class HyenaForCausalLM(CausalLM):
    """Token ids [batch, seq] -> next-token logits float32 [batch, seq, vocab]. Embedding, blocks,
    final norm and LM head as `CausalLM`; no packed documents (segment_ids), no paged serving."""

    def __init__(self, config: HyenaConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, HyenaConfig):
            raise TypeError(f"config must be a HyenaConfig; got {type(config).__name__}")
        super().__init__(config, lambda: HyenaBlock(config, rngs=rngs), rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Logits float32 [batch, T, vocab] of input_ids [batch, T]."""
        input_ids = check_input_ids(input_ids, self.config)
        logits, _ = self.forward(jnp.asarray(input_ids))
        return logits

    def init_cache(self, batch: int, max_len: int) -> HyenaCache:
        """An empty decoding cache for `batch` sequences of `max_len` slots; it materializes
        every layer's long filters once. Real positions stay below max_position_embeddings;
        slots past it are scratch (speculative decoding's last round), whose taps are zero.

        Per layer and sequence it holds the short-convolution inputs by position, about
        (N+1)/(N-1) times the long-convolution state (order 2: 3x; D = 768 in bfloat16 at
        max_len 8192: ~38 MB short + ~13 MB long), unlike a recurrent state of fixed size:
        positions are kept so that a rollback is exact (``HyenaOperator.init_cache``)."""
        return HyenaCache(tuple(layer.mixer.init_cache(batch, max_len) for layer in self.layers))

    def forward(self, input_ids: jax.Array, cache: HyenaCache | None = None,
                start: jax.Array | int = 0) -> tuple[jax.Array, HyenaCache | None]:
        """Logits [batch, T, vocab] float32 for input_ids [batch, T] at positions
        start..start+T-1, reading and extending `cache` when given (prefill: start=0 with the
        whole prompt; decode: continue where the cache stands, one token or several at a time).

        Without a cache the sequence starts at position 0. A known start (a Python, NumPy or
        concrete JAX integer) is checked (start+T <= the cache's max_len and
        max_position_embeddings); a traced one cannot be: with start+T > max_len the cache writes
        are clamped into the buffer (over earlier positions' records) and the logits are wrong,
        NaN at positions >= max_len."""
        if cache is not None and not isinstance(cache, HyenaCache):
            raise TypeError(f"cache must be a HyenaCache (from init_cache) or None; "
                            f"got {type(cache).__name__}")
        start = known_start(start)
        if isinstance(start, int):
            if cache is None and start != 0:
                raise ValueError(f"without a cache, start must be 0 (nothing precedes the "
                                 f"input); got start={start}")
            end = start + input_ids.shape[1]
            if cache is not None and not 0 <= start <= end <= cache.max_len:
                raise ValueError(f"positions start..start+T-1 = {start}..{end - 1} must lie in "
                                 f"the cache's [0, {cache.max_len}) (init_cache max_len)")
            if end > self.config.max_position_embeddings:
                raise ValueError(f"positions start..start+T-1 = {start}..{end - 1} must lie "
                                 f"below max_position_embeddings = "
                                 f"{self.config.max_position_embeddings} (the filters' length)")
        x = self.embed(input_ids)  # [batch, T, embed]
        # cached (decoding): no remat, so a prefill's static start of 0 picks the FFT path
        call = self.layer_caller(cache is not None)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = call(layer, x, None if cache is None else cache.layers[i], start)
            x = constrain(x, RESIDUAL)
            new_layers.append(layer_cache)
        new_cache = None if cache is None else HyenaCache(tuple(new_layers))
        return self.logits(x), new_cache
