"""``fftconv`` through ``jnp.fft``: rfft of size M, pointwise product with the effective filter's
spectrum, irfft, first N samples; gates and bias fused in the same jitted jnp graph. Computation
in float32 (XLA's FFT rejects bf16/f16). The caller picks M: with freq_sparsity 0 the smallest
exact size, ``monarch.linear_fft_size`` (the power of two >= N + the filter's reach, no floor:
N = 16 transforms 32 points); with freq_sparsity > 0 ``monarch.fft_size(N)`` = 2P, P = the
power of two >= max(N, 256), the size the frequency mask is defined at (``filters.py``), as on
every backend; an overlap-save block its own size S (``blocked.py``).

Backward: plain autodiff through jnp.fft (the transpose of an rfft product is the correlation the
custom VJP of the Pallas path computes by hand); memory is O(batch·channels·M) per residual.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.fftconv import filters, monarch


@functools.partial(jax.jit, static_argnames=("offset", "freq_sparsity", "fft_size"))
def fftconv(u, k, pre_gate, post_gate, bias, *, offset: int, freq_sparsity: float,
            fft_size: int | None = None):
    """u [batch, channels, N]; k [channels, L]; gates [batch, channels, N] or None; bias
    [channels] or None -> float32 y [batch, channels, N]. ``fft_size``: the circular size M
    (None: ``monarch.fft_size(N)``, exact, and the size freq_sparsity is defined at; ``fftconv``
    passes ``monarch.linear_fft_size`` when freq_sparsity is 0; overlap-save blocks pass M = N
    and keep only their unwrapped outputs, ``blocked.py``)."""
    n = u.shape[-1]
    m = monarch.fft_size(n) if fft_size is None else fft_size
    v = u.astype(jnp.float32)
    if pre_gate is not None:
        v = v * pre_gate.astype(jnp.float32)
    h = filters.effective_filter(k, bias, m=m, offset=offset, freq_sparsity=freq_sparsity)
    spec = jnp.fft.rfft(v, n=m, axis=-1) * jnp.fft.rfft(h, axis=-1)  # [batch, channels, M/2+1]
    y = jnp.fft.irfft(spec, n=m, axis=-1)[..., :n]
    if post_gate is not None:
        y = y * post_gate.astype(jnp.float32)
    return y
