"""First Finish Search in the engine: of n samples the result is the shortest, whatever order
the batching makes them finish in."""

import numpy as np
import pytest

import jaxinfer
from tests.jaxinfer.test_engine import (  # noqa: F401  (model, oracle: fixtures)
    ENGINE, GREEDY, ORACLE_NEW, VOCAB, model, oracle)


def test_first_finish_search_returns_the_shortest_sample_and_leaves_none_running(model):
    """Samples do not depend on each other (seeded by sample index), so the n=4 run shows every
    sample's full trace; First Finish Search must return the shortest (the lowest index on a tie)."""
    prompt = np.random.default_rng(9).integers(0, VOCAB, size=8).tolist()
    params = jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=1.0, seed=11, n=4,
                                     stop_token_ids=tuple(range(0, VOCAB, 6)), ignore_eos=True)
    engine = jaxinfer.Engine(model, **ENGINE)
    traces = engine.generate([prompt], params)[0]
    assert len({len(t) for t in traces}) > 1, "stop tokens were meant to end samples unevenly"
    first = engine.generate([prompt], jaxinfer.SamplingParams(**{**params.__dict__,
                                                                 "first_finish": True}))[0]
    assert first == min(traces, key=len)
    assert engine.num_unfinished == 0


FFS_GEOMETRY = dict(max_batch=4, page_size=4, num_pages=60)  # room for 4 samples, no preemption


@pytest.mark.parametrize("seed", [1, 6])
def test_first_finish_search_returns_the_shortest_sample_whatever_the_batching(model, seed):
    """A step budget of 8 staggers the samples' prefills and other prompts delay some samples,
    so a longer sample can finish in an earlier step than the shortest; the result must still be
    the shortest of the n samples (as run without First Finish Search), the same every time."""
    rng = np.random.default_rng(9)
    prompt = rng.integers(0, VOCAB, size=12).tolist()
    others = [rng.integers(0, VOCAB, size=14).tolist() for _ in range(2)]
    params = jaxinfer.SamplingParams(max_tokens=14, temperature=1.0, seed=seed, n=4,
                                     stop_token_ids=tuple(range(0, VOCAB, 7)), ignore_eos=True)
    ffs = jaxinfer.SamplingParams(**{**params.__dict__, "first_finish": True})
    traces = jaxinfer.Engine(model, **FFS_GEOMETRY, max_tokens_per_step=64).generate(
        [prompt], params)[0]
    shortest = min(traces, key=len)  # the lowest sample index among the shortest
    assert len({len(t) for t in traces}) > 1, "stop tokens were meant to end samples unevenly"
    results = {}
    for budget in (64, 8):
        engine = jaxinfer.Engine(model, **FFS_GEOMETRY, max_tokens_per_step=budget)
        results[f"alone, budget {budget}"] = engine.generate([prompt], ffs)[0]
        results[f"behind others, budget {budget}"] = engine.generate(
            others + [prompt], [GREEDY] * 2 + [ffs])[2]
        assert engine.num_unfinished == 0
    assert results == {name: shortest for name in results}


def test_aborting_a_first_finish_request_returns_one_list_as_its_result_would_be(model, oracle):
    """Greedy samples all follow the oracle; a step budget of 8 makes a 13-token prompt's second
    sample start two steps after the first (no prefix caching: the second would reuse the
    first's prompt pages). Aborted before any sample finished, the request
    returns the tokens of the sample furthest along; aborted once sample 0 has stopped (at the
    oracle's second token, a stop token) while sample 1 could still finish shorter, sample 0's."""
    rng = np.random.default_rng(10)
    engine = jaxinfer.Engine(model, **{**ENGINE, "max_tokens_per_step": 8}, prefix_caching=False)
    for phase in ("none finished", "sample 0 finished"):
        prompt = rng.integers(0, VOCAB, size=13).tolist()
        want = oracle(prompt)
        assert want[1] not in want[:1], "precondition: the stop token first appears second"
        params = jaxinfer.SamplingParams(max_tokens=ORACLE_NEW, temperature=0.0, n=2,
                                         first_finish=True, stop_token_ids=(want[1],))
        rid = engine.submit(prompt, params)
        per_sample = [[], []]
        while len(per_sample[0]) < (1 if phase == "none finished" else 2):
            for event in engine.step():
                assert not event.finished
                for sample, new in zip(per_sample, event.token_ids):
                    sample.extend(new)
        assert len(per_sample[1]) < len(per_sample[0]), "precondition: sample 1 lags"
        assert engine.abort(rid) == per_sample[0] == want[:len(per_sample[0])]
    assert engine.num_unfinished == 0
