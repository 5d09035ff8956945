"""Checkpoints: Hugging Face safetensors directories and orbax training state."""

from jaxinfer.checkpoint.hf import load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
