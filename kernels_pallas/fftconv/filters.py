"""The effective circular filter every backend convolves with (one definition, plain jnp).

For a FFT size M (``monarch.fft_size``) the op is y[t] = sum_s h[s] v[(t - s) mod M], t < N, with
v = pre_gate * u zero-padded to M and h [channels, M] built from the taps k [channels, L]:

1. ``partial`` = p is applied by the caller (``fftconv``), which passes only the kept taps as k:
   the first p taps (causal) or the p nearest the centre (bidirectional), a shorter filter.
2. ``freq_sparsity`` = r > 0: the filter's spectrum at size M keeps only the frequencies
   |f| < (1 - r) * M / 2, i.e. |f| <= ``keep_frequencies(M, r)`` (the rest, the highest-frequency
   bins, are zeroed): a low-pass projection of the filter, so the effective filter becomes
   circular and dense. r = 0 keeps all; a tiny r drops the Nyquist bin M/2 alone, and each larger
   r one more bin as (1 - r) M/2 passes an integer.
3. ``offset`` (bidirectional, centred): h[s] = k[(s + offset) mod M], so tap j of k multiplies
   v[t + offset - j]: tap ``offset`` multiplies v[t] itself, taps j < offset look ahead
   offset - j steps and taps j > offset look back j - offset.
4. ``bias`` [channels] is added to h[0] (the skip term bias * v), after the frequency mask.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def keep_frequencies(m: int, freq_sparsity: float) -> int:
    """Largest kept |frequency| (in bins of size M): M/2 (all) at freq_sparsity 0, otherwise the
    largest f < (1 - s) M/2 (bins 0 .. ceil((1 - s) M/2) - 1 are kept). Exclusive of (1 - s) M/2,
    so s = 1/2 keeps exactly half the Monarch kernel's DFT columns (not half plus one, which the
    kernel would pad back to all of them). M is a power of two, so (1 - s) M/2 is an exact
    scaling of 1 - s and ceil sees no rounding."""
    if freq_sparsity == 0:
        return m // 2
    return max(0, math.ceil((1.0 - freq_sparsity) * (m // 2)) - 1)


def effective_filter(k, bias, *, m: int, offset: int, freq_sparsity: float):
    """k [channels, L] float32 (already truncated by ``partial``), bias [channels] or None ->
    h [channels, M] float32."""
    c, l = k.shape
    h = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, m - l)))
    if freq_sparsity > 0:
        spec = jnp.fft.rfft(h, axis=-1)  # [channels, M/2 + 1]
        keep = jnp.arange(m // 2 + 1) <= keep_frequencies(m, freq_sparsity)
        h = jnp.fft.irfft(jnp.where(keep, spec, 0), n=m, axis=-1)
    if offset:
        h = jnp.roll(h, -offset, axis=-1)
    if bias is not None:
        h = h.at[:, 0].add(bias.astype(jnp.float32))
    return h
