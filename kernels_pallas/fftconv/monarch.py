"""FFT sizes and the Monarch (order-2) DFT factors, built once per size in numpy and cached.

Order-2 Monarch FFT of length M = N1 * N2 (ω = exp(-2πi/M), n = N2*n1 + n2, f = k1 + N1*k2):

    A[n1, n2] = x[N2*n1 + n2]                       (a row-major reshape, no permutation)
    D = ((F_N1 A) ⊙ T) F_N2,   T[k1, n2] = ω^(k1*n2),   D[k1, k2] = X[k1 + N1*k2]   ("D-order")
    x = Re F̄_N1 ((D F̄_N2) ⊙ T̄) / M                    (back in natural, A order)

Every convolution here is circular of size M = 2P, P = the power of two >= N (at least
``MIN_PADDED``): the input is zero on [P, M), so rows N1/2.. of A are zero and only the first N1/2
columns of F_N1 are needed forward; only outputs t < P are wanted, so only the first N1/2 rows of
F̄_N1 are needed inverse (FlashFFTConv's "skip the zero blocks").
"""

from __future__ import annotations

import functools

import numpy as np

# Smallest padded length P: M = 2P = 512 = 32 x 16 keeps every matmul dimension >= 16 (Triton).
MIN_PADDED = 256


def padded_length(n: int) -> int:
    """P: the power of two >= n (and >= MIN_PADDED) that the signal is zero-padded to."""
    return max(MIN_PADDED, 1 << max(0, (n - 1).bit_length()))


def fft_size(n: int) -> int:
    """M = 2P, the circular FFT size every backend uses for a length-n signal (linear causal
    convolution of two length-P signals fits without wrap-around)."""
    return 2 * padded_length(n)


def monarch_factors(m: int) -> tuple[int, int]:
    """(N1, N2) with N1 * N2 = m, N1 >= N2, both powers of two (N1 is even, so N1/2 rows hold
    the non-zero half of the signal)."""
    log = m.bit_length() - 1
    if m != 1 << log or m < 4:
        raise ValueError(f"FFT size must be a power of two >= 4; got {m}")
    n1 = 1 << ((log + 1) // 2)
    return n1, m // n1


def _dft(r: int) -> np.ndarray:
    idx = np.arange(r)
    return np.exp(-2j * np.pi * np.outer(idx, idx) / r)


@functools.lru_cache(maxsize=None)
def monarch_matrices(m: int) -> dict[str, np.ndarray]:
    """Real float32 planes of the factors for size m (cached per size):

    f1_re, f1_im [N1, N1/2]: the first N1/2 columns of F_N1 (forward; zero rows skipped);
    tw_re, tw_im [N1, N2]: the twiddles T;  f2_re, f2_im [N2, N2]: F_N2 (symmetric);
    g1_re, g1_im [N1/2, N1]: the first N1/2 rows of F̄_N1 / M (inverse, 1/M folded in).
    """
    n1, n2 = monarch_factors(m)
    f1 = _dft(n1)
    tw = np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(n2)) / m)
    f2 = _dft(n2)
    g1 = np.conj(f1[: n1 // 2, :]) / m
    planes = {"f1": f1[:, : n1 // 2], "tw": tw, "f2": f2, "g1": g1}
    out = {}
    for name, mat in planes.items():
        out[name + "_re"] = np.ascontiguousarray(mat.real, np.float32)
        out[name + "_im"] = np.ascontiguousarray(mat.imag, np.float32)
    return out


def to_d_order(spectrum, n1: int, n2: int):
    """[..., M] natural-order spectrum -> [..., N1, N2] D-order (D[k1, k2] = X[k1 + N1*k2])."""
    lead = spectrum.shape[:-1]
    return spectrum.reshape(*lead, n2, n1).swapaxes(-1, -2)


@functools.lru_cache(maxsize=None)
def frequency_columns(m: int, cutoff: int) -> tuple[int, ...]:
    """The D-order columns k2 a filter low-passed to |f| <= cutoff needs (f = k1 + N1*k2 is
    kept iff f <= cutoff or f >= M - cutoff), padded with dropped columns (whose spectrum is zero,
    so using them is exact) to a power of two >= min(16, N2) for Triton. All N2 columns when
    nothing is dropped. Skipping the other columns is FlashFFTConv's frequency-sparse speed-up:
    the N2-point DFT matmuls shrink to [., N2] x [N2, len(cols)] and back."""
    n1, n2 = monarch_factors(m)
    f = np.arange(n1)[:, None] + n1 * np.arange(n2)[None, :]  # [N1, N2]
    needed = np.any((f <= cutoff) | (f >= m - cutoff), axis=0)
    cols = [int(j) for j in np.flatnonzero(needed)]
    width = max(min(16, n2), 1 << max(0, (len(cols) - 1).bit_length()))
    cols += [int(j) for j in np.flatnonzero(~needed)][: width - len(cols)]
    return tuple(sorted(cols))
