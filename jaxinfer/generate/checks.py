"""Argument checks shared by every generation entry point, and the engine's model and prompt checks.

`SamplingParams`, `generate`, `speculative_generate` and `Engine` validate through these, so they
accept the same values and refuse them with the same message, "<name> must be <expected>; got
<value>". Integers are `numbers.Integral` and numbers `numbers.Real` (Python or NumPy scalars:
`np.int64(5)` and `np.float32(0.7)` are as good as 5 and 0.7); bools are refused although Python
counts them as integers, and so are NaN and infinities. The checks return the value as a Python int
or float, so that callers store plain values whatever scalar type came in.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NoReturn

import numpy as np
from flax import nnx

from jaxinfer.config_checks import is_int
from jaxinfer.models.inputs import check_in_vocab, check_integer_ids, token_array

MAX_SEED = 2**32 - 1  # seeds travel to the device as uint32


def is_finite_real(value) -> bool:
    """A real number (Python or NumPy, integers included) that is a finite float, not a bool."""
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def check_int(name: str, value, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """int(value) if it is an integer in [low, high] (None if optional and value is None);
    otherwise ValueError naming `name`, the expected range and the value."""
    if optional and value is None:
        return None
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if low is not None and high is not None:
        expected = f"an integer in [{low}, {high}]"
    else:
        expected = "an integer" + (f" >= {low}" if low is not None else "")
    _fail(name, value, expected, optional)


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, optional: bool = False) -> float | None:
    """float(value) if it is a finite number in [low, high] (in (low, high] with `low_open`;
    None if optional and value is None); otherwise ValueError naming `name`, the expected range
    and the value."""
    if optional and value is None:
        return None
    if is_finite_real(value) and (low is None or value > low or (value == low and not low_open)) \
            and (high is None or value <= high):
        return float(value)
    if low is not None and high is not None:
        expected = f"a number in {'(' if low_open else '['}{low}, {high}]"
    else:
        expected = "a finite number" + (f" {'>' if low_open else '>='} {low}"
                                        if low is not None else "")
    _fail(name, value, expected, optional)


def check_sampling(temperature, top_k, top_p, min_p=None, repetition_penalty=1.0, *,
                   prefix: str = "") -> dict[str, int | float | None]:
    """The sampling settings' one set of rules: {field: checked value}. `prefix` goes before
    each field's name in a message (`SamplingParams.` for its fields)."""
    return dict(
        temperature=check_real(prefix + "temperature", temperature, low=0),
        top_k=check_int(prefix + "top_k", top_k, low=1, optional=True),
        top_p=check_real(prefix + "top_p", top_p, low=0, high=1, low_open=True, optional=True),
        min_p=check_real(prefix + "min_p", min_p, low=0, high=1, optional=True),
        repetition_penalty=check_real(prefix + "repetition_penalty", repetition_penalty, low=0,
                                      low_open=True))


def _fail(name: str, value, expected: str, optional: bool) -> NoReturn:
    raise ValueError(f"{name} must be {'None or ' if optional else ''}{expected}; got {value!r}")


def check_prompt(prompt_ids, vocab_size: int) -> list[int]:
    """A request's prompt as a list of ids: a non-empty 1-D integer sequence in the vocabulary
    (a list, a NumPy or JAX array or a torch tensor; the models' `check_input_ids` rules)."""
    ids = np.asarray(token_array(prompt_ids, "prompt_ids", "a flat sequence of token ids"))
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1-D sequence of token ids; got "
                         f"shape {ids.shape}")
    check_integer_ids(ids.dtype, "prompt_ids")
    check_in_vocab(ids, vocab_size, "prompt_ids")
    return ids.tolist()


def check_model(name: str, model) -> None:
    """TypeError unless ``model`` is a jaxinfer model (a module with its config), not a path or a
    transformers model passed where a loaded model belongs."""
    if not (isinstance(model, nnx.Module) and hasattr(model, "config")):
        raise TypeError(f"{name} must be a jaxinfer model (jaxinfer.load_pretrained(path) gives "
                        f"one); got {type(model).__name__}")


def check_paged_model(name: str, model) -> None:
    """TypeError unless the model has a paged KV cache (what the engine runs)."""
    check_model(name, model)
    if not hasattr(model, "forward_paged"):
        raise TypeError(f"the paged Engine serves attention models (Llama, Mistral, Qwen2, "
                        f"Mixtral); {name} {type(model).__name__} has no paged KV cache: use "
                        f"jaxinfer.generate")


def check_context(whose: str, config, max_model_len: int) -> None:
    """ValueError unless the model serves max_model_len positions."""
    if max_model_len > config.max_position_embeddings:
        raise ValueError(f"max_model_len must be <= {whose} context "
                         f"({config.max_position_embeddings}); got {max_model_len}")


def check_snapkv_window(config, snapkv_budget: int | None, whose: str = "the model's") -> None:
    """ValueError for SnapKV on a sliding-window model (target or draft): SnapKV packs a prompt's
    kept tokens into consecutive cache slots, and the paged kernels cut their window by slot, so
    the window would span other tokens than the model's (HF's mask is by position)."""
    if snapkv_budget is not None and config.sliding_window is not None:
        raise ValueError(f"snapkv_budget needs a model without sliding_window: SnapKV's compacted "
                         f"cache has no positions to cut the window by; got snapkv_budget="
                         f"{snapkv_budget} with {whose} sliding_window={config.sliding_window}")


def check_draft_model(draft_model, config, max_model_len: int, speculative_tokens: int) -> None:
    """ValueError (TypeError) for a draft model the engine cannot pair with this target."""
    check_paged_model("draft_model", draft_model)
    if draft_model.config.vocab_size != config.vocab_size:
        raise ValueError(f"draft_model must share the model's vocabulary; got draft "
                         f"vocab_size {draft_model.config.vocab_size}, model vocab_size "
                         f"{config.vocab_size}")
    if speculative_tokens == 0:
        raise ValueError("draft_model needs speculative_tokens >= 1 (the tokens it guesses "
                         "per step); got speculative_tokens=0")
    check_context("the draft model's", draft_model.config, max_model_len)
