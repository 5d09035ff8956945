"""Checks on token-id inputs, done at the public boundary so users never see an error from inside XLA."""

from __future__ import annotations

import operator

import jax
import numpy as np

from jaxinfer.config import LlamaConfig


def check_input_ids(input_ids, config: LlamaConfig, *, new_tokens: int = 0,
                    name: str = "input_ids"):
    """Return input_ids as an array after checking that it is an integer [batch, seq] array of
    in-vocabulary ids that leaves room for `new_tokens` more positions within the model's context.
    Errors call the argument `name`.

    Nested lists and torch tensors (through numpy) are accepted. Value checks are skipped for
    traced arrays (inside jit the caller is responsible)."""
    input_ids = token_array(input_ids, name, "a rectangular [batch, seq] array")
    shape = getattr(input_ids, "shape", None)
    if shape is None or len(shape) != 2:
        got = type(input_ids).__name__ if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"{name} must be a 2-D [batch, seq] array of token ids; got {got}")
    check_integer_ids(getattr(input_ids, "dtype", None), name)
    batch, seq = shape
    if batch == 0 or seq == 0:
        raise ValueError(f"{name} must have at least one sequence and one token; got {shape}")
    context = config.max_position_embeddings
    if new_tokens and seq + new_tokens > context:
        raise ValueError(
            f"prompt of {seq} tokens plus {new_tokens} new tokens exceeds the model's context of "
            f"{context} positions (max_position_embeddings)"
        )
    if seq > context:
        raise ValueError(f"{name} has sequences of {seq} tokens, which exceeds the model's context "
                         f"of {context} positions (max_position_embeddings)")
    if isinstance(input_ids, jax.core.Tracer):
        return input_ids
    check_in_vocab(np.asarray(input_ids), config.vocab_size, name)
    return input_ids


# The token-id checks every entry point shares (here for the models' [batch, seq] ids, and for
# the engine's 1-D prompts in `jaxinfer.generate.checks.check_prompt`), so they accept the same
# inputs and refuse them with the same messages.

def token_array(ids, name: str, expected: str):
    """ids as an array where it arrives as a torch tensor (detached, through numpy on the CPU) or
    as nested lists or tuples (ValueError "<name> must be <expected>; got ragged nested lists"
    where they are not rectangular); anything else (NumPy and JAX arrays, tracers) unchanged."""
    if type(ids).__module__ == "torch":  # a torch.Tensor
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, (list, tuple)):
        try:
            ids = np.asarray(ids)
        except ValueError:
            raise ValueError(f"{name} must be {expected}; got ragged nested lists") from None
    return ids


def check_integer_ids(dtype, name: str) -> None:
    """ValueError unless ``dtype`` (NumPy-like, None or another library's) is an integer type."""
    try:
        integer = np.issubdtype(np.dtype(dtype), np.integer)
    except TypeError:
        integer = False
    if not integer:
        raise ValueError(f"{name} must hold integer token ids; got dtype {dtype}")


def check_in_vocab(ids: np.ndarray, vocab_size: int, name: str) -> None:
    """ValueError naming the first out-of-range id found (the lowest if negative, else the
    highest) unless every id of the non-empty integer array lies in [0, vocab_size)."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (vocab_size); found token id "
                         f"{low if low < 0 else high}")


def check_segment_ids(segment_ids, shape: tuple[int, int]):
    """Return segment_ids as an array after checking that it is an integer [batch, seq] array of
    the input ids' `shape` (packed documents: each contiguous run of one id is a document)."""
    segment_ids = token_array(segment_ids, "segment_ids", "a rectangular [batch, seq] array")
    got = tuple(getattr(segment_ids, "shape", ()) or ())
    if got != tuple(shape):
        raise ValueError(f"segment_ids must be [batch, seq] = {list(shape)} like input_ids; got "
                         f"shape {list(got) if hasattr(segment_ids, 'shape') else None}")
    check_integer_ids(getattr(segment_ids, "dtype", None), "segment_ids")
    return jax.numpy.asarray(segment_ids, jax.numpy.int32)


def known_start(start: jax.Array | int) -> jax.Array | int:
    """A cache start as a Python int when its value is known (a Python, NumPy or concrete JAX
    integer), so that it can be checked against the cache; a traced start unchanged. Anything
    but an integer scalar (a bool, a float, an array of positions) is a ValueError."""
    dtype = getattr(start, "dtype", None)
    integer = (isinstance(start, int) if dtype is None
               else np.issubdtype(np.dtype(dtype), np.integer) and np.ndim(start) == 0)
    if not integer or isinstance(start, bool):
        raise ValueError(f"start must be an integer scalar (the first position); got {start!r}")
    try:
        return operator.index(start)
    except TypeError:  # a tracer: jax raises TracerIntegerConversionError, a TypeError
        return start
