"""Training data: a tokenized corpus cut into random next-token windows (`TokenWindows`), or its
documents packed whole into rows with segment ids (`PackedDocuments`).

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
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(f"corpus has {len(self.tokens)} tokens; need at least seq_len + 1 = "
                             f"{self.seq_len + 1}")

    def batch(self, position: int) -> np.ndarray:
        """The batch at `position` (0, 1, 2, ...): int32 [batch_size, seq_len + 1], windows
        starting anywhere from 0 to the last start that fits, len(tokens) - seq_len - 1."""
        rng = np.random.default_rng([self.seed, position])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)

    def fixed_batches(self, count: int) -> list[np.ndarray]:
        """`count` non-overlapping, evenly spread batches: a stable evaluation set."""
        window = self.seq_len + 1
        usable = len(self.tokens) // window
        per = min(usable, count * self.batch_size)
        starts = np.linspace(0, (usable - 1) * window, per).astype(np.int64)
        rows = np.stack([self.tokens[s:s + window] for s in starts]).astype(np.int32)
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)
                if len(rows[i:i + self.batch_size]) == self.batch_size] or [rows]


@dataclasses.dataclass(frozen=True)
class PackedDocuments:
    """Documents packed into rows of seq_len + 1 tokens, with segment ids telling them apart.

    Each epoch takes the documents in an order shuffled by (seed, epoch), concatenates them and
    cuts the stream into consecutive rows of seq_len + 1 tokens (the remainder, under one row, is
    dropped). A document cut by a row boundary continues in the next row as a new segment (RoPE
    positions restart there, as for a document of its own). Segment ids number the pieces of a
    row 1, 2, ... in order; 0 (padding) never occurs here but is masked by the loss. Batch i is
    rows i B .. i B + B - 1 of the epochs laid end to end: a pure function of (seed, i)."""

    documents: tuple[np.ndarray, ...]  # each int32 [length >= 1]
    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        docs = tuple(np.asarray(d, np.int32) for d in self.documents)
        bad = next((i for i, d in enumerate(docs) if d.ndim != 1 or d.size == 0), None)
        if not docs or bad is not None:
            got = "0 documents" if not docs else f"documents[{bad}] of shape {docs[bad].shape}"
            raise ValueError(f"documents must be a non-empty sequence of non-empty 1-D token "
                             f"arrays; got {got}")
        object.__setattr__(self, "documents", docs)
        # computed once: batch() must cost O(its rows), not O(documents), every step
        object.__setattr__(self, "_lengths", np.fromiter((len(d) for d in docs), np.int64,
                                                         len(docs)))
        object.__setattr__(self, "_epochs", {})  # epoch -> (order, ends), the last two
        object.__setattr__(self, "_rows_per_epoch",
                           int(self._lengths.sum()) // (self.seq_len + 1))
        if self.rows_per_epoch < 1:
            raise ValueError(f"documents hold {self._lengths.sum()} tokens; need at least one row "
                             f"of seq_len + 1 = {self.seq_len + 1}")

    @property
    def rows_per_epoch(self) -> int:
        return self._rows_per_epoch

    def _layout(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(order, ends): the documents in `order` and their cumulative lengths in it."""
        return order, np.cumsum(self._lengths[order])

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The `_layout` of epoch `epoch`'s shuffled order, cached for the last two epochs (a
        batch spans at most two unless it is longer than an epoch)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                del self._epochs[min(self._epochs)]
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.documents))
            self._epochs[epoch] = self._layout(order)
        return self._epochs[epoch]

    def _row(self, order: np.ndarray, ends: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `row` of the stream of documents in `order` (ends: their cumulative lengths):
        tokens and segment ids, int32 [seq_len + 1] each."""
        width = self.seq_len + 1
        lo, hi = row * width, (row + 1) * width
        tokens, segs = [], []
        k = int(np.searchsorted(ends, lo, side="right"))  # first document ending after lo
        while lo < hi:
            doc_start = ends[k] - len(self.documents[order[k]])
            piece = self.documents[order[k]][lo - doc_start:min(hi, ends[k]) - doc_start]
            tokens.append(piece)
            segs.append(np.full(len(piece), len(segs) + 1, np.int32))
            lo += len(piece)
            k += 1
        return np.concatenate(tokens), np.concatenate(segs)

    def _rows(self, rows: list[tuple[tuple[np.ndarray, np.ndarray], int]]
              ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and segment ids, int32 [len(rows), seq_len + 1] each, of rows given as
        (a `_layout`, row index in it)."""
        out = [self._row(order, ends, r) for (order, ends), r in rows]
        return (np.stack([t for t, _ in out]).astype(np.int32),
                np.stack([s for _, s in out]).astype(np.int32))

    def batch(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch at `position` (0, 1, 2, ...): tokens and segment ids, int32
        [batch_size, seq_len + 1] each."""
        per_epoch = self.rows_per_epoch
        return self._rows([(self._epoch(g // per_epoch), g % per_epoch)
                           for g in range(position * self.batch_size,
                                          (position + 1) * self.batch_size)])

    def fixed_batches(self, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """`count` batches of rows spread evenly over the documents in their given order: a
        stable evaluation set (fewer when there are too few rows; at least one batch)."""
        per = min(self.rows_per_epoch, count * self.batch_size)
        layout = self._layout(np.arange(len(self.documents)))  # the given order
        picks = np.linspace(0, self.rows_per_epoch - 1, per).astype(np.int64)
        tokens, segs = self._rows([(layout, int(r)) for r in picks])
        step = min(self.batch_size, per)
        return [(tokens[i:i + step], segs[i:i + step]) for i in range(0, per - step + 1, step)]


def split_documents(tokens: np.ndarray, separator: int) -> tuple[np.ndarray, ...]:
    """A token stream cut into documents after each `separator` token (the tokenizer's EOS, say):
    each document keeps its separator at the end, so the model learns to end documents; a tail
    without one is a document too."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D; got shape {tokens.shape}")
    cuts = np.flatnonzero(tokens == separator) + 1
    return tuple(d for d in np.split(tokens, cuts) if len(d))


def tokenize_corpus(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """Encode a text corpus line by line (fast, batched) into one int32 token stream."""
    lines = text.splitlines(keepends=True)
    encodings = tokenizer.encode_batch(lines, add_special_tokens=False)
    return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32)


def split_held_out(tokens: np.ndarray, fraction: float, *, separator: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - fraction) of the stream for training, the tail for evaluation.

    With `separator` (packed documents, `split_documents`) the cut moves back to just after the
    last separator before it, so that no document is split between the two streams."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1); got {fraction}")
    cut = int(len(tokens) * (1 - fraction))
    if separator is not None:
        ends = np.flatnonzero(np.asarray(tokens[:cut]) == separator)
        if not len(ends):
            raise ValueError(f"separator {separator} does not occur in the first {cut} tokens "
                             f"(the training part): no document ends before the held-out cut")
        cut = int(ends[-1]) + 1
    return tokens[:cut], tokens[cut:]


def read_corpus(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return path.read_text(encoding="utf-8")
