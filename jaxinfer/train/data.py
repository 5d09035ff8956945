"""Training data: a tokenized corpus cut into random next-token windows.

Batch `i` is a pure function of (seed, i), so the data position in a checkpoint is one integer and a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """Random windows of seq_len + 1 tokens (inputs and shifted targets) from a 1-D token array."""

    tokens: np.ndarray  # int32 [num_tokens]
    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D; got shape {self.tokens.shape}")
        if len(self.tokens) < self.seq_len + 2:
            raise ValueError(
                f"corpus has {len(self.tokens)} tokens; need more than seq_len + 1 = {self.seq_len + 1}")

    def batch(self, position: int) -> np.ndarray:
        """The batch at `position` (0, 1, 2, ...): int32 [batch_size, seq_len + 1]."""
        rng = np.random.default_rng([self.seed, position])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)

    def fixed_batches(self, count: int) -> list[np.ndarray]:
        """`count` non-overlapping, evenly spread batches: a stable evaluation set."""
        window = self.seq_len + 1
        usable = (len(self.tokens) - 1) // window
        per = min(usable, count * self.batch_size)
        starts = np.linspace(0, (usable - 1) * window, per).astype(np.int64)
        rows = np.stack([self.tokens[s:s + window] for s in starts]).astype(np.int32)
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)
                if len(rows[i:i + self.batch_size]) == self.batch_size] or [rows]


def tokenize_corpus(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """Encode a text corpus line by line (fast, batched) into one int32 token stream."""
    lines = text.splitlines(keepends=True)
    encodings = tokenizer.encode_batch(lines, add_special_tokens=False)
    return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32)


def split_held_out(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - fraction) of the stream for training, the tail for evaluation."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1); got {fraction}")
    cut = int(len(tokens) * (1 - fraction))
    return tokens[:cut], tokens[cut:]


def read_corpus(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return path.read_text(encoding="utf-8")
