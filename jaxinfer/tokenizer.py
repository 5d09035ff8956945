"""Tokenizers: load a Hugging Face tokenizer.json, or train a byte-level BPE on a text corpus."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a model directory holding tokenizer.json, or from the file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    return Tokenizer.from_file(str(file))


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer (any text encodes; no unknown tokens);
    `progress` shows the tokenizers library's own progress bars (minutes on a large corpus)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
