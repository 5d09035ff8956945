"""The engine's Python scheduler: FCFS admission, chunked prefill fused with decode, preemption.

Every step (Dynamic SplitFuse, vLLM V1's rule):
1. Running requests, decodes first and then unfinished prompt chunks, oldest first (a SnapKV
   window chunk, below, before them all), each get min(tokens left to compute, budget left)
   tokens. A decode with a speculative draft counts as a decode (it is ordered by being one, not
   by its 1 + len(draft) tokens), and its draft is cut to the budget left after one token for
   each decode still to schedule: a guess never costs another decode its token. A request that
   needs a page when none is free preempts the newest running request (its pages are freed and
   it is requeued at the front of the waiting queue, to be recomputed from prompt + generated
   tokens).
2. Waiting requests, in arrival order, are admitted while a slot is free and the KV of their whole
   sequence fits in the free pages; each gets a chunk of what is left of the budget. A waiting
   request never preempts a running one, and none is admitted in a step that preempted (the
   freed pages go to the running requests that needed them, not to a new prompt).
Prefill and decode are the same operation here: compute the tokens not yet in the cache; the step
samples a token for a request only when its chunk reaches the end of its sequence.

Prefix caching: an admitted request starts from the longest run of its full blocks already in the
pool (`PageAllocator`), always leaving at least its last token to compute (the step that computes
it produces the logits to sample from). Every page a request fills is registered for later ones.

SnapKV: a request marked `compress` (its prompt is longer than the engine's budget) ends its
prompt with a chunk holding at least the whole observation window (so the step sees the window's
queries), one such chunk per step; the engine then compresses its pages (`compressed`). Such a
request neither takes nor offers prefix-cache pages: compression rewrites its pages in place.
Its prompt chunks stop short of the window until one can hold the rest of the prompt; from then
on (`at_window`) its window chunk is scheduled first in the step, before the decodes, the oldest
such request's alone. Scheduled after the decodes it could wait forever: it cannot be split, and
a steady stream of decodes (or their drafts) may never leave a window's worth of budget. Its
window tokens (<= max_tokens_per_step, as the Engine checks) may push the newest decodes to the
next step, but a decode waits two steps in a row only when several prompts reach their windows
in one step: a prompt reaches its window only in a step whose decodes all got their tokens
(prompt chunks take the budget left after them).
"""

from __future__ import annotations

import collections
import dataclasses

