"""When the engine's sequences stop: the tokens a step's samples keep, and First Finish Search.

`decide_tokens` judges one sequence's sampled tokens without changing it, so that the engine can
decide every sequence of a step before it changes any (a user's tokenizer, called for stop
strings, may raise; the step must then change nothing).

First Finish Search (`SamplingParams.first_finish`): of a request's n samples the result is the
shortest finished one, the lowest sample index on a tie. `first_finish` also names the unfinished
samples that can no longer beat it, which the engine stops at once.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from jaxinfer.generate.scheduler import Request


class Tokenizer(Protocol):
    """What stop strings need of a tokenizer (`tokenizers.Tokenizer` and HF tokenizers have it)."""

    def decode(self, ids: list[int]) -> str: ...


def should_stop(request: Request, new: list[int], eos_token_ids: Sequence[int],
                tokenizer: Tokenizer | None) -> bool:
    """Whether the request stops once its output grows by `new` (judging new[-1]): max_tokens
    reached, a stop token, EOS unless ignore_eos, or a stop string in the decoded output."""
    p, token = request.params, new[-1]
    if len(request.output) + len(new) >= p.max_tokens or token in p.stop_token_ids:
        return True
    if not p.ignore_eos and token in eos_token_ids:
        return True
    if p.stop:
        text = tokenizer.decode(request.output + new)
        return any(s in text for s in p.stop)
    return False


def decide_tokens(request: Request, sampled: list[int], eos_token_ids: Sequence[int],
                  tokenizer: Tokenizer | None) -> tuple[list[int], bool]:
    """The tokens the request keeps of those sampled at its chunk's last token and at its draft
    tokens (`request.draft`), and whether it stops; changes nothing. Each draft token stands
    while it equals the token sampled before it, so every kept token is the one plain decoding
    would sample there (same logits, same key)."""
    kept: list[int] = []
    for i, token in enumerate(sampled):
        kept.append(token)
        if should_stop(request, kept, eos_token_ids, tokenizer):
            return kept, True
        if i == len(request.draft) or token != request.draft[i]:
            break
    return kept, False


def first_finish(samples: list[Request], shortest: Request | None,
                 finished: list[Request]) -> tuple[Request | None, list[Request]]:
    """After a step: the shortest sample finished so far (lowest index on a tie) of the previous
    `shortest` (None: none) and the samples that step `finished`, or None; and the unfinished
    samples that can no longer beat it: one already as long (it can only finish longer), or one
    token shorter with a higher index (it could at best tie, and lose the tie). Shorter ones go
    on, so the result is the shortest of the n samples whatever order they finish in: it does
    not depend on how the engine's batching staggers them."""
    candidates = finished + ([] if shortest is None else [shortest])
    if not candidates:
        return None, []
    shortest = min(candidates, key=lambda r: (len(r.output), r.sample_index))
    beaten = [r for r in samples if not r.finished and len(r.output)
              >= len(shortest.output) - (r.sample_index > shortest.sample_index)]
    return shortest, beaten


def aborted_first_finish(samples: list[Request], shortest: Request | None) -> list[int]:
    """What an aborted First Finish request returns, one list as its result would be: the
    shortest finished sample's tokens or, while none has finished, the tokens so far of the
    sample furthest along (lowest index on a tie)."""
    if shortest is None:
        shortest = min(samples, key=lambda r: (-len(r.output), r.sample_index))
    return list(shortest.output)
