"""Training: data windows, AdamW schedule, jitted steps and a resumable loop."""

from jaxinfer.train.data import TokenWindows, split_held_out, tokenize_corpus
from jaxinfer.train.loop import TrainConfig, TrainResult, train

__all__ = ["TokenWindows", "TrainConfig", "TrainResult", "split_held_out", "tokenize_corpus", "train"]
