"""Which config and model classes a Hugging Face config.json's `model_type` names: the one
dispatch that `load_pretrained` and `jaxinfer train --config` share."""

from __future__ import annotations

from flax import nnx

from jaxinfer.config import HYENA_MODEL_TYPE, SUPPORTED_MODEL_TYPES, HyenaConfig, LlamaConfig
from jaxinfer.models.hyena import HyenaForCausalLM
from jaxinfer.models.llama import LlamaForCausalLM
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MIXTRAL_MODEL_TYPE, MixtralConfig

# model_type -> (config class, model class)
MODEL_CLASSES: dict[str, tuple[type, type[nnx.Module]]] = {
    **{t: (LlamaConfig, LlamaForCausalLM) for t in SUPPORTED_MODEL_TYPES},
    MIXTRAL_MODEL_TYPE: (MixtralConfig, MixtralForCausalLM),
    HYENA_MODEL_TYPE: (HyenaConfig, HyenaForCausalLM),
}


def model_classes(model_type: object, name: str = "config.json") -> tuple[type, type[nnx.Module]]:
    """(config class, model class) of a config.json's `model_type`; a ValueError naming the
    file as `name` (how the user knows it) and the supported types for any other value."""
    if not isinstance(model_type, str) or model_type not in MODEL_CLASSES:  # a list: unhashable
        raise ValueError(f"{name}: model_type must be one of {tuple(MODEL_CLASSES)}; "
                         f"got {model_type!r}")
    return MODEL_CLASSES[model_type]
