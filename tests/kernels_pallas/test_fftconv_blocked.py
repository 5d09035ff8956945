"""fftconv's overlap-save blocking (``kernels_pallas/fftconv/blocked.py``): blocked results and
gradients equal the direct reference convolution, and the blocks really run at the small FFT
size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import fftconv
from kernels_pallas.fftconv import blocked, monarch

# f32: each block is an FFT conv of size S <= M (relative error ~ eps * log2(S)); the kept outputs
# are exact circular = linear sums, so blocking adds no error of its own (measured 1.4e-7 to
# 2.4e-7, the same as unblocked). The bound is test_fftconv.py's F32_RTOL.
F32_RTOL = 5e-6
# gradients: a forward and a backward FFT conv per block, plus the overlap-add of the segments'
# gradients (float32 sums of two or three terms): test_fftconv.py's GRAD_RTOL.
GRAD_RTOL = 1e-5
BACKENDS = ("xla", "pallas")
BATCH, CHANNELS = 2, 2  # small: pallas runs interpreted on CPU; 2 batch rows check the folding


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _inputs(n, l, seed=0):
    """u, pre, post [BATCH, CHANNELS, n], k [CHANNELS, l], bias [CHANNELS], float32."""
    rng = np.random.default_rng(seed)
    u, pre, post = (jnp.asarray(rng.normal(size=(BATCH, CHANNELS, n)), jnp.float32)
                    for _ in range(3))
    k = jnp.asarray(rng.normal(size=(CHANNELS, l)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(CHANNELS,)), jnp.float32)
    return u, k, pre, post, bias


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _transform_sizes(fn, *args) -> tuple[set, set]:
    """(FFT lengths of every jnp.fft call, samples per program of every Pallas kernel) in the
    traced program of fn(*args)."""
    ffts, kernels = set(), set()
    for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
        if eqn.primitive.name == "fft":
            ffts.add(tuple(eqn.params["fft_lengths"]))
        elif eqn.primitive.name == "pallas_call":  # out [batch, channels, S planes, rows, width]
            kernels.add(int(np.prod(eqn.outvars[0].aval.shape[2:])))
    return ffts, kernels


# (N, L, partial, bidirectional, block_fft_size): odd N, N not a multiple of B, partial and a
# short L, causal and centred, forced small sizes (cheap to interpret) and the rule's own (None)
CASES = [(299, 40, None, False, None), (1001, 500, 37, False, 64), (777, 20, None, True, 64),
         (1000, 301, 25, True, 256), (300, 17, None, False, 32), (257, 9, None, True, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, l, partial, bidirectional, size", CASES)
def test_blocked_matches_direct_convolution_with_gates_and_bias(backend, n, l, partial,
                                                                bidirectional, size):
    u, k, pre, post, bias = _inputs(n, l, seed=n)
    kw = dict(partial=partial, bidirectional=bidirectional, pre_gate=pre, post_gate=post,
              bias=bias)
    got = fftconv(u, k, backend=backend, block_fft_size=size, dot_precision="float32", **kw)
    want = fftconv(u, k, backend="reference", **kw)
    assert got.shape == want.shape
    assert _rel(got, want) < F32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_blocked_grads_match_reference(backend, bidirectional):
    # causal: 7 blocks of B = 64 - 20 (308 > N: a ragged end); centred: taps 19..39 around the
    # centre 29, 7 blocks of B = 64 - 10 - 10
    n, l, p, size = 301, 60, 21, 64
    u, k, pre, post, bias = _inputs(n, l, seed=3)
    w = jnp.asarray(np.random.default_rng(4).normal(size=u.shape), jnp.float32)

    def fwd_bwd(be, kw):
        def f(u, k, pre, post, bias):
            return fftconv(u, k, pre_gate=pre, post_gate=post, bias=bias, partial=p,
                           bidirectional=bidirectional, backend=be, **kw)
        return jax.jit(lambda *a: (lambda y, vjp: (y, vjp(w)))(*jax.vjp(f, *a)))

    y, got = fwd_bwd(backend, dict(block_fft_size=size, dot_precision="float32"))(
        u, k, pre, post, bias)
    y_ref, want = fwd_bwd("reference", {})(u, k, pre, post, bias)
    assert _rel(y, y_ref) < F32_RTOL
    for name, g, r in zip(("u", "k", "pre_gate", "post_gate", "bias"), got, want):
        assert g.shape == r.shape, name
        assert _rel(g, r) < GRAD_RTOL, name
    lo = 19 if bidirectional else 0  # the first kept tap
    dropped = (np.arange(l) < lo) | (np.arange(l) >= lo + p)
    assert np.all(np.asarray(got[1])[:, dropped] == 0)  # the dropped taps get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_partial_equals_short_filter(backend):
    """partial=p of a long filter and the p-tap filter itself block alike and give the direct
    convolution of the p taps."""
    n, l, p = 999, 999, 30
    u, k, *_ = _inputs(n, l, seed=5)
    kw = dict(backend=backend, block_fft_size=64, dot_precision="float32")
    want = fftconv(u, k[:, :p], backend="reference")
    assert _rel(fftconv(u, k, partial=p, **kw), want) < F32_RTOL
    assert _rel(fftconv(u, k[:, :p], **kw), want) < F32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_blocked_path_runs_at_the_small_fft_size(backend, bidirectional):
    """The traced program transforms at the block size S only (forward and backward), while the
    unblocked one (block_fft_size=0) runs at its size (pallas: M; xla: the exact M' <= M): read
    from the jnp.fft calls' lengths and the Pallas kernel's per-program samples. Centred, the
    partial taps around the centre reach as far as the causal ones (25 back, 24 ahead) and
    block alike."""
    n, l, p = 4500, 4500, 50
    u, k, *_ = _inputs(n, l, seed=7)
    offset = (p - 1) // 2 if bidirectional else 0
    auto = blocked.choose_blocking(n, p, offset, 0.0, backend)
    m = (monarch.fft_size(n) if backend == "pallas"  # 16384
         else monarch.linear_fft_size(n, *blocked.back_and_ahead(p, offset)))  # 8192
    # xla: 4·50 -> 256, the smallest size (22 blocks, 5632 < 8192 samples); pallas: 10 r2c
    # blocks of 512 cost less than 22 of 256
    assert auto is not None and auto.fft_size == {"xla": 256, "pallas": 512}[backend]

    def loss(size):
        return lambda u, k: jnp.sum(fftconv(u, k, partial=p, backend=backend,
                                            bidirectional=bidirectional,
                                            block_fft_size=size) ** 2)

    for size, want in ((None, auto.fft_size), (0, m)):
        ffts, kernels = _transform_sizes(jax.grad(loss(size), argnums=(0, 1)), u, k)
        assert ffts == {(want,)}, (size, ffts)
        if backend == "pallas":  # forward and input-gradient kernels: one transform of S each
            assert kernels == {want if size is None else m // 2}, (size, kernels)


def test_choose_blocking_xla_counts_transformed_samples():
    """xla blocks when the blocks transform fewer samples than its one unblocked transform at
    the exact size M' = linear_fft_size (no 512 floor, so short sequences stay unblocked)."""
    for n, taps, offset in ((4096, 64, 0), (4096, 256, 0), (1000, 61, 30), (1000, 37, 0)):
        b = blocked.choose_blocking(n, taps, offset, 0.0, "xla")
        assert b is not None, (n, taps)
        s = b.fft_size
        assert s & (s - 1) == 0 and blocked.MIN_BLOCK_FFT <= s <= blocked.MAX_BLOCK_FFT
        # fewer samples transformed than one exact transform
        assert b.blocks * s < monarch.linear_fft_size(n, *blocked.back_and_ahead(taps, offset))
        assert b.block + taps - 1 == s and b.blocks * b.block >= n > (b.blocks - 1) * b.block
    assert blocked.choose_blocking(4096, 2048, 0, 0.0, "xla") is None  # 2 x 8192 = M': no gain
    # M' = 512, 128, 4096: blocks of 256 or more save nothing (against the kernel's M = 1024,
    # 512, 8192 they would), and a single block (n + back + ahead) is never smaller than M'
    for n, taps in ((300, 17), (100, 3), (3000, 1000)):
        assert blocked.choose_blocking(n, taps, 0, 0.0, "xla") is None, n
    for backend in BACKENDS:
        assert blocked.choose_blocking(4096, 4096, 0, 0.0, backend) is None
        assert blocked.choose_blocking(4096, 64, 0, 0.5, backend) is None  # sparsity: size M
    with pytest.raises(ValueError, match="backend"):
        blocked.choose_blocking(4096, 64, 0, 0.0, "reference")


def _kernel_mflop(m, full):
    """The Pallas kernel's real-matmul MFLOP per (batch row, channel) at FFT size m, its plan by
    size (what experiments/bench_fftconv.py reports as kernel_mflop)."""
    plan = monarch.choose_plan(m, full)
    geo = plan.geometry(m, full)
    return 2 * geo.real_macs(geo.factors[-1]) * monarch.outer_residues(plan.outer) / 1e6


def test_choose_blocking_pallas_never_costs_more_kernel_work():
    """The pallas rule weighs the kernel's work, not the samples: over a sweep of N (powers of
    two and between, to 2^20) and L' (causal and centred), a chosen blocking never does more
    real-matmul work than the unblocked kernel (which skips its input's zero half and from
    M = 16384 runs order 3: counting samples blocked N = 16384, L' = 2048 in three order-2
    blocks of 8192, 1.36x the work), and clearly short filters still block, for much less."""
    chosen = 0
    for log in range(6, 21):
        for n in (2 ** log, int(0.6 * 2 ** log) + 1):
            unblocked = _kernel_mflop(monarch.fft_size(n), False)
            taps = 1
            while taps <= n:
                for t in (taps, min(n, int(1.5 * taps) + 1)):
                    for offset in (0, (t - 1) // 2):
                        b = blocked.choose_blocking(n, t, offset, 0.0, "pallas")
                        if b is None:
                            continue
                        chosen += 1
                        back, ahead = blocked.back_and_ahead(t, offset)
                        assert b.block == b.fft_size - back - ahead > 0
                        assert b.blocks * b.block >= n > (b.blocks - 1) * b.block
                        work = b.blocks * _kernel_mflop(b.fft_size, True)
                        assert work < unblocked, (n, t, offset, b, work, unblocked)
                taps *= 2
            if n >= 1024:  # a clearly short filter: blocks, at well under half the work
                for t in (16, 64):
                    b = blocked.choose_blocking(n, t, 0, 0.0, "pallas")
                    assert b is not None, (n, t)
                    assert b.blocks * _kernel_mflop(b.fft_size, True) < 0.5 * unblocked, (n, t)
    assert chosen > 300
    for n, t in ((16384, 2048), (8192, 1024), (2 ** 20, 2048)):  # the sample rule's worst
        b = blocked.choose_blocking(n, t, 0, 0.0, "pallas")
        assert b is None or b.fft_size >= 16384, (n, t, b)  # order 3, not order-2 blocks


def test_segments_round_trip():
    """Each segment's outputs back .. back + B are its own inputs' times, so the identity as
    the per-segment op gives the input back (zero padding never reaches the kept outputs)."""
    a = jnp.arange(2 * 3 * 101, dtype=jnp.float32).reshape(2, 3, 101)
    for taps, offset, size in ((20, 0, 32), (9, 4, 16), (2, 0, 8), (7, 6, 8)):
        b = blocked.make_blocking(101, taps, offset, size)
        seg = blocked.to_segments(a, b)
        assert seg.shape == (2 * b.blocks, 3, size)
        np.testing.assert_array_equal(blocked.from_segments(seg, b, 2, 101), a)


BAD_BLOCKS = [(3, "power of two"), (48, "power of two"), (True, "power of two"),
              (2 * blocked.MAX_BLOCK_FFT, "power of two"), (16, "exceed the filter's reach")]


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("size, words", BAD_BLOCKS)
def test_bad_block_fft_size_raises_clear_errors(backend, size, words):
    """Checked before any backend runs, so the reference (which never blocks) refuses them too."""
    u, k, *_ = _inputs(256, 17)
    with pytest.raises(ValueError, match=words):
        fftconv(u, k, backend=backend, block_fft_size=size)
    with pytest.raises(ValueError, match="freq_sparsity"):
        fftconv(u, k, backend=backend, block_fft_size=64, freq_sparsity=0.5)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_monarch_plan_checked_against_the_kernel_size_on_every_backend(backend):
    """A plan that does not fit is refused on every backend: at M unblocked (an outer step of
    1024 at M = 512), at the forced block size S with block_fft_size (an outer step needs the
    zero-padded signal that a full block is not)."""
    u, k, *_ = _inputs(256, 17)
    with pytest.raises(ValueError, match="does not fit"):
        fftconv(u, k, backend=backend, monarch_plan=monarch.MonarchPlan(outer=1024))
    with pytest.raises(ValueError, match="does not fit"):
        fftconv(u, k, backend=backend, monarch_plan=monarch.MonarchPlan(outer=2),
                block_fft_size=64)


def test_monarch_plan_turns_off_automatic_blocking_on_pallas_only():
    """xla ignores the plan and keeps its automatic blocks; the pallas path, whose kernel the
    plan is meant for at size M, runs unblocked (traced only: no kernel is compiled)."""
    n, p = 4500, 50
    u, k, *_ = _inputs(n, n, seed=7)
    plan = monarch.MonarchPlan(order=3, r2c=True)
    for backend, want in (("xla", 256), ("pallas", monarch.fft_size(n))):
        ffts, _ = _transform_sizes(
            lambda u, k: fftconv(u, k, partial=p, backend=backend, monarch_plan=plan), u, k)
        assert ffts == {(want,)}, (backend, ffts)


def test_every_block_size_has_a_plan_triton_compiles():
    """The Pallas kernel's plan by size for a full block (no zero-block skip) of every size the
    rule may choose has matmuls at least 16 wide and needs no outer step."""
    size = blocked.MIN_BLOCK_FFT
    while size <= blocked.MAX_BLOCK_FFT:
        plan = monarch.choose_plan(size, full=True)
        geo = plan.geometry(size, full=True)
        assert plan.outer == 1 and not geo.skip and geo.lowers_to_triton, size
        assert plan.r2c == (size >= 512), size  # a full r2c kernel of 256 is still 16 x 16
        size *= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_bf16_inputs_keep_their_dtype(backend):
    """bf16 signals and gates (cut into float32 segments) give a bf16 output, within bf16's
    rounding of the float32 result (2^-9 relative per element)."""
    n, l = 500, 12
    u, k, pre, _, bias = _inputs(n, l, seed=9)
    u16, pre16 = u.astype(jnp.bfloat16), pre.astype(jnp.bfloat16)
    got = fftconv(u16, k, pre_gate=pre16, bias=bias, backend=backend, block_fft_size=64,
                  dot_precision="float32")
    want = fftconv(u16, k, pre_gate=pre16, bias=bias, backend="reference")
    assert got.dtype == jnp.bfloat16
    assert _rel(got, want.astype(jnp.float32)) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_bf16_gradients_rounded_once(backend):
    """bf16 gradients of u and pre_gate are as close to the float32 gradient blocked as
    unblocked: each is rounded to bf16 once (2^-9 relative, plus the bf16 rounding of the output
    cotangent's path), not per segment and again in a bf16 overlap-add of the segments (which
    measured up to 2.0 relative error on an element)."""
    n, l = 1100, 16  # blocked by both rules (5 blocks of 256 each)
    rng = np.random.default_rng(11)
    u, pre, w = (jnp.asarray(rng.normal(size=(1, CHANNELS, n)), jnp.bfloat16) for _ in range(3))
    k = jnp.asarray(rng.normal(size=(CHANNELS, l)), jnp.float32)
    assert blocked.choose_blocking(n, l, 0, 0.0, backend) is not None

    def grads(be, u, pre, **kw):
        def loss(u, pre):
            y = fftconv(u, k, pre_gate=pre, backend=be, **kw)
            return jnp.vdot(w.astype(jnp.float32), y.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1))(u, pre)

    want = grads("reference", u.astype(jnp.float32), pre.astype(jnp.float32))  # float32
    errors = {}
    for size in (None, 0):
        got = grads(backend, u, pre, block_fft_size=size, dot_precision="float32")
        for name, g, r in zip(("u", "pre_gate"), got, want):
            assert g.dtype == jnp.bfloat16
            g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
            errors[size, name] = np.max(np.abs(g - r) / np.abs(r))
    for name in ("u", "pre_gate"):
        assert errors[0, name] < 2 ** -7, errors
        assert errors[None, name] < max(2 * errors[0, name], 2 ** -8), errors


@pytest.mark.parametrize("n, l, bidirectional, freq_sparsity, want", [
    (16, 16, False, 0.0, 32), (33, 5, True, 0.0, 64), (200, 200, True, 0.0, 512),
    (33, 5, False, 0.5, 512)])
def test_xla_unblocked_runs_at_the_smallest_exact_size(n, l, bidirectional, freq_sparsity, want):
    """Exact (freq_sparsity 0), the xla path transforms at the power of two >= N + the filter's
    reach, without the Pallas kernel's floor M >= 512 (N = 16: 32 points, not 512), forward and
    backward; with freq_sparsity it keeps M = monarch.fft_size(N), where the mask is defined."""
    u, k, *_ = _inputs(n, l, seed=11)
    assert monarch.fft_size(n) == 512  # the kernel's floor

    def loss(u, k):
        return jnp.sum(fftconv(u, k, bidirectional=bidirectional, freq_sparsity=freq_sparsity,
                               backend="xla") ** 2)

    ffts, _ = _transform_sizes(jax.grad(loss, argnums=(0, 1)), u, k)
    assert ffts == {(want,)}, ffts


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 28, 30, 33])
def test_xla_small_n_equals_reference_at_every_filter_length(n, bidirectional):
    """At the exact size no window wraps onto the signal, also at its edge (N + reach = a power
    of two: N = 30, L = 3 causal and N = 28, L = 9 centred reach exactly 32); and the xla and
    pallas backends agree."""
    for l in sorted({1, 2, 3, 9, n // 2 + 1, n} & set(range(1, n + 1))):
        u, k, pre, post, bias = _inputs(n, l, seed=n + l)
        kw = dict(bidirectional=bidirectional, pre_gate=pre, post_gate=post, bias=bias)
        want = fftconv(u, k, backend="reference", **kw)
        assert _rel(fftconv(u, k, backend="xla", **kw), want) < F32_RTOL, l
    if n == 33:  # one interpreted kernel (M = 512) for the cross-backend check
        got = fftconv(u, k, backend="pallas", dot_precision="float32", **kw)
        assert _rel(got, fftconv(u, k, backend="xla", **kw)) < F32_RTOL
