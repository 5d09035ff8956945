"""`TrainConfig`: the settings of a training run, saved beside it as train_config.json."""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path

import numpy as np

from jaxinfer.config import read_config_json
from jaxinfer.files import write_json

# what a resumed run may change: how long it goes on and how often it evaluates and saves. The
# rest fix what batch i is (batch_size, grad_accum, seq_len, seed, packing) or how the update
# is made, so a resumed run with other values would not continue the uninterrupted run's curve.
# `steps` sets the cosine schedule's length too: a longer run follows the new total from the
# resume on, so its learning rate can jump up there.
RESUMABLE = ("steps", "eval_every", "checkpoint_every")

_INT_FIELDS = ("steps", "batch_size", "seq_len", "grad_accum", "warmup_steps", "eval_every",
               "eval_batches", "checkpoint_every", "seed")
_FLOAT_FIELDS = ("learning_rate", "weight_decay", "clip_norm")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches averaged per optimizer update
    learning_rate: float = 3e-3
    warmup_steps: int = 100  # 0: the peak learning rate from the first step
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    seed: int = 0
    # a token id (the tokenizer's EOS, say) that ends each document of the training and held-out
    # streams; set, whole documents are packed into rows with segment ids (PackedDocuments)
    # instead of random windows being cut across them
    document_separator: int | None = None

    def __post_init__(self) -> None:
        for names, kind, what, plain in ((_INT_FIELDS, numbers.Integral, "an integer", int),
                                         (_FLOAT_FIELDS, numbers.Real, "a number", float)):
            for name in names:  # bools and strings (a JSON typo) are refused
                value = getattr(self, name)
                if not isinstance(value, kind) or isinstance(value, (bool, np.bool_)):
                    raise TypeError(f"{name} must be {what}; got {value!r}")
                # numpy scalars become Python numbers, which save() can write as JSON
                object.__setattr__(self, name, plain(value))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        # an infinite learning rate or weight decay makes every parameter NaN after one update
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be a finite number > 0; "
                             f"got {self.learning_rate}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0; "
                             f"got {self.weight_decay}")
        # clip_norm 0 would zero every gradient; inf is allowed: it never clips
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive; got {self.clip_norm}")
        for name in ("warmup_steps", "seed"):  # numpy seeds are non-negative
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        sep = self.document_separator
        if sep is not None and (not isinstance(sep, numbers.Integral)
                                or isinstance(sep, (bool, np.bool_)) or sep < 0):
            raise ValueError(f"document_separator must be None or a token id >= 0; got {sep!r}")
        if sep is not None:
            object.__setattr__(self, "document_separator", int(sep))

    def save(self, path: Path) -> None:
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """The config saved at `path`; fields it lacks (older runs) take their defaults. Errors
        name the file."""
        saved = read_config_json(path)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(saved) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig field(s) {unknown}; expected some of "
                             f"{known}")
        try:
            return cls(**saved)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    def changes_on_resume(self, saved: TrainConfig) -> list[str]:
        """The fields outside RESUMABLE in which this config differs from the run's `saved` one,
        as 'name: saved -> this' lines (empty: this config may continue that run)."""
        return [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(self, f.name)!r}"
                for f in dataclasses.fields(self)
                if f.name not in RESUMABLE and getattr(saved, f.name) != getattr(self, f.name)]
