"""Calibration and evaluation token chunks cut from a text's token stream.

GPTQ needs calibration token ids [n_samples, seq_len]; a held-out perplexity needs chunks the
quantizer never saw. Both come from one stream split by ``jaxinfer.train.data.split_held_out``
(head for calibration, tail held out), so the CLI and the experiments cut text the same way.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.config_checks import is_int
from jaxinfer.models.inputs import check_integer_ids


def token_chunks(tokens: np.ndarray, seq_len: int, n_chunks: int | None = None, *,
                 from_end: bool = False) -> np.ndarray:
    """Consecutive non-overlapping chunks int32 [n, seq_len] of a 1-D token stream.

    ``n_chunks`` None takes every whole chunk; otherwise at most ``n_chunks`` (fewer if the stream
    is short), from the start of the stream or, with ``from_end``, from its end. ``tokens`` must
    hold integer ids (a float stream would be truncated); ``seq_len`` and ``n_chunks`` are Python
    or NumPy ints (not bools)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream; got shape {list(tokens.shape)}")
    if tokens.size:  # an empty list is float64 to numpy: it gets the "fewer than" error below
        check_integer_ids(tokens.dtype, "tokens")
    if not is_int(seq_len) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
    if n_chunks is not None and (not is_int(n_chunks) or n_chunks <= 0):
        raise ValueError(f"n_chunks must be a positive int or None; got {n_chunks!r}")
    seq_len = int(seq_len)
    available = len(tokens) // seq_len
    if available == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of "
                         f"seq_len={seq_len}")
    n = available if n_chunks is None else min(n_chunks, available)
    whole = tokens[len(tokens) - available * seq_len:] if from_end else tokens[:available * seq_len]
    chunks = whole.reshape(available, seq_len)  # [available, seq_len]
    return (chunks[-n:] if from_end else chunks[:n]).astype(np.int32)
