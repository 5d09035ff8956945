"""Host-side bookkeeping of the paged KV pool: the free list of pages and the pool's size.

The device holds the pages (`jaxinfer.models.paged_kv.PagedKVCache`); which page belongs to which
sequence is decided here, in Python, between steps.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math

import jax
import numpy as np

from jaxinfer.config import LlamaConfig
from jaxinfer.models.paged_kv import page_bytes

log = logging.getLogger(__name__)

# On CPU the pool is host memory shared with everything else: cap it.
CPU_KV_CAP_BYTES = 1 << 30
# On an accelerator, the share of free device memory the pool takes; the rest holds the
# activations of the largest step bucket and the compiled executables.
DEVICE_KV_FRACTION = 0.8


class PageAllocator:
    """Pages 0..num_pages-1 with reference counts, and a cache of full pages found by content.

    Prefix caching (vLLM's automatic prefix caching): a full page whose tokens are known is
    registered under the hash of its tokens and of every token before it (`block_hashes`). When
    its last user frees it, the page keeps its K/V and stays findable; it is only reused for other
    content when no never-registered page is free, least recently freed first. A hit is shared
    (its reference count grows), never copied, and never written again: only full pages are
    registered, and a sequence writes only past its last full page.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self._refs = [0] * num_pages
        self._page_of: dict[bytes, int] = {}  # block hash -> page
        self._hash_of: dict[int, bytes] = {}  # page -> block hash

    @property
    def num_free(self) -> int:
        """Pages allocate() can hand out: never-registered free pages plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    def allocate(self, count: int) -> list[int]:
        """`count` pages, or ValueError when fewer are free (callers check num_free first)."""
        if count > self.num_free:
            raise ValueError(f"asked for {count} pages; only {self.num_free} are free")
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.pop()
            else:  # evict the least recently freed cached page
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; unreferenced registered pages stay findable."""
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def register(self, page: int, block_hash: bytes) -> None:
        """Record that `page` holds the full block with this hash (the first page wins)."""
        if block_hash not in self._page_of and page not in self._hash_of:
            self._page_of[block_hash] = page
            self._hash_of[page] = block_hash

    def acquire_cached(self, hashes: list[bytes]) -> list[int]:
        """The pages holding the longest run of these blocks from the first, each referenced."""
        pages = []
        for block_hash in hashes:
            page = self._page_of.get(block_hash)
            if page is None:
                break
            self._evictable.pop(page, None)
            self._refs[page] += 1
            pages.append(page)
        return pages


def block_hashes(tokens: list[int], page_size: int, start: int = 0,
                 previous: bytes = b"") -> list[bytes]:
    """Hashes of the full blocks start, start + 1, ... of `tokens`; block i's hash covers every
    token of blocks 0..i (`previous` is block start - 1's hash). SHA-256: a collision would serve
    another prompt's K/V silently, so no cheap 64-bit hash."""
    hashes = []
    for i in range(start, len(tokens) // page_size):
        block = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        previous = hashlib.sha256(previous + block).digest()
        hashes.append(previous)
    return hashes


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)


def default_num_pages(config: LlamaConfig, page_size: int, max_batch: int,
                      max_model_len: int, kv_dtype: str | None = None,
                      draft_config: LlamaConfig | None = None) -> int:
    """Pages that fit in memory: a fraction of the free device memory (a fixed cap on CPU), never
    more than max_batch full-length sequences can use. kv_dtype None: the model's dtype. With a
    draft model (draft_config) each page id also holds a page of the draft's K/V."""
    per_page = sum(page_bytes(c.num_hidden_layers, page_size, c.num_key_value_heads, c.head_dim,
                              c.dtype if kv_dtype is None else kv_dtype)
                   for c in (config, draft_config) if c is not None)
    useful = max_batch * pages_for(max_model_len, page_size)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        budget = int(DEVICE_KV_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        source = f"{DEVICE_KV_FRACTION:.0%} of free {device.platform} memory"
    else:
        budget = CPU_KV_CAP_BYTES
        source = f"the CPU cap of {CPU_KV_CAP_BYTES / 2**30:.1f} GiB"
    num_pages = max(1, min(useful, budget // per_page))
    log.info("KV pool: %d pages of %d tokens (%.1f MiB; from %s; max concurrency at %d tokens: %d)",
             num_pages, page_size, num_pages * per_page / 2**20, source, max_model_len,
             num_pages // pages_for(max_model_len, page_size))
    return num_pages
