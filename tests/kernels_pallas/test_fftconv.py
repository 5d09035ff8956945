"""fftconv: every backend equals the direct convolution (``reference.py``, itself checked
against numpy's float64 ``np.convolve``); gradients equal autodiff of the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import fftconv
from kernels_pallas.fftconv import MonarchPlan, filters, monarch, pallas_gpu

# f32: an FFT of size M has relative error ~ eps * log2(M) (<= 2e-6 at M = 64K); the direct
# convolution sums the same products exactly in order. Measured ~2e-7 at N <= 4096, and 2-3e-7
# at N = 4095 on every Monarch plan (order 2 or 3, r2c, outer step: each an exact factorization
# of the same DFT, one extra float32 stage adds ~eps).
F32_RTOL = 5e-6
# bf16 inputs: the output is rounded to bfloat16 (8 mantissa bits, 2^-9 relative per element),
# both sides compute in float32 from the same rounded inputs.
BF16_RTOL = 1e-2
# Gradients: a forward and a backward FFT conv (or correlation) in float32 (measured <= 1e-6 on
# every Monarch plan; order 3 and the outer step add a DFT stage each, ~eps * log2(M) apiece).
GRAD_RTOL = 1e-5
# The kernel's reduced-precision matmuls (dot_precision), forward and gradients, relative error:
# bf16x3 drops lo*lo and rounds lo (~2^-17 per operand per matmul, a few matmuls in a row):
# measured 4.8e-6 in the test, 2.6e-6 to 5.9e-6 over N 250..4096 and every plan; bf16 rounds each
# operand to 2^-9: measured 3.2e-3, 1.7e-3 to 3.7e-3. The floors: float32 dots measure <= 3e-7,
# so an error above them shows the bf16 rounding really happened (XLA:CPU would silently run a
# bf16 dot algorithm in float32).
DOT_RTOL = {"bf16x3": 2e-5, "bf16": 1e-2}
DOT_ERROR_FLOOR = {"bf16x3": 1e-6, "bf16": 1e-4}
BACKENDS = ("xla", "pallas")
BATCH, CHANNELS = 1, 2  # small: pallas runs interpreted on CPU


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _inputs(n, l, *, batch=BATCH, channels=CHANNELS, seed=0, smooth=False):
    rng = np.random.default_rng(seed)
    u = jnp.asarray(rng.normal(size=(batch, channels, n)), jnp.float32)
    k = rng.normal(size=(channels, l))
    if smooth:  # a Hyena-like filter: a smooth random walk under an exponential decay window
        k = np.cumsum(k, axis=-1) / np.sqrt(l) * np.exp(-np.arange(l) / (0.1 * l))
    return u, jnp.asarray(k, jnp.float32)


def _fftconv(u, k, **kw):
    """fftconv with the Pallas kernel's matmuls in float32, also on a GPU (whose default is
    bf16x3): F32_RTOL bounds the factorization's own error; the reduced precisions have
    test_pallas_dot_precisions_within_their_tolerance."""
    return fftconv(u, k, dot_precision="float32", **kw)


def _output_and_vjp(u, k, w, **kw):
    """Jitted fftconv(u, k, **kw) and its VJP against the cotangent w: (y, (du, dk))."""
    return jax.jit(lambda u, k: (lambda y, vjp: (y, vjp(w)))(
        *jax.vjp(lambda u, k: fftconv(u, k, **kw), u, k)))(u, k)


def _gates(n, seed=1, channels=CHANNELS):
    rng = np.random.default_rng(seed)
    pre, post = (jnp.asarray(rng.normal(size=(BATCH, channels, n)), jnp.float32)
                 for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(channels,)), jnp.float32)
    return pre, post, bias


@pytest.mark.parametrize("bidirectional", [False, True])
def test_reference_equals_numpy_convolution(bidirectional):
    n, l = 300, 41
    u, k = _inputs(n, l, batch=2, channels=3)
    full = np.stack([[np.convolve(np.asarray(u[b, c], np.float64), np.asarray(k[c], np.float64))
                      for c in range(3)] for b in range(2)])
    o = (l - 1) // 2 if bidirectional else 0
    got = fftconv(u, k, bidirectional=bidirectional, backend="reference")
    assert _rel(got, full[..., o:o + n]) < 1e-6


def test_reference_gates_and_bias_follow_definition():
    n, l = 256, 17
    u, k = _inputs(n, l)
    pre, post, bias = _gates(n)
    v = np.asarray(pre * u, np.float64)
    conv = np.stack([[np.convolve(v[b, c], np.asarray(k[c], np.float64))[:n]
                      for c in range(CHANNELS)] for b in range(BATCH)])
    want = np.asarray(post) * (conv + np.asarray(bias)[:, None] * v)
    got = fftconv(u, k, pre_gate=pre, post_gate=post, bias=bias, backend="reference")
    assert _rel(got, want) < 1e-6


# L = 17 blocks automatically at N = 4096 (overlap-save, blocked.py; at N = 1000 xla's exact
# unblocked size 1024 costs less); block_fft_size=0 keeps the unblocked transform covered with a
# short filter too
@pytest.mark.parametrize("n, l, size", [(n, l, None) for n in (256, 1000, 4096)
                                        for l in (n, 17, n // 2)]
                         + [(1000, 17, 0), (4096, 17, 0)])
def test_xla_matches_direct_convolution(n, l, size):
    u, k = _inputs(n, l, seed=n + l)
    got = fftconv(u, k, backend="xla", block_fft_size=size)
    assert got.shape == u.shape and got.dtype == jnp.float32
    assert _rel(got, fftconv(u, k, backend="reference")) < F32_RTOL


# pallas interprets on CPU (seconds per compile): the filter lengths of one N share one compiled
# kernel (the filter enters as its size-M spectrum), so they run in one test, unblocked
# (block_fft_size=0: automatically, L = 17 would run in overlap-save blocks at N = 1000 and 4096,
# covered by test_fftconv_blocked.py and the gates and bf16 tests below). Each N takes its plan
# by size: plain order 2 at M = 512, r2c order 2 at M = 2048 and at M = 8192; the other plans
# run in test_outputs_and_grads_match_reference and
# test_pallas_forced_plans_with_block_c_match_reference.
@pytest.mark.parametrize("n", [256, 1000, 4096])
def test_pallas_matches_direct_convolution_at_every_filter_length(n):
    for l in (n, 17, n // 2):
        u, k = _inputs(n, l, seed=n + l)
        got = _fftconv(u, k, backend="pallas", block_fft_size=0)
        assert got.shape == u.shape and got.dtype == jnp.float32
        assert _rel(got, fftconv(u, k, backend="reference")) < F32_RTOL, l


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l", [32768, 17, 16384])
def test_backends_match_direct_convolution_long(backend, l):
    n = 32768
    u, k = _inputs(n, l, channels=1)
    assert _rel(_fftconv(u, k, backend=backend), fftconv(u, k, backend="reference")) < F32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, l, size", [(1000, 500, None), (300, 17, None), (300, 17, 0)])
def test_bidirectional_matches_direct_convolution(backend, n, l, size):
    # (300, 17) blocks automatically on pallas (size None; xla's exact size 512 needs none);
    # size 0 keeps it unblocked
    u, k = _inputs(n, l, seed=3)
    pre, post, bias = _gates(n)
    kw = dict(bidirectional=True, pre_gate=pre, post_gate=post, bias=bias)
    assert _rel(_fftconv(u, k, backend=backend, block_fft_size=size, **kw),
                fftconv(u, k, backend="reference", **kw)) < F32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_and_bias_match_reference(backend):
    n, l = 1000, 17
    u, k = _inputs(n, l, seed=4)
    pre, post, bias = _gates(n)
    # pallas: one kernel per gate combination and each compiles in interpret mode; the grad tests
    # run every gate together too. L = 17 blocks automatically here on pallas (blocked.py; xla
    # runs unblocked at its exact size either way); pallas's unblocked gates run in the grad
    # tests, xla's blocked ones in test_fftconv_blocked.py.
    cases = [dict(pre_gate=pre), dict(post_gate=post), dict(bias=bias)] if backend == "xla" else []
    for kw in cases + [dict(pre_gate=pre, post_gate=post, bias=bias)]:
        for size in (None, 0) if backend == "xla" else (None,):
            assert _rel(_fftconv(u, k, backend=backend, block_fft_size=size, **kw),
                        fftconv(u, k, backend="reference", **kw)) < F32_RTOL, (kw, size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [None, 0])  # L = 17: pallas blocks automatically; unblocked
def test_bf16_inputs_within_bf16_tolerance(backend, size):
    n, l = 1000, 17
    u, k = _inputs(n, l, seed=5)
    pre, post, _ = _gates(n)
    u, pre, post = (a.astype(jnp.bfloat16) for a in (u, pre, post))
    got = fftconv(u, k, pre_gate=pre, post_gate=post, backend=backend, block_fft_size=size)
    want = fftconv(u, k, pre_gate=pre, post_gate=post, backend="reference")
    assert got.dtype == jnp.bfloat16
    assert _rel(got, want.astype(jnp.float32)) < BF16_RTOL


ORDER2, R2C = MonarchPlan(order=2), MonarchPlan(order=2, r2c=True)
ORDER3, ORDER3_R2C = MonarchPlan(order=3), MonarchPlan(order=3, r2c=True)
OUTER, OUTER_ORDER3 = MonarchPlan(order=2, outer=4), MonarchPlan(order=3, outer=2)
# (backend, bidirectional, freq_sparsity, monarch_plan, block_fft_size): every Monarch plan,
# forced at a small size (odd N, L < N, every gate), forward and backward; None is the plan by
# size (r2c here). (Plain order 2 shares its backward with ORDER3's "real" kernel mode; its
# forward runs at N = 256 in the other tests.) L = 40 at N = 299 blocks automatically on pallas
# where freq_sparsity is 0 and no plan is forced (blocked.py, whose gradients
# test_fftconv_blocked.py checks); xla runs unblocked at its exact size 512, and forced into
# blocks of 256.
GRAD_CASES = [
    ("xla", False, 0.0, None, None), ("xla", False, 0.0, None, 256),
    ("xla", True, 0.6, None, None),
    ("pallas", True, 0.6, None, None), ("pallas", False, 0.0, ORDER3, None),
    ("pallas", True, 0.6, ORDER3_R2C, None), ("pallas", True, 0.0, OUTER, None),
    ("pallas", False, 0.6, OUTER_ORDER3, None)]


@pytest.mark.parametrize("backend, bidirectional, freq_sparsity, plan, size", GRAD_CASES)
def test_outputs_and_grads_match_reference(backend, bidirectional, freq_sparsity, plan, size):
    n, l = 299, 40
    u, k = _inputs(n, l, seed=6)
    pre, post, bias = _gates(n)
    w = jnp.asarray(np.random.default_rng(7).normal(size=u.shape), jnp.float32)
    plan_kw = dict(block_fft_size=size) if plan is None else dict(monarch_plan=plan)

    def fwd_bwd(be, kw):
        def f(u, k, pre, post, bias):
            return _fftconv(u, k, pre_gate=pre, post_gate=post, bias=bias,
                            bidirectional=bidirectional, freq_sparsity=freq_sparsity, backend=be,
                            **kw)
        return jax.jit(lambda *args: (lambda y, vjp: (y, vjp(w)))(*jax.vjp(f, *args)))

    y, got = fwd_bwd(backend, plan_kw)(u, k, pre, post, bias)
    y_ref, want = fwd_bwd("reference", {})(u, k, pre, post, bias)
    assert _rel(y, y_ref) < F32_RTOL
    for name, g, r in zip(("u", "k", "pre_gate", "post_gate", "bias"), got, want):
        assert g.shape == r.shape
        assert _rel(g, r) < GRAD_RTOL, name


def test_outer_step_through_jnp_fft_matches_reference(monkeypatch):
    """The outer step's rfft/irfft branch (taken above Q = MAX_DENSE_OUTER_DFT, only lowered at
    the sizes above) forced at Q = 4: forward and every gradient as the dense-matrix branch."""
    monkeypatch.setattr(monarch, "MAX_DENSE_OUTER_DFT", 1)
    monarch.outer_matrices.cache_clear()  # its dense matrices depend on the threshold
    try:
        n, l = 299, 40
        u, k = _inputs(n, l, seed=6)
        w = jnp.asarray(np.random.default_rng(7).normal(size=u.shape), jnp.float32)
        y, (du, dk) = _output_and_vjp(u, k, w, backend="pallas", monarch_plan=OUTER,
                                      dot_precision="float32")
        y_ref, (du_ref, dk_ref) = _output_and_vjp(u, k, w, backend="reference")
    finally:
        monarch.outer_matrices.cache_clear()
    assert _rel(y, y_ref) < F32_RTOL
    assert _rel(du, du_ref) < GRAD_RTOL and _rel(dk, dk_ref) < GRAD_RTOL


@pytest.mark.parametrize("precision", ["bf16x3", "bf16"])
def test_pallas_dot_precisions_within_their_tolerance(precision):
    """Forward and gradients of the kernel with reduced-precision matmuls (the plan by size at
    this N: plain order 2, the cheapest to interpret) against the float32 reference: within the
    precision's tolerance, and above float32's error (the bf16 rounding is emulated)."""
    n, l = 250, 40
    u, k = _inputs(n, l, seed=13)
    w = jnp.asarray(np.random.default_rng(14).normal(size=u.shape), jnp.float32)
    y, (du, dk) = _output_and_vjp(u, k, w, backend="pallas", dot_precision=precision)
    y_ref, (du_ref, dk_ref) = _output_and_vjp(u, k, w, backend="reference")
    for name, got, want in (("y", y, y_ref), ("du", du, du_ref)):
        assert DOT_ERROR_FLOOR[precision] < _rel(got, want) < DOT_RTOL[precision], name
    assert _rel(dk, dk_ref) < GRAD_RTOL  # the filter gradient is a jnp.fft correlation


def _direct_truncated(u, k, p, bidirectional):
    """np.convolve of u with k's kept taps (the others zero), centred at (L - 1) // 2 or causal:
    causal keeps taps 0..p-1, centred the p taps o - (p-1)//2 .. o + p//2 around o."""
    l = k.shape[1]
    o = (l - 1) // 2 if bidirectional else 0
    lo = o - (p - 1) // 2 if bidirectional else 0
    kz = np.zeros((k.shape[0], l))
    kz[:, lo:lo + p] = np.asarray(k, np.float64)[:, lo:lo + p]
    n = u.shape[-1]
    return np.stack([[np.convolve(np.asarray(u[b, c], np.float64), kz[c])[o:o + n]
                      for c in range(k.shape[0])] for b in range(u.shape[0])])


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_partial_equals_direct_convolution_with_the_truncated_filter(backend, bidirectional):
    n, l, p = 1000, 500, 37
    u, k = _inputs(n, l, seed=8)
    want = _direct_truncated(u, k, p, bidirectional)
    # partial = 37 blocks automatically (blocked.py; xla centred: its exact size 1024 is
    # cheaper); xla runs unblocked (size 0) as well
    for size in (None, 0) if backend == "xla" else (None,):
        got = _fftconv(u, k, partial=p, bidirectional=bidirectional, backend=backend,
                       block_fft_size=size)
        assert _rel(got, want) < F32_RTOL, size


