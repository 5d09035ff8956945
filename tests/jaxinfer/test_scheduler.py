"""The engine's scheduler alone (no model): which tokens each step gets.

`complete` stands in for the engine's step: a chunk that samples appends one token (every draft
token rejected), any other chunk just adds its tokens to the cache.
"""

from __future__ import annotations

from jaxinfer.generate.sampling_params import SamplingParams
from jaxinfer.generate.scheduler import Chunk, Request, Scheduler

BUDGET = 8
PARAMS = SamplingParams(max_tokens=16, temperature=0.0)


def request(request_id: int, prompt_len: int, arrival: int) -> Request:
    return Request(request_id, 0, list(range(1, prompt_len + 1)), PARAMS, arrival)


def scheduler() -> Scheduler:
    return Scheduler(max_batch=4, page_size=4, num_pages=32, max_tokens_per_step=BUDGET,
                     prefix_caching=False)


def complete(chunks: list[Chunk]) -> None:
    for chunk in chunks:
        req = chunk.request
        if chunk.samples:
            req.computed = chunk.start + chunk.count - len(req.draft)
            req.draft = []
            req.output.append(0)
        else:
            req.computed += chunk.count


def scheduled(chunks: list[Chunk]) -> list[tuple[int, int]]:
    return [(chunk.request.request_id, chunk.count) for chunk in chunks]


def test_a_decode_with_a_draft_is_scheduled_before_an_older_prompt():
    """An older request still prefilling (re-admitted after a preemption, so behind a newer one in
    the queue but ahead of it by arrival) must not take a drafting decode's token."""
    sched = scheduler()
    decode, prefill = request(1, 3, arrival=1), request(0, 20, arrival=0)
    sched.add(decode)
    complete(sched.schedule())
    sched.add(prefill)
    chunks = sched.schedule()
    assert scheduled(chunks) == [(1, 1), (0, 7)]
    complete(chunks)
    decode.draft = [5] * 7
    chunks = sched.schedule()
    assert scheduled(chunks) == [(1, 8)]  # the decode first, its draft fitted to the budget
    assert decode.draft == [5] * 7


def test_a_draft_never_takes_a_later_decodes_token():
    """Two drafting decodes on a budget smaller than both drafts: the first keeps what the
    budget leaves after the second's token; the second decodes without its draft."""
    sched = scheduler()
    first, second = request(0, 3, arrival=0), request(1, 3, arrival=1)
    sched.add(first)
    sched.add(second)
    complete(sched.schedule())
    first.draft, second.draft = [5] * 7, [6] * 7
    assert scheduled(sched.schedule()) == [(0, 7), (1, 1)]
    assert first.draft == [5] * 6 and second.draft == []


def test_a_prompt_at_its_snapkv_window_gets_its_window_chunk_despite_steady_decodes():
    """A prompt SnapKV compresses must end with one chunk holding its whole 8-token window, the
    whole budget here: scheduled after the decodes it would wait for as long as any request
    decodes. Under a steady stream of short requests it must still finish its prompt within a
    few steps, and a decode it pushes out of a step gets its token in the next one."""
    sched = Scheduler(max_batch=3, page_size=4, num_pages=40, max_tokens_per_step=BUDGET,
                      prefix_caching=False, snapkv_window=8)
    short = SamplingParams(max_tokens=30, temperature=0.0)
    arrivals = iter(range(100))  # request ids and arrival order

    def new_short() -> Request:
        arrival = next(arrivals)
        return Request(arrival, 0, [1, 2, 3], short, arrival)

    traffic = [new_short()]
    compressed = Request(1, 0, list(range(1, 21)), PARAMS, next(arrivals), compress=True)
    traffic.append(new_short())
    sched.add(traffic[0])
    sched.add(compressed)
    sched.add(traffic[1])
    waited: dict[int, int] = {}  # id(decoding request) -> steps since its last token
    first_token = None  # the step that sampled the compressed prompt's first token
    for step in range(1, 40):
        chunks = sched.schedule()
        served = {id(chunk.request) for chunk in chunks}
        for request in sched.running:
            if request.decoding:
                unserved = id(request) not in served
                waited[id(request)] = waited.get(id(request), 0) + 1 if unserved else 0
                assert waited[id(request)] <= 1, "a decode waited two steps in a row"
        complete(chunks)
        if compressed.output and first_token is None:
            first_token = step
        for request in list(sched.running):
            if len(request.output) >= request.params.max_tokens:
                sched.finish(request)
                if request in traffic:  # steady traffic: another short request comes
                    traffic.remove(request)
                    traffic.append(new_short())
                    sched.add(traffic[-1])
    assert first_token is not None, "the compressed prompt never got its window chunk"
    assert first_token <= 4  # its first 12 tokens next to one or two decodes, then its window
    assert compressed.finished


def test_a_preempted_window_chunk_frees_the_step_for_another_prompt_to_compress():
    """A, newest and at its window, is scheduled first; the older decode D then needs a page and
    preempts A, whose chunk leaves the step. C, another prompt to compress, may then finish its
    prompt (window included) in this step: one compressing chunk per step, and there is none."""
    sched = Scheduler(max_batch=4, page_size=4, num_pages=6, max_tokens_per_step=16,
                      prefix_caching=False, snapkv_window=4)
    d = Request(0, 0, list(range(1, 9)), PARAMS, 0)
    d.output = [1]  # decoding: 8 tokens cached in 2 full pages, its next one needs a third
    c = Request(1, 0, list(range(1, 11)), PARAMS, 1, compress=True)  # 2 of 10 computed
    a = Request(2, 0, list(range(1, 13)), PARAMS, 2, compress=True)  # at its window: 8 of 12
    for r, pages, computed in ((d, 2, 8), (c, 1, 2), (a, 2, 8)):
        r.slot = sched.free_slots.pop()
        r.pages = sched.allocator.allocate(pages)
        r.computed = computed
        sched.running.append(r)
    assert sched.at_window(a) and not sched.at_window(c) and sched.allocator.num_free == 1
    chunks = sched.schedule()
    assert list(sched.waiting) == [a]
    assert [(ch.request.request_id, ch.start, ch.count, ch.compresses) for ch in chunks] == [
        (0, 8, 1, False), (1, 2, 8, True)]

