"""`MixtralConfig`: a Llama-family config plus the sparse mixture-of-experts fields of HF Mixtral.

It subclasses `LlamaConfig` so that every piece that reads attention / rope / norm fields (the
attention block, rotary tables, generation, sharding's head-count checks) takes it unchanged; the
Llama fields are validated by LlamaConfig's own rules (as a Mistral-style decoder: no biases,
optional sliding window), the MoE fields here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from jaxinfer.config import LlamaConfig, config_json_errors, hf_decoder_fields, read_config_json
from jaxinfer.config_checks import check_finite, is_int, is_real

MIXTRAL_MODEL_TYPE = "mixtral"
# "dropless": sort tokens by expert + ragged_dot, never drops (HF Mixtral's semantics).
# "capacity": one-hot dispatch/combine einsums with a fixed capacity per expert (drops overflow).
# "expert_parallel": capacity dispatch with all_to_all over the mesh axis the active sharding
#     rules give the logical "expert" axis (sharding/expert_parallel.py); without active rules it
#     runs as "capacity" on one device, which is the same computation with one token group.
MOE_IMPLS = ("dropless", "capacity", "expert_parallel")


@dataclasses.dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    """Mixtral: Llama attention blocks whose MLP is `num_local_experts` SwiGLU experts, each token
    routed to its `num_experts_per_tok` highest-scoring experts (softmax over all experts, top-k,
    weights renormalised over the k).

    Router losses in training (`MixtralForCausalLM.aux_loss_weights`, added by
    jaxinfer.train.step's training loss): `router_aux_loss_coef` weights HF's Switch
    load-balancing loss, and only when `output_router_logits` is True, as in HF (whose loss adds
    it only then; both HF defaults, 0.001 and False, are kept, so a checkpoint loaded from HF
    trains as HF would train it). `router_z_loss_coef` weights the ST-MoE router z-loss (ST-MoE
    used 1e-3); HF Mixtral has no z-loss, so it defaults to 0 and is read from / written to
    config.json under that name. `router_jitter_noise` is the router input jitter eps (training
    only, with a key: `MixtralForCausalLM.forward_with_routing`'s `router_key`; 0 = off, Switch
    Transformer used 1e-2). `moe_impl`, `capacity_factor` are run settings (not written to
    config.json): capacity per expert is ceil(capacity_factor * tokens * k / num_experts) per
    token group.
    """

    model_type: str = MIXTRAL_MODEL_TYPE
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    moe_impl: str = "dropless"
    capacity_factor: float = 1.25

    _INT_FIELDS = LlamaConfig._INT_FIELDS + ("num_local_experts", "num_experts_per_tok")
    _FLOAT_FIELDS = LlamaConfig._FLOAT_FIELDS + (
        "router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "capacity_factor")
    _BOOL_FIELDS = LlamaConfig._BOOL_FIELDS + ("output_router_logits",)

    def _validate(self) -> None:
        if self.model_type != MIXTRAL_MODEL_TYPE:
            raise ValueError(f"model_type must be {MIXTRAL_MODEL_TYPE!r}; got {self.model_type!r}")
        if self.qkv_bias or self.o_bias or self.mlp_bias:
            raise ValueError("mixtral has no qkv_bias, o_bias or mlp_bias; got "
                             f"{self.qkv_bias}, {self.o_bias}, {self.mlp_bias}")
        # the attention / norm / dtype fields follow the Llama family's rules (as Mistral)
        llama_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LlamaConfig)}
        LlamaConfig(**{**llama_fields, "model_type": "mistral"})
        for name in ("num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok must be <= num_local_experts; got "
                             f"{self.num_experts_per_tok} > {self.num_local_experts}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}; got {self.moe_impl!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            check_finite(name, getattr(self, name), low_inclusive=True)
        if not isinstance(self.output_router_logits, bool):
            raise ValueError(f"output_router_logits must be a bool; got "
                             f"{self.output_router_logits!r}")
        if not is_real(self.router_jitter_noise) or not 0 <= self.router_jitter_noise < 1:
            raise ValueError(f"router_jitter_noise must lie in [0, 1); got "
                             f"{self.router_jitter_noise}")
        check_finite("capacity_factor", self.capacity_factor)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, dtype: str = "float32",
                       attention_backend: str = "auto", moe_impl: str = "dropless",
                       capacity_factor: float = 1.25) -> MixtralConfig:
        """Build from a Hugging Face Mixtral config dict (transformers 4.x or 5.x spelling)."""
        if hf.get("model_type") != MIXTRAL_MODEL_TYPE:
            raise ValueError(f"config.json: model_type must be {MIXTRAL_MODEL_TYPE!r}; "
                             f"got {hf.get('model_type')!r}")
        # Mixtral's attention blocks are Mistral's, read by the Llama family's parser. Values
        # pass through as config.json has them (no int() / bool(): bool("false") is True), so
        # that the checks name a wrong one.
        fields = dict(hf_decoder_fields(hf, MIXTRAL_MODEL_TYPE),
                      num_local_experts=hf.get("num_local_experts", 8),
                      num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                      router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                      output_router_logits=hf.get("output_router_logits", False),
                      router_z_loss_coef=hf.get("router_z_loss_coef", 0.0),
                      router_jitter_noise=hf.get("router_jitter_noise", 0.0))
        with config_json_errors():  # config.json's values alone, so that errors name the file
            cls(**fields)
        return cls(**fields, dtype=dtype, param_dtype=dtype, attention_backend=attention_backend,
                   moe_impl=moe_impl, capacity_factor=capacity_factor)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that transformers loads as MixtralForCausalLM."""
        llama_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LlamaConfig)}
        hf = LlamaConfig(**{**llama_fields, "model_type": "mistral"}).to_hf_config()
        hf.update(architectures=["MixtralForCausalLM"], model_type=MIXTRAL_MODEL_TYPE,
                  num_local_experts=self.num_local_experts,
                  num_experts_per_tok=self.num_experts_per_tok,
                  router_aux_loss_coef=self.router_aux_loss_coef,
                  output_router_logits=self.output_router_logits,
                  router_z_loss_coef=self.router_z_loss_coef,
                  router_jitter_noise=self.router_jitter_noise)
        return hf

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, dtype: str = "float32",
                       attention_backend: str = "auto", moe_impl: str = "dropless",
                       capacity_factor: float = 1.25) -> MixtralConfig:
        return cls.from_hf_config(read_config_json(path), dtype=dtype,
                                  attention_backend=attention_backend, moe_impl=moe_impl,
                                  capacity_factor=capacity_factor)