@pytest.mark.parametrize("l, p", [(9, 1), (9, 3), (9, 4), (10, 3), (10, 4), (10, 10)])
def test_bidirectional_partial_keeps_the_taps_nearest_the_centre(l, p):
    """Odd and even L and p: the kept window is centred on tap (L - 1) // 2, an even p keeping
    one more tap behind (looking back) than ahead."""
    u, k = _inputs(64, l, seed=l + p)
    want = _direct_truncated(u, k, p, bidirectional=True)
    for backend in ("reference", "xla"):
        got = fftconv(u, k, partial=p, bidirectional=True, backend=backend)
        assert _rel(got, want) < F32_RTOL, backend


def test_freq_sparsity_degrades_monotonically():
    n, l = 1000, 1000
    u, k = _inputs(n, l, seed=9, smooth=True)
    exact = fftconv(u, k, backend="reference")
    assert _rel(fftconv(u, k, freq_sparsity=0.0, backend="reference"), exact) == 0.0
    errors = [_rel(fftconv(u, k, freq_sparsity=r, backend="reference"), exact)
              for r in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < 0.05 and errors[-1] > 0.2, errors  # smooth filter: high bins matter little


def test_freq_sparsity_keeps_the_frequencies_below_the_cutoff():
    """|f| < (1 - r) M/2 are kept: a tiny r drops the Nyquist bin alone, each further bin goes as
    (1 - r) M/2 passes an integer, and r = 1/2 keeps exactly the lower half 0 .. M/4 - 1."""
    m = 512
    cutoffs = {r: filters.keep_frequencies(m, r) for r in (0.0, 1e-6, 0.004, 0.5, 0.75)}
    assert cutoffs == {0.0: 256, 1e-6: 255, 0.004: 254, 0.5: 127, 0.75: 63}
    rs = np.linspace(1e-6, 0.99, 4001)
    kept = np.array([filters.keep_frequencies(m, r) for r in rs])
    np.testing.assert_array_equal(kept, np.ceil((1 - rs) * m / 2) - 1)


@pytest.mark.parametrize("backend, n", [("xla", 300), ("pallas", 1000)])
def test_freq_sparse_backends_match_reference(backend, n):
    u, k = _inputs(n, n, seed=10, smooth=True)
    _, post, bias = _gates(n)
    if backend == "pallas":  # at 0.75 the r2c kernel (size M/2 = 32 x 32) skips half its columns
        m = monarch.fft_size(n)
        geo = monarch.choose_plan(m).geometry(m)
        cols = monarch.frequency_columns(geo.size, filters.keep_frequencies(m, 0.75), geo.factors)
        assert len(cols) == 16 and geo.factors == (32, 32)
    for r in (0.0, 0.25, 0.75):
        kw = dict(freq_sparsity=r, post_gate=post, bias=bias)
        assert _rel(_fftconv(u, k, backend=backend, **kw),
                    fftconv(u, k, backend="reference", **kw)) < F32_RTOL, r


@pytest.mark.parametrize("factors", [(32, 32), (32, 16, 32), (64, 32, 32)])
def test_frequency_columns_hold_every_kept_frequency(factors):
    """The kept spectrum columns of an order-2 or order-3 layout hold every frequency the
    low-passed filter keeps (so skipping the others is exact) and skip some at s = 0.75."""
    size = int(np.prod(factors))
    index = monarch.spectrum_index(factors)  # [spec_rows, N_last]: the frequency held
    assert sorted(index.ravel()) == list(range(size))
    for s in (0.25, 0.75):
        cutoff = filters.keep_frequencies(size, s)
        cols = monarch.frequency_columns(size, cutoff, factors)
        kept = index[:, list(cols)]
        f = np.arange(size)
        assert np.isin(f[(f <= cutoff) | (f >= size - cutoff)], kept).all(), s
    assert len(cols) < factors[-1]
    with pytest.raises(ValueError, match="multiply to"):  # e.g. M passed for an r2c kernel's M/2
        monarch.frequency_columns(2 * size, 0, factors)


# Forced plans the rule by size never picks at these sizes, forward only with every gate and
# block_c = 2 (a program loops over two channels, each with its own bias and filter): order 3 with
# unequal factors N2 != N3 (the middle transposes; the rule's N <= 16384 kernels are (32, 32, 16)),
# and an outer step with Q > MAX_DENSE_OUTER_DFT, whose Q-point DFTs are jnp.fft calls.
FORCED_PLANS = [(600, ORDER3, (16, 16, 8)), (300, MonarchPlan(order=2, outer=256), (2, 2))]


@pytest.mark.parametrize("n, plan, factors", FORCED_PLANS)
def test_pallas_forced_plans_with_block_c_match_reference(n, plan, factors):
    assert plan.geometry(monarch.fft_size(n)).factors == factors
    assert plan.outer == 1 or plan.outer > monarch.MAX_DENSE_OUTER_DFT
    u, k = _inputs(n, 40, channels=4, seed=11)
    pre, post, bias = _gates(n, channels=4)
    kw = dict(pre_gate=pre, post_gate=post, bias=bias)
    assert _rel(_fftconv(u, k, backend="pallas", block_c=2, monarch_plan=plan, **kw),
                fftconv(u, k, backend="reference", **kw)) < F32_RTOL


@pytest.mark.parametrize("platform", ["gpu", "tpu", "cpu"])
def test_auto_runs_xla_on_every_platform(monkeypatch, platform):
    """auto never picks the Pallas kernel: on the H200 it measured 37x slower than jnp.fft
    (BENCHMARKS.md); the shared resolver alone would pick it on a GPU."""
    monkeypatch.setattr(jax, "default_backend", lambda: platform)

    def refuse(*args):
        raise AssertionError("auto ran the Pallas kernel")

    monkeypatch.setattr(pallas_gpu, "fftconv", refuse)
    u, k = _inputs(300, 40, seed=13)
    assert _rel(fftconv(u, k, backend="auto"), fftconv(u, k, backend="reference")) < F32_RTOL


def test_pallas_on_a_tpu_raises_value_error_naming_the_op(monkeypatch):
    """fftconv has no Mosaic kernel: an explicit "pallas" on a TPU is a bad argument there."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    u, k = _inputs(300, 40, seed=13)
    with pytest.raises(ValueError, match=r"backend='pallas' on a TPU .* which fftconv does not"):
        fftconv(u, k, backend="pallas")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_matches_eager(backend):
    n, l = 256, 17
    u, k = _inputs(n, l, seed=12)
    pre, _, bias = _gates(n)
    f = jax.jit(lambda u, k, pre, bias: _fftconv(u, k, pre_gate=pre, bias=bias, partial=9,
                                                   backend=backend))
    want = fftconv(u, k[:, :9], pre_gate=pre, bias=bias, backend="reference")
    assert _rel(f(u, k, pre, bias), want) < F32_RTOL


def test_choose_plan_follows_size_rule_and_lowers():
    """Order 2 without r2c only at M = 512, r2c order 2 to N = 4096, r2c order 3 to N = 16384,
    an outer step around order-3 kernels of MAX_KERNEL_SIZE beyond, its Q-point DFTs dense up to
    Q = 128 (N = 2^20) and jnp.fft calls from Q = 256 (checked numerically with a forced Q = 256
    in test_pallas_forced_plans_with_block_c_match_reference); every chosen kernel has matmuls
    Triton can compile and does fewer real MACs than the plain order-2 kernel."""
    want = {256: ORDER2, 512: R2C, 4096: R2C, 8192: ORDER3_R2C, 16384: ORDER3_R2C,
            32768: MonarchPlan(order=3, outer=4), 2**20: MonarchPlan(order=3, outer=128),
            2**21: MonarchPlan(order=3, outer=256)}
    for n in (1, 100, 256, 257, 512, 1000, 4096, 8192, 16384, 32768, 2**20, 2**21):
        m = monarch.fft_size(n)
        plan = monarch.choose_plan(m)
        if n in want:
            assert plan == want[n], n
        assert (plan.outer > monarch.MAX_DENSE_OUTER_DFT) == (n > 2**20), n
        geo = plan.geometry(m)
        assert geo.lowers_to_triton and geo.size <= monarch.MAX_KERNEL_SIZE, n
        plain = ORDER2.geometry(m)
        assert (geo.real_macs(geo.factors[-1]) * monarch.outer_residues(plan.outer)
                <= plain.real_macs(plain.factors[-1])), n


# (n, plan, dot_precision): each kernel mode and order as chosen by size (None: order 2 real, r2c
# order 2, r2c order 3, the outer step around order-3 kernels), and the forced plans that the
# benchmark's monarch_plan sweep runs on a GPU at N = 4096 and no size chooses: plain order 3 in
# real mode and order 3 inside an outer step of Q = 2. (Its order-3 r2c kernel at N = 4096 has 8
# input rows, too few for Triton: the sweep skips it.) Then an outer step with Q = 256 >
# MAX_DENSE_OUTER_DFT (its Q-point DFTs by jnp.fft, as the rule does from N = 2^21) around an
# order-2 kernel of 16 x 16. These with float32 matmuls (a plan's shapes do not depend on the
# precision, and the three bf16 dots of bf16x3 triple the lowering time); last, at one plan, the
# GPU's default bf16x3: its casts and bf16 dots (bf16's one dot is one of those three). The
# "full" cases are overlap-save blocks (fft_size = N, no zero-block skip) as the blocking rule
# makes them: its smallest size (real order 2, 16 x 16), the smallest r2c one and an r2c order 3.
LOWERING_CASES = (
    [(n, plan, "float32", False) for n, plan in [
        (256, None), (1000, None), (8192, None), (32768, None), (4096, ORDER3),
        (4096, OUTER_ORDER3), (32768, MonarchPlan(order=2, outer=256))]]
    + [(1000, None, "bf16x3", False)]
    + [(n, None, "float32", True) for n in (256, 512, 16384)])


@pytest.mark.parametrize("n, plan, precision, full", LOWERING_CASES)
def test_pallas_plans_lower_to_triton(n, plan, precision, full):
    """The plan's kernel, forward and backward, passes the Pallas -> Triton lowering (block
    shapes, reshapes and transposes in the kernel, bf16 casts and dots); lowering needs no GPU,
    compiling to PTX does."""
    pytest.importorskip("jax.experimental.pallas.triton")
    fft_size = n if full else None
    m = n if full else monarch.fft_size(n)
    assert (plan or monarch.choose_plan(m, full)).geometry(m, full).lowers_to_triton
    u = jax.ShapeDtypeStruct((2, 4, n), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((4, 100), jnp.float32)
    bias = jax.ShapeDtypeStruct((4,), jnp.float32)

    def fwd_bwd(u, k, pre, post, bias):
        y, vjp = jax.vjp(lambda *a: pallas_gpu.fftconv(*a, 0, 0.0, 1, precision, False, plan,
                                                       fft_size), u, k, pre, post, bias)
        return vjp(y)

    lowered = jax.jit(fwd_bwd).trace(u, k, u, u, bias).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, d_post, dv


def test_fft_size_and_split_factors_cover_length():
    """M = 2P holds a length-n causal convolution; the factors of M multiply to it, largest
    first and as equal as possible (order 2: N1 is even, N2 >= 16 for Triton)."""
    for n in (1, 256, 257, 1000, 4096, 32768):
        m = monarch.fft_size(n)
        assert m >= 2 * n and m & (m - 1) == 0, n
        for order in (2, 3):
            factors = monarch.split_factors(m, order)
            assert len(factors) == order and int(np.prod(factors)) == m, (n, order)
            assert list(factors) == sorted(factors, reverse=True) and factors[0] <= 2 * factors[-1]
        n1, n2 = monarch.split_factors(m, 2)
        assert n1 % 2 == 0 and n2 >= monarch.MIN_DOT_DIM, n


BAD_INPUTS = [  # (what to change, error type, words the message must contain)
    (dict(k=jnp.zeros((2, 300))), ValueError, "L <= N"),
    (dict(k=jnp.zeros((3, 17))), ValueError, "channels"),
    (dict(u=jnp.zeros((1, 2, 256), jnp.int32)), ValueError, "u must be float32"),
    (dict(k=jnp.zeros((2, 17), jnp.int32)), ValueError, "k must be float32"),
    (dict(u=jnp.zeros((2, 256))), ValueError, "[batch, channels, N]"),
    (dict(k=jnp.zeros((2, 1, 17))), ValueError, "[channels, L]"),
    (dict(pre_gate=jnp.zeros((1, 2, 255))), ValueError, "pre_gate must have u's shape"),
    (dict(bias=jnp.zeros((3,))), ValueError, "bias must be [channels]"),
    (dict(partial=0), ValueError, "partial"),
    (dict(partial=True), ValueError, "partial"),
    (dict(partial=np.float32(9)), ValueError, "partial"),
    (dict(freq_sparsity=1.0), ValueError, "freq_sparsity"),
    (dict(freq_sparsity=np.bool_(False)), ValueError, "freq_sparsity"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(bidirectional="no"), TypeError, "bidirectional must be a bool; got 'no'"),
    (dict(bidirectional=1), TypeError, "bidirectional must be a bool; got 1"),
    (dict(backend="pallas", block_c=3), ValueError, "block_c"),
    (dict(backend="pallas", dot_precision="tf32"), ValueError, "dot_precision must be one of"),
    (dict(backend="pallas", monarch_plan="order3"), TypeError, "monarch_plan must be"),
    (dict(backend="pallas", monarch_plan=MonarchPlan(outer=1024)), ValueError, "does not fit"),
    (dict(backend="xla", monarch_plan=MonarchPlan(outer=1024)), ValueError, "does not fit"),
    (dict(backend="reference", monarch_plan=MonarchPlan(outer=1024)), ValueError, "does not fit"),
    # a MonarchPlan checks its own fields: built inside the test (lambda) as construction raises
    (dict(monarch_plan=lambda: MonarchPlan(order=3.0)), TypeError, "MonarchPlan.order"),
    (dict(monarch_plan=lambda: MonarchPlan(order=4)), ValueError, "MonarchPlan.order"),
    (dict(monarch_plan=lambda: MonarchPlan(outer=2.0)), TypeError, "MonarchPlan.outer"),
    (dict(monarch_plan=lambda: MonarchPlan(outer=True)), TypeError, "MonarchPlan.outer"),
    (dict(monarch_plan=lambda: MonarchPlan(outer=3)), ValueError, "MonarchPlan.outer"),
    (dict(monarch_plan=lambda: MonarchPlan(r2c=1)), TypeError, "MonarchPlan.r2c"),
    (dict(monarch_plan=lambda: MonarchPlan(r2c=True, outer=2)), ValueError, "r2c"),
]


@pytest.mark.parametrize("change, error, words", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(change, error, words):
    args = dict(u=jnp.zeros((1, 2, 256)), k=jnp.zeros((2, 17)))
    args.update(change)
    u, k = args.pop("u"), args.pop("k")
    with pytest.raises(error) as info:
        args = {name: value() if callable(value) else value for name, value in args.items()}
        fftconv(u, k, **args)
    assert words in str(info.value)


def test_numpy_scalar_options_equal_python_scalars():
    """partial and freq_sparsity taken from numpy (np.int64, np.float32: what arrays and configs
    loaded with numpy hand over) give exactly what the Python scalars give. (fftconv turns them
    into Python scalars before any backend sees them, so one backend checks it.)"""
    u, k = _inputs(256, 40, seed=15)
    want = fftconv(u, k, partial=9, freq_sparsity=0.25, backend="xla")
    got = fftconv(u, k, partial=np.int64(9), freq_sparsity=np.float32(0.25), backend="xla")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("batch, channels", [(0, 2), (1, 0)])
def test_empty_batch_or_channels_give_zeros_and_zero_grads(backend, batch, channels):
    """No batch rows or no channels: zeros of u's shape and dtype (the Pallas grid and the
    reference's channel groups would be empty), and zero gradients for every input."""
    u = jnp.ones((batch, channels, 8), jnp.bfloat16)
    k, pre = jnp.ones((channels, 3)), jnp.ones((batch, channels, 8))
    bias = jnp.ones((channels,))
    y = fftconv(u, k, pre_gate=pre, bias=bias, backend=backend)
    assert y.shape == u.shape and y.dtype == u.dtype
    grads = jax.grad(lambda k, pre, bias: fftconv(u, k, pre_gate=pre, bias=bias,
                                                 backend=backend).astype(jnp.float32).sum(),
                     argnums=(0, 1, 2))(k, pre, bias)
    for g, a in zip(grads, (k, pre, bias)):
        assert g.shape == a.shape and not np.any(np.asarray(g))


