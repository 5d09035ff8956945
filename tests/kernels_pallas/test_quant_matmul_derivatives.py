"""quant_matmul's derivatives (its custom_jvp) on every backend: jvp, jacfwd, grads wrt x and
the float scales and zeros, second derivatives, vmap, what reverse mode keeps, tangent dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.quant_matmul import MixedQuantizedWeight, quant_matmul
from tests.kernels_pallas.quant_weights import random_mixed_weight, random_weight

# Derivatives: the oracle is plain jax autodiff of x @ W with W = w.dequantize() in float32, a
# function of x and of the weight's float scales (no custom rule anywhere on that path).
DERIVATIVE_CASES = [("reference", False), ("xla", False), ("pallas", False),
                    ("pallas_tpu", False), ("xla", True), ("pallas", True)]
# float32 sums of up to K = 1024 products in another order (and, for pallas, scales applied late)
DERIV_RTOL, DERIV_ATOL = 1e-5, 1e-4


def _derivative_weight(mixed):
    """A K = 1024, N = 128 weight with act-order groups of 128 (a shape every backend tiles), or a
    mixed 2/4-bit one; the TPU kernel's tile is the binding constraint."""
    if mixed:
        return random_mixed_weight(1024, 128, 128, np.array([0, 1, 0, 0, 1, 0, 0, 0], bool))[0]
    return random_weight(1024, 128, 4, 128, desc_act=True, seed=8)[0]


def _float_scales(w):
    """The weight's float leaves: its scales, one array per part (float32)."""
    parts = w.parts if isinstance(w, MixedQuantizedWeight) else (w,)
    return tuple(p.scales.astype(jnp.float32) for p in parts)


def _with_scales(w, scales):
    """w with its scales replaced by ``scales`` (as ``_float_scales`` orders them)."""
    if not isinstance(w, MixedQuantizedWeight):
        return dataclasses.replace(w, scales=scales[0])
    parts = iter(scales)
    return dataclasses.replace(w, **{name: dataclasses.replace(part, scales=next(parts))
                                     for name, part in (("high", w.high), ("low", w.low))
                                     if part is not None})


def _dense_matmul(x, w):
    """The oracle: x @ dequantize(w) in float32, differentiated by plain jax autodiff."""
    return jnp.dot(x, w.dequantize(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _assert_trees_close(got, want, atol=DERIV_ATOL):
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == v.shape and g.dtype == v.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=DERIV_RTOL, atol=atol)


@pytest.mark.parametrize("backend, mixed", DERIVATIVE_CASES)
def test_grads_wrt_x_and_scales_match_autodiff_of_the_dequantized_matmul(backend, mixed):
    w = _derivative_weight(mixed)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(2, 3, 1024)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.float32)  # a generic output cotangent

    def loss(x, scales, matmul):
        return jnp.sum(matmul(x, _with_scales(w, scales)) * c)

    args = (x, _float_scales(w))
    got = jax.grad(loss, argnums=(0, 1))(*args, lambda x, w: quant_matmul(x, w, backend=backend))
    want = jax.grad(loss, argnums=(0, 1))(*args, _dense_matmul)
    assert all(float(jnp.max(jnp.abs(s))) > 1 for s in want[1])  # scales do get a gradient
    _assert_trees_close(got, want)