from jaxinfer.generate.paged_cache import PageAllocator, block_hashes, pages_for
from jaxinfer.generate.sampling_params import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence: a request with n == 1, or one of the n samples of a request."""

    request_id: int
    sample_index: int
    prompt: list[int]
    params: SamplingParams
    arrival: int  # FCFS order and preemption order (largest = newest)
    output: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the cache
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    preemptions: int = 0
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of its full blocks so far
    registered: int = 0  # leading pages registered in the prefix cache
    from_cache: bool = False  # admitted with a prefix-cache hit, not yet stepped
    draft: list[int] = dataclasses.field(default_factory=list)  # speculative tokens to verify
    compress: bool = False  # SnapKV compresses its prompt's K/V once the prompt is computed
    offset: int = 0  # prompt tokens compression dropped: cache slot = position - offset

    @property
    def tokens(self) -> list[int]:
        """The sequence: prompt, generated tokens and the draft under verification."""
        return self.prompt + self.output + self.draft

    @property
    def remaining(self) -> int:
        """Tokens to compute before the next token (and one per draft token) can be sampled."""
        return len(self.tokens) - self.computed

    @property
    def decoding(self) -> bool:
        """Its prompt and output are computed but for the last token: it samples its next token
        from a one-token chunk (plus its draft, if any). False while it (re)computes a prompt."""
        return len(self.prompt) + len(self.output) - self.computed == 1

    @property
    def cached(self) -> int:
        """Cache slots its computed tokens fill (fewer than `computed` once compressed)."""
        return self.computed - self.offset


@dataclasses.dataclass
class Chunk:
    """`count` tokens of `request` from position `start`; samples iff they reach its end (at the
    last token and at each draft token)."""

    request: Request
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == len(self.request.tokens)

    @property
    def compresses(self) -> bool:
        """It completes a prompt that SnapKV compresses after this step."""
        prompt = len(self.request.prompt)
        return self.request.compress and self.start < prompt == self.start + self.count


class Scheduler:
    def __init__(self, max_batch: int, page_size: int, num_pages: int, max_tokens_per_step: int,
                 prefix_caching: bool = True, snapkv_window: int = 0):
        self.page_size = page_size
        self.snapkv_window = snapkv_window
        self.prefix_caching = prefix_caching
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        self.max_tokens_per_step = max_tokens_per_step
        self.allocator = PageAllocator(num_pages)
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Release a finished (or aborted) request's slot and pages."""
        request.finished = True
        if request in self.running:
            self._release(request)
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def schedule(self) -> list[Chunk]:
        """The chunks of the next step, at most max_tokens_per_step tokens in all."""
        budget = self.max_tokens_per_step
        chunks: dict[int, Chunk] = {}  # id(request) -> chunk, in scheduling order
        preempted = observing = False  # observing: a chunk of this step compresses its prompt
        order = sorted(self.running,
                       key=lambda r: (not self.at_window(r), not r.decoding, r.arrival))
        # decodes not yet given their token (one preempted in this loop keeps its reservation)
        decodes_left = sum(r.decoding for r in order)
        for request in order:
            if budget == 0:
                break
            if request not in self.running:  # preempted earlier in this loop
                continue
            count = min(request.remaining, budget)
            if request.decoding:
                decodes_left -= 1
                if request.draft:  # a guess never takes a later decode's token
                    count = self._fit_draft(request, max(1, min(count, budget - decodes_left)))
            count = self._fit_window(request, count, observing)
            if count == 0:
                continue
            while not self._grow(request, request.cached + count):
                victim = max(self.running, key=lambda r: r.arrival)
                dropped = chunks.pop(id(victim), None)
                budget += dropped.count if dropped else 0
                if dropped is not None and dropped.compresses:  # the step's window chunk is gone
                    observing = False
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request in self.running:
                chunks[id(request)] = Chunk(request, request.computed, count)
                observing |= chunks[id(request)].compresses
                budget -= count
        while not preempted and self.waiting and budget > 0 and self.free_slots:
            request = self.waiting[0]
            hits = self._acquire_prefix(request)  # none for a request to compress: computed stays 0
            count = self._fit_window(request, min(len(request.tokens) - len(hits) * self.page_size,
                                                  budget), observing)
            if count == 0 or (pages_for(len(request.tokens), self.page_size) - len(hits)
                              > self.allocator.num_free):
                self.allocator.free(hits)
                break
            self.waiting.popleft()
            request.pages, request.registered = hits, len(hits)
            request.computed = len(hits) * self.page_size
            request.from_cache = bool(hits)
            self.num_cached_tokens += request.computed
            request.slot = self.free_slots.pop()
            self.running.append(request)
            self._grow(request, request.cached + count)
            chunks[id(request)] = Chunk(request, request.computed, count)
            observing |= chunks[id(request)].compresses
            budget -= count
        return list(chunks.values())

    def compressed(self, request: Request, budget: int) -> None:
        """SnapKV compressed the request's prompt to `budget` cache slots: free the pages past
        them; its later tokens sit len(prompt) - budget slots before their positions."""
        keep = pages_for(budget, self.page_size)
        self.allocator.free(request.pages[keep:])
        del request.pages[keep:]
        request.offset = len(request.prompt) - budget

    def register_computed(self, request: Request) -> None:
        """Offer the request's newly filled pages to the prefix cache."""
        if not self.prefix_caching or request.compress:
            return
        full = request.computed // self.page_size
        hashes = self._block_hashes(request, full)
        for i in range(request.registered, full):
            self.allocator.register(request.pages[i], hashes[i])
        request.registered = max(request.registered, full)

    def _fit_draft(self, request: Request, count: int) -> int:
        """Trim the draft to the `count` tokens its decode may take (the budget left, less one
        token for each decode after it) and to the pages it can get without preempting anyone (a
        guess never costs another request its pages or its token); returns the chunk's count."""
        room = len(request.pages) * self.page_size + self.allocator.num_free * self.page_size
        keep = max(0, min(count, room - request.cached) - 1)
        del request.draft[keep:]
        return request.remaining

    def at_window(self, request: Request) -> bool:
        """Whether the request's next chunk must be its window chunk: it holds a prompt still to
        compress, and all that is left of it fits in the observation window."""
        left = len(request.prompt) - request.computed
        return request.compress and 0 < left <= self.snapkv_window

    def _fit_window(self, request: Request, count: int, observing: bool) -> int:
        """Cut the chunk of a prompt still to compress so that it either ends the prompt, holding
        its whole observation window, while no other chunk of the step does (`observing`), or
        ends before the window. Keeps computed <= len(prompt) - window until the prompt ends;
        returns the chunk's count (0: nothing this step)."""
        end = len(request.prompt)
        if not request.compress or request.computed >= end:
            return count
        if request.computed + count >= end and not observing:
            return end - request.computed
        return min(count, end - self.snapkv_window - request.computed)

    def _acquire_prefix(self, request: Request) -> list[int]:
        """Pages of the longest cached run of the request's leading blocks (not its last token)."""
        if not self.prefix_caching or request.compress:
            return []
        usable = (len(request.tokens) - 1) // self.page_size
        return self.allocator.acquire_cached(self._block_hashes(request, usable))

    def _block_hashes(self, request: Request, blocks: int) -> list[bytes]:
        """Hashes of the request's first `blocks` blocks (memoized on the request)."""
        known = len(request.hashes)
        if blocks > known:
            tokens = request.tokens[:blocks * self.page_size]
            request.hashes += block_hashes(tokens, self.page_size, known,
                                           request.hashes[-1] if known else b"")
        return request.hashes[:blocks]

    def _grow(self, request: Request, tokens: int) -> bool:
        """Give the request pages for `tokens` tokens; False (and no change) if too few are free."""
        missing = pages_for(tokens, self.page_size) - len(request.pages)
        if missing > self.allocator.num_free:
            return False
        if missing > 0:
            request.pages += self.allocator.allocate(missing)
        return True

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.computed = request.offset = 0
        request.draft = []
        request.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.allocator.free(request.pages)
        request.pages, request.registered = [], 0
        self.free_slots.append(request.slot)
        request.slot = None
