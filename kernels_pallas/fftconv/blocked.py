"""Overlap-save blocking: a short filter convolved at a small FFT size.

Unblocked, a backend convolves the whole sequence in one transform, whatever the filter's
length: the Pallas kernel at M = ``monarch.fft_size(N)`` (2P, P = the power of two >= max(N,
256)), xla at M' = ``monarch.linear_fft_size`` (the power of two >= N + max(back, ahead), no
floor). A filter whose effective taps (L' = ``partial``, or a short L)
reach ``back`` samples into the past and ``ahead`` into the future (causal: back = L' - 1,
ahead = 0; centred: ``back_and_ahead``) only needs, for each output, the window
[t - back, t + ahead]. Overlap-save cuts the outputs into blocks of B and gives each block the
segment of S = B + back + ahead inputs that covers its windows (consecutive segments overlap by
back + ahead samples):

    segment j = v[j·B - back : j·B - back + S]   (zero outside [0, N))     [batch·blocks, C, S]
    z_j       = circ_conv_S(segment j, h)        (h: the centred filter at size S, filters.py)
    y[j·B + r] = z_j[back + r],  0 <= r < B      (the outputs whose window did not wrap around)

Only the back + ahead outputs whose window wraps are discarded, so S needs only B + back + ahead
samples, not twice that: the circular convolution is exact on the kept outputs. The segments are
folded into the batch, so the xla and pallas paths (and the custom VJP) run unchanged at size S
(``fft_size=S``); the gradient of the window gather (an overlap-add of the segments' gradients)
is autodiff of the slicing here. Gates and bias are pointwise, so they are cut into the same
segments: segment index i of u, pre_gate, post_gate and of the output all mean time
j·B - back + i, and the bias term bias * v stays aligned.

The rule (``choose_blocking``), only when freq_sparsity is 0 (the frequency mask is defined on
the spectrum at the full size M, and low-passing makes the filter circular and dense, every tap
non-zero, so no short segment reproduces it). The candidate sizes S are the powers of two from
the one >= OVERLAP_FACTOR · (back + ahead + 1) up to the one a single block of all N outputs
needs, within [MIN_BLOCK_FFT, MAX_BLOCK_FFT]. The decision depends on the backend:

* xla: S = the smallest candidate, taken when the blocks transform fewer samples in all than
  the one unblocked transform (blocks · S < M' = ``monarch.linear_fft_size``; the MIN_BLOCK_FFT
  floor stays, so short sequences, whose M' is small, run unblocked): an FFT's cost per sample grows only like log S (BENCHMARKS.md: 0.94x to
  1.58x on CPU over the blocked rows, the 0.94x within the noise).
* pallas: the candidate whose kernels cost least (``kernel_cost``: the Monarch kernel's
  real-matmul MACs times its outer residues, as ``experiments/bench_fftconv.py`` reports
  ``kernel_mflop``), taken when blocks · cost(S) < cost(M). Counting samples is wrong there: the
  unblocked kernel skips the zero half of its input (a full block cannot), and from M = 16384 it
  runs order 3, cheaper per sample than the order-2 kernels of blocks up to 8192 (at N = 16384,
  L' = 2048, three blocks of 8192 transform fewer samples than M = 32768 but cost 1.36x the work;
  two of 16384, order 3, cost 0.91x).

The ``block_fft_size`` argument of ``fftconv`` forces a size or disables blocking.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.fftconv import monarch

# S >= 4 (back + ahead + 1): B >= 3S/4 outputs per block, a fraction (back + ahead) / S <= 1/4 of
# the transform spent on the overlap. The Monarch kernel's cost grows like S^1.5 (its per-output
# cost S^1.5 / (S - halo) is least near S = 3 halo); an FFT's per-output cost S log S / (S - halo)
# is flat between 4 and 16 halo.
OVERLAP_FACTOR = 4
# The smallest block FFT size: 16 x 16, the smallest Monarch kernel whose matmuls Triton can
# compile (a full block keeps all N1 rows; ``monarch.MIN_DOT_DIM``).
MIN_BLOCK_FFT = 256
# The largest: the largest size the Pallas kernel holds without the outer step
# (``monarch.choose_plan``), whose inner convolutions assume a zero-padded signal.
MAX_BLOCK_FFT = 2 * monarch.MAX_KERNEL_SIZE


@dataclasses.dataclass(frozen=True)
class Blocking:
    """Overlap-save geometry: ``blocks`` segments of ``fft_size`` = S samples, each yielding
    ``block`` = B outputs; segment j starts at time j·B - ``back``."""

    fft_size: int
    block: int
    back: int
    blocks: int


def back_and_ahead(taps: int, offset: int) -> tuple[int, int]:
    """How far the filter reaches into the past and the future: taps s < ``taps`` with the tap
    ``offset`` < ``taps`` at the present (y[t] = sum_s k[s] v[t + offset - s]) -> (back, ahead)."""
    return taps - 1 - offset, offset


def make_blocking(n: int, taps: int, offset: int, fft_size: int) -> Blocking:
    """The blocks of a sequence of n outputs at block FFT size ``fft_size`` (> back + ahead)."""
    back, ahead = back_and_ahead(taps, offset)
    block = fft_size - back - ahead
    return Blocking(fft_size, block, back, -(-n // block))


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def kernel_cost(m: int, full: bool) -> int:
    """The Pallas kernel's real-matmul multiply-adds per (batch row, channel) at FFT size m with
    its plan by size (``monarch.choose_plan``; ``full``: an overlap-save block), times the outer
    step's Q/2 + 1 inner convolutions: what the pallas rule compares."""
    plan = monarch.choose_plan(m, full)
    geo = plan.geometry(m, full)
    return geo.real_macs(geo.factors[-1]) * monarch.outer_residues(plan.outer)


