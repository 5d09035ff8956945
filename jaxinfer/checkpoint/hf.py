"""Hugging Face checkpoint import and export: config.json plus safetensors (single file or sharded).

`load_pretrained` reads any model type jaxinfer has (the Llama family here, Mixtral through
`hf_mixtral`, Hyena through `hf_hyena`), all through `hf_read.load_model`; parameter names follow
HF's module names (`hf_read.hf_name`).

GPTQ checkpoints (a GPTQ `quantization_config`, see `gptq_config.py`) hold, per quantized decoder
linear layer, `<module>.{qweight,qzeros,scales,g_idx}` in AutoGPTQ's packing (`gptq_format.py`)
instead of `<module>.weight`; they load into `QuantizedLinear` layers (repacked once into the
kernel layout), and `save_pretrained` writes a model holding such layers in that format.

Writing goes through `hf_write.write_checkpoint`, which replaces the directory's checkpoint as a
whole (never a new config.json over old or half-written weights, never a stale index or single
file left behind).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.checkpoint.gptq_config import (QUANTIZE_CONFIG_FILE, GPTQConfig, GPTQLayerSpec,
                                             gptq_config_for, read_gptq_config)
from jaxinfer.checkpoint.gptq_format import FORMATS, from_gptq_tensors, to_gptq_tensors
from jaxinfer.checkpoint.hf_hyena import load_hyena
from jaxinfer.checkpoint.hf_mixtral import expert_tensors, load_mixtral
from jaxinfer.checkpoint.hf_read import (TensorReader, hf_name, load_model, param_names,
                                         read_model_dir)
from jaxinfer.checkpoint.hf_write import CONFIG_FILE, write_checkpoint
from jaxinfer.config import LlamaConfig
from jaxinfer.models.hyena import HyenaForCausalLM
from jaxinfer.models.layers import Linear
from jaxinfer.models.llama import LlamaForCausalLM
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.registry import model_classes
from jaxinfer.quant.linear import QuantizedLinear
from jaxinfer.quant.model import QUANT_BACKENDS, quantized_linear
from kernels_pallas.quant_matmul import QuantizedWeight

log = logging.getLogger(__name__)

REQUIRED_GPTQ_TENSORS = ("qweight", "qzeros", "scales")  # and g_idx, needed under desc_act
GPTQ_TENSORS = (*REQUIRED_GPTQ_TENSORS, "g_idx")


def hf_tensors(model: nnx.Module,
               expand: Callable[[tuple, np.ndarray], dict[str, np.ndarray] | None] | None = None,
               ) -> dict[str, np.ndarray]:
    """{HF tensor name: array in the on-disk layout} for the model's `nnx.Param`s: named by
    `hf_name`, linear kernels transposed to [out, in]. `expand(path, value)` may return the
    tensors of a parameter stored under other names (Mixtral's stacked experts, one tensor per
    expert on disk), or None for the `hf_name` default."""
    tensors: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.value)
        expanded = expand(path, value) if expand is not None else None
        if expanded is None:
            name, transposed = hf_name(path)
            expanded = {name: np.ascontiguousarray(value.T if transposed else value)}
        tensors.update(expanded)
    return tensors


def _gptq_modules(flat, gptq: GPTQConfig, files) -> dict[tuple, tuple[str, GPTQLayerSpec]]:
    """{kernel path: (HF module name, spec)} for each decoder linear the checkpoint quantizes:
    those the config quantizes, except any stored as a float ``weight`` alone, with none of its
    GPTQ tensors (a partly quantized checkpoint whose config does not say so; logged). A module
    with some GPTQ tensors but not all, or one the config names as quantized
    (``GPTQConfig.names_as_quantized``) but stored as float, raises."""
    out, stored_float = {}, []
    for path, var in flat:
        if not (isinstance(var, nnx.Param) and path[0] == "layers" and path[-1] == "kernel"):
            continue
        module = hf_name(path)[0].removesuffix(".weight")
        spec = gptq.layer_spec(module)
        if spec is None:  # left float by modules_in_block_to_quantize or a "-:" dynamic rule
            continue
        present = [t for t in GPTQ_TENSORS if f"{module}.{t}" in files]
        if not present and f"{module}.weight" in files:
            named = gptq.names_as_quantized(module)
            if named:
                raise ValueError(f"quantization_config names {module} as quantized ({named}) but "
                                 f"the checkpoint stores it as a float weight, with none of its "
                                 f"GPTQ tensors {list(GPTQ_TENSORS)}")
            stored_float.append(module)
            continue
        missing = [f"{module}.{t}" for t in REQUIRED_GPTQ_TENSORS if f"{module}.{t}" not in files]
        if spec.desc_act and f"{module}.g_idx" not in files:
            missing.append(f"{module}.g_idx")
        if missing:
            raise ValueError(f"GPTQ checkpoint is missing tensor(s) {missing} (quantization_config "
                             f"quantizes {module} with bits={spec.bits}; the checkpoint holds "
                             f"{[f'{module}.{t}' for t in present] or 'none of its GPTQ tensors'})")
        out[path] = (module, spec)
    if stored_float:
        log.warning("quantization_config quantizes %d module(s) that the checkpoint stores as "
                    "float weights (no GPTQ tensors), e.g. %s: loading them as float",
                    len(stored_float), stored_float[0])
    return out


def _read_gptq_weight(reader: TensorReader, module: str, spec: GPTQLayerSpec,
                      shape: tuple[int, int], checkpoint_format: str) -> QuantizedWeight:
    """One layer's GPTQ tensors, checked against the [in, out] = [K, N] shape the config implies."""
    k, n = shape
    b, g = spec.bits, spec.group_size
    if g != -1 and k % g:
        raise ValueError(f"{module}: group_size={g} does not divide in_features={k}")
    if (k * b) % 32 or (n * b) % 32:
        raise ValueError(f"{module}: {b}-bit packing needs in_features*bits and out_features*bits "
                         f"to be multiples of 32; got [in={k}, out={n}]")
    groups = 1 if g == -1 else k // g
    expected = {"qweight": (k * b // 32, n), "qzeros": (groups, n * b // 32),
                "scales": (groups, n), "g_idx": (k,)}
    tensors = {}
    for t, want in expected.items():
        name = f"{module}.{t}"
        if name not in reader.files:  # only g_idx may be absent (checked by _gptq_modules)
            continue
        x = np.asarray(reader.get(name))
        if tuple(x.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {list(x.shape)}; bits={b}, "
                             f"group_size={g} and the layer's [in={k}, out={n}] imply "
                             f"{list(want)}")
        integer = t != "scales"
        if integer != np.issubdtype(x.dtype, np.integer) or (t in ("qweight", "qzeros")
                                                            and x.dtype != np.int32):
            raise ValueError(f"tensor {name!r} must be "
                             f"{'a float type' if t == 'scales' else 'int32'}; got {x.dtype}")
        tensors[t] = x
    try:
        return from_gptq_tensors(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                 tensors.get("g_idx"), bits=b, group_size=g,
                                 checkpoint_format=checkpoint_format)
    except ValueError as e:
        raise ValueError(f"{module}: {e}") from None


def _module_at(model, path: tuple):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def load_pretrained(model_dir: str | os.PathLike, dtype: str = "float32",
                    attention_backend: str = "auto",
                    quant_backend: str = "auto"
                    ) -> LlamaForCausalLM | MixtralForCausalLM | HyenaForCausalLM:
    """Load a local Hugging Face model directory (config.json + safetensors) as an NNX model:
    the `LlamaForCausalLM`, `MixtralForCausalLM` or `HyenaForCausalLM` that config.json's
    model_type names (`jaxinfer.models.registry`).

    `dtype` ("float32" or "bfloat16") is both the parameter and the compute dtype;
    `attention_backend` is that of `kernels_pallas.flash_attention`. A GPTQ checkpoint loads
    with `QuantizedLinear` layers whose `quant_matmul` backend is `quant_backend`."""
    if quant_backend not in QUANT_BACKENDS:
        raise ValueError(f"quant_backend must be one of {QUANT_BACKENDS}; got {quant_backend!r}")
    model_dir, hf_config = read_model_dir(model_dir)
    _, model_class = model_classes(hf_config.get("model_type"))
    if model_class is MixtralForCausalLM:
        return load_mixtral(model_dir, dtype=dtype, attention_backend=attention_backend)
    if model_class is HyenaForCausalLM:
        return load_hyena(model_dir, dtype=dtype)
    config = LlamaConfig.from_hf_config(hf_config, dtype=dtype,
                                        attention_backend=attention_backend)
    gptq = read_gptq_config(model_dir, hf_config)
    if gptq is None:
        return load_model(model_dir, config, LlamaForCausalLM)
    quantized: dict[tuple, tuple[str, GPTQLayerSpec]] = {}

    def float_names(flat, files):  # the GPTQ layers' kernels are left for replace_gptq_layers
        quantized.update(_gptq_modules(flat, gptq, files))
        return {path: n for path, n in param_names(flat, files).items() if path not in quantized}

    def replace_gptq_layers(model, reader):
        for path, (module, spec) in quantized.items():
            parent, name = _module_at(model, path[:-2]), path[-2]
            layer = getattr(parent, name)
            weight = _read_gptq_weight(reader, module, spec, tuple(layer.kernel.shape),
                                       gptq.checkpoint_format)
            setattr(parent, name, quantized_linear(layer, weight, quant_backend))
        return model

    model = load_model(model_dir, config, LlamaForCausalLM, names=float_names,
                       finish=replace_gptq_layers)
    if quantized:
        log.info("loaded %d GPTQ layers (%s, %d-bit base)", len(quantized),
                 gptq.checkpoint_format, gptq.bits)
    return model


def _gptq_tensors(model, checkpoint_format: str | None) -> tuple[dict, GPTQConfig | None]:
    """({tensor name: array}, config) for the model's QuantizedLinear layers; ({}, None) if none.
    The config keeps the model's float decoder linear layers float (a "-:" rule each)."""
    weights, float_modules = {}, []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedLinear):
            weights[hf_name(path + ("kernel",))[0].removesuffix(".weight")] = node.weight
        elif isinstance(node, Linear) and path[:1] == ("layers",):
            float_modules.append(hf_name(path + ("kernel",))[0].removesuffix(".weight"))
    if not weights:
        return {}, None
    if checkpoint_format is None:  # v1 (widest reader support) unless a zero point is 0
        v1_ok = all(bool((w.zeros >= 1).all()) for w in weights.values())
        checkpoint_format = "gptq" if v1_ok else "gptq_v2"
    elif checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS} or None; "
                         f"got {checkpoint_format!r}")
    config = gptq_config_for(weights, checkpoint_format, float_modules)  # refuses mixed bits
    tensors = {}
    for module, w in weights.items():
        for t, x in to_gptq_tensors(w, checkpoint_format).items():
            tensors[f"{module}.{t}"] = jnp.asarray(x)
    return tensors, config


