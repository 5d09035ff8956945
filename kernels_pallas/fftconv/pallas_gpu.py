"""FlashFFTConv as a Pallas kernel for NVIDIA GPUs (Triton lowering; ``interpret=True`` on CPU).

Algorithm (``monarch.py``). The signal is zero-padded to P (the power of two >= max(N, 256):
``monarch.padded_length``, the floor keeping every matmul >= 16 wide) and convolved circularly
at size M = 2P with the effective filter h (``filters.py``), whose spectrum H is
computed once per call (per channel, not per batch row) and handed to the kernel in the plan's
spectrum layout as real and imaginary planes. Pallas has no complex type and no FFT, so every
complex product is written on real planes and every DFT is a pair (real operand) or four
(complex operands) of real matmuls. Per channel, for a plan's kernel size m:

    a   = pre_gate * u, reshaped [rows_in, m / N1]      (rows N1/2.. of the padded input are zero)
    X   = Monarch forward of a (order 2 or 3)           spectrum layout [m / N_last, Nk]
    W   = H ⊙ X                                         (r2c: Ke ⊙ X_even + Ko ⊙ X_odd)
    y   = Monarch inverse of W, first half of the rows  (real part, or both parts)
    out = post_gate * (y + bias * a)

The plan (``monarch.choose_plan``, by size) is one of:

* real (order 2 or 3): one real input, the transform at size M, real output.
* r2c: the real-to-complex trick. The kernel takes the (M/2)-point FFTs of the even and the odd
  samples, Xe and Xo, and forms W = Ye + i·Yo, the spectrum of (even outputs) + i·(odd outputs),
  with Ye = Hp Xe + Hm ω^k Xo and Yo = Hm ω^-k Xe + Hp Xo (Hp, Hm = (H[k] ± H[k + M/2]) / 2,
  ω = exp(-2πi/M): the 2x2 polyphase form of the size-M product), i.e. W = Ke Xe + Ko Xo with
  Ke = Hp + i Hm ω^-k and Ko = Hm ω^k + i Hp. One complex (M/2)-point inverse then returns the
  even outputs in its real part and the odd ones in its imaginary part. Every transform runs at
  M/2: about M·(2·N1 + 6·N2) real MACs with the factors of M/2 instead of M·(2·N1 + 8·N2) with
  those of M (256·M instead of 384·M at M = 2048). The forward stays two real-input transforms,
  as separating a packed x_even + i·x_odd spectrum needs an index reversal (k -> -k) that a
  Triton program cannot apply to values in registers (no gather or reverse lowers); the inverse
  is packed. Nor would the packing save matmuls in this form: folded into constants (the row
  reversal k1 -> -k1 is conj(F_N1), made of the same four real products as F_N1·z; the carry
  into k2 an elementwise factor), conj(Z[-f]) still needs its own last-stage matmul, the one
  the packing was to save; as permutation matmuls it costs 2·N1 real MACs per sample more than
  the two real transforms (order 2, checked in numpy).
* complex (the outer step, M > 2 * MAX_KERNEL_SIZE): decimation in frequency with n = r + R q,
  f = Q f_r + f_q (M = Q R): XLA takes the Q-point DFT over q (only q < Q/2 is non-zero; a dense
  matmul up to Q = ``monarch.MAX_DENSE_OUTER_DFT``, jnp.fft above), the twiddle ω_M^(r f_q), then
  the kernel convolves each complex sequence f_q with the filter whose spectrum is
  H[Q f_r + f_q] (dense, size R, complex in and out); XLA undoes the twiddle and the Q-point DFT
  (only outputs q < Q/2 are wanted). Signal and filter are real, so residue Q - f is fixed by
  residue f (``monarch.outer_matrices``): only the Q/2 + 1 residues f_q <= Q/2 are computed, and
  the inverse weights the middle ones twice. Gates and bias are then applied in XLA.

Full blocks (``fft_size`` = N, overlap-save segments from ``blocked.py``): the signal fills all
M samples and every output is wanted, so the zero-block skip is off (``MonarchPlan.geometry``'s
``full``: rows_in = N1, every row of F_N1 and F̄_N1); the rest, r2c included, is unchanged.

Grid (batch, channels / block_c). A program handles ``block_c`` channels of one batch row (the
outer step: of one (channel, f_q <= Q/2) pair each), one channel at a time: it reads its input
planes [S, rows_in, m / N1] (and gates) once, the channel's filter planes [F, m / N_last, Nk]
once, and the DFT/twiddle planes (a few m floats, shared by all programs), and writes
[S, rows_in, m / N1] outputs. ``Nk`` of the N_last spectrum columns are kept
(``monarch.frequency_columns``): all for a dense filter; ``freq_sparsity`` drops the columns
whose frequencies are all dropped, which is where frequency sparsity saves work. The bias stays
out of H (it would make every frequency non-zero) and is added in the time domain instead. Every
plane, twiddle product and accumulator is float32; the matmuls' products are float32, three
bfloat16 products (bf16x3, on tensor cores) or one (``dot_precision``, ``DOT_PRECISIONS``).

Sizes: one program holds a whole transform of size m <= ``monarch.MAX_KERNEL_SIZE`` (about ten
live float32 planes of m values); larger sizes take the outer step. The Triton lowering is
checked off-device by the tests; compiling and running it needs a GPU.

Backward (``jax.custom_vjp``): the gradient of the input is the correlation of the output
gradient with h plus bias times it, i.e. the same kernel run with conj(H) (post-gate fused as its
pre-gate): ``fftconv`` of the reversed taps flip(k) centred at L - 1 - offset; the filter
gradient, a sum over the batch, is one jnp.fft correlation; gate and bias gradients are
elementwise. The forward and backward rules call ``fftconv`` itself (not the kernel), so they
are differentiable in turn: reverse mode works to any order. Forward mode does not: JAX refuses
``jvp`` through a custom VJP.
"""

