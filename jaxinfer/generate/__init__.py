"""Generation: sampling, batched `generate`, and the continuous-batching `Engine`."""

from jaxinfer.generate.engine import Engine, Event, StepStats
from jaxinfer.generate.sampling import SamplingArrays, sample_next_token
from jaxinfer.generate.sampling_params import SamplingParams
from jaxinfer.generate.static_batch import generate

__all__ = ["Engine", "Event", "SamplingArrays", "SamplingParams", "StepStats", "generate",
           "sample_next_token"]
