"""`SamplingParams`: one request's generation settings, validated once at construction.

Every field is checked here so that a bad value fails at `Engine.submit` with a message naming the
field, the expected range and the value given, and never inside a jitted step shared with others.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.generate.checks import MAX_SEED, check_int, check_sampling, is_int



@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Settings of one request (vLLM's names and meanings).

    max_tokens: tokens to generate; exact unless a stop condition ends the request earlier.
    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_k, top_p, min_p: None disables the filter. repetition_penalty: 1.0 disables it (HF's rule
    over prompt and generated tokens). stop_token_ids: tokens that end the request (kept in the
    output). stop: strings that end the request once the decoded output contains one (needs the
    engine's tokenizer; the token completing the match is kept). seed: with the sample index and
    the position it determines every random draw, so the output does not depend on the batch.
    n: independent samples of the same prompt. ignore_eos: keep going past the model's EOS.
    first_finish: First Finish Search: of the n samples, the shortest to finish is the result (a
    single token list; the lowest sample index on a tie). Once a sample finishes with L tokens,
    the others stop as soon as they hold L tokens unfinished, so the result is the shortest of
    the n seeded samples whatever the batch, and the request costs about the latency of its
    quickest sample; the shortest trace tends to be the correct one for reasoning models.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int = 0
    n: int = 1
    ignore_eos: bool = False
    first_finish: bool = False

    def __post_init__(self) -> None:
        # lists are accepted for the tuple fields; the frozen dataclass stores tuples (hashable)
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if isinstance(value, str) or is_int(value):
                value = (value,)
            if isinstance(value, list):
                value = tuple(value)
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        """Check every field; numeric ones are stored as Python ints and floats (NumPy scalars
        are accepted, `checks.py`), so equal settings compare and hash equal."""
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"SamplingParams.{name} must be {expected}; "
                             f"got {getattr(self, name)!r}")

        prefix = "SamplingParams."
        checked = dict(
            max_tokens=check_int(prefix + "max_tokens", self.max_tokens, low=1),
            **check_sampling(self.temperature, self.top_k, self.top_p, self.min_p,
                             self.repetition_penalty, prefix=prefix),
            seed=check_int(prefix + "seed", self.seed, low=0, high=MAX_SEED),
            n=check_int(prefix + "n", self.n, low=1))
        if not isinstance(self.stop_token_ids, tuple) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a tuple of integer token ids >= 0")
        checked["stop_token_ids"] = tuple(int(t) for t in self.stop_token_ids)
        if not isinstance(self.stop, tuple) or not all(
                isinstance(s, str) and s for s in self.stop):
            fail("stop", "a tuple of non-empty strings")
        for flag in ("ignore_eos", "first_finish"):  # Python or NumPy bools, stored as bool
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                fail(flag, "a bool")
            checked[flag] = bool(getattr(self, flag))
        for name, value in checked.items():
            object.__setattr__(self, name, value)
