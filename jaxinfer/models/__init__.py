"""Flax NNX language models."""

from jaxinfer.models.kv_cache import KVCache
from jaxinfer.models.llama import LlamaForCausalLM

__all__ = ["KVCache", "LlamaForCausalLM"]
