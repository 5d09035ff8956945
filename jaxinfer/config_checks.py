"""Field checks shared by the model configs (`LlamaConfig`, `MixtralConfig`, `HyenaConfig`) and
the GPTQ settings (`quant.quantize`, a checkpoint's quantization_config).

Configs come from Python, from JSON and from numpy, so numpy scalars count as the Python numbers
they hold (and are stored as those, which hash alike and can be written as JSON); bools are not
numbers here, and strings (a JSON typo such as "10000") are refused rather than coerced.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_group_size(value: Any, *, where: str | None = None) -> None:
    """A GPTQ group size: a positive int (input rows per scale/zero group) or -1 (per channel).
    `where`, when given, prefixes the message (the file or rule it came from)."""
    if not is_int(value) or (value != -1 and value <= 0):
        prefix = "" if where is None else f"{where}: "
        raise ValueError(f"{prefix}group_size must be a positive int or -1 (per channel); "
                         f"got {value!r}")


def normalize_fields(config: Any, ints: tuple[str, ...], floats: tuple[str, ...],
                      bools: tuple[str, ...]) -> None:
    """Store numpy ints, floats and bools of a frozen dataclass's fields as Python ones; values
    of another type are left for the checks to refuse."""
    for name in ints:
        if is_int(getattr(config, name)):
            object.__setattr__(config, name, int(getattr(config, name)))
    for name in floats:
        if is_real(getattr(config, name)):
            object.__setattr__(config, name, float(getattr(config, name)))
    for name in bools:
        if isinstance(getattr(config, name), np.bool_):
            object.__setattr__(config, name, bool(getattr(config, name)))


def check_finite(name: str, value: Any, *, low: float = 0.0, low_inclusive: bool = False) -> None:
    """A finite number above `low` (or at it, with `low_inclusive`): a NaN, an infinity or a
    negative value here turns a model's every output into NaN rather than failing."""
    bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
    if not is_real(value):
        raise TypeError(f"{name} must be a finite number {bound}; got {value!r}")
    if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")


def check_bools(config: Any, names: tuple[str, ...]) -> None:
    for name in names:  # a string such as "no" would be truthy and switch the feature on
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool; got {value!r}")


def token_ids_to_tuple(eos_token_id: Any) -> Any:
    """eos_token_id as the tuple the configs store: one id, a list or tuple of them, or None
    (no end token); anything else is returned as is for check_token_ids to refuse."""
    if eos_token_id is None:
        return ()
    if is_int(eos_token_id):
        return (int(eos_token_id),)
    if isinstance(eos_token_id, (list, tuple)):
        return tuple(int(i) if is_int(i) else i for i in eos_token_id)
    return eos_token_id


def check_token_ids(config: Any) -> None:
    """bos_token_id (an id or None) and eos_token_id (a tuple of ids) must be ints in
    [0, vocab_size): a string or an id the model cannot emit would only fail mid-generation."""
    vocab = config.vocab_size

    def is_id(i: Any) -> bool:
        return is_int(i) and 0 <= i < vocab

    bos = config.bos_token_id
    if bos is not None and not is_id(bos):
        raise (ValueError if is_int(bos) else TypeError)(
            f"bos_token_id must be None or a token id (an int in [0, vocab_size {vocab})); "
            f"got {bos!r}")
    eos = config.eos_token_id
    if not isinstance(eos, tuple) or not all(is_id(i) for i in eos):
        wrong_type = not isinstance(eos, tuple) or not all(is_int(i) for i in eos)
        raise (TypeError if wrong_type else ValueError)(
            f"eos_token_id must be a token id (an int in [0, vocab_size {vocab})), a list of "
            f"them or None; got {eos!r}")
