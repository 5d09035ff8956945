"""Ulysses attention (all-to-all sequence <-> heads) equals single-device attention on the gathered
sequence, forward and gradients; head counts that cannot split raise clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from kernels_pallas import flash_attention
from tests.sharding.test_ring_attention import (F32_ATOL, assert_matches, make_qkv,
                                                output_and_grads, zeros_qkv)


def ulysses_vs_reference(p, *, causal, layout="contiguous", batch=2, heads=8, kv_heads=4,
                         head_dim=20, seq=32, segments=False, window=None, impl_call=None):
    q, k, v, ct = make_qkv(batch, seq, heads, kv_heads, head_dim, seed=1)
    seg = None
    if segments:  # two documents per row, split at different points
        seg = jnp.stack([(jnp.arange(seq) >= seq // 2 + b).astype(jnp.int32)
                         for b in range(batch)])
    mesh = sharding.make_mesh(sequence=p, devices=jax.devices()[:p])
    zig = layout == "zigzag"
    to_layout = (lambda x: sharding.zigzag_permute(x, p)) if zig else (lambda x: x)
    from_layout = (lambda x: sharding.zigzag_unpermute(x, p)) if zig else (lambda x: x)
    call = impl_call or sharding.ulysses_attention

    def ulysses(q, k, v):
        out = call(to_layout(q), to_layout(k), to_layout(v), mesh=mesh, causal=causal,
                   layout=layout, segment_ids=None if seg is None else to_layout(seg),
                   local_window=window, backend="xla")
        return from_layout(out)

    def reference(q, k, v):
        return flash_attention(q, k, v, causal=causal, segment_ids=seg, local_window=window,
                               backend="reference")

    assert_matches(output_and_grads(ulysses, q, k, v, ct),
                   output_and_grads(reference, q, k, v, ct))


def test_causal_gqa_matches_reference():
    ulysses_vs_reference(4, causal=True)


def test_fewer_kv_heads_than_devices_are_replicated():
    ulysses_vs_reference(4, causal=False, heads=4, kv_heads=1, head_dim=8, batch=1)


def test_zigzag_layout_with_segments_matches_reference():
    ulysses_vs_reference(2, causal=True, layout="zigzag", heads=2, kv_heads=2, head_dim=8,
                         segments=True)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_for_other_degrees(p, causal):
    ulysses_vs_reference(p, causal=causal, heads=8, kv_heads=8, head_dim=12, seq=64)


@pytest.mark.slow
def test_sequence_parallel_attention_with_a_window_on_zigzag_matches_reference():
    def call(*args, **kwargs):
        return sharding.sequence_parallel_attention(*args, impl="ulysses", **kwargs)
    ulysses_vs_reference(4, causal=True, layout="zigzag", window=(5, 0), impl_call=call)


def test_ring_rejects_a_local_window():
    q, k, v = zeros_qkv(1, 16, 8, 8, 8)
    with pytest.raises(ValueError, match=r"local_window=\(4, 0\) is not supported by "
                                         r"impl='ring'"):
        sharding.sequence_parallel_attention(q, k, v, mesh=sharding.make_mesh(sequence=8),
                                             impl="ring", local_window=(4, 0))


def test_heads_not_divisible_by_devices_is_an_error():
    q, k, v = zeros_qkv(1, 16, 6, 6, 8)
    with pytest.raises(ValueError, match=r"heads must be divisible by 4; got heads=6.*ring"):
        sharding.ulysses_attention(q, k, v, mesh=sharding.make_mesh(sequence=4, data=2))


def test_a_window_with_heads_the_axis_cannot_split_does_not_point_to_the_ring():
    q, k, v = zeros_qkv(1, 16, 6, 6, 8)
    with pytest.raises(ValueError, match=r"got heads=6\. Sliding-window attention runs "
                                         r"sequence-parallel only through Ulysses") as info:
        sharding.ulysses_attention(q, k, v, mesh=sharding.make_mesh(sequence=4, data=2),
                                   local_window=(3, 0))
    assert "impl='ring'" not in str(info.value)


def test_a_window_on_zigzag_needs_2p_chunks_even_without_causal():
    """Ulysses un-permutes the zig-zag layout for a window as for a causal mask, so a
    non-causal window needs the 2P chunks too, and says so before the shard_map."""
    q, k, v = zeros_qkv(2, 12, 4, 2, 8)
    with pytest.raises(ValueError, match=r"split into 2 \* 4 chunks \(zig-zag layout\); got "
                                         r"seq=12"):
        sharding.ulysses_attention(q, k, v, mesh=sharding.make_mesh(sequence=4, data=2),
                                   layout="zigzag", local_window=(2, 0))


def test_kv_heads_neither_dividing_nor_divisible_is_an_error():
    q, k, v = zeros_qkv(1, 16, 12, 3, 8)
    with pytest.raises(ValueError, match=r"kv_heads divisible by the 4 devices.*got kv_heads=3"):
        sharding.ulysses_attention(q, k, v, mesh=sharding.make_mesh(sequence=4, data=2))


def test_missing_mesh_axis_is_an_error():
    q, k, v = zeros_qkv(1, 16, 8, 8, 8)
    with pytest.raises(ValueError, match=r"axis='sequence' is not an axis of the mesh"):
        sharding.ulysses_attention(q, k, v, mesh=jax.make_mesh((8,), ("sp",)))


def test_numpy_bool_causal_is_taken_and_means_causal():
    q, k, v, _ = make_qkv(2, 16, 4, 2, 8)
    mesh = sharding.make_mesh(sequence=2, devices=jax.devices()[:2])
    got = sharding.ulysses_attention(q, k, v, mesh=mesh, causal=np.bool_(True), backend="xla")
    want = flash_attention(q, k, v, causal=True, backend="reference")
    np.testing.assert_allclose(got, want, rtol=F32_ATOL, atol=F32_ATOL)


def test_bad_batch_axes_and_non_bool_causal_are_errors():
    q, k, v = zeros_qkv(3, 16, 8, 8, 8)
    mesh = sharding.make_mesh(fsdp=2, sequence=4)
    with pytest.raises(ValueError, match=r"batch=3 must be divisible by batch_axes \('fsdp',\) "
                                         r"of size 2"):
        sharding.ulysses_attention(q, k, v, mesh=mesh, batch_axes="fsdp")
    with pytest.raises(ValueError, match=r"batch_axes may not include axis 'sequence'"):
        sharding.ulysses_attention(q, k, v, mesh=mesh, batch_axes="sequence")
    with pytest.raises(ValueError, match=r"batch_axes='data2' is not an axis of the mesh"):
        sharding.ulysses_attention(q, k, v, mesh=mesh, batch_axes=("data2",))
    with pytest.raises(TypeError, match=r"causal must be a bool; got 'yes'"):
        sharding.sequence_parallel_attention(q, k, v, mesh=mesh, impl="ulysses", causal="yes")
