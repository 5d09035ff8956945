"""FFT sizes, Monarch decompositions and their DFT/twiddle factors (numpy, cached once per size).

The Pallas kernel's convolutions are circular of size M = 2P (``fft_size``), P = the power of
two >= max(N, ``MIN_PADDED``): the signal is zero on [P, M) and only outputs t < P are wanted. The
floor (M >= 512) is the kernel's (Triton's matmul widths), and freq_sparsity is defined on the
spectrum at this M on every backend (``filters.py``). An exact convolution (freq_sparsity 0) on
the xla path needs no floor and runs at ``linear_fft_size`` instead, which can be smaller.

Order-2 Monarch FFT of length m = N1 * N2 (ω = exp(-2πi/m), n = N2*n1 + n2, f = k1 + N1*k2):

    A[n1, n2] = x[N2*n1 + n2]                       (a row-major reshape, no permutation)
    D = ((F_N1 A) ⊙ T) F_N2,   T[k1, n2] = ω^(k1*n2),   D[k1, k2] = X[k1 + N1*k2]   ("D-order")
    x = F̄_N1 ((D F̄_N2) ⊙ T̄) / m                      (back in natural, A order)

Order 3 (m = N1 * N2 * N3, n = N2*N3*n1 + N3*n2 + n3, f = k1 + N1*k2 + N1*N2*k3) recurses on the
inner N2*N3-point transform of each row: A [N1, N2*N3] -> F_N1 A ⊙ T1 (T1[k1, n'] = ω^(k1*n'),
the same twiddle as order 2), then per row an order-2 transform of length N2*N3 (twiddle
T2[k2, n3] = ω_(N2*N3)^(k2*n3)); the kernel's layout is D[k1*N2 + k2, k3] = X[f]. Cost in real
MACs per (batch row, channel) is about m·(2·N1 + 8·N2) for order 2 and m·(2·N1 + 8·N2 + 8·N3) for
order 3: order 3 does fewer FLOPs at the price of smaller matmuls, so it pays only for large m.

Zero blocks (FlashFFTConv's "skip"): the input is zero on the second half, so rows N1/2.. of A
are zero and only the first N1/2 columns of F_N1 are needed forward; only the first half of the
outputs is wanted, so only the first N1/2 rows of F̄_N1 inverse.

``MonarchPlan`` says which decomposition the Pallas kernel runs; ``choose_plan`` is the rule by
size (see its docstring); ``KernelGeometry`` is the resulting kernel shape.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# Smallest padded length P: M = 2P = 512 = 32 x 16 keeps every matmul dimension >= 16 (Triton).
MIN_PADDED = 256
# Triton's tl.dot needs every matmul dimension >= 16.
MIN_DOT_DIM = 16
# Largest transform one kernel program holds (about ten live float32 planes of this many values
# each; FlashFFTConv fuses up to 32K fp16 values, half that in float32). Larger FFT sizes take an
# outer Cooley-Tukey step in XLA whose inner convolutions are kernels of this size. Not yet tuned
# on a GPU: ``experiments/bench_fftconv.py`` sweeps the plans to do so.
MAX_KERNEL_SIZE = 16384
# Kernel sizes up to this use order 2; larger ones order 3 (the smallest order-3 size whose
# factors all satisfy MIN_DOT_DIM with the zero-block skip, 32 x 16 x 16, is 8192).
MAX_ORDER2_SIZE = 4096
# The outer step's Q-point DFTs (XLA, outside the kernel) are dense matmuls with a precomputed
# DFT matrix up to this Q, and jnp.fft calls above it: the dense DFT costs O(Q) multiply-adds per
# element each way, an FFT O(log Q) (choose_plan gives Q = 256 from N = 2^21 on). Not yet tuned on
# a GPU.
MAX_DENSE_OUTER_DFT = 128


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def padded_length(n: int) -> int:
    """P: the power of two >= max(n, MIN_PADDED) that the Pallas kernel zero-pads the signal to."""
    return max(MIN_PADDED, _pow2_at_least(n))


def fft_size(n: int) -> int:
    """M = 2P (at least 2 * MIN_PADDED = 512), the circular FFT size of the Pallas kernel for a
    length-n signal (a linear causal convolution of two length-P signals fits without
    wrap-around), and the size at which freq_sparsity's frequency mask is defined on every
    backend (``filters.effective_filter``)."""
    return 2 * padded_length(n)


def linear_fft_size(n: int, back: int, ahead: int) -> int:
    """The smallest power of two M' at which a circular convolution of a length-n signal
    zero-padded to M' gives the n outputs of the linear one exactly, for a filter reaching
    ``back`` samples into the past and ``ahead`` into the future (``blocked.back_and_ahead``;
    back + ahead < n): M' >= n + max(back, ahead), so no window wraps onto the signal (at most
    2·(the power of two >= n), and no floor). The xla path's size when freq_sparsity is 0."""
    return _pow2_at_least(n + max(back, ahead))