def save_pretrained(model: LlamaForCausalLM | MixtralForCausalLM | HyenaForCausalLM,
                    out_dir: str | os.PathLike, *, tokenizer=None,
                    max_shard_bytes: int | None = None,
                    checkpoint_format: str | None = None,
                    extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write config.json and safetensors that `transformers.AutoModelForCausalLM` loads back
    (Llama family, Mixtral; Hyena, which transformers lacks, loads back through `load_pretrained`).

    With `max_shard_bytes` the weights are split into shards plus `model.safetensors.index.json`;
    a `tokenizers.Tokenizer` given as `tokenizer` is saved beside them as tokenizer.json, and
    `extra_files` ({name: source file}, e.g. the source directory's tokenizer files) are copied in
    with the checkpoint, replacing out_dir's files of those names in the same step.
    A Llama-family model with `QuantizedLinear` layers is written as an HF GPTQ checkpoint (a
    `quantization_config` in config.json, also written as quantize_config.json):
    `checkpoint_format` "gptq" (v1), "gptq_v2", or None for v1 unless some zero point is 0
    (which v1 cannot store). Mixtral and Hyena models are written in float.

    out_dir's previous checkpoint (weights, index, config.json, quantize_config.json) is replaced
    as a whole, so it is never left half-written or with stale files; its other files (tokenizer
    files, generation_config.json, ...) are kept. See `hf_write.write_checkpoint`."""
    if not isinstance(model, (LlamaForCausalLM, MixtralForCausalLM, HyenaForCausalLM)):
        raise TypeError(f"model must be a jaxinfer LlamaForCausalLM, MixtralForCausalLM or "
                        f"HyenaForCausalLM (jaxinfer.load_pretrained gives one); "
                        f"got {type(model).__name__}")
    gptq = None
    if isinstance(model, (MixtralForCausalLM, HyenaForCausalLM)):
        if checkpoint_format is not None:
            raise ValueError(f"checkpoint_format applies to GPTQ checkpoints of Llama-family "
                             f"models; a {type(model).__name__} is saved in float, got "
                             f"checkpoint_format={checkpoint_format!r}")
        if isinstance(model, MixtralForCausalLM):
            tensors = hf_tensors(model, expert_tensors)
        else:
            tensors = hf_tensors(model)
    else:
        gptq_tensors, gptq = _gptq_tensors(model, checkpoint_format)
        tensors = hf_tensors(model) | gptq_tensors
    hf_config = model.config.to_hf_config()  # after _gptq_tensors: its errors say more
    json_files: dict[str, dict] = {}  # written after the weights, config.json last
    if gptq is not None:
        hf_config["quantization_config"] = gptq.to_dict()
        json_files[QUANTIZE_CONFIG_FILE] = gptq.to_dict()
    json_files[CONFIG_FILE] = hf_config
    return write_checkpoint(out_dir, tensors, json_files, max_shard_bytes=max_shard_bytes,
                            tokenizer=tokenizer, extra_files=extra_files)
