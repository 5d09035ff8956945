"""Generation: sampling and batched `generate` (the serving engine builds on these)."""

from jaxinfer.generate.sampling import SamplingArrays, sample_next_token
from jaxinfer.generate.static_batch import generate

__all__ = ["SamplingArrays", "generate", "sample_next_token"]
