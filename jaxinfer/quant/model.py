"""Quantize a whole decoder: ``quantize(model, method="gptq" | "rtn", ...)`` -> a new model.

Every decoder linear layer (attention q/k/v/o, MLP gate/up/down) becomes a ``QuantizedLinear``
holding a packed ``QuantizedWeight`` (a ``MixedQuantizedLinear`` holding a
``MixedQuantizedWeight`` for mixed 2/4-bit); embeddings, norms and lm_head stay float. The input
model is left untouched (the new model is an ``nnx.clone`` whose layers are then replaced).

GPTQ follows AutoGPTQ's true-sequential recipe, block by block:

1. the calibration hidden states ``x`` [batch, seq, embed] entering the block (embeddings for
   block 0) are run through the *partly quantized* block up to the next group of layers, whose
   inputs are folded into a running Hessian ``2 X^T X / n``;
2. groups, in order: q/k/v (one shared input and Hessian), o, gate/up (shared), down; each group
   is quantized before the next group's inputs are captured, so later layers see (and compensate
   for) the quantization error of earlier ones;
3. the fully quantized block then maps ``x`` to the next block's input.

Capturing stops the forward pass at the wanted layer (``_StopAt`` raises with its input while
the jitted capture traces), so each capture computes only the part of the block before that
layer; blocks of one structure share compilations. Calibration batches are kept as
hidden states, one [batch, seq, embed] array (compute dtype) per batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxinfer.config_checks import check_group_size
from jaxinfer.models.inputs import check_input_ids, token_array
from jaxinfer.models.layers import Linear
from jaxinfer.models.llama import LlamaForCausalLM
from jaxinfer.models.rope import inverse_frequencies, rotary_tables
from jaxinfer.quant.gptq import check_damp, gptq_quantize_layer
from jaxinfer.quant.hessian import HessianState, accumulate_hessian
from jaxinfer.quant.linear import QuantizedLinear
from jaxinfer.quant.mixed import check_mixed_args, packing_bits
from jaxinfer.quant.mixed_linear import MixedQuantizedLinear
from jaxinfer.quant.rtn import quantize_rtn
from kernels_pallas.quant_matmul import BACKENDS as QUANT_BACKENDS
from kernels_pallas.quant_matmul import MixedQuantizedWeight, QuantizedWeight, check_quant_params

logger = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")
# True-sequential order inside a block: (parent attribute, layer names sharing one input).
LAYER_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")),
                ("self_attn", ("o_proj",)),
                ("mlp", ("gate_proj", "up_proj")),
                ("mlp", ("down_proj",)))


class _Captured(Exception):
    def __init__(self, x):
        super().__init__("captured layer input")
        self.x = x


class _StopAt(nnx.Module):
    """Stands in for a linear layer: raises with the layer's input, ending the forward pass."""

    def __call__(self, x):
        raise _Captured(x)


def linear_layers(model):
    """(block index, parent module, name, layer) for every decoder linear layer (`LAYER_GROUPS`),
    in order: what `quantize` replaces."""
    for i, block in enumerate(model.layers):
        for parent_name, names in LAYER_GROUPS:
            parent = getattr(block, parent_name)
            for name in names:
                yield i, parent, name, getattr(parent, name)