# grad of grad: a first-order backward (two FFT convs) differentiated again (several more), each
# in float32: measured <= 3e-7 relative against autodiff of the reference twice (GRAD_RTOL's bound)
GRAD2_RTOL = 1e-5


@pytest.mark.parametrize("bidirectional, freq_sparsity, plan", [(False, 0.0, None),
                                                                (True, 0.6, R2C)])
def test_pallas_grad_of_grad_matches_reference(bidirectional, freq_sparsity, plan):
    """The Pallas custom VJP's backward is itself differentiable (written with fftconv): the
    gradient of a gradient-dependent loss, in every input, equals autodiff of the reference
    twice; jacrev of jacrev (reverse-over-reverse Hessian) too."""
    n, l = 40, 9
    u, k = _inputs(n, l, seed=16)
    pre, post, bias = _gates(n, seed=17)
    w = jnp.asarray(np.random.default_rng(18).normal(size=u.shape), jnp.float32)

    def second(be, kw):
        def f(u, k, pre, post, bias):
            return fftconv(u, k, pre_gate=pre, post_gate=post, bias=bias,
                           bidirectional=bidirectional, freq_sparsity=freq_sparsity, backend=be,
                           **kw)

        def g(*args):  # first-order gradients, contracted into a scalar
            _, vjp = jax.vjp(f, *args)
            return sum(jnp.sum(d ** 2) for d in vjp(w))
        return jax.jit(jax.grad(g, argnums=(0, 1, 2, 3, 4)))(u, k, pre, post, bias)

    got = second("pallas", dict(dot_precision="float32", monarch_plan=plan, block_fft_size=0))
    want = second("reference", {})
    for name, a, b in zip(("u", "k", "pre_gate", "post_gate", "bias"), got, want):
        assert a.shape == b.shape and _rel(a, b) < GRAD2_RTOL, name
    if plan is None:
        def loss(be, kw):
            return lambda k: jnp.sum(fftconv(u, k, backend=be, **kw) ** 2 * w)
        hess = jax.jacrev(jax.jacrev(loss("pallas", dict(dot_precision="float32"))))(k)
        want = jax.jacrev(jax.jacrev(loss("reference", {})))(k)
        assert hess.shape == (CHANNELS, l, CHANNELS, l)
        assert _rel(hess, want) < GRAD2_RTOL


def test_pallas_forward_mode_is_refused_by_the_custom_vjp():
    """Forward mode (jvp, jacfwd, jax.hessian = jacfwd of jacrev) does not go through a custom
    VJP: JAX says so; the xla and reference backends support it."""
    u, k = _inputs(40, 9, seed=19)
    f = lambda be: lambda k: fftconv(u, k, backend=be)  # noqa: E731
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f("pallas"), (k,), (k,))
    _, t = jax.jvp(f("xla"), (k,), (k,))
    assert _rel(t, fftconv(u, k, backend="reference")) < F32_RTOL  # linear in k