def _log2(m: int) -> int:
    if m < 4 or m & (m - 1):
        raise ValueError(f"FFT size must be a power of two >= 4; got {m}")
    return m.bit_length() - 1


def split_factors(m: int, order: int) -> tuple[int, ...]:
    """``order`` powers of two whose product is m, as equal as possible, largest first (a large
    N1 is cheap: the zero-block skip halves the N1 stages)."""
    log = _log2(m)
    if log < order:
        raise ValueError(f"FFT size {m} is too small for an order-{order} decomposition")
    logs = [log // order + (i < log % order) for i in range(order)]
    return tuple(1 << e for e in logs)


@dataclasses.dataclass(frozen=True)
class MonarchPlan:
    """How the Pallas kernel computes a circular convolution of real signals of FFT size M.

    order: 2 or 3, the Monarch order of the in-kernel transform.
    r2c: the real-to-complex trick. The signal is split into its even and odd samples; the
      kernel takes the (M/2)-point FFTs of both (real inputs), combines them with the filter as
      a 2x2 polyphase product, and one complex (M/2)-point inverse returns the even outputs in
      its real part and the odd ones in its imaginary part. No transform runs at size M.
    outer: Q = 1, or a power of two >= 2: an outer decimation-in-frequency step in XLA splits the
      size-M convolution into Q complex convolutions of size M/Q (the kernel), one per residue
      of the frequency mod Q, of which the kernel runs Q/2 + 1 (``outer_residues``).
    """

    order: int = 2
    r2c: bool = False
    outer: int = 1

    def __post_init__(self):
        for name in ("order", "outer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MonarchPlan.{name} must be an int (not a bool); "
                                f"got {value!r} ({type(value).__name__})")
        if not isinstance(self.r2c, bool):
            raise TypeError(f"MonarchPlan.r2c must be a bool; got {self.r2c!r} "
                            f"({type(self.r2c).__name__})")
        if self.order not in (2, 3):
            raise ValueError(f"MonarchPlan.order must be 2 or 3; got {self.order!r}")
        if self.outer < 1 or self.outer & (self.outer - 1):
            raise ValueError(f"MonarchPlan.outer must be a power of two >= 1; got {self.outer!r}")
        if self.r2c and self.outer > 1:
            raise ValueError("MonarchPlan: r2c and an outer step do not combine (the outer "
                             "step's inner convolutions are complex)")

    def geometry(self, m: int, full: bool = False) -> "KernelGeometry":
        """The kernel's shapes for FFT size m. ``full``: the signal fills all m samples and every
        output is wanted (overlap-save blocks, ``blocked.py``), so no zero block is skipped;
        otherwise it fills the first m/2 and the first m/2 outputs are wanted."""
        div = (2 if self.r2c else 1) * self.outer
        if m % div or m // div < 2 ** self.order:
            raise ValueError(f"the kernel size M / {div} = {m / div:g} (M = {m}) must be a power "
                             f"of two >= {2 ** self.order} for an order-{self.order} transform")
        if full and self.outer > 1:
            raise ValueError("MonarchPlan: an outer step needs the zero-padded (not full) signal")
        size = m // div
        factors = split_factors(size, self.order)
        return KernelGeometry(size, factors, skip=self.outer == 1 and not full,
                              mode="complex" if self.outer > 1 else "r2c" if self.r2c else "real")


def choose_plan(m: int, full: bool = False) -> MonarchPlan:
    """The decomposition for FFT size m (= 2P; or any power of two with ``full``, the signal
    filling all m samples: ``MonarchPlan.geometry``). The rule:

    * r2c from m = 1024 on (512 with ``full``): the kernel then runs at size m/2, half the
      transform work; below, the half-size factors would make matmuls under 16 wide (the zero
      block skip halves N1; a full signal keeps it).
    * order 2 while the kernel size is <= MAX_ORDER2_SIZE (4096, i.e. N <= 4096 with r2c),
      order 3 above: its smaller matmuls do fewer FLOPs (at kernel size m = 8192, real mode,
      m·(2·32 + 8·16 + 8·16) = 320·m real MACs instead of m·(2·128 + 8·64) = 768·m), and 8192
      is the smallest size whose order-3 factors (32, 16, 16) Triton can multiply. At M = 8192
      (N = 4096) plain order 3 (320·M) does fewer MACs than r2c order 2 (512·M) but has narrower
      matmuls and two transposes; ``experiments/bench_fftconv.py``'s monarch_plan sweep at
      N = 4096 measures which is faster.
    * an outer step once m/2 > MAX_KERNEL_SIZE (N > 16384): Q = m / MAX_KERNEL_SIZE inner
      complex convolutions of size MAX_KERNEL_SIZE, order 3, Q/2 + 1 of them computed (the
      rest are their conjugates, ``outer_matrices``). Q grows with N (Q = 256 at
      N = 2^21); its Q-point DFTs in XLA are dense matmuls up to Q = MAX_DENSE_OUTER_DFT
      (N <= 2^20) and jnp.fft calls beyond.
    """
    if m // 2 > MAX_KERNEL_SIZE:
        return MonarchPlan(order=3, outer=m // MAX_KERNEL_SIZE)
    r2c = m >= (512 if full else 1024)
    size = m // 2 if r2c else m
    return MonarchPlan(order=2 if size <= MAX_ORDER2_SIZE else 3, r2c=r2c)


@dataclasses.dataclass(frozen=True)
class KernelGeometry:
    """Shapes of one kernel program's transforms, for a kernel size ``size`` = prod(factors).

    Signals enter as [rows_in, width] (width = size / N1: the input reshaped row-major), spectra
    live as [spec_rows, N_last] (D-order of the plan, ``spectrum_index``). ``skip``: the input is
    zero on its second half and only the first half of the output is wanted (real signals; not
    the outer step's dense inner convolutions). ``mode``: "real" (one real input, real output),
    "r2c" (even and odd real inputs, complex output = even + i odd), "complex" (complex in/out).
    """

    size: int
    factors: tuple[int, ...]
    skip: bool
    mode: str

    @property
    def width(self) -> int:
        return self.size // self.factors[0]

    @property
    def rows_in(self) -> int:
        return self.factors[0] // 2 if self.skip else self.factors[0]

    @property
    def spec_rows(self) -> int:
        return self.size // self.factors[-1]

    @property
    def lowers_to_triton(self) -> bool:
        """Whether every matmul has all dimensions >= MIN_DOT_DIM (Triton's tl.dot; the kept
        spectrum columns are padded to at least min(16, N_last))."""
        return min(self.rows_in, *self.factors) >= MIN_DOT_DIM

    def real_macs(self, n_cols: int) -> int:
        """Real multiply-adds of the kernel's matmuls per convolution (one batch row, channel and
        outer residue) with ``n_cols`` kept spectrum columns: the cost the plans trade."""
        n1, last = self.factors[0], self.factors[-1]
        rows = self.spec_rows
        real_in, real_out = self.mode != "complex", self.mode == "real"
        middle = 0
        if len(self.factors) == 3:
            n2 = self.factors[1]
            middle = 4 * n2 * n2 * (self.size // n2)
        forward = (2 if real_in else 4) * n1 * self.rows_in * self.width + middle \
            + 4 * rows * last * n_cols
        inverse = 4 * rows * n_cols * last + middle \
            + (2 if real_out else 4) * self.rows_in * n1 * self.width
        return (2 if self.mode == "r2c" else 1) * forward + inverse


def _dft(r: int) -> np.ndarray:
    idx = np.arange(r)
    return np.exp(-2j * np.pi * np.outer(idx, idx) / r)


@functools.lru_cache(maxsize=None)
def spectrum_index(factors: tuple[int, ...]) -> np.ndarray:
    """[spec_rows, N_last] int: the frequency f held at each position of the kernel's spectrum
    layout (order 2: D[k1, k2] = X[k1 + N1*k2]; order 3: D[k1*N2 + k2, k3] =
    X[k1 + N1*k2 + N1*N2*k3])."""
    if len(factors) == 2:
        n1, n2 = factors
        return np.arange(n1)[:, None] + n1 * np.arange(n2)[None, :]
    n1, n2, n3 = factors
    f = (np.arange(n1)[:, None, None] + n1 * np.arange(n2)[None, :, None]
         + n1 * n2 * np.arange(n3)[None, None, :])
    return f.reshape(n1 * n2, n3)


def _planes(mats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Complex matrices -> float32 real and imaginary planes (name_re, name_im)."""
    out = {}
    for name, mat in mats.items():
        out[name + "_re"] = np.ascontiguousarray(mat.real, np.float32)
        out[name + "_im"] = np.ascontiguousarray(mat.imag, np.float32)
    return out


@functools.lru_cache(maxsize=None)
def kernel_matrices(geo: KernelGeometry, cols: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Real float32 planes of every DFT and twiddle factor the kernel needs, built once per
    (geometry, kept columns) and cached:

    f1 [N1, rows_in]: F_N1, first rows_in columns (zero rows of the input skipped);
    t1 [N1, width]: T1;  g1 [rows_in, N1]: F̄_N1 / size, first rows_in rows (only the outputs in
      the rows the input occupies are wanted; 1/size folded in);
    order 2: fl [N2, Nk] = F_N2[:, cols], bl [Nk, N2] = F̄_N2[cols, :];
    order 3: f2 [N2, N2] = F_N2; t2 [N2, N3*N1]: T2[k2, n3] repeated over k1 (the kernel's
      middle layout [k2, (n3, k1)]); fl [N3, Nk] = F_N3[:, cols], bl [Nk, N3] = F̄_N3[cols, :].
    (F̄_N2 and T̄ are the conjugates of f2 and the twiddles: the kernel flips their sign.)
    """
    n1, size = geo.factors[0], geo.size
    f1 = _dft(n1)
    mats = {"f1": f1[:, : geo.rows_in],
            "t1": np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(geo.width)) / size),
            "g1": np.conj(f1[: geo.rows_in, :]) / size}
    last = _dft(geo.factors[-1])
    idx = list(cols)
    mats["fl"], mats["bl"] = last[:, idx], np.conj(last[idx, :])
    if len(geo.factors) == 3:
        _, n2, n3 = geo.factors
        mats["f2"] = _dft(n2)
        t2 = np.exp(-2j * np.pi * np.outer(np.arange(n2), np.arange(n3)) / (n2 * n3))
        mats["t2"] = np.repeat(t2, n1, axis=1)  # [N2, N3*N1]: column n3*N1 + k1
    return _planes(mats)


@functools.lru_cache(maxsize=None)
def frequency_columns(m: int, cutoff: int, factors: tuple[int, ...]) -> tuple[int, ...]:
    """The spectrum-layout columns a filter low-passed to |f| <= cutoff needs at kernel size m
    (f is kept iff f <= cutoff or f >= m - cutoff), padded with dropped columns (whose spectrum
    is zero, so using them is exact) to a power of two >= min(16, N_last) for Triton. All
    columns when nothing is dropped. ``factors``: the kernel's decomposition
    (``KernelGeometry.factors``, product m), whose layout (``spectrum_index``) the columns index.
    Skipping the other columns is FlashFFTConv's frequency-sparse speed-up: the last DFT's
    matmuls shrink to [., N_last] x [N_last, len(cols)] and back.

    With r2c the kernel size is M/2 and bin k carries the frequencies k and k + M/2 (both
    within the cutoff iff k <= cutoff or k >= M/2 - cutoff), so the same rule applies at m = M/2.
    """
    if int(np.prod(factors)) != m:
        raise ValueError(f"factors {factors} must multiply to the kernel size m = {m}")
    n_last = factors[-1]
    f = spectrum_index(tuple(factors))  # [spec_rows, N_last]
    needed = np.any((f <= cutoff) | (f >= m - cutoff), axis=0)
    cols = [int(j) for j in np.flatnonzero(needed)]
    width = max(min(16, n_last), 1 << max(0, (len(cols) - 1).bit_length()))
    cols += [int(j) for j in np.flatnonzero(~needed)][: width - len(cols)]
    return tuple(sorted(cols))


def outer_residues(q: int) -> int:
    """How many of the outer step's Q inner convolutions are computed: f_q = 0 .. Q/2 (one for
    Q = 1, no outer step). For a real signal and filter the others follow (``outer_matrices``)."""
    return q // 2 + 1


@functools.lru_cache(maxsize=None)
def outer_matrices(m: int, q: int) -> dict[str, np.ndarray]:
    """Float32 planes of the outer decimation-in-frequency step of size m = Q * R, built once per
    (m, Q), for the residues f_q = 0 .. Q/2 only (``outer_residues``): the signal and the filter
    are real, so the inner convolution of residue Q - f is z_(Q-f)[r] = ω_R^r conj(z_f[r]), and
    its term in the inverse DFT is the conjugate of residue f's: the real output is the sum over
    f <= Q/2 with weights c_f = 1 at f in {0, Q/2} and 2 between.
    tw [Q/2+1, R]: ω_m^(f_q * r); for Q <= MAX_DENSE_OUTER_DFT (larger Q take jnp.fft) the dense
    Q-point DFTs fwd [Q/2+1, Q/2] = F_Q[:Q/2+1, :Q/2] (the input is zero for q >= Q/2) and
    inv [Q/2, Q/2+1] = F̄_Q[:Q/2, :Q/2+1] c_f / Q (only outputs q < Q/2 are wanted)."""
    if q < 2 or q & (q - 1):  # the weights c_f pair residue f with Q - f: Q even (a power of 2)
        raise ValueError(f"the outer step's size Q must be a power of two >= 2; got {q}")
    r, half = m // q, outer_residues(q)
    mats = {"tw": np.exp(-2j * np.pi * np.outer(np.arange(half), np.arange(r)) / m)}
    if q <= MAX_DENSE_OUTER_DFT:
        f = _dft(q)
        weight = np.where((np.arange(half) == 0) | (np.arange(half) == q // 2), 1.0, 2.0)
        mats.update(fwd=f[:half, : q // 2], inv=np.conj(f[: q // 2, :half]) * weight / q)
    return _planes(mats)