def _check_args(model, method, bits, group_size, act_order, sym, backend, damp, high_fraction,
                criterion, progress):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    check_group_size(group_size)
    check_mixed_args(bits, group_size, high_fraction, criterion)
    if method == "rtn" and criterion == "hessian":
        raise ValueError("criterion='hessian' needs layer Hessians from calibration: use "
                         "method='gptq', or criterion='range' with method='rtn'")
    for name, value in (("act_order", act_order), ("sym", sym), ("progress", progress)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    check_damp(damp)
    if backend not in QUANT_BACKENDS:
        raise ValueError(f"backend must be one of {QUANT_BACKENDS}; got {backend!r}")
    if not isinstance(model, LlamaForCausalLM):  # Mixtral's experts and Hyena: not yet
        raise TypeError(f"quantize supports LlamaForCausalLM (Llama, Mistral, Qwen2); "
                        f"got {type(model).__name__}")
    for i, parent, name, layer in linear_layers(model):
        if not isinstance(layer, Linear):
            raise ValueError(f"layers[{i}].{name} is already quantized "
                             f"({type(layer).__name__}); quantize a float model")
        try:
            check_quant_params(layer.kernel.shape, packing_bits(bits), group_size)
        except ValueError as e:
            raise ValueError(f"layers[{i}].{name} [in={layer.kernel.shape[0]}, "
                             f"out={layer.kernel.shape[1]}]: {e}") from None


def _calibration_batches(calibration, config) -> list[jax.Array]:
    """Validated int32 [n_samples, seq_len] batches from an array (numpy, jax or torch), a
    tokenizer's output (a mapping with ``input_ids``), an iterable of either, or a list of 1-D
    token sequences: of one length, one [n, seq_len] batch; of different lengths (one per
    text), one [1, seq_i] batch each (the Hessian is a mean over tokens, so the split does not
    weigh them differently)."""
    if calibration is None:
        raise ValueError("calibration must be given for method='gptq': int32 token ids "
                         "[n_samples, seq_len] or an iterable of such batches; got None")
    sequences = (isinstance(calibration, (list, tuple)) and calibration
                 and all(not isinstance(c, Mapping) and np.ndim(c) == 1 for c in calibration))
    context = config.max_position_embeddings
    for i, c in enumerate(calibration if sequences else ()):  # [] would read as float ids
        if len(c) == 0:
            raise ValueError(f"calibration sequence {i} is empty; each 1-D token sequence must "
                             f"hold at least one token")
        if len(c) > context:
            raise ValueError(f"calibration sequence {i} has {len(c)} tokens, which exceeds the "
                             f"model's context of {context} positions (max_position_embeddings)")
    if sequences and len({len(c) for c in calibration}) > 1:  # ragged: a sample per sequence
        names = [f"calibration sequence {i}" for i in range(len(calibration))]
        return [_checked_batch(token_array(c, name, "a 1-D token sequence")[None], config, name)
                for name, c in zip(names, calibration, strict=True)]
    if isinstance(calibration, Mapping) or hasattr(calibration, "shape") or (
            isinstance(calibration, (list, tuple)) and calibration
            and np.ndim(calibration[0]) == 1):
        batches = [calibration]
    else:
        try:
            batches = list(calibration)
        except TypeError:
            raise ValueError(f"calibration must be an int array [n_samples, seq_len] or an "
                             f"iterable of them; got {type(calibration).__name__}") from None
    if not batches:
        raise ValueError("calibration must hold at least one batch of token ids; got none")
    return [_checked_batch(batch, config, f"calibration batch {b}")
            for b, batch in enumerate(batches)]


def _checked_batch(batch, config, name: str) -> jax.Array:
    """One calibration batch (an array or a tokenizer's output) as int32 [n, seq] token ids,
    checked, with errors that call it ``name``."""
    if isinstance(batch, Mapping):
        batch = _unpadded_input_ids(batch, name)
    return jnp.asarray(check_input_ids(batch, config, name=name), jnp.int32)


def _unpadded_input_ids(encoding: Mapping, name: str):
    """The ``input_ids`` of a tokenizer's output, whose ``attention_mask`` (if any) must mark no
    padding: GPTQ calibrates on every position."""
    if "input_ids" not in encoding:
        raise ValueError(f"{name} is a mapping without 'input_ids' (a tokenizer's output has "
                         f"them); got keys {sorted(encoding)}")
    mask = encoding.get("attention_mask")
    if mask is not None and not np.all(np.asarray(mask)):
        raise ValueError(f"{name}'s attention_mask marks padding, but GPTQ calibrates on every "
                         f"position: pass sequences of one length, tokenized without padding")
    return encoding["input_ids"]


def quantized_linear(layer: Linear, weight: QuantizedWeight | MixedQuantizedWeight,
                     backend: str) -> QuantizedLinear | MixedQuantizedLinear:
    """A ``QuantizedLinear`` (``MixedQuantizedLinear`` for a mixed weight) taking ``layer``'s
    place: its logical axes, compute dtype and bias, with ``weight`` (same [in, out] shape)
    instead of the float kernel."""
    if weight.shape != tuple(layer.kernel.shape):
        raise ValueError(f"weight must have the layer's shape {list(layer.kernel.shape)}; "
                         f"got {list(weight.shape)}")
    axes = layer.kernel.get_metadata()["logical_axes"]
    bias = None if layer.bias is None else layer.bias[...]
    cls = MixedQuantizedLinear if isinstance(weight, MixedQuantizedWeight) else QuantizedLinear
    return cls(weight, bias, axes=axes, dtype=layer.dtype, backend=backend)


@functools.partial(jax.jit, static_argnames=("graphdef", "parent_name", "name"))
def _capture(graphdef, state, x, rope, *, parent_name, name):
    """Input of ``block.<parent_name>.<name>`` [batch, seq, features] when the block runs on x.

    The stand-in raises while tracing; the exception carries a tracer of this same trace, so
    returning it is sound and XLA prunes the rest of the block.
    """
    block = nnx.merge(graphdef, state)
    setattr(getattr(block, parent_name), name, _StopAt())
    try:
        block(x, *rope, None, 0)
    except _Captured as c:
        return c.x
    raise RuntimeError(f"{parent_name}.{name} was never called by the decoder block")


@functools.partial(jax.jit, static_argnames="graphdef")
def _run_block(graphdef, state, x, rope):
    """The block's output hidden states [batch, seq, embed] for input x."""
    return nnx.merge(graphdef, state)(x, *rope, None, 0)[0]


def quantize(model, method: str = "gptq", bits: int | tuple[int, int] = 4, group_size: int = 128,
             act_order: bool = True, sym: bool = True, calibration=None, *,
             damp: float = 0.01, backend: str = "auto", static_groups: bool = False,
             high_fraction: float | None = None, criterion: str | None = None,
             progress: bool = True):
    """A new model whose decoder linear layers hold packed ``bits``-bit weights.

    Args:
      model: a float ``LlamaForCausalLM`` (left unchanged).
      method: "gptq" (needs ``calibration``) or "rtn" (round to nearest; ignores calibration and
        act_order).
      bits: 2, 3, 4 or 8; or the pair (2, 4): mixed 2/4-bit, a fraction ``high_fraction`` of
        each layer's groups at 4 bits and the rest at 2 (``jaxinfer.quant.mixed``); the layers'
        ``weight.bits_per_weight`` gives the average stored bits per weight.
      group_size: input rows per scale/zero group, -1 for per channel (not with mixed bits);
        must divide every layer's in_features.
      act_order: GPTQ's desc_act (quantize inputs by decreasing Hessian diagonal).
      sym: symmetric grid (zero point in the middle) or asymmetric.
      calibration: int token ids [n_samples, seq_len] (numpy, jax or torch), a tokenizer's
        output (a mapping with ``input_ids`` and no padding), an iterable of such batches, or a
        list of 1-D token sequences (e.g. one per text): of different lengths, each is its own
        [1, seq] sample. Every sequence must fit the model's context (nothing is cut here: cut
        a long text with ``token_chunks``).
      damp: GPTQ's relative Hessian dampening. backend: ``quant_matmul`` backend of the layers.
      static_groups: GPTQ grids fit up front (see ``gptq_quantize_layer``).
      high_fraction: mixed bits only: fraction of groups kept at 4 bits, in [0, 1] (default
        0.25; rounded per layer so both parts hold whole packed words).
      criterion: mixed bits only: how the 4-bit groups are chosen, "range" (default: largest
        weight range) or "hessian" (largest Hessian-weighted 2-bit error; method "gptq" only).
      progress: show a progress bar (one step per layer) on stderr, terminal or not, as
        ``jaxinfer.train.train`` does; False for none.

    Returns:
      The quantized model (same class; linear layers are ``QuantizedLinear``, or
      ``MixedQuantizedLinear`` for mixed bits).
    """
    _check_args(model, method, bits, group_size, act_order, sym, backend, damp, high_fraction,
                criterion, progress)
    group_size = int(group_size)  # numpy ints too: the weights and the saved config hold it
    mixed_kw = dict(high_fraction=high_fraction, criterion=criterion)
    batches = _calibration_batches(calibration, model.config) if method == "gptq" else None
    new = nnx.clone(model)
    n_layers = len(new.layers) * sum(len(names) for _, names in LAYER_GROUPS)
    width = "/".join(map(str, bits)) if isinstance(bits, (tuple, list)) else bits
    bar = tqdm(total=n_layers, desc=f"{method} {width}-bit", unit="layer",
               disable=not progress)
    try:
        if method == "rtn":
            for i, parent, name, layer in list(linear_layers(new)):
                bar.set_postfix_str(f"layers[{i}].{name}")
                try:
                    weight = quantize_rtn(layer.kernel[...], bits=bits, group_size=group_size,
                                          sym=bool(sym), **mixed_kw)
                except ValueError as e:  # arguments were checked: a NaN or Inf weight
                    raise ValueError(f"layers[{i}].{name}: {e}") from None
                setattr(parent, name, quantized_linear(layer, weight, backend))
                bar.update()
        else:
            _gptq_model(new, batches, bar, backend=backend, bits=bits, group_size=group_size,
                        act_order=bool(act_order), sym=bool(sym), damp=check_damp(damp),
                        static_groups=bool(static_groups), **mixed_kw)
    finally:
        bar.close()
    return new


def _gptq_model(model, batches, bar, *, backend, **gptq_kw):
    config = model.config
    inv_freq = inverse_frequencies(config)
    ropes, hidden = [], []
    for ids in batches:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        cos, sin = rotary_tables(positions, inv_freq)
        ropes.append((cos, sin, positions))
        hidden.append(model.embed_tokens(ids))  # [batch, seq, embed]
    for i, block in enumerate(model.layers):
        for parent_name, names in LAYER_GROUPS:
            parent = getattr(block, parent_name)
            first = getattr(parent, names[0])
            state = HessianState.zeros(first.kernel.shape[0])
            graphdef, params = nnx.split(block)
            for x, rope in zip(hidden, ropes):
                x_in = _capture(graphdef, params, x, rope, parent_name=parent_name,
                                name=names[0])
                state = accumulate_hessian(state, x_in)
            for name in names:
                bar.set_postfix_str(f"layers[{i}].{name}")
                layer = getattr(parent, name)
                try:
                    weight = gptq_quantize_layer(layer.kernel[...], state.h, **gptq_kw)
                except ValueError as e:  # arguments were checked: a singular Hessian, a NaN
                    # or Inf weight
                    raise ValueError(f"layers[{i}].{parent_name}.{name}: {e}") from None
                setattr(parent, name, quantized_linear(layer, weight, backend))
                bar.update()
        graphdef, params = nnx.split(block)
        hidden = [_run_block(graphdef, params, x, rope) for x, rope in zip(hidden, ropes)]
        logger.info("GPTQ: quantized block %d of %d", i + 1, len(model.layers))
