"""The engine's page allocator: reference counts and the prefix cache's eviction order."""

from __future__ import annotations

import pytest

from jaxinfer.generate.paged_cache import PageAllocator, block_hashes


def test_block_hashes_chain_every_earlier_token_and_skip_partial_blocks():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], page_size=3)
    b = block_hashes([9, 2, 3, 4, 5, 6], page_size=3)
    assert len(a) == 2 and len(b) == 2  # token 7 is a partial block
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different history
    assert block_hashes([1, 2, 3, 4, 5, 6], 3, start=1, previous=a[0]) == a[1:]


def test_freed_registered_pages_stay_findable_until_evicted_least_recent_first():
    pool = PageAllocator(4)
    pages = pool.allocate(3)
    assert pages == [0, 1, 2]
    h = block_hashes(list(range(9)), page_size=3)
    for page, block_hash in zip(pages, h):
        pool.register(page, block_hash)
    pool.free(pages)
    assert pool.num_free == 4
    assert pool.acquire_cached(h[:2]) == [0, 1] and pool.num_free == 2
    assert pool.acquire_cached(h[:2]) == [0, 1]  # shared: referenced twice
    pool.free([0, 1])
    assert pool.num_free == 2  # still held by the first user
    assert pool.allocate(1) == [3]  # a never-registered page before any cached one
    assert pool.allocate(1) == [2]  # then the least recently freed cached page, evicted
    assert pool.acquire_cached(h) == [0, 1]  # block 2's page now holds other content
    with pytest.raises(ValueError, match="only 0 are free"):
        pool.allocate(1)


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_match():
    from jaxinfer.generate.prompt_lookup import lookup_draft

    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 9, 5, 6]
    assert lookup_draft(tokens, ngram=2, max_tokens=3) == [8, 2, 9]  # latest match, not the first
    assert lookup_draft(tokens, ngram=2, max_tokens=1) == [8]
    assert lookup_draft(tokens, ngram=3, max_tokens=3) == []  # (9, 5, 6) never occurred before
    assert lookup_draft([4, 4], ngram=1, max_tokens=5) == [4]  # a match may run up to the end
    assert lookup_draft(tokens, ngram=2, max_tokens=0) == []