@pytest.mark.parametrize("backend, mixed", DERIVATIVE_CASES)
def test_jvp_and_jacfwd_match_the_dequantized_matmul(backend, mixed):
    w = _derivative_weight(mixed)
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.normal(size=(2, 1024)), jnp.float32)
    dx = jnp.asarray(rng.normal(size=(2, 1024)), jnp.float32)
    scales = _float_scales(w)
    dscales = tuple(jnp.asarray(rng.normal(size=s.shape), jnp.float32) for s in scales)

    def matmul(x, scales):
        return quant_matmul(x, _with_scales(w, scales), backend=backend)

    def dense(x, scales):
        return _dense_matmul(x, _with_scales(w, scales))

    got = jax.jvp(matmul, (x, scales), (dx, dscales))
    want = jax.jvp(dense, (x, scales), (dx, dscales))
    _assert_trees_close(got, want)
    # jacfwd: [2, 128, 2, 1024] wrt x (a vmap of the tangent over K * 2 directions)
    _assert_trees_close(jax.jacfwd(matmul)(x, scales), jax.jacfwd(dense)(x, scales))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_second_derivatives_and_vmapped_grads_match_the_dequantized_matmul(backend):
    w = _derivative_weight(False)
    # [3, K], small enough that tanh stays unsaturated
    x = jnp.asarray(np.random.default_rng(11).normal(size=(3, 1024)), jnp.float32) / 64

    def loss(x, matmul):
        return jnp.sum(jnp.tanh(matmul(x)))

    def quant(x):
        return quant_matmul(x, w, backend=backend)

    def dense(x):
        return _dense_matmul(x, w)

    for derivative in (
            lambda f: jax.grad(lambda x: jnp.sum(jax.grad(loss)(x, f) ** 2))(x),  # rev over rev
            lambda f: jax.jacfwd(jax.grad(loss))(x[0], f),  # the Hessian, fwd over rev
            lambda f: jax.vmap(jax.grad(loss), in_axes=(0, None))(x, f)):
        want = derivative(dense)
        # entries span ~1e4 and cancel: float32 reordering error is relative to the largest
        _assert_trees_close(derivative(quant), want,
                            atol=DERIV_RTOL * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_reverse_mode_keeps_the_packed_weight_not_a_float_copy(backend):
    # What jax.vjp saves for the backward pass: x and the weight's own leaves, nothing [K, N] in
    # float (a float copy per layer would cost the memory of a float model in training).
    w = _derivative_weight(False)
    x = jnp.ones((4, 1024), jnp.float32)
    _, backward = jax.vjp(lambda x, s: quant_matmul(x, _with_scales(w, s), backend=backend), x,
                          _float_scales(w))
    saved = [a for a in jax.tree.leaves(backward) if hasattr(a, "shape")]
    assert not [a.shape for a in saved if a.shape == w.shape and a.dtype != jnp.int32]
    assert sum(a.size * a.dtype.itemsize for a in saved) < 1024 * 128 * 4 // 2


def test_float_zeros_get_exact_derivatives():
    # from_ints stores int32 zeros; a weight built by hand may hold float ones, and then they
    # are a float input like the scales.
    w = _derivative_weight(False)
    zeros = w.zeros.astype(jnp.float32) + 0.25
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(2, 1024)), jnp.float32)
    dzeros = jnp.asarray(rng.normal(size=zeros.shape), jnp.float32)

    def matmul(zeros, f):
        return f(x, dataclasses.replace(w, zeros=zeros))

    def quant(x, w):
        return quant_matmul(x, w, backend="xla")

    _assert_trees_close(jax.jvp(lambda z: matmul(z, quant), (zeros,), (dzeros,)),
                        jax.jvp(lambda z: matmul(z, _dense_matmul), (zeros,), (dzeros,)))
    _assert_trees_close(jax.grad(lambda z: jnp.sum(matmul(z, quant) ** 2))(zeros),
                        jax.grad(lambda z: jnp.sum(matmul(z, _dense_matmul) ** 2))(zeros),
                        atol=1e-2)  # entries ~1e3: float32 reordering


def _dot_generals(jaxpr):
    """Every dot_general equation of ``jaxpr`` and of the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dot_generals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dot_generals(sub)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_tangent_dots_run_in_x_dtype_accumulating_in_float32(dtype):
    # 16-bit x: one pass in x's dtype into float32 (a HIGHEST float32 dot would cost ~6 passes on
    # GPU/TPU); float32 x: HIGHEST, as the forward runs it. jax.linearize keeps only the tangent.
    w = _derivative_weight(False)
    x = jnp.asarray(np.random.default_rng(12).normal(size=(4, 1024)), dtype)
    scales = _float_scales(w)
    with jax.default_matmul_precision("default"):  # as users run it (conftest sets "highest")
        _, tangent = jax.linearize(
            lambda x, s: quant_matmul(x, _with_scales(w, s), backend="xla"), x, scales)
        dots = list(_dot_generals(jax.make_jaxpr(tangent)(x, scales).jaxpr))
    assert len(dots) == 2  # dx @ W and x @ dW
    highest = jax.lax.Precision.HIGHEST
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [dtype, dtype]
        assert eqn.params["preferred_element_type"] == jnp.float32
        assert (eqn.params["precision"] == (highest, highest)) == (dtype == jnp.float32)
    # and reverse mode: the gradient wrt x has x's dtype
    g = jax.grad(lambda x: jnp.sum(quant_matmul(x, w, backend="xla").astype(jnp.float32)))(x)
    assert g.dtype == dtype
