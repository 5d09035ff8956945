"""Hyena decoder (Poli et al. 2023) as a Flax NNX module: attention replaced by gated long
convolutions with implicit filters, computed by ``kernels_pallas.fftconv``.

Hyena operator of order N on x [batch, seq, D] (the safari reference implementation):

    x_0, .., x_{N-1}, v = split(short_conv(in_proj(x)))     N + 1 streams of D channels
    for i = N-1 .. 1:  v = h_i * (x_i ⊙ v) + bias_i ⊙ (x_i ⊙ v)   causal long convolution
    y = out_proj(x_0 ⊙ v)

The short convolution is depthwise and causal (a few taps, local token mixing); the long filters
h_i [D, seq] come from ``hyena_filter.ImplicitFilter``. Each step is one ``fftconv`` call with the
gates fused (pre_gate = x_i; post_gate = x_0 on the last step). Every operation is causal, so
logits at t depend on tokens <= t only. Blocks are pre-norm like Llama: RMSNorm -> Hyena mixer,
RMSNorm -> SwiGLU MLP. `forward` has the signature the training step calls
(``jaxinfer.train.step``); there is no recurrent decoding state yet, so `cache` must be None.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import HyenaConfig
from jaxinfer.models.hyena_filter import ImplicitFilter
from jaxinfer.models.inputs import check_input_ids
from jaxinfer.models.layers import Embedding, Linear, RMSNorm, SwiGLU, param
from kernels_pallas import fftconv
from sharding import constrain

# Logical names of activation dimensions (sharding/rules.py maps them to mesh axes).
RESIDUAL = ("batch", "res_seq", "act_embed")
LOGITS = ("batch", "seq", "act_vocab")


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

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, seq, channels]
        seq = x.shape[1]
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (self.size - 1, 0), (0, 0)))
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

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, seq, D]
        batch, seq, d = x.shape
        u = self.short_conv(self.in_proj(x))  # [batch, seq, (N+1) D]
        u = u.transpose(0, 2, 1).reshape(batch, self.order + 1, d, seq)  # [batch, N+1, D, seq]
        gates, v = [u[:, i] for i in range(self.order)], u[:, self.order]  # each [batch, D, seq]
        k = self.filter(seq).reshape(self.order - 1, d, seq)  # [N-1, D, seq] float32
        for step in range(self.order - 1):
            last = step == self.order - 2
            v = fftconv(v, k[step], pre_gate=gates[self.order - 1 - step],
                        post_gate=gates[0] if last else None,
                        bias=self.filter_bias[step].astype(v.dtype), backend=self.backend)
        return self.out_proj(v.transpose(0, 2, 1))  # [batch, seq, D]


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

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, seq, D]
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class HyenaForCausalLM(nnx.Module):
    """Token ids [batch, seq] -> next-token logits float32 [batch, seq, vocab]."""

    def __init__(self, config: HyenaConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, HyenaConfig):
            raise TypeError(f"config must be a HyenaConfig; got {type(config).__name__}")
        c = config
        self.config = c
        dt, pd = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pd,
                                      rngs=rngs)
        self.layers = nnx.List([HyenaBlock(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.lm_head = None if c.tie_word_embeddings else Linear(
            c.hidden_size, c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dt,
            param_dtype=pd, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        input_ids = check_input_ids(input_ids, self.config)
        logits, _ = self.forward(jnp.asarray(input_ids))
        return logits

    def forward(self, input_ids: jax.Array, cache: None = None, start: int = 0
                ) -> tuple[jax.Array, None]:
        """(logits [batch, T, vocab] float32, None) for input_ids [batch, T] from position 0.

        The `cache` / `start` arguments mirror LlamaForCausalLM.forward so that the training step
        drives either model; Hyena has no incremental decoding state yet."""
        if cache is not None or (isinstance(start, int) and start != 0):
            raise ValueError("HyenaForCausalLM.forward has no decoding cache: cache must be None "
                             f"and start 0; got cache={type(cache).__name__}, start={start!r}")
        x = constrain(self.embed_tokens(input_ids), RESIDUAL)  # [batch, T, embed]
        for layer in self.layers:
            x = constrain(layer(x), RESIDUAL)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits, LOGITS).astype(jnp.float32), None
