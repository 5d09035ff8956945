"""Checks on token-id inputs, done at the public boundary so users never see an error from inside XLA."""

from __future__ import annotations

import jax
import numpy as np

from jaxinfer.config import LlamaConfig


def check_input_ids(input_ids, config: LlamaConfig, *, new_tokens: int = 0):
    """Return input_ids as an array after checking that it is an integer [batch, seq] array of
    in-vocabulary ids that leaves room for `new_tokens` more positions within the model's context.

    Nested lists are accepted. Value checks are skipped for traced arrays (inside jit the caller
    is responsible)."""
    if isinstance(input_ids, (list, tuple)):
        try:
            input_ids = np.asarray(input_ids)
        except ValueError:
            raise ValueError("input_ids must be a rectangular [batch, seq] array; got ragged "
                             "nested lists") from None
    shape = getattr(input_ids, "shape", None)
    dtype = getattr(input_ids, "dtype", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"input_ids must be a 2-D [batch, seq] array; got shape {shape}")
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"input_ids must hold integer token ids; got dtype {dtype}")
    batch, seq = shape
    if batch == 0 or seq == 0:
        raise ValueError(f"input_ids must have at least one sequence and one token; got {shape}")
    total = seq + new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {seq} tokens plus {new_tokens} new tokens exceeds the model's context of "
            f"{config.max_position_embeddings} positions (max_position_embeddings)"
        )
    if isinstance(input_ids, jax.core.Tracer):
        return input_ids
    ids = np.asarray(input_ids)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids must lie in [0, {config.vocab_size}) (vocab_size); found token id {bad}"
        )
    return input_ids


def check_segment_ids(segment_ids, shape: tuple[int, int]):
    """Return segment_ids as an array after checking that it is an integer [batch, seq] array of
    the input ids' `shape` (packed documents: each contiguous run of one id is a document)."""
    if isinstance(segment_ids, (list, tuple)):
        segment_ids = np.asarray(segment_ids)
    got = tuple(getattr(segment_ids, "shape", ()) or ())
    if got != tuple(shape):
        raise ValueError(f"segment_ids must be [batch, seq] = {list(shape)} like input_ids; got "
                         f"shape {list(got) if hasattr(segment_ids, 'shape') else None}")
    dtype = getattr(segment_ids, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"segment_ids must hold integer ids; got dtype {dtype}")
    return jax.numpy.asarray(segment_ids, jax.numpy.int32)
