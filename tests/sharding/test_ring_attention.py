"""Ring attention over the "sequence" mesh axis equals single-device attention on the gathered
sequence (kernels_pallas reference backend), forward and gradients; zig-zag layout helpers; the
sequence-parallel presets and public entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sharding
from kernels_pallas import flash_attention

F32_ATOL = 1e-5   # forward: online softmax across ring steps reorders float32 sums
GRAD_RTOL = 1e-4  # gradients: per-block VJPs summed in another order than the dense reference
GRAD_ATOL = 1e-5  # scaled by max(1, |reference|) (../shared/research/parallelism.md section 5)
# XLA:CPU compile time dominates these tests; backend optimization level 0 halves it
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_qkv(batch, seq, heads, kv_heads, head_dim, seed=0):
    """Random q, k, v and an output cotangent (numpy's generator: no compile per shape)."""
    rng = np.random.default_rng(seed)
    q_shape, kv_shape = (batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in (q_shape, kv_shape, kv_shape, q_shape))


def output_and_grads(attend, q, k, v, cotangent):
    """One jit (one compile): attend's output and the VJP of <out, cotangent> w.r.t. q, k, v."""
    def run(q, k, v):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(cotangent)
    return jax.jit(run).lower(q, k, v).compile(compiler_options=FAST_COMPILE)(q, k, v)


def assert_matches(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    np.testing.assert_allclose(out, ref_out, rtol=F32_ATOL, atol=F32_ATOL)
    for name, g, r in zip("qkv", grads, ref_grads):
        atol = GRAD_ATOL * max(1.0, float(jnp.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=GRAD_RTOL, atol=atol, err_msg=f"d{name}")


def ring_vs_reference(p, *, causal, layout, batch=2, heads=4, kv_heads=2, head_dim=20,
                      chunk=8, segments=False, backend="xla"):
    """Ring attention on p devices (the sequence permuted into `layout` and back) against the
    reference on the natural order."""
    seq = 2 * p * chunk
    q, k, v, ct = make_qkv(batch, seq, heads, kv_heads, head_dim)
    seg = None
    if segments:  # three documents of uneven lengths per row
        seg = jnp.stack([jnp.searchsorted(jnp.array([seq // 3, seq // 2 + b]), jnp.arange(seq),
                                          side="right") for b in range(batch)]).astype(jnp.int32)
    mesh = sharding.make_mesh(sequence=p, devices=jax.devices()[:p])
    to_layout = ((lambda x: sharding.zigzag_permute(x, p)) if layout == "zigzag"
                 else (lambda x: x))
    from_layout = ((lambda x: sharding.zigzag_unpermute(x, p)) if layout == "zigzag"
                   else (lambda x: x))

    def ring(q, k, v):
        out = sharding.ring_attention(
            to_layout(q), to_layout(k), to_layout(v), mesh=mesh, causal=causal, layout=layout,
            segment_ids=None if seg is None else to_layout(seg), backend=backend)
        return from_layout(out)

    def reference(q, k, v):
        return flash_attention(q, k, v, causal=causal, segment_ids=seg, backend="reference")

    assert_matches(output_and_grads(ring, q, k, v, ct), output_and_grads(reference, q, k, v, ct))


def test_zigzag_positions_follow_the_documented_layout():
    got = sharding.zigzag_positions(16, 4).reshape(4, 4)
    np.testing.assert_array_equal(got, [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11],
                                        [6, 7, 8, 9]])


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_zigzag_permute_round_trip_is_exact(p):
    x = jnp.asarray(np.random.default_rng(p).standard_normal((2, 32, 3, 5)), jnp.float32)
    laid_out = sharding.zigzag_permute(x, p)
    assert not p > 1 or not np.array_equal(laid_out, x)
    np.testing.assert_array_equal(sharding.zigzag_unpermute(laid_out, p), x)
    ids = jnp.arange(64).reshape(2, 32)
    np.testing.assert_array_equal(sharding.zigzag_unpermute(sharding.zigzag_permute(ids, p), p),
                                  ids)


def test_zigzag_rejects_a_length_that_does_not_split_into_2p_chunks():
    with pytest.raises(ValueError, match=r"seq_len must be divisible by 2 \* num_shards = 8.*"
                                         r"got seq_len=20"):
        sharding.zigzag_permute(jnp.ones((1, 20, 2, 4)), 4)


def test_causal_zigzag_gqa_matches_reference():
    ring_vs_reference(4, causal=True, layout="zigzag")


def test_non_causal_matches_reference():
    ring_vs_reference(2, causal=False, layout="zigzag", batch=1, heads=2, kv_heads=2,
                      head_dim=8)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_zigzag_matches_reference_for_every_degree(p, causal):
    ring_vs_reference(p, causal=causal, layout="zigzag", batch=2, heads=6, kv_heads=3,
                      head_dim=12, chunk=4)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 8])
def test_contiguous_causal_matches_reference(p):
    ring_vs_reference(p, causal=True, layout="contiguous", head_dim=12, chunk=4)


@pytest.mark.slow
def test_segment_ids_match_reference():
    ring_vs_reference(4, causal=True, layout="zigzag", chunk=4, segments=True)


@pytest.mark.slow
def test_pallas_blocks_match_reference():
    ring_vs_reference(2, causal=True, layout="zigzag", heads=2, kv_heads=1, head_dim=16,
                      backend="pallas")


@pytest.mark.slow
def test_batch_split_over_data_axis_matches_reference():
    q, k, v, ct = make_qkv(4, 32, 4, 2, 8)
    mesh = sharding.make_mesh(data=2, sequence=4)

    def ring(q, k, v):
        perm = [sharding.zigzag_permute(x, 4) for x in (q, k, v)]
        out = sharding.ring_attention(*perm, mesh=mesh, causal=True, layout="zigzag",
                                      batch_axes="data", backend="xla")
        return sharding.zigzag_unpermute(out, 4)

    def reference(q, k, v):
        return flash_attention(q, k, v, causal=True, backend="reference")

    assert_matches(output_and_grads(ring, q, k, v, ct), output_and_grads(reference, q, k, v, ct))


def test_backward_is_the_custom_ring_replay():
    """The gradient comes from the custom VJP (residuals: local shards), not from autodiff storing
    every visiting K/V block: the jaxpr of the forward holds a custom_vjp_call."""
    q, k, v = zeros_qkv(1, 16, 2, 1, 8)
    mesh = sharding.make_mesh(sequence=2, devices=jax.devices()[:2])
    jaxpr = jax.make_jaxpr(lambda q, k, v: sharding.ring_attention(
        q, k, v, mesh=mesh, causal=True, backend="xla"))(q, k, v)
    assert "custom_vjp_call" in str(jaxpr)


def zeros_qkv(batch, seq, heads, kv_heads, head_dim):
    """Inputs for validation tests, which fail before any compile."""
    return (jnp.zeros((batch, seq, heads, head_dim)), jnp.zeros((batch, seq, kv_heads, head_dim)),
            jnp.zeros((batch, seq, kv_heads, head_dim)))


def block_work(p, layout, local_len=8):
    """Score entries each device computes at each causal ring step: [device, step]."""
    from sharding.ring_attention import RingConfig, _parts
    cfg = RingConfig("sequence", p, True, layout, None, "xla")
    work = np.zeros((p, p))
    for device in range(p):
        for step in range(p):
            parts = _parts(cfg, step, local_len)
            part = parts[0] if len(parts) == 1 or device >= step else parts[1]
            if part is not None:
                rows = len(range(local_len)[part.q_rows])
                cols = len(range(local_len)[part.kv_rows])
                work[device, step] = rows * cols // (2 if part.causal else 1)
    return work


@pytest.mark.parametrize("p", [2, 4, 8])
def test_zigzag_gives_every_device_equal_work_at_every_step(p):
    zigzag, contiguous = block_work(p, "zigzag"), block_work(p, "contiguous")
    assert (zigzag == zigzag[0, 0]).all()  # half of a dense [2c x 2c] block, everywhere
    assert zigzag.sum() == contiguous.sum()  # the same total: only its spread differs
    assert contiguous.sum(1).tolist() == sorted(contiguous.sum(1).tolist())
    assert contiguous[-1].sum() > contiguous[0].sum()  # the last device does the most


def test_sequence_not_divisible_by_2p_is_an_error():
    q, k, v = zeros_qkv(1, 24, 2, 2, 8)
    mesh = sharding.make_mesh(sequence=8)
    with pytest.raises(ValueError, match=r"split into 2 \* 8 chunks.*got seq=24"):
        sharding.ring_attention(q, k, v, mesh=mesh, causal=True, layout="zigzag")


def test_missing_mesh_axis_is_an_error():
    q, k, v = zeros_qkv(1, 16, 2, 2, 8)
    mesh = sharding.make_mesh(data=8)
    with pytest.raises(ValueError, match=r"axis='seq' is not an axis of the mesh.*'sequence'"):
        sharding.ring_attention(q, k, v, mesh=mesh, axis="seq")


@pytest.mark.parametrize("batch, batch_axes, message", [
    (2, "data2", r"batch_axes='data2' is not an axis of the mesh; its axes are \('data', 'fsdp'"),
    (2, ("fsdp", "sequence"), r"batch_axes may not include axis 'sequence'"),
    (2, ("fsdp", "fsdp"), r"batch_axes must name each mesh axis once"),
    (3, "fsdp", r"batch=3 must be divisible by batch_axes \('fsdp',\) of size 2"),
    (2, 7, r"batch_axes must be None, a mesh axis name or a tuple of them; got 7"),
])
def test_bad_batch_axes_are_errors_before_the_shard_map(batch, batch_axes, message):
    q, k, v = zeros_qkv(batch, 16, 2, 2, 8)
    mesh = sharding.make_mesh(fsdp=2, sequence=4)
    with pytest.raises((ValueError, TypeError), match=message):
        sharding.sequence_parallel_attention(q, k, v, mesh=mesh, batch_axes=batch_axes)


def test_numpy_bool_causal_is_taken_and_means_causal():
    # a flag read from a numpy config or array (np.bool_) is a bool; fftconv takes it too
    q, k, v, _ = make_qkv(2, 16, 4, 2, 8)
    mesh = sharding.make_mesh(sequence=2, devices=jax.devices()[:2])
    got = sharding.sequence_parallel_attention(q, k, v, mesh=mesh, impl="ring",
                                               layout="contiguous", causal=np.bool_(True))
    want = flash_attention(q, k, v, causal=True, backend="reference")
    np.testing.assert_allclose(got, want, rtol=F32_ATOL, atol=F32_ATOL)


def test_default_layout_is_the_natural_order_for_both_impls():
    """Without a layout both impls, and ring_attention itself, take the tokens in natural order
    (zig-zag is opt-in), so the same causal call gives the same answer whichever runs it."""
    q, k, v, _ = make_qkv(2, 16, 4, 2, 8)
    mesh = sharding.make_mesh(data=2, sequence=4)
    want = flash_attention(q, k, v, causal=True, backend="reference")
    for impl in ("ring", "ulysses"):
        got = sharding.sequence_parallel_attention(q, k, v, mesh=mesh, impl=impl, causal=True)
        np.testing.assert_allclose(got, want, rtol=F32_ATOL, atol=F32_ATOL, err_msg=impl)
    got = sharding.ring_attention(q, k, v, mesh=mesh, causal=True, batch_axes="data")
    np.testing.assert_allclose(got, want, rtol=F32_ATOL, atol=F32_ATOL, err_msg="ring_attention")


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_float_segment_ids_are_an_error_not_truncated(impl):
    """Float ids would be cast to int32 on the way into the shard_map: 1.2 and 1.7 would become
    one document."""
    q, k, v = zeros_qkv(2, 16, 4, 2, 8)
    seg = jnp.repeat(jnp.asarray([[1.2, 1.7]]), 8, axis=1).repeat(2, axis=0)  # [2, 16]
    with pytest.raises(ValueError, match=r"segment_ids must have an integer dtype; got float32"):
        sharding.sequence_parallel_attention(q, k, v, mesh=sharding.make_mesh(data=2, sequence=4),
                                             impl=impl, segment_ids=seg)


def test_mismatched_k_and_v_is_an_error():
    q, k, _ = zeros_qkv(1, 16, 4, 2, 8)
    mesh = sharding.make_mesh(sequence=8)
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        sharding.ring_attention(q, k, k[:, :, :1], mesh=mesh)


def test_sp_presets_split_sequence_dimensions_over_the_sequence_axis():
    for preset, impl in (("sp_ring", "ring"), ("sp_ulysses", "ulysses")):
        assert sharding.SEQUENCE_PARALLEL_IMPL[preset] == impl
        assert sharding.logical_to_spec(("batch", "seq", "act_heads", "head_dim"), preset) == \
            P(("data", "fsdp"), "sequence", None, None)
        assert sharding.logical_to_spec(("batch", "res_seq", "act_embed"), preset) == \
            P(("data", "fsdp"), "sequence", None)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(impl="tree"), ValueError, r"impl must be one of \('ring', 'ulysses'\); got 'tree'"),
    (dict(causal="yes"), TypeError, r"causal must be a bool; got 'yes'"),
])
def test_sequence_parallel_attention_rejects_bad_arguments(kwargs, error, message):
    q, k, v = zeros_qkv(1, 16, 2, 2, 8)
    with pytest.raises(error, match=message):
        sharding.sequence_parallel_attention(q, k, v, mesh=sharding.make_mesh(sequence=8),
                                             **kwargs)


def test_communication_volume_formulas():
    shape = dict(batch=1, seq=1024, heads=8, head_dim=64, num_shards=4)
    local = 1024 // 4 * 64  # one head of one local shard
    ring = sharding.communication_elements("ring", kv_heads=2, **shape)
    assert ring == 3 * (2 * 2) * local  # P-1 hops of K and V
    assert sharding.communication_elements("ring", kv_heads=2, backward=True, **shape) == \
        ring + 3 * (2 * 2) * local + 4 * (2 * 2) * local  # K/V replayed, dK/dV P hops
    # all-to-all keeps 1/P of q, k, v, out; 2 KV heads are replicated to 4 for 4 devices
    assert sharding.communication_elements("ulysses", kv_heads=4, **shape) == \
        (16 + 8) * local * 3 // 4
    assert sharding.communication_elements("ulysses", kv_heads=2, **shape) == \
        sharding.communication_elements("ulysses", kv_heads=4, **shape)
