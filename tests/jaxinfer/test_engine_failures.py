"""The serving `Engine` when a step raises after its model pass: a user's tokenizer failing in a
stop-string check. The step must change no request, so that stream() still yields every token
exactly once and the outputs equal the oracle (`jaxinfer.generate` alone)."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer
from tests.jaxinfer.test_engine import (  # noqa: F401  (model, oracle: fixtures)
    ENGINE, GREEDY, CharTokenizer, model, oracle, random_prompts)

# no greedy continuation of the test prompts decodes to it (CharTokenizer: "z" is 25 mod 26), so
# the stop string only makes the engine call the tokenizer after every token
NEVER_SEEN = "zzzz"
WITH_STOP_STRING = jaxinfer.SamplingParams(**{**GREEDY.__dict__, "stop": (NEVER_SEEN,)})


class FailingTokenizer:
    """CharTokenizer whose decode raises on the calls numbered (from 1) in `failing`."""

    def __init__(self, failing):
        self.failing, self.calls = failing, 0

    def decode(self, ids) -> str:
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError(f"decode call {self.calls} failed")
        return CharTokenizer.decode(ids)


def test_a_step_whose_stop_check_raises_changes_no_request_and_stream_yields_each_token_once(
        model, oracle):
    """The request with the stop string decodes after an older one in the same step: before the
    failing check that one's token was already appended, and was lost to stream()."""
    prompts = random_prompts(np.random.default_rng(14), 3)
    engine = jaxinfer.Engine(model, **ENGINE, tokenizer=FailingTokenizer(failing={3}))
    ids = [engine.submit(p, params)
           for p, params in zip(prompts, [GREEDY, WITH_STOP_STRING, GREEDY])]
    streamed, raised = {}, []
    while engine.num_unfinished:
        try:
            for event in engine.stream():
                streamed.setdefault(event.request_id, []).extend(event.token_ids)
        except RuntimeError as error:  # the step's exception reaches the caller
            raised.append(str(error))
    assert raised == ["decode call 3 failed"]
    results = engine.run_until_done()
    want = {rid: oracle(prompt) for rid, prompt in zip(ids, prompts)}
    assert streamed == results == want


def test_while_a_tokenizer_keeps_raising_no_request_advances_and_abort_frees_the_others(
        model, oracle):
    prompts = random_prompts(np.random.default_rng(15), 3)
    engine = jaxinfer.Engine(model, **ENGINE, tokenizer=FailingTokenizer(failing=range(1, 10**6)))
    ids = [engine.submit(p, params)
           for p, params in zip(prompts, [GREEDY, WITH_STOP_STRING, GREEDY])]
    streamed = {}
    with pytest.raises(RuntimeError, match="decode call 1 failed"):
        for event in engine.stream():
            streamed.setdefault(event.request_id, []).extend(event.token_ids)
    for call in (2, 3):  # every later step raises and leaves the outputs as they were
        before = [list(request.output) for samples in engine._live.values() for request in samples]
        with pytest.raises(RuntimeError, match=f"decode call {call} failed"):
            engine.step()
        assert [request.output for samples in engine._live.values()
                for request in samples] == before
    assert engine.abort(ids[1]) == []  # it never got past its first token's stop check
    for event in engine.stream():
        streamed.setdefault(event.request_id, []).extend(event.token_ids)
    results = engine.run_until_done()
    assert streamed == results == {ids[0]: oracle(prompts[0]), ids[2]: oracle(prompts[2])}
    assert engine.num_unfinished == 0
