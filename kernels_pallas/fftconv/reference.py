"""The definition of ``fftconv`` as a direct convolution in float32: the oracle.

Without frequency sparsity this is the O(N·L) sum y[t] = sum_s k[s] v[t + offset - s] over the L
taps (a depthwise ``lax.conv_general_dilated``, one group per channel), plus bias * v, times the
post-gate. With ``freq_sparsity`` > 0 the filter is, by definition, the low-passed circular filter
h of ``filters.effective_filter`` (length M), and the sum runs over all M taps of the circular
convolution: O(N·M), meant for small N.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels_pallas.fftconv import filters, monarch


def _depthwise(x, taps, pad_lo: int, pad_hi: int):
    """x [batch, channels, n], taps [channels, T] -> out[t] = sum_s taps[s] x[t + T-1 - pad_lo - s]
    for t in the range the padding gives (a true convolution, not a correlation)."""
    c = x.shape[1]
    w = jnp.flip(taps, axis=-1)[:, None, :]  # [channels (out), 1 (in per group), T]
    return lax.conv_general_dilated(x, w, window_strides=(1,), padding=[(pad_lo, pad_hi)],
                                    dimension_numbers=("NCH", "OIH", "NCH"),
                                    feature_group_count=c, precision=lax.Precision.HIGHEST)


def fftconv(u, k, *, offset: int, pre_gate=None, post_gate=None, bias=None,
            freq_sparsity: float = 0.0):
    """u [batch, channels, N]; k [channels, L] (already truncated by ``partial``) -> float32 y
    [batch, channels, N]. ``offset`` is 0 (causal) or the centre tap (bidirectional)."""
    n = u.shape[-1]
    l = k.shape[-1]
    v = u.astype(jnp.float32)
    if pre_gate is not None:
        v = v * pre_gate.astype(jnp.float32)
    if freq_sparsity > 0:
        m = monarch.fft_size(n)
        h = filters.effective_filter(k, bias, m=m, offset=offset, freq_sparsity=freq_sparsity)
        # circular: x_ext[e] = v_pad[(e - (M-1)) mod M], so a VALID M-tap convolution gives t < M
        v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, m - n)))
        x_ext = jnp.concatenate([v_pad[..., 1:], v_pad], axis=-1)
        y = _depthwise(x_ext, h, 0, 0)[..., :n]
    else:
        y = _depthwise(v, k.astype(jnp.float32), l - 1 - offset, offset)
        if bias is not None:
            y = y + bias.astype(jnp.float32)[:, None] * v
    if post_gate is not None:
        y = y * post_gate.astype(jnp.float32)
    return y
