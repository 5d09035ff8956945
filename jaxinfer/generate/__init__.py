"""Generation: sampling, batched `generate`, the continuous-batching `Engine`, speculative
decoding, shared-prefix (Hydragen) attention, SnapKV selection and int8 KV quantization."""

from jaxinfer.generate.engine import Engine, Event, StepStats
from jaxinfer.generate.hydragen import shared_prefix_attention
from jaxinfer.models.kv_quant import dequantize_kv, quantize_kv
from jaxinfer.generate.sampling import SamplingArrays, sample_next_token
from jaxinfer.generate.sampling_params import SamplingParams
from jaxinfer.generate.snapkv import snapkv_select
from jaxinfer.generate.speculative import SpeculativeOutput, speculative_generate
from jaxinfer.generate.static_batch import generate

__all__ = ["Engine", "Event", "SamplingArrays", "SamplingParams", "SpeculativeOutput", "StepStats",
           "dequantize_kv", "generate", "quantize_kv", "sample_next_token",
           "shared_prefix_attention", "snapkv_select", "speculative_generate"]