def choose_blocking(n: int, taps: int, offset: int, freq_sparsity: float,
                    backend: str) -> Blocking | None:
    """The size rule (module docstring) of ``backend`` ("xla" or "pallas"): the overlap-save
    blocking for n outputs of a filter of ``taps`` effective taps centred at ``offset``, or None
    when a single transform costs no more (xla: at M' = ``monarch.linear_fft_size``; pallas: at
    M = ``monarch.fft_size(n)``) or freq_sparsity > 0."""
    if backend not in ("xla", "pallas"):
        raise ValueError(f"choose_blocking: backend must be 'xla' or 'pallas'; got {backend!r}")
    if freq_sparsity > 0:
        return None
    back, ahead = back_and_ahead(taps, offset)
    one_block = _pow2_at_least(n + back + ahead)  # a single block of all n outputs
    smallest = max(MIN_BLOCK_FFT,
                   min(_pow2_at_least(OVERLAP_FACTOR * (back + ahead + 1)), one_block))
    if smallest > MAX_BLOCK_FFT:
        return None
    largest = max(smallest, min(MAX_BLOCK_FFT, one_block))
    if backend == "xla":
        blocking = make_blocking(n, taps, offset, smallest)
        return (blocking if blocking.blocks * smallest < monarch.linear_fft_size(n, back, ahead)
                else None)
    best, best_cost = None, kernel_cost(monarch.fft_size(n), False)
    size = smallest
    while size <= largest:
        blocking = make_blocking(n, taps, offset, size)
        cost = blocking.blocks * kernel_cost(size, True)
        if cost < best_cost:
            best, best_cost = blocking, cost
        size *= 2
    return best


def to_segments(a: jax.Array, blocking: Blocking) -> jax.Array:
    """a [batch, C, N] -> the overlapping segments [batch · blocks, C, S], zero outside [0, N):
    segment j = a[j·B - back : j·B - back + S]. Built from ceil(S / B) strided reshapes (each
    piece q holds a[(j + q)·B - back : ... + B] for every j at once), not a gather."""
    b, c, n = a.shape
    s, blk, nb = blocking.fft_size, blocking.block, blocking.blocks
    pieces = -(-s // blk)
    total = (nb + pieces - 1) * blk  # >= (nb - 1)·B + S: the last segment's end
    a = jnp.pad(a, ((0, 0), (0, 0), (blocking.back, total - blocking.back - n)))
    seg = jnp.concatenate([a[..., q * blk: (q + nb) * blk].reshape(b, c, nb, blk)
                           for q in range(pieces)], axis=-1)[..., :s]  # [batch, C, blocks, S]
    return seg.transpose(0, 2, 1, 3).reshape(b * nb, c, s)


def from_segments(z: jax.Array, blocking: Blocking, batch: int, n: int) -> jax.Array:
    """The segments' circular outputs z [batch · blocks, C, S] -> y [batch, C, N]: the B
    unwrapped outputs of each, z_j[back : back + B], laid end to end."""
    nb, blk = blocking.blocks, blocking.block
    c = z.shape[1]
    y = z[..., blocking.back: blocking.back + blk].reshape(batch, nb, c, blk)
    return y.transpose(0, 2, 1, 3).reshape(batch, c, nb * blk)[..., :n]
