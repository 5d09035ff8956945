"""jaxinfer: fast, memory-lean training and generation of large language models in JAX.

The public API::

    model = jaxinfer.load_pretrained("path/to/hf_dir", dtype="float32")
    logits = model(input_ids)                          # int32 [batch, seq] -> [batch, seq, vocab]
    out = jaxinfer.generate(model, input_ids, max_new_tokens=32)
    engine = jaxinfer.Engine(model)                    # continuous batching over a paged KV cache
    rid = engine.submit(prompt_ids, jaxinfer.SamplingParams(max_tokens=64, temperature=0.8))
    results = engine.run_until_done()                  # {request id: generated token ids}
    jaxinfer.save_pretrained(model, "out_dir")
    # group_size must divide each layer's in_features: 128 suits most checkpoints, 16 the
    # embedded model (jaxinfer.default_model_dir()), -1 is one group per output channel
    qmodel = jaxinfer.quantize(model, method="gptq", bits=4, group_size=128, calibration=token_ids)
    tok = jaxinfer.load_tokenizer("path/to/hf_dir")
"""

from jaxinfer.assets import default_model_dir
from jaxinfer.checkpoint import load_pretrained, save_pretrained
from jaxinfer.config import HyenaConfig, LlamaConfig, RopeScaling
from jaxinfer.generate import Engine, SamplingParams, generate, speculative_generate
from jaxinfer.models import (HyenaForCausalLM, LlamaForCausalLM, MixtralConfig,
                             MixtralForCausalLM)
from jaxinfer.quant import quantize
from jaxinfer.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "HyenaConfig",
    "HyenaForCausalLM",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MixtralConfig",
    "MixtralForCausalLM",
    "RopeScaling",
    "SamplingParams",
    "default_model_dir",
    "generate",
    "load_pretrained",
    "load_tokenizer",
    "quantize",
    "save_pretrained",
    "speculative_generate",
]
