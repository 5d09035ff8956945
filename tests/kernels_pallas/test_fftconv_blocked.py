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
    # causal: 7 blocks of B = 64 - 20 (308 > N: a ragged end); centred (offset 29 > 20 taps):
    # 9 blocks of B = 64 - 29, every tap looking ahead
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
    assert np.all(np.asarray(got[1])[:, p:] == 0)  # the dropped taps get no gradient


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
def test_blocked_path_runs_at_the_small_fft_size(backend):
    """The traced program transforms at the block size S only (forward and backward), while the
    unblocked one (block_fft_size=0) runs at M: read from the jnp.fft calls' lengths and the
    Pallas kernel's per-program samples."""
    n, l, p = 4000, 4000, 50
    u, k, *_ = _inputs(n, l, seed=7)
    auto = blocked.choose_blocking(n, p, 0, 0.0)
    assert auto is not None and auto.fft_size == blocked.MIN_BLOCK_FFT  # 4·50 -> 256
    m = monarch.fft_size(n)  # 8192

    def loss(size):
        return lambda u, k: jnp.sum(fftconv(u, k, partial=p, backend=backend,
                                            block_fft_size=size) ** 2)

    for size, want in ((None, auto.fft_size), (0, m)):
        ffts, kernels = _transform_sizes(jax.grad(loss(size), argnums=(0, 1)), u, k)
        assert ffts == {(want,)}, (size, ffts)
        if backend == "pallas":  # forward and input-gradient kernels: one transform of S each
            assert kernels == {want if size is None else m // 2}, (size, kernels)


def test_choose_blocking_follows_the_rule():
    for n, taps, offset in ((4096, 64, 0), (4096, 256, 0), (300, 17, 0), (1000, 61, 30),
                            (100, 3, 0), (3000, 1000, 0)):
        b = blocked.choose_blocking(n, taps, offset, 0.0)
        assert b is not None, (n, taps)
        s = b.fft_size
        assert s & (s - 1) == 0 and blocked.MIN_BLOCK_FFT <= s <= blocked.MAX_BLOCK_FFT
        assert b.blocks * s < monarch.fft_size(n)  # fewer samples transformed than one size M
        assert b.block + taps - 1 == s and b.blocks * b.block >= n > (b.blocks - 1) * b.block
    assert blocked.choose_blocking(3000, 1000, 0, 0.0).blocks == 1  # 4096 < M = 8192
    assert blocked.choose_blocking(4096, 2048, 0, 0.0) is None  # 2 x 8192 = M: no gain
    assert blocked.choose_blocking(4096, 4096, 0, 0.0) is None
    assert blocked.choose_blocking(4096, 64, 0, 0.5) is None  # frequency sparsity: size M


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


@pytest.mark.parametrize("size, words", BAD_BLOCKS)
def test_bad_block_fft_size_raises_clear_errors(size, words):
    u, k, *_ = _inputs(256, 17)
    with pytest.raises(ValueError, match=words):
        fftconv(u, k, backend="xla", block_fft_size=size)
    with pytest.raises(ValueError, match="freq_sparsity"):
        fftconv(u, k, backend="xla", block_fft_size=64, freq_sparsity=0.5)


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
    """bf16 signals and gates are cut into segments as bf16 and the output comes back in bf16,
    within bf16's rounding of the float32 result (2^-9 relative per element)."""
    n, l = 500, 12
    u, k, pre, _, bias = _inputs(n, l, seed=9)
    u16, pre16 = u.astype(jnp.bfloat16), pre.astype(jnp.bfloat16)
    got = fftconv(u16, k, pre_gate=pre16, bias=bias, backend=backend, block_fft_size=64,
                  dot_precision="float32")
    want = fftconv(u16, k, pre_gate=pre16, bias=bias, backend="reference")
    assert got.dtype == jnp.bfloat16
    assert _rel(got, want.astype(jnp.float32)) < 1e-2
