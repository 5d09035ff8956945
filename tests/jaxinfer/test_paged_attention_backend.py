"""The model's per-token paged attention leaves the backend to the kernels (DESIGN: which backend
runs is configuration): it passes a 64-token chunk hint, which the XLA path takes on every
platform and the Pallas kernels ignore. The platform is faked (jax.default_backend) and each
implementation replaced by a recorder, so no kernel is compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxinfer.models.attention import PAGED_XLA_CHUNK_TOKENS, paged_attention
from jaxinfer.models.paged_kv import PagedBatch, PagedLayerKV
from kernels_pallas.attention import paged_pallas_gpu, paged_pallas_tpu, paged_xla

PAGES_PER_SEQ = 8


def recorded_pages_per_block(monkeypatch, platform: str, backend: str,
                             page_size: int) -> tuple[str, int | None]:
    """(implementation, pages_per_block) that one per-token paged_attention call reaches."""
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    seen = []
    for name, module in (("xla", paged_xla), ("pallas_gpu", paged_pallas_gpu),
                         ("pallas_tpu", paged_pallas_tpu)):
        def record(q, *args, pages_per_block, name=name, **kwargs):
            seen.append((name, pages_per_block))
            return jnp.zeros_like(q), jnp.zeros(q.shape[:2], jnp.float32)

        monkeypatch.setattr(module, "paged_decode_attention", record)
    pages = jnp.zeros((8, page_size, 2, 8), jnp.float32)  # [num_pages, page_size, Hkv, D]
    meta = PagedBatch(positions=jnp.asarray([0, 1, 0, 1], jnp.int32),
                      write_slots=jnp.zeros(4, jnp.int32),
                      page_table=jnp.zeros((2, PAGES_PER_SEQ), jnp.int32),
                      query_starts=jnp.asarray([0, 2, 4], jnp.int32),
                      kv_lengths=jnp.asarray([2, 2], jnp.int32), num_seqs=jnp.int32(2),
                      ragged=False)
    paged_attention(jnp.zeros((4, 4, 8), jnp.float32), PagedLayerKV(pages, pages), meta,
                    backend=backend)
    (call,) = seen
    return call


@pytest.mark.parametrize("platform,backend,page_size,expected", [
    ("cpu", "auto", 16, ("xla", 4)),  # 64 tokens: 4 pages of 16
    ("cpu", "auto", 4, ("xla", PAGES_PER_SEQ)),  # 16 pages wanted, the table has 8
    ("cpu", "auto", 128, ("xla", 1)),  # at least one page
    ("cpu", "xla", 16, ("xla", 4)),
    ("gpu", "xla", 16, ("xla", 4)),
    ("tpu", "xla", 16, ("xla", 4)),
    ("gpu", "auto", 16, ("pallas_gpu", None)),  # the Triton kernel sizes its own blocks
    ("cpu", "pallas", 16, ("pallas_gpu", None)),
    ("tpu", "auto", 16, ("pallas_tpu", None)),
    ("tpu", "pallas", 16, ("pallas_tpu", None)),
    # auto's fallback from Triton (odd pages) is the XLA path with its 64-token chunk too
    ("gpu", "auto", 12, ("xla", 5)),
])
def test_per_token_paged_attention_takes_64_token_chunks_on_xla_only(monkeypatch, platform,
                                                                     backend, page_size, expected):
    assert PAGED_XLA_CHUNK_TOKENS == 64
    assert recorded_pages_per_block(monkeypatch, platform, backend, page_size) == expected
