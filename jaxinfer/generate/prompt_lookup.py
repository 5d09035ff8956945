"""Prompt-lookup drafts for the engine (Aggressive Decoding's input-guided drafting, host side).

The draft is what followed the latest earlier occurrence of the sequence's last `ngram` tokens:
outputs that copy from the prompt (summaries, edits, code, retrieval answers) are proposed whole.
The engine verifies drafts by sampling the target at every drafted position with the keys it would
use anyway (`engine_step`), so accepted tokens are exactly the tokens decoding one at a time
would produce; a draft is a guess that costs compute when wrong, never a change of output.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def lookup_draft(tokens: list[int], ngram: int, max_tokens: int) -> list[int]:
    """Up to max_tokens tokens that followed the latest earlier match of tokens[-ngram:] (the
    match must end before the last token); [] when there is none."""
    if max_tokens < 1 or len(tokens) <= ngram:
        return []
    ids = np.asarray(tokens)
    windows = sliding_window_view(ids[:-1], ngram)  # [len - ngram, ngram]: earlier n-grams
    hits = np.flatnonzero(np.all(windows == ids[-ngram:], axis=1))
    if hits.size == 0:
        return []
    start = int(hits[-1]) + ngram
    return ids[start:start + max_tokens].tolist()
