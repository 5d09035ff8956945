"""Building blocks shared by the decoders: linear, embedding, RMSNorm, SwiGLU MLP, and
`CausalLM`, the embedding, layer stack, final norm and LM head every model here is built on.

Every parameter carries `logical_axes` metadata (the logical names of ../shared/DESIGN.md). The
`sharding` package maps those names to mesh axes, so a new parallel layout never edits a model. The
decoders call their projections through `column_parallel` (q/k/v, gate/up, the LM head) and
`row_parallel` (o, down), which hand the arrays' logical names to `sharding`: under Megatron-SP
("tp_sp") that is where the all-gather and the reduce-scatter of the sequence-split residual
happen.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models.remat import remat_call
from sharding import (column_parallel_matmul, constrain, row_parallel_matmul,
                      vocab_parallel_lookup)

INIT_STDDEV = 0.02  # the initializer_range of HF Llama configs
# Logical names of the residual stream [batch, seq, embed] (sharding/rules.py).
RESIDUAL = ("batch", "res_seq", "act_embed")
LOGITS = ("batch", "seq", "act_vocab")  # the logits [batch, seq, vocab]

if TYPE_CHECKING:
    from jaxinfer.config import HyenaConfig, LlamaConfig


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """A trainable parameter tagged with one logical axis name per dimension."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match parameter shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] stored in param_dtype, matmul in compute dtype."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * INIT_STDDEV
        self.kernel = param(init.astype(param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _add_bias(layer: Linear, y: jax.Array) -> jax.Array:
    return y if layer.bias is None else y + layer.bias[...].astype(layer.dtype)


def _kernel_axes(layer: Linear) -> tuple[str | None, str | None]:
    """The kernel's logical axes ((None, None), so never split, if it carries none)."""
    return getattr(layer.kernel, "logical_axes", None) or (None, None)


def column_parallel(layers: Sequence[nnx.Module], x: jax.Array,
                    x_axes: Sequence[str | None] = RESIDUAL) -> list[jax.Array]:
    """[layer(x) for layer in layers] for column-parallel projections of one input x
    [batch, seq, in] (q/k/v, gate/up) -> [batch, seq, out_i] each.

    Float `Linear` layers go through `sharding.column_parallel_matmul`: under a layout that
    splits the residual's sequence and the layers' outputs over one axis (tp_sp), x is
    all-gathered along the sequence once for all of them. Other layers (quantized) are called."""
    if x.ndim != 3 or not all(isinstance(layer, Linear) for layer in layers):
        return [layer(x) for layer in layers]
    dtype = layers[0].dtype
    kernels = [layer.kernel[...].astype(dtype) for layer in layers]  # [in, out_i] each
    ys = column_parallel_matmul(x.astype(dtype), kernels, x_axes=x_axes,
                                w_axes=[_kernel_axes(layer) for layer in layers])
    return [_add_bias(layer, y) for layer, y in zip(layers, ys)]


def row_parallel(layer: nnx.Module, x: jax.Array, x_axes: Sequence[str | None]) -> jax.Array:
    """layer(x) for a row-parallel projection (o, down) of x [batch, seq, in] whose features are
    split like the layer's input -> [batch, seq, out], the residual stream's layout.

    A float `Linear` goes through `sharding.row_parallel_matmul`: under tp_sp its partial sums
    are reduce-scattered straight onto the sequence-split residual. The bias, replicated, is
    added after the sum. Other layers (quantized) are called."""
    if x.ndim != 3 or not isinstance(layer, Linear):
        return layer(x)
    y = row_parallel_matmul(x.astype(layer.dtype), layer.kernel[...].astype(layer.dtype),
                            x_axes=x_axes, w_axes=_kernel_axes(layer), out_axes=RESIDUAL)
    return _add_bias(layer, y)


class Embedding(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` reuses it as a tied output projection."""

    def __init__(self, vocab_size: int, features: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (vocab_size, features), jnp.float32) * INIT_STDDEV
        self.embedding = param(init.astype(param_dtype), ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:  # [batch, seq] -> [batch, seq, embed]
        # Gather the model-width dimension first (as FSDP does for every weight) and keep the
        # vocabulary split: XLA then looks ids up in each vocab shard and all-reduces, Megatron's
        # vocab-parallel embedding. Left to itself under fsdp_tp the partitioner cannot map a table
        # split over (vocab, embed) to a batch-split output and replicates the whole table.
        table = constrain(self.embedding[...], ("vocab", None))  # [vocab, embed]
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def lookup_residual(self, ids: jax.Array) -> jax.Array:
        """Token embeddings [batch, seq, embed] of ids [batch, seq], in the residual layout.

        Under tp_sp each device looks the ids up in its vocab shard and the partial rows are
        reduce-scattered onto the sequence-split residual (`sharding.vocab_parallel_lookup`).
        Otherwise the lookup lands in the unsplit-sequence layout first, then the residual's:
        constrained straight to a sequence-split residual, the partitioner all-gathered the
        whole vocab-split table."""
        x = vocab_parallel_lookup(self.embedding[...], ids, table_axes=("vocab", "embed"),
                                  ids_axes=("batch", "seq"), out_axes=RESIDUAL)
        if x is not None:
            return x.astype(self.dtype)
        return constrain(constrain(self(ids), ("batch", "seq", "act_embed")), RESIDUAL)

    def attend(self, x: jax.Array) -> jax.Array:  # [batch, seq, embed] -> [batch, seq, vocab]
        """The tied output projection x @ table.T: column-parallel over the vocabulary, so under
        tp_sp the sequence-split x is all-gathered first (`column_parallel_matmul`)."""
        table_t = self.embedding[...].astype(self.dtype).T  # [embed, vocab]
        if x.ndim != 3:
            return jnp.dot(x.astype(self.dtype), table_t)
        (y,) = column_parallel_matmul(x.astype(self.dtype), [table_t], x_axes=RESIDUAL,
                                      w_axes=[("embed", "vocab")])
        return y


def output_logits(embedding: Embedding, lm_head: nnx.Module | None, x: jax.Array) -> jax.Array:
    """Logits [batch, seq, vocab] in the compute dtype of the final-norm output x [batch, seq,
    embed] (residual layout): the tied embedding's `attend`, or the untied `lm_head`, both
    column-parallel over the vocabulary."""
    if lm_head is None:
        return embedding.attend(x)
    return column_parallel((lm_head,), x)[0]


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, scaled after casting back (as HF Llama does)."""

    def __init__(self, features: int, *, eps: float, param_dtype: jnp.dtype):
        self.weight = param(jnp.ones((features,), param_dtype), ("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., embed]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), the Llama feed-forward block."""

    def __init__(self, features: int, hidden: int, *, use_bias: bool, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(features, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(features, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, features, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, seq, embed], the residual layout
        gate, up = column_parallel((self.gate_proj, self.up_proj), x)  # [batch, seq, mlp] each
        hidden = jax.nn.silu(gate) * up  # [batch, seq, mlp]
        if hidden.ndim != 3:
            return self.down_proj(hidden)
        hidden = constrain(hidden, ("batch", "seq", "act_mlp"))
        return row_parallel(self.down_proj, hidden, ("batch", "seq", "act_mlp"))


def _call_layer(layer: nnx.Module, *args, **static):
    return layer(*args, **static)


class CausalLM(nnx.Module):
    """What every language model here shares: the token embedding (`embed_tokens`), a stack of
    `layers` (``make_layer()`` each), the final `norm` and the tied (None) or untied `lm_head`,
    named as Hugging Face names them; the embedding lookup, the logits, and how a forward calls
    a layer. Subclasses define ``forward`` and ``__call__``."""

    def __init__(self, config: LlamaConfig | HyenaConfig, make_layer: Callable[[], nnx.Module],
                 *, rngs: nnx.Rngs):
        c = config
        self.config = c
        dt, pd = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pd,
                                      rngs=rngs)
        self.layers = nnx.List([make_layer() for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.lm_head = None if c.tie_word_embeddings else Linear(
            c.hidden_size, c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dt,
            param_dtype=pd, rngs=rngs)

    def layer_caller(self, cached: bool, **static):
        """How forward calls a layer, `call(layer, *args)`: without a cache (training, scoring:
        what is differentiated) under remat with the policy `config.remat` names
        (`remat_call`), so that the backward pass recomputes what the policy does not keep;
        with one (prefill and decode, never differentiated) directly, since remat only costs
        there and would trace a prefill's static start of 0. `static` keyword arguments (not
        arrays: the sequence layout, the prefill flag) are bound before the remat, which would
        otherwise trace them."""
        call = functools.partial(_call_layer, **static)
        return call if cached else remat_call(call, self.config.remat)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [batch, T, embed] of input_ids [batch, T], in the residual layout
        (`Embedding.lookup_residual`: under tp_sp a vocab-parallel lookup reduce-scattered onto
        the sequence-split residual, never an all-gather of the table)."""
        return self.embed_tokens.lookup_residual(input_ids)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: x [batch, T, embed] -> float32 logits [batch, T, vocab]."""
        logits = output_logits(self.embed_tokens, self.lm_head, self.norm(x))
        return constrain(logits, LOGITS).astype(jnp.float32)