from __future__ import annotations

import functools
import operator
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import numpy as np

from kernels_pallas.backend import triton_compiler_params
from kernels_pallas.fftconv import filters, monarch
from kernels_pallas.fftconv.monarch import KernelGeometry, MonarchPlan

# A complex value on real planes: (real, imaginary); the imaginary plane is None for a real one.
Planes = tuple[jax.Array, Optional[jax.Array]]


# How the kernel's matmuls compute their products (float32 accumulation in every case):
# "float32": IEEE fp32 (Triton runs these on CUDA cores, no tensor cores); "bf16x3": each float32
# operand split into bfloat16 hi + lo, three bf16 products hi·hi + hi·lo + lo·hi on tensor cores
# (XLA's BF16_BF16_F32_X3: lo·lo, ~2^-18 relative, is dropped); "bf16": one bf16 product
# (FlashFFTConv's half-precision matmuls). The casts are explicit rather than a dot algorithm, so
# interpret mode on a CPU (where XLA computes bf16 dot algorithms in float32 and rejects TF32)
# computes the products the GPU does (their summation order inside a dot aside).
DOT_PRECISIONS = ("float32", "bf16x3", "bf16")


def _split_bf16(x):
    """x float32 -> (hi, lo) bfloat16: hi = x rounded to bf16, lo = the remainder rounded, so
    hi + lo = x to ~2^-17 relative."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _dot(a, b, precision: str):
    """a @ b, float32 matrices [m, k] x [k, n] -> float32 [m, n], products at ``precision``
    (``DOT_PRECISIONS``). HIGHEST keeps float32 operands IEEE on Triton (DEFAULT would mean TF32)
    and changes nothing for bf16 operands, whose products are exact in float32."""
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32,
                            precision=lax.Precision.HIGHEST)
    if precision == "float32":
        return dot(a, b)
    if precision == "bf16":
        return dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    (a_hi, a_lo), (b_hi, b_lo) = _split_bf16(a), _split_bf16(b)
    return dot(a_lo, b_hi) + dot(a_hi, b_lo) + dot(a_hi, b_hi)  # smallest terms first


def _cprod(a: Planes, b: Planes, op: Callable = operator.mul, real_only: bool = False) -> Planes:
    """a * b (op = mul) or a @ b (op = _dot) of complex planes, skipping the products of absent
    (zero) imaginary planes; ``real_only`` computes the real part alone."""
    (ar, ai), (br, bi) = a, b
    re = op(ar, br)
    if ai is not None and bi is not None:
        re = re - op(ai, bi)
    if real_only:
        return re, None
    im = [op(x, y) for x, y in ((ar, bi), (ai, br)) if x is not None and y is not None]
    return re, (im[0] + im[1] if len(im) == 2 else im[0] if im else None)


def _cdot(a: Planes, b: Planes, precision: str, real_only: bool = False) -> Planes:
    return _cprod(a, b, functools.partial(_dot, precision=precision), real_only)


def _conj(a: Planes) -> Planes:
    return a[0], None if a[1] is None else -a[1]


def _map(fn: Callable, a: Planes) -> Planes:
    return fn(a[0]), None if a[1] is None else fn(a[1])


def _rows_to_middle(x, n1: int, n2: int, n3: int):
    """[N1, N2*N3] ([k1, (n2, n3)]) -> [N2, N3*N1] ([n2, (n3, k1)]): the order-3 middle DFT then
    contracts the rows (2-D matmuls only: Triton's dot has no batch dimension)."""
    return x.T.reshape(n2, n3 * n1)


def _middle_to_rows(x, n1: int, n2: int, n3: int):
    """[N2, N3*N1] ([k2, (n3, k1)]) -> [N1, N2*N3] ([k1, (k2, n3)])."""
    return x.reshape(n2 * n3, n1).T


def _forward(a: Planes, c: dict[str, Planes], geo: KernelGeometry, precision: str) -> Planes:
    """Monarch FFT of one signal: a [rows_in, width] -> spectrum layout [spec_rows, Nk]."""
    p = _cprod(_cdot(c["f1"], a, precision), c["t1"])  # [N1, width]
    if len(geo.factors) == 3:
        n1, n2, n3 = geo.factors
        p = _map(lambda x: _rows_to_middle(x, n1, n2, n3), p)  # [N2, N3*N1]
        p = _cprod(_cdot(c["f2"], p, precision), c["t2"])  # [k2, (n3, k1)]
        p = _map(lambda x: _middle_to_rows(x, n1, n2, n3).reshape(n1 * n2, n3), p)
    return _cdot(p, c["fl"], precision)  # [spec_rows, Nk]


def _inverse(w: Planes, c: dict[str, Planes], geo: KernelGeometry, real_only: bool,
             precision: str) -> Planes:
    """Inverse Monarch FFT (1/m folded into g1): spectrum layout [spec_rows, Nk] -> the first
    rows_in rows of the signal [rows_in, width]."""
    g = _cdot(w, c["bl"], precision)  # [spec_rows, N_last]
    if len(geo.factors) == 3:
        n1, n2, n3 = geo.factors
        g = _map(lambda x: _rows_to_middle(x.reshape(n1, n2 * n3), n1, n2, n3), g)
        g = _cdot(_conj(c["f2"]), _cprod(g, _conj(c["t2"])), precision)  # [n2, (n3, k1)]
        g = _map(lambda x: _middle_to_rows(x, n1, n2, n3), g)  # [N1, N2*N3]
    return _cdot(c["g1"], _cprod(g, _conj(c["t1"])), precision, real_only)  # [rows_in, width]


def _kernel(*refs, names: tuple[str, ...], geo: KernelGeometry, block_c: int, precision: str,
            has_pre: bool, has_post: bool, has_bias: bool):
    refs = list(refs)
    x_ref = refs.pop(0)  # [block_c, S, rows_in, width]
    pre_ref = refs.pop(0) if has_pre else None
    post_ref = refs.pop(0) if has_post else None
    bias_ref = refs.pop(0) if has_bias else None  # [block_c, 1]
    h_ref = refs.pop(0)  # [block_c, F, spec_rows, Nk]: filter planes
    o_ref = refs.pop()  # [block_c, S, rows_in, width]
    mats = {name: ref[...] for name, ref in zip(names, refs)}
    c = {name[:-3]: (mats[name], mats[name[:-3] + "_im"]) for name in names
         if name.endswith("_re")}
    n_sig = 1 if geo.mode == "real" else 2
    for ch in range(block_c):
        a = [x_ref[ch, s, :, :].astype(jnp.float32) for s in range(n_sig)]
        if has_pre:
            a = [a[s] * pre_ref[ch, s, :, :].astype(jnp.float32) for s in range(n_sig)]
        filt = [(h_ref[ch, 2 * j, :, :], h_ref[ch, 2 * j + 1, :, :]) for j in range(2)
                if 2 * j + 1 < h_ref.shape[1]]
        if geo.mode == "complex":  # one complex signal a[0] + i a[1]
            w = _cprod(filt[0], _forward((a[0], a[1]), c, geo, precision))
        else:  # real: one real signal; r2c: W = Ke Xe + Ko Xo
            w = [_cprod(k, _forward((x, None), c, geo, precision)) for k, x in zip(filt, a)]
            w = w[0] if len(w) == 1 else (w[0][0] + w[1][0], w[0][1] + w[1][1])
        y = _inverse(w, c, geo, geo.mode == "real", precision)
        for s in range(n_sig):  # real: Re; r2c: even (Re), odd (Im); complex: Re, Im
            out = y[s]
            if has_bias:
                out = out + bias_ref[pl.ds(ch, 1), :].astype(jnp.float32) * a[s]
            if has_post:
                out = out * post_ref[ch, s, :, :].astype(jnp.float32)
            o_ref[ch, s, :, :] = out.astype(o_ref.dtype)


def _filter_planes(spec, m: int, plan: MonarchPlan, cols: tuple[int, ...]):
    """spec [channels, M] complex (the filter's spectrum, or its conjugate for the backward) ->
    [channels', F, spec_rows, Nk] float32 planes in the kernel's spectrum layout: F = 2 (H;
    the outer step: channels' = channels * (Q/2+1), one filter H[Q f_r + f_q] per residue
    f_q <= Q/2) or F = 4 (r2c: Ke, Ko)."""
    geo = plan.geometry(m)
    c = spec.shape[0]
    if plan.r2c:
        half = m // 2
        hp, hm = (spec[:, :half] + spec[:, half:]) / 2, (spec[:, :half] - spec[:, half:]) / 2
        w = jnp.asarray(np.exp(-2j * np.pi * np.arange(half) / m).astype(np.complex64))
        filts = [hp + 1j * hm * jnp.conj(w), hm * w + 1j * hp]  # Ke, Ko  [channels, M/2]
    elif plan.outer > 1:  # [channels, R, Q] -> [channels, f_q <= Q/2, R]
        per_residue = spec.reshape(c, geo.size, plan.outer).swapaxes(1, 2)
        filts = [per_residue[:, : monarch.outer_residues(plan.outer)].reshape(-1, geo.size)]
    else:
        filts = [spec]
    idx = monarch.spectrum_index(geo.factors)[:, np.asarray(cols)]  # [rows, Nk]
    planes = [p for f in filts for p in (f[:, idx].real, f[:, idx].imag)]
    return jnp.stack(planes, axis=1).astype(jnp.float32)


def _to_kernel_layout(a, geo: KernelGeometry, plan: MonarchPlan, p: int):
    """a [batch, channels, N] -> [batch, channels, S, rows_in, width]: zero-padded to p (P, or M
    for a full signal; the kernel size without the skip); r2c: S = 2 planes, the even and the
    odd samples."""
    b, c, n = a.shape
    if plan.r2c:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, p - n))).reshape(b, c, p // 2, 2).swapaxes(-1, -2)
        return a.reshape(b, c, 2, geo.rows_in, geo.width)
    a = jnp.pad(a, ((0, 0), (0, 0), (0, geo.rows_in * geo.width - n)))
    return a.reshape(b, c, 1, geo.rows_in, geo.width)


def _from_kernel_layout(y, plan: MonarchPlan, n: int):
    """The inverse of ``_to_kernel_layout`` for the kernel's output: -> [batch, channels, N]."""
    b, c = y.shape[:2]
    if plan.r2c:
        y = y.reshape(b, c, 2, -1).swapaxes(-1, -2)
    return y.reshape(b, c, -1)[..., :n]


def _kernel_call(sig: list, bias, filt, *, geo: KernelGeometry, cols: tuple[int, ...],
                 block_c: int, precision: str, interpret: bool, has_pre: bool,
                 has_post: bool):
    """The pallas_call: sig = [x, pre?, post?] each [batch, channels', S, rows_in, width]
    float32 or input dtype; bias [channels'] or None; filt [channels', F, spec_rows, Nk] ->
    float32 [batch, channels', S, rows_in, width]."""
    b, c, s = sig[0].shape[:3]
    mats = monarch.kernel_matrices(geo, cols)
    names = tuple(mats)
    consts = [jnp.asarray(mats[name]) for name in names]
    sig_spec = pl.BlockSpec((pl.squeezed, block_c, s, geo.rows_in, geo.width),
                            lambda i, j: (i, j, 0, 0, 0))
    filt_spec = pl.BlockSpec((block_c,) + filt.shape[1:], lambda i, j: (j, 0, 0, 0))
    const_specs = [pl.BlockSpec(a.shape, lambda i, j: (0, 0)) for a in consts]
    extra, extra_specs = [], []
    if bias is not None:
        extra = [bias.astype(jnp.float32).reshape(c, 1)]
        extra_specs = [pl.BlockSpec((block_c, 1), lambda i, j: (j, 0))]
    kernel = functools.partial(_kernel, names=names, geo=geo, block_c=block_c,
                               precision=precision, has_pre=has_pre, has_post=has_post,
                               has_bias=bias is not None)
    return pl.pallas_call(
        kernel,
        grid=(b, c // block_c),
        in_specs=[sig_spec] * len(sig) + extra_specs + [filt_spec] + const_specs,
        out_specs=sig_spec,
        out_shape=jax.ShapeDtypeStruct(sig[0].shape, jnp.float32),
        interpret=interpret,
        # more threads share the per-sequence planes as the size grows (fewer registers each)
        compiler_params=triton_compiler_params(4 if geo.size <= 2048 else 8, 1, interpret),
        name=f"fftconv_monarch_{geo.mode}_order{len(geo.factors)}",
    )(*sig, *extra, filt, *consts)


def _outer_forward(x: jax.Array, m: int, q: int) -> tuple[jax.Array, jax.Array]:
    """The outer step's forward half: x [b, c, Q/2, R] float32 (x[q, r] = v[r + R q]; zero for
    q >= Q/2) -> the kernel's complex inputs (re, im) [b, c, Q/2+1, R] for the residues
    f_q <= Q/2 (``monarch.outer_matrices``), B[f_q, r] = ω_M^(r f_q) sum_{q < Q/2} x[q, r]
    ω_Q^(q f_q)."""
    mats = monarch.outer_matrices(m, q)
    if q > monarch.MAX_DENSE_OUTER_DFT:  # O(log Q) work per element instead of O(Q)
        spec = jnp.fft.rfft(x, n=q, axis=2)  # [b, c, Q/2+1, R] complex64
        br, bi = spec.real, spec.imag
    else:
        hi = lax.Precision.HIGHEST
        br = jnp.einsum("fq,bcqr->bcfr", mats["fwd_re"], x, precision=hi)  # [b, c, Q/2+1, R]
        bi = jnp.einsum("fq,bcqr->bcfr", mats["fwd_im"], x, precision=hi)
    tr, ti = mats["tw_re"], mats["tw_im"]  # [Q/2+1, R]
    return br * tr - bi * ti, br * ti + bi * tr


def _outer_inverse(yr: jax.Array, yi: jax.Array, m: int, q: int) -> jax.Array:
    """The outer step's inverse half: the inner convolutions (re, im) [b, c, Q/2+1, R] (indexed
    [f_q, r], f_q <= Q/2) -> y[q, r] = Re sum_{f <= Q/2} c_f ω_Q^(-q f) ω_M^(-r f) (.)[f, r] / Q
    (c_f: ``monarch.outer_matrices``; the residues above Q/2 add the conjugates of those below)
    for the wanted q < Q/2, float32 [b, c, Q/2, R]."""
    mats = monarch.outer_matrices(m, q)
    tr, ti = mats["tw_re"], mats["tw_im"]  # [Q/2+1, R]
    zr, zi = yr * tr + yi * ti, yi * tr - yr * ti  # ⊙ ω_M^(-r f_q)
    if q > monarch.MAX_DENSE_OUTER_DFT:  # irfft: that weighted real sum, 1/Q included
        return jnp.fft.irfft(lax.complex(zr, zi), n=q, axis=2)[:, :, : q // 2]
    hi = lax.Precision.HIGHEST
    return (jnp.einsum("qf,bcfr->bcqr", mats["inv_re"], zr, precision=hi)
            - jnp.einsum("qf,bcfr->bcqr", mats["inv_im"], zi, precision=hi))


def _outer_conv(v, spec, plan: MonarchPlan, cols: tuple[int, ...], block_c: int,
                precision: str, interpret: bool):
    """The outer decimation-in-frequency step (module docstring): v [batch, channels, N] float32
    -> the first N samples of circ_conv_M(v, h), float32. The Q-point DFTs are matmuls with a
    precomputed DFT matrix up to Q = ``monarch.MAX_DENSE_OUTER_DFT`` (small enough that the
    dense DFT's O(Q) multiply-adds per element stay cheap) and jnp.fft calls above."""
    b, c, n = v.shape
    m = spec.shape[-1]
    q, geo = plan.outer, plan.geometry(m)
    r, half = geo.size, monarch.outer_residues(q)
    x = jnp.pad(v, ((0, 0), (0, 0), (0, m // 2 - n))).reshape(b, c, q // 2, r)  # [b, c, Q/2, R]
    xr, xi = _outer_forward(x, m, q)  # [b, c, Q/2+1, R]
    sig = jnp.stack([xr, xi], axis=3).reshape(b, c * half, 2, geo.rows_in, geo.width)
    filt = _filter_planes(spec, m, plan, cols)
    y = _kernel_call([sig], None, filt, geo=geo, cols=cols, block_c=block_c,
                     precision=precision, interpret=interpret, has_pre=False, has_post=False)
    y = y.reshape(b, c, half, 2, r)  # [b, c, f_q, (re, im), r]: the inner convolutions
    out = _outer_inverse(y[:, :, :, 0], y[:, :, :, 1], m, q)  # [b, c, Q/2, R]
    return out.reshape(b, c, m // 2)[..., :n]


@functools.partial(jax.jit, static_argnames=("plan", "cols", "block_c", "precision",
                                             "interpret"))
def _circular_conv(x, pre, post, bias, spec, *, plan: MonarchPlan, cols: tuple[int, ...],
                   block_c: int, precision: str, interpret: bool):
    """x, pre, post [batch, channels, N] (pre/post may be None); bias [channels] or None;
    spec [channels, M] complex (the filter's spectrum) -> float32 [batch, channels, N]:
    post * (first N samples of circ_conv_M(pre * x, h) + bias * pre * x). N <= M/2 (zero
    padded: the kernel skips the zero block) or N = M (a full overlap-save block)."""
    n = x.shape[-1]
    m = spec.shape[-1]
    full = n > m // 2
    if plan.outer > 1:  # gates and bias in XLA around the outer step
        v = x.astype(jnp.float32)
        if pre is not None:
            v = v * pre.astype(jnp.float32)
        y = _outer_conv(v, spec, plan, cols, block_c, precision, interpret)
        if bias is not None:
            y = y + bias.astype(jnp.float32)[:, None] * v
        return y if post is None else y * post.astype(jnp.float32)
    geo = plan.geometry(m, full)
    sig = [_to_kernel_layout(a, geo, plan, m if full else m // 2)
           for a in (x, pre, post) if a is not None]
    y = _kernel_call(sig, bias, _filter_planes(spec, m, plan, cols), geo=geo, cols=cols,
                     block_c=block_c, precision=precision, interpret=interpret,
                     has_pre=pre is not None, has_post=post is not None)
    return _from_kernel_layout(y, plan, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def fftconv(u, k, pre_gate, post_gate, bias, offset, freq_sparsity, block_c, dot_precision,
            interpret, plan=None, fft_size=None):
    """u [batch, channels, N]; k [channels, L]; gates [batch, channels, N] or None; bias
    [channels] or None -> float32 y [batch, channels, N]. ``dot_precision``: one of
    ``DOT_PRECISIONS``, for the kernel's matmuls forward and backward. ``plan``: a
    ``monarch.MonarchPlan`` or None for ``monarch.choose_plan``'s by size. ``fft_size``: None
    (M = ``monarch.fft_size(N)``, the linear convolution) or N itself (a full overlap-save
    block, convolved circularly at size N: ``blocked.py``)."""
    n = u.shape[-1]
    m = monarch.fft_size(n) if fft_size is None else fft_size
    spec, plan, cols = _filter(k, n, offset, freq_sparsity, plan, m)
    return _circular_conv(u, pre_gate, post_gate, bias, spec, plan=plan, cols=cols,
                          block_c=block_c, precision=dot_precision, interpret=interpret)


def _filter(k, n: int, offset: int, freq_sparsity: float, plan: MonarchPlan | None,
            m: int):
    """The effective filter's spectrum at FFT size m without the bias (the kernel adds bias * v
    itself, so the bias does not densify a frequency-sparse spectrum) [channels, M] complex, the
    plan and the spectrum-layout columns it needs."""
    full = n > m // 2
    plan = monarch.choose_plan(m, full) if plan is None else plan
    geo = plan.geometry(m, full)
    if plan.outer > 1:  # the inner filters are dense: every column
        cols = tuple(range(geo.factors[-1]))
    else:
        cols = monarch.frequency_columns(geo.size, filters.keep_frequencies(m, freq_sparsity),
                                         geo.factors)
    h = filters.effective_filter(k, None, m=m, offset=offset, freq_sparsity=freq_sparsity)
    return jnp.fft.fft(h, axis=-1), plan, cols


def _fwd(u, k, pre_gate, post_gate, bias, offset, freq_sparsity, block_c, dot_precision,
         interpret, plan, fft_size):
    # y through fftconv itself, not the kernel: under a second derivative the forward is
    # differentiated too (without one, the call is the kernel alone)
    y = fftconv(u, k, pre_gate, post_gate, bias, offset, freq_sparsity, block_c, dot_precision,
                interpret, plan, fft_size)
    return y, (u, k, pre_gate, post_gate, bias)


def _bwd(offset, freq_sparsity, block_c, dot_precision, interpret, plan, fft_size, res, g):
    """The VJP, written with ``fftconv`` itself (and jnp), so that it is differentiable in turn:
    reverse-over-reverse (grad of grad, ``jax.jacrev(jax.jacrev(f))``) works to any order, each
    level running the kernels. Outside a transformation a custom-VJP call is its forward alone,
    so the first-order backward runs the same two kernels as a direct call would."""
    u, k, pre_gate, post_gate, bias = res
    n = u.shape[-1]
    m = monarch.fft_size(n) if fft_size is None else fft_size
    g = g.astype(jnp.float32)
    conv = functools.partial(fftconv, freq_sparsity=freq_sparsity, block_c=block_c,
                             dot_precision=dot_precision, interpret=interpret, plan=plan,
                             fft_size=fft_size)
    d_post = None
    if post_gate is not None:
        y_core = conv(u, k, pre_gate, None, bias, offset)  # recomputed, not kept as a residual
        d_post = (g * y_core).astype(post_gate.dtype)
    # dL/dv = the correlation of gc = post * g with h, plus bias * gc: a convolution with the
    # reversed filter h[-s mod M], which is flip(k) centred at tap L - 1 - offset (the frequency
    # mask is symmetric, so it commutes with the reversal)
    dv = conv(g, jnp.flip(k, axis=-1), post_gate, None, bias, k.shape[-1] - 1 - offset)
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
