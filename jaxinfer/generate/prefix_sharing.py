"""Which pages of a step's sequences Hydragen attends once for all of them.

Prefix caching shares pages, never copies them, so sequences that start with the same cached
prompt blocks start on the same page ids: a step's chunks are grouped by their first page, and
the group whose common run of leading pages saves the most page reads is attended as one shared
prefix (`models.attention.paged_attention` with a `models.paged_kv.SharedPrefix`).
"""

from __future__ import annotations

from jaxinfer.generate.scheduler import Chunk


def shared_prefix(chunks: list[Chunk], page_size: int) -> tuple[list[int], list[Chunk]]:
    """The run of leading pages that the most page reads can share, and the chunks sharing it:
    among chunks whose sequences start on the same page, the longest common run lying wholly
    before each chunk's first token. ([], []) if no two chunks share a page before it."""
    by_first_page: dict[int, list[Chunk]] = {}
    for chunk in chunks:
        if chunk.request.pages:
            by_first_page.setdefault(chunk.request.pages[0], []).append(chunk)
    best: tuple[list[int], list[Chunk]] = ([], [])
    best_saved = 0
    for group in by_first_page.values():
        if len(group) < 2:
            continue
        limit = min(chunk.start for chunk in group) // page_size
        pages = group[0].request.pages
        common = 0
        while common < limit and all(len(c.request.pages) > common
                                     and c.request.pages[common] == pages[common]
                                     for c in group):
            common += 1
        saved = (sum(chunk.count for chunk in group) - 1) * common  # page reads saved
        if saved > best_saved:
            best, best_saved = (pages[:common], group), saved
    return best
