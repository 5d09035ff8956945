"""Shared inputs and oracles of the paged attention tests: the paged decode cases and backends,
their inputs (shuffled, non-contiguous page tables with a shared prefix page), a float64 dense
oracle over the gathered pages, int8 pages, poisoned (NaN/Inf) unused slots, and a fake GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tests.kernels_pallas.attention_cases import LSE_ATOL


@dataclasses.dataclass(frozen=True)
class PagedCase:
    name: str
    hq: int
    hkv: int
    d: int
    page_size: int
    pages_per_seq: int
    lengths: tuple[int, ...]
    dtype: str = "float32"
    num_pages: int = 40


# Ragged lengths: 0 (nothing to see), 1, odd lengths ending mid-page, exactly one page, and the
# full capacity. Pages are drawn from a shuffled pool larger than needed, and two sequences share
# their first page (prefix sharing), so the tables are non-contiguous and non-monotone.
CASES = [
    PagedCase("gqa1_f32", hq=2, hkv=2, d=16, page_size=16, pages_per_seq=5,
              lengths=(0, 37, 80, 16)),
    PagedCase("gqa2_bf16_small_pages", hq=4, hkv=2, d=32, page_size=4, pages_per_seq=9,
              lengths=(1, 35, 36, 13), dtype="bfloat16"),
    PagedCase("gqa4_f32_head_dim_80", hq=8, hkv=2, d=80, page_size=16, pages_per_seq=4,
              lengths=(64, 5, 0, 49)),
    PagedCase("gqa8_bf16", hq=8, hkv=1, d=16, page_size=8, pages_per_seq=6,
              lengths=(47, 48, 3, 29), dtype="bfloat16"),
]

# Backend options that force several loop steps or context splits at these small sizes.
# pallas: one page per step where pages hold >= 16 tokens, 2 or 4 pages (the minimum 16 tokens)
# for smaller ones; its default blocks and splits run in test_default_options_*.
BACKENDS = [("reference", {}), ("xla", {}), ("xla", {"pages_per_block": 2}),
            ("pallas", {"num_splits": 3, "pages_per_block": 1})]


def make_inputs(case: PagedCase, seed: int = 0):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    batch = len(case.lengths)
    q = jnp.asarray(rng.standard_normal((batch, case.hq, case.d)), dt)
    shape = (case.num_pages, case.page_size, case.hkv, case.d)
    k_pages = jnp.asarray(rng.standard_normal(shape), dt)
    v_pages = jnp.asarray(rng.standard_normal(shape), dt)
    table = rng.permutation(case.num_pages)[:batch * case.pages_per_seq]
    table = table.reshape(batch, case.pages_per_seq)
    table[1, 0] = table[0, 0]  # shared prefix page
    return q, k_pages, v_pages, jnp.asarray(table, jnp.int32), jnp.asarray(case.lengths, jnp.int32)


def dense_oracle(q, k_pages, v_pages, table, lengths, scale=None, window=None):
    """float64 numpy: gather each sequence's pages, keep its first `length` keys (with a window
    only the last window + 1 of them), softmax."""
    q, k_pages, v_pages = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                           for x in (q, k_pages, v_pages))
    batch, hq, d = q.shape
    hkv = k_pages.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((batch, hq, d))
    lse = np.full((batch, hq), -np.inf)
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:
            continue
        lo = 0 if window is None else max(0, n - 1 - window)
        k = np.concatenate([k_pages[p] for p in np.asarray(table[b])])[lo:n]  # [n - lo, Hkv, D]
        v = np.concatenate([v_pages[p] for p in np.asarray(table[b])])[lo:n]
        for h in range(hq):
            kh = h // (hq // hkv)
            s = k[:, kh] @ q[b, h] * scale  # [n]
            w = np.exp(s - s.max())
            out[b, h] = w @ v[:, kh] / w.sum()
            lse[b, h] = s.max() + np.log(w.sum())
    return out, lse


def quantize_pages(pages):
    """int8 pages and float32 scales [num_pages, page_size, Hkv]: max-abs per (token, head)."""
    pages = np.asarray(pages, np.float32)
    scales = np.abs(pages).max(-1) / 127
    values = np.round(pages / np.where(scales > 0, scales, 1)[..., None]).astype(np.int8)
    return jnp.asarray(values), jnp.asarray(scales)


def used_slots(num_pages: int, page_size: int, table, keys) -> np.ndarray:
    """bool [num_pages, page_size]: the slots holding the first ``keys[b]`` tokens of row b."""
    used = np.zeros((num_pages, page_size), bool)
    for row, n in zip(np.asarray(table), np.asarray(keys)):
        for p in range(int(n)):
            used[row[p // page_size], p % page_size] = True
    return used


def poison(x, used: np.ndarray):
    """x [num_pages, page_size, ...] with every slot outside ``used`` set to NaN, +Inf or -Inf
    (in turn): what a reused page whose float16 K/V overflowed, or a freed one, may hold."""
    x = np.array(x, np.float32)
    bad = np.array([np.nan, np.inf, -np.inf], np.float32)
    x[~used] = bad[np.arange((~used).sum()) % 3].reshape(-1, *[1] * (x.ndim - 2))
    return jnp.asarray(x)


def fake_gpu_without_triton(monkeypatch, kernel_module, name: str) -> None:
    """Fake a GPU platform (so auto would pick the Triton kernel) and make the Triton kernel
    ``kernel_module.name`` fail if it is reached."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def refuse(*args, **kwargs):
        raise AssertionError(f"auto ran the Triton kernel {name}")

    monkeypatch.setattr(kernel_module, name, refuse)


def poisoned_pages(k_pages, v_pages, seen: np.ndarray, int8: bool) -> tuple[tuple, tuple]:
    """((k, v, scales), (k, v, scales)): clean pages, and the same with every slot outside
    ``seen`` poisoned (``poison``); float32 pages, or int8 ones whose float32 scales (``scales``
    holds k_scales and v_scales) are what a stale slot poisons."""
    if int8:
        (k8, ks), (v8, vs) = quantize_pages(k_pages), quantize_pages(v_pages)
        return ((k8, v8, {"k_scales": ks, "v_scales": vs}),
                (k8, v8, {"k_scales": poison(ks, seen), "v_scales": poison(vs, seen)}))
    k, v = (jnp.asarray(x, jnp.float32) for x in (k_pages, v_pages))
    return (k, v, {}), (poison(k, seen), poison(v, seen), {})


def assert_lse_matches(lse, ref_lse) -> None:
    """-inf (nothing seen) in the same rows as the reference, the finite ones within LSE_ATOL."""
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=LSE_ATOL, rtol=0)
