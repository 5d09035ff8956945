"""Hugging Face Mixtral checkpoints: config.json + safetensors <-> `MixtralForCausalLM`.

On disk (Mixtral-8x7B's files, and what transformers 5.x `save_pretrained` writes) each expert is
three linear weights, [out, in] like every HF linear:

    model.layers.{l}.block_sparse_moe.gate.weight            [E, D]   router
    model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight  [F, D]   gate projection
    model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight  [F, D]   up projection
    model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight  [D, F]   down projection

transformers 5.x fuses them in memory (`mlp.experts.gate_up_proj` [E, 2F, D] with gate rows
first, `mlp.experts.down_proj` [E, D, F], router `mlp.gate.weight`) through its
conversion_mapping; a file in that fused layout loads here too. jaxinfer stacks experts as
gate_proj/up_proj [E, D, F] and down_proj [E, F, D]. Everything else is named, read and checked
as for every model (`hf_read.load_model`), and `save_pretrained` writes it (`expert_tensors`).
Only float checkpoints load: a quantized one (any `quantization_config`) is refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.checkpoint.gptq_config import refuse_quantized
from jaxinfer.checkpoint.hf_read import TensorReader, hf_name, load_model, read_model_dir
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig

# jaxinfer stacked expert parameter -> (HF per-expert linear, half of the fused gate_up_proj)
EXPERT_LINEARS = {"gate_proj": ("w1", 0), "up_proj": ("w3", 1), "down_proj": ("w2", None)}


def _layer_prefix(path: tuple) -> str:
    return f"model.layers.{path[1]}"


def _read_stacked_expert(reader: TensorReader, path: tuple, current: jax.Array) -> jax.Array:
    """One stacked expert parameter [E, in, out], now holding `current` (its shape and dtype),
    from per-expert or fused HF tensors."""
    shape = tuple(current.shape)
    leaf = str(path[-1])
    w, half = EXPERT_LINEARS[leaf]
    prefix = _layer_prefix(path)
    num_experts = shape[0]
    per_expert = [f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(num_experts)]
    fused = f"{prefix}.mlp.experts." + ("down_proj" if half is None else "gate_up_proj")
    missing = [name for name in per_expert if name not in reader.files]
    if not missing:
        expected = [shape[2], shape[1]]  # one expert's [out, in]
        experts = []
        for name in per_expert:
            tensor = np.asarray(reader.get_float(name))
            if list(tensor.shape) != expected:
                raise ValueError(f"tensor {name!r} in {reader.files[name].name} has shape "
                                 f"{list(tensor.shape)}; config.json implies {expected}")
            experts.append(tensor)
        stacked = np.stack(experts)  # [E, out, in]
    elif fused in reader.files:
        stacked = np.asarray(reader.get_float(fused))
        if half is not None:  # [E, 2F, D]: gate rows, then up rows
            f = stacked.shape[1] // 2
            stacked = stacked[:, half * f:(half + 1) * f]
    elif len(missing) < num_experts:  # a per-expert checkpoint with some experts' tensors lost
        raise ValueError(f"checkpoint holds per-expert {w} weights of layer {path[1]} for only "
                         f"some of its {num_experts} experts (config.json's num_local_experts); "
                         f"missing {len(missing)}: {missing[:5]}")
    else:
        raise ValueError(f"checkpoint has neither {per_expert[0]!r} (per-expert layout) nor "
                         f"{fused!r} (transformers' fused layout)")
    stacked = np.swapaxes(stacked, 1, 2)  # [E, in, out]
    if stacked.shape != tuple(shape):
        raise ValueError(f"expert weights {leaf} of layer {path[1]} have shape "
                         f"{list(stacked.shape)} after stacking; config.json implies "
                         f"{list(shape)}")
    return jnp.asarray(stacked, dtype=current.dtype)


def _names(flat: list, files: Mapping[str, Path]) -> dict[tuple, tuple[str, bool]]:
    """`hf_name` of each non-expert parameter, except that a router stored under transformers'
    fused-layout name (`mlp.gate`) is read from there. Stacked experts are read (and their
    absence reported) by `_read_stacked_expert`."""
    out = {}
    for path, var in flat:
        if isinstance(var, nnx.Param) and str(path[-1]) not in EXPERT_LINEARS:
            name, transposed = hf_name(path)
            fused = name.replace(".block_sparse_moe.", ".mlp.")
            out[path] = (fused if name not in files and fused in files else name), transposed
    return out


def load_mixtral(model_dir: str | os.PathLike, dtype: str = "float32",
                 attention_backend: str = "auto", moe_impl: str = "dropless",
                 capacity_factor: float = 1.25) -> MixtralForCausalLM:
    """Load a local HF Mixtral directory (config.json + safetensors, single or sharded)."""
    model_dir, hf_config = read_model_dir(model_dir)
    config = MixtralConfig.from_hf_config(
        hf_config, dtype=dtype, attention_backend=attention_backend, moe_impl=moe_impl,
        capacity_factor=capacity_factor)
    refuse_quantized(model_dir, hf_config, config.model_type)
    return load_model(model_dir, config, MixtralForCausalLM, names=_names,
                      read_other=_read_stacked_expert)


def expert_tensors(path: tuple, value: np.ndarray) -> dict[str, np.ndarray] | None:
    """The per-expert HF tensors [out, in] of a stacked expert parameter [E, in, out]; None for
    any other parameter (`hf_tensors` names those)."""
    leaf = str(path[-1])
    if leaf not in EXPERT_LINEARS:
        return None
    w = EXPERT_LINEARS[leaf][0]
    return {f"{_layer_prefix(path)}.block_sparse_moe.experts.{e}.{w}.weight":
            np.ascontiguousarray(value[e].T) for e in range(value.shape[0])}
