"""Long convolutions: ``fftconv(u, k)``, a depthwise convolution with filters as long as the
sequence, computed by FFT (FlashFFTConv), with gating, a skip bias, partial and frequency-sparse
filters.

One function, several implementations (the pattern of ../shared/DESIGN.md):

* ``reference`` (``reference.py``): the direct O(N·L) convolution in float32. The oracle.
* ``xla`` (``xla.py``): ``jnp.fft.rfft`` at the smallest exact size, the power of two
  >= N + the filter's reach (``monarch.linear_fft_size``: 32 at N = 16), or at M (below) with
  freq_sparsity > 0; gates and bias in the same jnp graph; backward by autodiff through the FFT.
  What CPU users run.
* ``pallas`` (``pallas_gpu.py``): the Monarch FFT convolution as a Pallas kernel (DFT and
  twiddle matrices as real/imaginary matmuls at ``dot_precision``, gates fused; the outer step
  computes the Q/2 + 1 inner convolutions that a real signal needs) with a custom VJP (reverse
  mode to any order; no forward mode), lowered
  through Triton on NVIDIA GPUs and run with ``interpret=True`` on CPU. The decomposition is
  chosen by size (``monarch.choose_plan``): order 2 (with the real-to-complex trick from
  N = 257) up to N = 4096, order 3 with it up to N = 16384, an outer XLA step around order-3
  kernels beyond; ``monarch_plan`` forces one. No TPU (Mosaic) kernel yet.
* ``auto``: xla on every platform. The shared resolver (``kernels_pallas.backend``) would pick
  pallas on a GPU, but on the H200 the Pallas kernel ran 37x slower than ``jnp.fft`` at N = 1K
  and its compile time grows steeply with N (BENCHMARKS.md, "FFT convolution on a GPU"); like
  attention's ``pallas_mgpu``, auto picks it once a GPU run shows it faster (``_resolve``).

The Pallas kernel convolves circularly at M = 2P, P = the power of two >= max(N, 256)
(``monarch.fft_size``; the floor M >= 512 keeps its matmuls at least 16 wide for Triton).
``freq_sparsity``'s frequency mask is defined on the filter's spectrum at that M on every
backend (``filters.py``; the reference and xla low-pass at it too), which is what makes it mean
the same thing everywhere: the kept band |f| < (1 - r)·M/2 is a fraction of M/2 bins, so for
N < 256 it is measured against the floored M = 512, not against 2N. A short filter (``partial``, or
a small L) on the xla and pallas backends is instead convolved by overlap-save blocks at a smaller
FFT size S (``blocked.py``: the rule, and ``block_fft_size`` to force or disable it); the result
is the same convolution, only cheaper.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.backend import resolve_backend
from kernels_pallas.fftconv import blocked, monarch, pallas_gpu, reference, xla
from kernels_pallas.fftconv.monarch import MonarchPlan
from kernels_pallas.validation import check_arrays, check_float_dtype, is_int, shape_str

__all__ = ["fftconv", "DEFAULT_KERNEL_OPTIONS", "DOT_PRECISIONS", "BACKENDS", "MonarchPlan"]

BACKENDS = ("auto", "reference", "xla", "pallas")
DOT_PRECISIONS = pallas_gpu.DOT_PRECISIONS
# Per-backend kernel defaults ("pallas": the Triton kernel on a GPU; "pallas_interpret": the same
# kernel interpreted on a CPU).
# block_c: channels per Pallas program (each channel is one fused FFT conv of a whole sequence,
#   so one is already a sizeable program; raise it for short sequences).
# dot_precision: on a GPU "bf16x3". Float32 matmuls lower to IEEE fp32 dots on CUDA cores (the
#   recorded H200 kernel ran at 0.027x jnp.fft); bf16 products run on tensor cores (H100/H200:
#   ~990 dense TFLOP/s against ~67 for fp32 FMA, so ~5x even at three products each), and three
#   of them keep the error near float32's (measured 3e-6 to 6e-6 relative, against ~2e-7) where
#   one ("bf16", FlashFFTConv's half-precision choice) loses 2e-3 to 4e-3, much for an op
#   documented as computing in float32. Interpreted on
#   a CPU "float32": there are no matrix units to gain and three dots cost three times one; pass
#   dot_precision to emulate the GPU's products (summation order aside).
DEFAULT_KERNEL_OPTIONS = {"pallas": dict(block_c=1, dot_precision="bf16x3"),
                          "pallas_interpret": dict(block_c=1, dot_precision="float32")}


def _is_bool(x) -> bool:
    return isinstance(x, (bool, np.bool_))


def _check_float(name: str, x) -> None:
    check_arrays(**{name: x})
    check_float_dtype(name, x)


def _check_inputs(u, k, bidirectional, pre_gate, post_gate, bias, partial, freq_sparsity, backend,
                  block_c, dot_precision, monarch_plan, block_fft_size):
    if not _is_bool(bidirectional):  # a truthy string such as "no" would mean True
        raise TypeError(f"bidirectional must be a bool; got {bidirectional!r}")
    _check_float("u", u)
    _check_float("k", k)
    if u.ndim != 3:
        raise ValueError(f"u must be [batch, channels, N]; got shape {shape_str(u)}")
    if k.ndim != 2:
        raise ValueError(f"k must be [channels, L]; got shape {shape_str(k)}")
    b, c, n = u.shape
    if k.shape[0] != c:
        raise ValueError(f"k must have u's {c} channels; got u {shape_str(u)} and k {shape_str(k)}")
    if not 1 <= k.shape[1] <= n:
        raise ValueError(f"k's length L must satisfy 1 <= L <= N = {n}; got k {shape_str(k)}")
    for name, gate in (("pre_gate", pre_gate), ("post_gate", post_gate)):
        if gate is not None:
            _check_float(name, gate)
            if gate.shape != u.shape:
                raise ValueError(f"{name} must have u's shape {shape_str(u)}; "
                                 f"got {shape_str(gate)}")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (c,):
            raise ValueError(f"bias must be [channels] = [{c}]; got {shape_str(bias)}")
    # Python or numpy scalars (np.int64 is an Integral, np.float32 a Real); bools are neither here
    if partial is not None and (not is_int(partial) or not 1 <= partial <= k.shape[1]):
        raise ValueError(f"partial must be an int in [1, L = {k.shape[1]}] or None; "
                         f"got {partial!r}")
    if (_is_bool(freq_sparsity) or not isinstance(freq_sparsity, numbers.Real)
            or not 0.0 <= freq_sparsity < 1.0):
        raise ValueError(f"freq_sparsity must be a float in [0, 1); got {freq_sparsity!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if block_c is not None and (not is_int(block_c) or block_c < 1 or c % block_c):
        raise ValueError(f"block_c must be a positive int dividing channels = {c}; "
                         f"got {block_c!r}")
    if dot_precision is not None and dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS} or None; "
                         f"got {dot_precision!r}")
    if monarch_plan is not None and not isinstance(monarch_plan, MonarchPlan):
        raise TypeError(f"monarch_plan must be a MonarchPlan or None; "
                        f"got {type(monarch_plan).__name__}")
    if block_fft_size is not None:
        s = block_fft_size
        if not is_int(s) or (s and (s < 8 or s & (s - 1) or s > blocked.MAX_BLOCK_FFT)):
            raise ValueError(f"block_fft_size must be None, 0 or a power of two in "
                             f"[8, {blocked.MAX_BLOCK_FFT}]; got {s!r}")
        if s and freq_sparsity:
            raise ValueError(f"block_fft_size forces overlap-save blocks, which need "
                             f"freq_sparsity == 0 (the mask is defined at the full FFT size); "
                             f"got block_fft_size={s} and freq_sparsity={freq_sparsity!r}")


def _resolve(backend: str) -> tuple[str, bool]:
    """(implementation, interpret) for ``backend``: "auto" is xla here, before the shared
    resolver would map it to pallas on a GPU (module docstring: the measured H200 kernel)."""
    return resolve_backend("xla" if backend == "auto" else backend, op="fftconv")


def _check_plan(monarch_plan: MonarchPlan, m: int, full: bool, n: int, triton: bool) -> None:
    """The forced plan (or, on a GPU, the plan by size of a forced block size) must fit the FFT
    size m the kernel runs at (``full``: an overlap-save block) and, with ``triton`` (compiled
    on a GPU), lower to Triton."""
    try:
        geo = monarch_plan.geometry(m, full)
    except ValueError as e:
        raise ValueError(f"monarch_plan {monarch_plan} does not fit N = {n} "
                         f"(FFT size {m}): {e}") from None
    if triton and not geo.lowers_to_triton:
        raise ValueError(f"the kernel plan {monarch_plan} has matmuls narrower than "
                         f"{monarch.MIN_DOT_DIM} at N = {n} (FFT size {m}), which Triton cannot "
                         "compile; use a larger N (or block_fft_size), another plan or None")


def fftconv(u: jax.Array, k: jax.Array, *, bidirectional: bool = False,
            pre_gate: jax.Array | None = None, post_gate: jax.Array | None = None,
            bias: jax.Array | None = None, partial: int | None = None,
            freq_sparsity: float = 0.0, backend: str = "auto", block_c: int | None = None,
            dot_precision: str | None = None, monarch_plan: MonarchPlan | None = None,
            block_fft_size: int | None = None) -> jax.Array:
    """Depthwise long convolution of each channel of u with its own filter, by FFT.

    Args:
      u: [batch, channels, N], float32, bfloat16 or float16. Any N (padded inside).
      k: [channels, L], 1 <= L <= N, the filter taps (float32 recommended; computed in float32).
      bidirectional: False (causal): y[b,c,t] = sum_{s=0}^{min(t, L-1)} k[c,s] * v[b,c,t-s].
        True (centred, non-causal, like ``np.convolve(..., mode="same")``): with the centre tap
        o = (L - 1) // 2, y[b,c,t] = sum_s k[c,s] * v[b,c,t + o - s] over 0 <= t + o - s < N;
        tap o multiplies v[t]; taps s < o look ahead o - s steps, taps s > o look back s - o.
        M2-BERT's two-filter form (circular [k_fwd, 0] + [0, rev(k_bwd)], k_fwd and k_bwd of
        length l) is this with k = concat(rev(k_bwd), k_fwd, [0]) (L = 2l + 1, o = l).
      pre_gate, post_gate: [batch, channels, N] or None: v = pre_gate * u and
        y = post_gate * (conv(v, k) + bias * v).
      bias: [channels] or None: the skip term bias[c] * v[b,c,t] (Hyena's "D").
      partial: p keeps only p taps of k (the rest are treated as zero). Causal: the first p,
        k[:, :p]. Bidirectional: the p nearest the centre o, k[:, o - (p-1)//2 : o + p//2 + 1],
        itself a centred filter of length p whose centre (p - 1) // 2 is tap o (an even p keeps
        one more tap looking back than ahead, as an even L does).
      freq_sparsity: r in [0, 1): the filter's spectrum at the FFT size M =
        ``monarch.fft_size(N)`` (2P, P = the power of two >= max(N, 256)) keeps only the
        frequencies |f| < (1 - r)·M/2 (``filters.effective_filter``), on every backend; 0 is
        the exact convolution. (The bias is not filtered.)
      backend: "reference" | "xla" | "pallas" | "auto" (xla everywhere until the Pallas
        kernel measures faster on a GPU; module docstring).
      block_c: pallas only: channels per program; None takes ``DEFAULT_KERNEL_OPTIONS``.
      dot_precision: pallas only: the kernel matmuls' products, "float32", "bf16x3" (three
        bfloat16 products, ~5e-6 relative error) or "bf16" (one, ~3e-3); float32 accumulation
        in each. None takes ``DEFAULT_KERNEL_OPTIONS`` (bf16x3 on a GPU, float32 interpreted).
      monarch_plan: pallas only: a ``MonarchPlan`` (order 2 or 3, r2c, outer step) forcing the
        kernel's decomposition at the size the kernel runs; None chooses by size
        (``monarch.choose_plan``). A forced plan turns the pallas path's automatic blocking off
        (it is meant for the full size M) unless block_fft_size forces blocks too; xla ignores
        it. Every backend checks that it fits the size the kernel would run at (S when
        block_fft_size forces blocks, else M).
      block_fft_size: xla and pallas only (every backend validates it): overlap-save blocking
        (``blocked.py``) of a short filter. None: automatic, by the backend's rule
        (``blocked.choose_blocking``): blocks at a small FFT size S when the effective filter
        (``partial`` taps, or L) is short enough that they cost less than one size-M transform
        (xla: fewer samples transformed; pallas: less real-matmul work in the kernel), and never
        with freq_sparsity > 0 (the mask is defined at the full size M); 0: never; a power of
        two S in [8, ``blocked.MAX_BLOCK_FFT``] larger than the filter's reach (L' - 1 taps,
        causal or centred): force blocks at that size. Blocking computes the same convolution
        (float32 rounding aside; bfloat16/float16 inputs are cut into float32 segments, so
        outputs and gradients are rounded once, as unblocked).

    Returns:
      y [batch, channels, N] in u's dtype (computed in float32); zeros when batch or channels
      is 0 (every option is still validated). Differentiable in u, k, the gates and the bias:
      reverse mode to any order on every backend (pallas: a custom VJP whose backward is again
      fftconv, so grad of grad and ``jax.jacrev(jax.jacrev(f))`` run the kernels); forward
      mode (``jax.jvp``, ``jacfwd``, ``jax.hessian``, which is jacfwd of jacrev) on xla and
      reference only, as JAX refuses it through a custom VJP ("can't apply forward-mode
      autodiff (jvp) to a custom_vjp function"): use backend="xla", or jacrev(jacrev(f)) for a
      Hessian. A NaN or Inf input spreads to
      every output of its FFT (block) on xla and pallas, earlier times included; the reference
      keeps it to the outputs whose sums include it.
    """
    _check_inputs(u, k, bidirectional, pre_gate, post_gate, bias, partial, freq_sparsity, backend,
                  block_c, dot_precision, monarch_plan, block_fft_size)
    n, l = u.shape[-1], k.shape[1]
    taps = l if partial is None else int(partial)  # the effective filter length L'
    # the kept taps: the first L' (causal) or the L' around the centre (l - 1) // 2 (centred)
    first = (l - 1) // 2 - (taps - 1) // 2 if bidirectional else 0
    k = k[:, first:first + taps]  # [channels, L']
    offset = (taps - 1) // 2 if bidirectional else 0
    # checked on every backend, before any runs (the reference ignores both options)
    forced = None
    if block_fft_size:
        back, ahead = blocked.back_and_ahead(taps, offset)
        if block_fft_size <= back + ahead:
            raise ValueError(f"block_fft_size must exceed the filter's reach back + ahead = "
                             f"{back + ahead} (L' = {taps} taps); got {block_fft_size}")
        forced = blocked.make_blocking(n, taps, offset, int(block_fft_size))
    if monarch_plan is not None:  # the size the pallas kernel runs at with these options
        _check_plan(monarch_plan, m=monarch.fft_size(n) if forced is None else forced.fft_size,
                    full=forced is not None, n=n, triton=False)
    impl, interpret = _resolve(backend)
    if u.size == 0:  # no batch rows or no channels: nothing to convolve (the kernels' grids and
        # lax.conv's channel groups would be empty); zeros, so every gradient is zero too
        return jnp.zeros(u.shape, u.dtype)
    freq_sparsity = float(freq_sparsity)
    if impl == "reference":
        y = reference.fftconv(u, k, offset=offset, pre_gate=pre_gate, post_gate=post_gate,
                              bias=bias, freq_sparsity=freq_sparsity)
        return y.astype(u.dtype)
    blocking = forced
    # automatic: the backend's rule; a forced plan is meant for the pallas kernel at size M, so
    # it keeps the pallas path unblocked (xla ignores the plan)
    if block_fft_size is None and (impl == "xla" or monarch_plan is None):
        blocking = blocked.choose_blocking(n, taps, offset, freq_sparsity, impl)
    if impl == "xla":
        # exact at freq_sparsity 0: the smallest size without wrap-around, not the kernel's floor
        size = monarch.fft_size(n) if freq_sparsity else monarch.linear_fft_size(
            n, *blocked.back_and_ahead(taps, offset))

        def conv(u, k, pre_gate, post_gate, bias, fft_size=size):
            return xla.fftconv(u, k, pre_gate, post_gate, bias, offset=offset,
                               freq_sparsity=freq_sparsity, fft_size=fft_size)
    else:
        defaults = DEFAULT_KERNEL_OPTIONS["pallas_interpret" if interpret else "pallas"]
        bc = defaults["block_c"] if block_c is None else block_c
        precision = defaults["dot_precision"] if dot_precision is None else dot_precision
        size = monarch.fft_size(n) if blocking is None else blocking.fft_size
        full = blocking is not None
        if not interpret and (monarch_plan is not None or (full and block_fft_size)):
            _check_plan(monarch_plan or monarch.choose_plan(size, full), size, full, n,
                        triton=True)

        def conv(u, k, pre_gate, post_gate, bias, fft_size=None):
            return pallas_gpu.fftconv(u, k, pre_gate, post_gate, bias, offset, freq_sparsity, bc,
                                      precision, interpret, monarch_plan, fft_size)
    if blocking is None:
        y = conv(u, k, pre_gate, post_gate, bias)
    else:  # segments folded into the batch, each convolved circularly at size S
        def seg(a):  # cut from a float32 copy: the overlap-add of the segments' gradients (the
            # slicing's transpose) then sums in float32, and each gradient is rounded once
            return None if a is None else blocked.to_segments(a.astype(jnp.float32), blocking)

        z = conv(seg(u), k, seg(pre_gate), seg(post_gate), bias,
                 fft_size=blocking.fft_size)
        y = blocked.from_segments(z, blocking, u.shape[0], n)
    return y.astype(u.dtype)
