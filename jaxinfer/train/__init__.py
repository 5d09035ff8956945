"""Training: data windows or packed documents, AdamW schedule, jitted steps and a resumable loop."""

from jaxinfer.train.data import (PackedDocuments, TokenWindows, split_documents, split_held_out,
                                 tokenize_corpus)
from jaxinfer.train.loop import (CheckpointWriteError, TrainConfig, TrainingInterrupted,
                                 TrainResult, train)

__all__ = ["CheckpointWriteError", "PackedDocuments", "TokenWindows", "TrainConfig",
           "TrainResult", "TrainingInterrupted", "split_documents", "split_held_out",
           "tokenize_corpus", "train"]
