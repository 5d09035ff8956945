"""Flax NNX language models: Llama-family decoders, Mixtral sparse MoE, Hyena long convolutions."""

from jaxinfer.models.hyena import HyenaForCausalLM
from jaxinfer.models.kv_cache import KVCache
from jaxinfer.models.llama import LlamaForCausalLM
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig
from jaxinfer.models.registry import MODEL_CLASSES, model_classes

__all__ = ["HyenaForCausalLM", "KVCache", "LlamaForCausalLM", "MODEL_CLASSES", "MixtralConfig",
           "MixtralForCausalLM", "model_classes"]
