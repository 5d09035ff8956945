"""Hyena checkpoints: config.json + safetensors <-> `HyenaForCausalLM`.

No transformers class exists for Hyena, so the layout is this module's, written in hf.py's
conventions (names follow the NNX module path with a `model.` prefix, kernels become `weight`
stored [out, in]), so that the files read like a Llama checkpoint's:

    model.embed_tokens.weight                          [vocab, D]
    model.layers.{l}.mixer_norm.weight                 [D]
    model.layers.{l}.mixer.in_proj.{weight,bias}       [(N+1) D, D], [(N+1) D]
    model.layers.{l}.mixer.short_conv.weight           [(N+1) D, short_filter_size]  depthwise taps
    model.layers.{l}.mixer.short_conv.bias             [(N+1) D]
    model.layers.{l}.mixer.filter.sines.{i}.weight     [hidden, in]   implicit filter's sine FFN
    model.layers.{l}.mixer.filter.sines.{i}.{bias,freq} [hidden]
    model.layers.{l}.mixer.filter.out                  [hidden, (N-1) D]
    model.layers.{l}.mixer.filter_bias                 [N-1, D]      skip term of each long conv
    model.layers.{l}.mixer.out_proj.{weight,bias}      [D, D], [D]
    model.layers.{l}.mlp_norm.weight, model.layers.{l}.mlp.{gate,up,down}_proj.weight
    model.norm.weight, lm_head.weight (absent when tie_word_embeddings)

config.json holds `HyenaConfig.to_hf_config()` (model_type "hyena"), which `load_pretrained`
dispatches on; `save_pretrained` writes this layout (single file or sharded) through `hf_tensors`.
"""

from __future__ import annotations

import os

from jaxinfer.checkpoint.gptq_config import refuse_quantized
from jaxinfer.checkpoint.hf_read import load_model, read_model_dir
from jaxinfer.config import HyenaConfig
from jaxinfer.models.hyena import HyenaForCausalLM


def load_hyena(model_dir: str | os.PathLike, dtype: str = "float32",
               fftconv_backend: str = "auto") -> HyenaForCausalLM:
    """Load a directory written by `save_pretrained` (safetensors single or sharded).

    `dtype` ("float32" or "bfloat16") becomes both the parameter and the compute dtype, as in
    `load_pretrained`; the implicit filters stay float32 whatever it is. Tied embeddings are read
    as for the Llama family."""
    model_dir, hf_config = read_model_dir(model_dir)
    config = HyenaConfig.from_hf_config(hf_config, fftconv_backend=fftconv_backend)
    config = config.replace(dtype=dtype, param_dtype=dtype)
    refuse_quantized(model_dir, hf_config, config.model_type)
    return load_model(model_dir, config, HyenaForCausalLM)
