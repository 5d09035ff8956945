"""Host-side bookkeeping of the paged KV pool: the free list of pages and the pool's size.

The device holds the pages (`jaxinfer.models.paged_kv.PagedKVCache`); which page belongs to which
sequence is decided here, in Python, between steps.
"""

from __future__ import annotations

import logging
import math

import jax

from jaxinfer.config import LlamaConfig
from jaxinfer.models.paged_kv import page_bytes

log = logging.getLogger(__name__)

# On CPU the pool is host memory shared with everything else: cap it.
CPU_KV_CAP_BYTES = 1 << 30
# On an accelerator, the share of free device memory the pool takes; the rest holds the
# activations of the largest step bucket and the compiled executables.
DEVICE_KV_FRACTION = 0.8


class PageAllocator:
    """A free list over pages 0..num_pages-1."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """`count` pages, or ValueError when fewer are free (callers check num_free first)."""
        if count > len(self._free):
            raise ValueError(f"asked for {count} pages; only {len(self._free)} are free")
        return [self._free.pop() for _ in range(count)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)


def default_num_pages(config: LlamaConfig, page_size: int, max_batch: int,
                      max_model_len: int, kv_dtype: str | None = None) -> int:
    """Pages that fit in memory: a fraction of the free device memory (a fixed cap on CPU), never
    more than max_batch full-length sequences can use. kv_dtype None: the model's dtype."""
    per_page = page_bytes(config.num_hidden_layers, page_size, config.num_key_value_heads,
                          config.head_dim, config.dtype if kv_dtype is None else kv_dtype)
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
