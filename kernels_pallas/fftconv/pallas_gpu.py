"""FlashFFTConv as a Pallas kernel for NVIDIA GPUs (Triton lowering; ``interpret=True`` on CPU).

Algorithm (order-2 Monarch FFT, ``monarch.py``). The signal is zero-padded to P (a power of two
>= N) and convolved circularly at size M = 2P = N1 * N2 with the effective filter h
(``filters.py``), whose spectrum H is computed once per call (per channel, not per batch row) and
handed to the kernel in D-order as real and imaginary planes. Pallas has no complex type and no
FFT, so every complex product is written on real planes and every DFT is a pair of real matmuls:

    A  = pre_gate * u  as [N1/2, N2]                (rows N1/2.. of the padded signal are zero)
    D  = ((F1[:, :N1/2] A) ⊙ T) F2[:, cols]          forward FFT of the signal, D-order
    E  = D ⊙ H[:, cols]                              pointwise complex product
    y  = Re(G1 ((E F̄2[cols, :]) ⊙ T̄))               inverse FFT, first P outputs only
    out = post_gate * (y + bias * A)                 G1 = F̄1[:N1/2] / M

``cols`` are the D-order columns the filter's spectrum needs (``monarch.frequency_columns``): all
N2 of them for a dense filter; with ``freq_sparsity`` the columns whose frequencies are all
dropped are skipped, which is where frequency sparsity saves work. The bias stays out of H (it
would make every frequency non-zero) and is added in the time domain instead.

Grid (batch, channels / block_c). A program handles ``block_c`` channels of one batch row, one
channel at a time: it reads its [N1/2, N2] input (and gates) once, the channel's H planes
[N1, Nk] once, and the DFT/twiddle planes (a few N1·N2 floats, shared by all programs), and
writes [N1/2, N2] outputs. 12 real matmuls per channel: 2 of [N1, N1/2]x[N1/2, N2], 4 of
[N1, N2]x[N2, Nk], 4 of [N1, Nk]x[Nk, N2], 2 of [N1/2, N1]x[N1, N2]; everything in float32.

Sizes: one program holds a whole sequence (about ten live [N1, N2] float32 planes), which fits
a GPU's registers and shared memory comfortably only up to M ~ 8K (N ~ 4K); beyond that the
kernel still runs but spills. FlashFFTConv's answer, an order-3 decomposition and an outer step
through HBM for M > 32K, is not written yet. The Triton lowering has not been run on a GPU yet.

Backward (``jax.custom_vjp``): the gradient of the input is the correlation of the output
gradient with h plus bias times it, i.e. the same kernel run with conj(H) (post-gate fused as its
pre-gate); the
filter gradient, a sum over the batch, is one jnp.fft correlation; gate and bias gradients are
elementwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import numpy as np

from kernels_pallas.fftconv import filters, monarch

_MATRICES = ("f1_re", "f1_im", "tw_re", "tw_im")


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


def _kernel(*refs, block_c: int, has_pre: bool, has_post: bool, has_bias: bool):
    refs = list(refs)
    x_ref = refs.pop(0)  # [block_c, N1/2, N2]
    pre_ref = refs.pop(0) if has_pre else None
    post_ref = refs.pop(0) if has_post else None
    bias_ref = refs.pop(0) if has_bias else None  # [block_c, 1]
    hr_ref, hi_ref = refs.pop(0), refs.pop(0)  # [block_c, N1, Nk]: the kept D-order columns
    f1r, f1i, twr, twi, f2fr, f2fi, f2br, f2bi, g1r, g1i = (r[...] for r in refs[:10])
    o_ref = refs[10]  # [block_c, N1/2, N2]
    for c in range(block_c):
        a = x_ref[c, :, :].astype(jnp.float32)
        if has_pre:
            a = a * pre_ref[c, :, :].astype(jnp.float32)
        pr, pi = _dot(f1r, a), _dot(f1i, a)  # [N1, N2]
        qr, qi = pr * twr - pi * twi, pr * twi + pi * twr
        dr = _dot(qr, f2fr) - _dot(qi, f2fi)  # [N1, Nk]
        di = _dot(qr, f2fi) + _dot(qi, f2fr)
        kr, ki = hr_ref[c, :, :], hi_ref[c, :, :]
        er, ei = dr * kr - di * ki, dr * ki + di * kr
        gr = _dot(er, f2br) + _dot(ei, f2bi)  # E F̄2 [N1, N2]
        gi = _dot(ei, f2br) - _dot(er, f2bi)
        hr, hi = gr * twr + gi * twi, gi * twr - gr * twi  # ⊙ T̄
        y = _dot(g1r, hr) - _dot(g1i, hi)  # [N1/2, N2]
        if has_bias:
            y = y + bias_ref[pl.ds(c, 1), :].astype(jnp.float32) * a
        if has_post:
            y = y * post_ref[c, :, :].astype(jnp.float32)
        o_ref[c, :, :] = y.astype(o_ref.dtype)


def _compiler_params(interpret: bool, m: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton  # GPU only; deprecated from jax 0.11
    # more threads share the per-sequence planes as M grows (fewer registers per thread)
    return pltriton.CompilerParams(num_warps=4 if m <= 2048 else 8, num_stages=1)


def _spectrum_planes(h, cols: tuple[int, ...]):
    """h [channels, M] -> real, imaginary planes of its FFT in D-order, kept columns only
    [channels, N1, len(cols)]."""
    n1, n2 = monarch.monarch_factors(h.shape[-1])
    spec = monarch.to_d_order(jnp.fft.fft(h, axis=-1), n1, n2)[..., jnp.asarray(cols)]
    return spec.real.astype(jnp.float32), spec.imag.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cols", "block_c", "interpret"))
def _circular_conv(x, pre, post, bias, hr, hi, *, cols: tuple[int, ...], block_c: int,
                   interpret: bool):
    """x, pre, post [batch, channels, N] (pre/post may be None); bias [channels] or None;
    hr, hi [channels, N1, len(cols)] -> float32 [batch, channels, N]:
    post * (first N samples of circ_conv_M(pre * x, h) + bias * pre * x)."""
    b, c, n = x.shape
    n1 = hr.shape[1]
    m = monarch.fft_size(n)
    n2, nk = m // n1, len(cols)
    p, rows = m // 2, n1 // 2

    def prep(a):
        return jnp.pad(a, ((0, 0), (0, 0), (0, p - n))).reshape(b, c, rows, n2)

    sig = [prep(a) for a in (x, pre, post) if a is not None]
    mats = monarch.monarch_matrices(m)
    idx = np.asarray(cols)
    consts = [jnp.asarray(mats[name]) for name in _MATRICES] + [
        jnp.asarray(mats["f2_re"][:, idx]), jnp.asarray(mats["f2_im"][:, idx]),
        jnp.asarray(mats["f2_re"][idx, :]), jnp.asarray(mats["f2_im"][idx, :]),
        jnp.asarray(mats["g1_re"]), jnp.asarray(mats["g1_im"])]
    sig_spec = pl.BlockSpec((pl.squeezed, block_c, rows, n2), lambda i, j: (i, j, 0, 0))
    filt_spec = pl.BlockSpec((block_c, n1, nk), lambda i, j: (j, 0, 0))
    const_specs = [pl.BlockSpec(a.shape, lambda i, j: (0, 0)) for a in consts]
    extra, extra_specs = [], []
    if bias is not None:
        extra = [bias.astype(jnp.float32).reshape(c, 1)]
        extra_specs = [pl.BlockSpec((block_c, 1), lambda i, j: (j, 0))]
    kernel = functools.partial(_kernel, block_c=block_c, has_pre=pre is not None,
                               has_post=post is not None, has_bias=bias is not None)
    out = pl.pallas_call(
        kernel,
        grid=(b, c // block_c),
        in_specs=[sig_spec] * len(sig) + extra_specs + [filt_spec, filt_spec] + const_specs,
        out_specs=sig_spec,
        out_shape=jax.ShapeDtypeStruct((b, c, rows, n2), jnp.float32),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, m),
        name="fftconv_monarch",
    )(*sig, *extra, hr, hi, *consts)
    return out.reshape(b, c, p)[..., :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def fftconv(u, k, pre_gate, post_gate, bias, offset, freq_sparsity, block_c, interpret):
    """u [batch, channels, N]; k [channels, L]; gates [batch, channels, N] or None; bias
    [channels] or None -> float32 y [batch, channels, N]."""
    return _fwd(u, k, pre_gate, post_gate, bias, offset, freq_sparsity, block_c, interpret)[0]


def _filter(k, n: int, offset: int, freq_sparsity: float):
    """The effective filter without the bias (the kernel adds bias * v itself, so the bias does
    not densify a frequency-sparse spectrum) and the D-order columns it needs."""
    m = monarch.fft_size(n)
    cols = monarch.frequency_columns(m, filters.keep_frequencies(m, freq_sparsity))
    return filters.effective_filter(k, None, m=m, offset=offset,
                                    freq_sparsity=freq_sparsity), cols


def _fwd(u, k, pre_gate, post_gate, bias, offset, freq_sparsity, block_c, interpret):
    h, cols = _filter(k, u.shape[-1], offset, freq_sparsity)
    hr, hi = _spectrum_planes(h, cols)
    y = _circular_conv(u, pre_gate, post_gate, bias, hr, hi, cols=cols, block_c=block_c,
                       interpret=interpret)
    return y, (u, k, pre_gate, post_gate, bias)


def _bwd(offset, freq_sparsity, block_c, interpret, res, g):
    u, k, pre_gate, post_gate, bias = res
    n = u.shape[-1]
    m = monarch.fft_size(n)
    h, cols = _filter(k, n, offset, freq_sparsity)
    hr, hi = _spectrum_planes(h, cols)
    g = g.astype(jnp.float32)
    run = functools.partial(_circular_conv, cols=cols, block_c=block_c, interpret=interpret)
    d_post = None
    if post_gate is not None:
        y_core = run(u, pre_gate, None, bias, hr, hi)  # recomputed rather than kept as a residual
        d_post = (g * y_core).astype(post_gate.dtype)
    # dL/dv = correlation of gc = post * g with h (conj(H)) plus bias * gc: the same kernel
    dv = run(g, post_gate, None, bias, hr, -hi)
    v = u.astype(jnp.float32)
    if pre_gate is not None:
        v = v * pre_gate.astype(jnp.float32)
        d_pre = (dv * u.astype(jnp.float32)).astype(pre_gate.dtype)
        du = dv * pre_gate.astype(jnp.float32)
    else:
        d_pre, du = None, dv
    gc = g if post_gate is None else g * post_gate.astype(jnp.float32)
    d_bias = None if bias is None else jnp.sum(gc * v, axis=(0, 2)).astype(bias.dtype)
    cross = jnp.sum(jnp.fft.rfft(gc, n=m, axis=-1) * jnp.conj(jnp.fft.rfft(v, n=m, axis=-1)),
                    axis=0)  # [channels, M/2 + 1]
    dh = jnp.fft.irfft(cross, n=m, axis=-1)  # dL/dh[s] = sum_{b,t} gc[t] v[(t - s) mod M]
    _, filter_vjp = jax.vjp(
        lambda kk: filters.effective_filter(kk, None, m=m, offset=offset,
                                            freq_sparsity=freq_sparsity), k)
    (dk,) = filter_vjp(dh)
    return du.astype(u.dtype), dk.astype(k.dtype), d_pre, d_post, d_bias


fftconv.defvjp(_fwd, _bwd)
