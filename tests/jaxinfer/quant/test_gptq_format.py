"""HF GPTQ tensors, checked against a bit-level packing written here from the format description
(research brief, "Checkpoint format"), never against the project's own packer:

* qweight int32 [K*b/32, N]: value q[k, n] occupies bits [k*b, k*b + b) of column n's LSB-first
  bit stream; stream bit i lives in word i // 32 at bit i % 32 (3-bit values straddle words).
* qzeros int32 [groups, N*b/32]: the same along N. v1 ("gptq") stores zero - 1, v2 the zero.
* W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.checkpoint.gptq_format import from_gptq_tensors, to_gptq_tensors
from jaxinfer.quant import (QuantizedWeight, gptq_quantize_layer, hessian_from_activations,
                            quantize_rtn)


def _stream_pack(vals, bits):
    """Independent packer: int [R, C] -> int32 [R*bits/32, C], one bit at a time."""
    r, c = vals.shape
    words = np.zeros((r * bits // 32, c), np.uint64)
    for k in range(r):
        for t in range(bits):
            i = k * bits + t
            words[i // 32] |= ((vals[k].astype(np.uint64) >> np.uint64(t)) & np.uint64(1)) \
                << np.uint64(i % 32)
    return words.astype(np.uint32).view(np.int32)


def _stream_unpack(words, bits):
    """Independent unpacker: int32 [R*bits/32, C] -> int64 [R, C], one bit at a time."""
    u = words.view(np.uint32).astype(np.uint64)
    r = u.shape[0] * 32 // bits
    vals = np.zeros((r, u.shape[1]), np.int64)
    for k in range(r):
        for t in range(bits):
            i = k * bits + t
            vals[k] |= (((u[i // 32] >> np.uint64(i % 32)) & np.uint64(1)).astype(np.int64)) << t
    return vals


def _independent_dequantize(t, bits, checkpoint_format):
    q = _stream_unpack(t["qweight"], bits)
    z = _stream_unpack(np.ascontiguousarray(t["qzeros"].T), bits).T
    if checkpoint_format == "gptq":
        z = z + 1
    g = t["g_idx"]
    return t["scales"].astype(np.float32)[g] * (q - z[g])


def test_three_bit_values_straddle_int32_words_as_described():
    q = np.zeros((32, 1), np.int64)
    q[10, 0] = 0b101  # stream bits 30..32: bits 30, 31 of word 0 get 1, 0; bit 0 of word 1 gets 1
    q[21, 0] = 0b011  # stream bits 63..65: bit 31 of word 1 gets 1; bits 0, 1 of word 2 get 1, 0
    words = _stream_pack(q, 3).view(np.uint32)
    assert words.tolist() == [[1 << 30], [(1 << 31) | 1], [0b01]]
    qw = QuantizedWeight.from_ints(np.repeat(q, 32, axis=1), jnp.ones((1, 32)),
                                   jnp.full((1, 32), 4), bits=3, group_size=-1)
    np.testing.assert_array_equal(to_gptq_tensors(qw, "gptq_v2")["qweight"][:, :1],
                                  words.view(np.int32))


def test_symmetric_four_bit_v1_zeros_are_0x77777777():
    qw = quantize_rtn(jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)), jnp.float32),
                      bits=4, group_size=32, sym=True)
    qzeros = to_gptq_tensors(qw, "gptq")["qzeros"]
    assert qzeros.shape == (2, 2)
    assert np.all(qzeros.view(np.uint32) == 0x77777777)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_hand_built_checkpoint_tensors_load_to_described_weight(bits, checkpoint_format,
                                                                desc_act):
    k, n, g = 64, 32, 16
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2 ** bits, (k, n))
    lo = 1 if checkpoint_format == "gptq" else 0  # v1 cannot store a zero point of 0
    z = rng.integers(lo, 2 ** bits, (k // g, n))
    scales = rng.uniform(0.01, 0.1, (k // g, n)).astype(np.float16)
    g_idx = np.arange(k) // g
    if desc_act:
        g_idx = g_idx[rng.permutation(k)]
    stored_z = z - 1 if checkpoint_format == "gptq" else z
    tensors = dict(qweight=_stream_pack(q, bits),
                   qzeros=np.ascontiguousarray(_stream_pack(stored_z.T, bits).T),
                   scales=scales, g_idx=g_idx.astype(np.int32))
    assert tensors["qweight"].shape == (k * bits // 32, n)
    assert tensors["qzeros"].shape == (k // g, n * bits // 32)
    qw = from_gptq_tensors(**tensors, bits=bits, group_size=g,
                           checkpoint_format=checkpoint_format)
    expect = scales.astype(np.float32)[g_idx] * (q - z[g_idx])
    np.testing.assert_allclose(np.asarray(qw.dequantize()), expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(qw.g_idx), g_idx)
    # And the writer reproduces the hand-built tensors bit for bit.
    out = to_gptq_tensors(qw, checkpoint_format)
    for name in ("qweight", "qzeros", "g_idx"):
        np.testing.assert_array_equal(out[name], tensors[name], err_msg=name)
    np.testing.assert_array_equal(out["scales"], scales)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_written_act_order_gptq_layer_decodes_independently(bits, checkpoint_format):
    rng = np.random.default_rng(7)
    k, n = 64, 32
    x = jnp.asarray(rng.normal(size=(256, k)) * np.exp(rng.normal(size=k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    qw = gptq_quantize_layer(w, hessian_from_activations(x), bits=bits, group_size=16,
                             act_order=True, sym=True)
    t = to_gptq_tensors(qw, checkpoint_format)
    assert not np.all(np.diff(t["g_idx"]) >= 0)  # desc_act order survives the round trip
    # float16 scales on disk: relative error 2**-11 per weight.
    np.testing.assert_allclose(_independent_dequantize(t, bits, checkpoint_format),
                               np.asarray(qw.dequantize()), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_per_channel_checkpoint_has_one_group_row(checkpoint_format):
    k, n, bits = 64, 16, 4
    rng = np.random.default_rng(11)
    q, z = rng.integers(0, 16, (k, n)), rng.integers(1, 16, (1, n))
    scales = rng.uniform(0.01, 0.1, (1, n)).astype(np.float16)
    stored_z = z - 1 if checkpoint_format == "gptq" else z
    tensors = dict(qweight=_stream_pack(q, bits),
                   qzeros=np.ascontiguousarray(_stream_pack(stored_z.T, bits).T),
                   scales=scales, g_idx=np.zeros(k, np.int32))
    qw = from_gptq_tensors(**tensors, bits=bits, group_size=-1,
                           checkpoint_format=checkpoint_format)
    np.testing.assert_allclose(np.asarray(qw.dequantize()), scales.astype(np.float32) * (q - z),
                               rtol=1e-6, atol=1e-7)
    out = to_gptq_tensors(qw, checkpoint_format)
    assert out["qzeros"].shape == (1, n * bits // 32) and out["scales"].shape == (1, n)
    np.testing.assert_array_equal(out["g_idx"], 0)


def test_v1_writer_rejects_zero_point_zero():
    w = jnp.abs(jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32))
    qw = quantize_rtn(w, bits=4, group_size=-1, sym=False)  # all weights >= 0 -> zero 0
    assert int(jnp.min(qw.zeros)) == 0
    with pytest.raises(ValueError, match="cannot represent a zero point of 0"):
        to_gptq_tensors(qw, "gptq")
    t = to_gptq_tensors(qw, "gptq_v2")
    np.testing.assert_allclose(_independent_dequantize(t, 4, "gptq_v2"),
                               np.asarray(qw.dequantize()), rtol=1e-3, atol=1e-6)


def test_v2_writer_explains_a_v1_zero_of_two_to_the_bits():
    # AutoGPTQ's v1 writer lets zero 0 spill -1 into every nibble: stored 15, decoded zero 16,
    # which 4-bit v2 zeros cannot hold (the packer used to fail on its own range check).
    qzeros = np.full((1, 1), -1, np.int32)  # [groups, N * 4 / 32]: N = 8
    qw = from_gptq_tensors(np.zeros((4, 8), np.int32), qzeros, np.ones((1, 8), np.float16),
                           bits=4, group_size=32, checkpoint_format="gptq")
    np.testing.assert_array_equal(np.asarray(qw.zeros), 16)
    with pytest.raises(ValueError, match=r"'gptq_v2' stores the zero point in 4 bits and cannot "
                                         r"represent a zero point of 16 .* write "
                                         r"checkpoint_format='gptq'"):
        to_gptq_tensors(qw, "gptq_v2")
    np.testing.assert_array_equal(to_gptq_tensors(qw, "gptq")["qzeros"], qzeros)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scales=np.zeros((3, 8), np.float16)), "scales must be"),
    (dict(qzeros=np.zeros((2, 2), np.int32)), "qzeros must be"),
    (dict(checkpoint_format="gptq_v3"), "checkpoint_format must be one of"),
    (dict(bits=5), "bits must be one of"),
])
def test_from_gptq_tensors_rejects_bad_tensors(kwargs, message):
    args = dict(qweight=np.zeros((8, 8), np.int32), qzeros=np.zeros((2, 1), np.int32),
                scales=np.zeros((2, 8), np.float16), g_idx=None, bits=4, group_size=32,
                checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match=message):
        from_gptq_tensors(**{**args, **kwargs})


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_loading_skips_the_range_scan_of_integers_unpacked_under_a_mask(bits, monkeypatch):
    # every bit set: q = 2**bits - 1 and a v1 zero of 2**bits - 1 + 1 = 2**bits, the extremes
    # unpacking can give; both fit, so from_ints need not read the whole weight again
    from kernels_pallas.quant_matmul import weight as weight_module
    scanned = []
    monkeypatch.setattr(weight_module, "check_int_range", lambda *a, **k: scanned.append(a[0]))
    k, n = 64, 32
    qw = from_gptq_tensors(np.full((k * bits // 32, n), -1, np.int32),
                           np.full((1, n * bits // 32), -1, np.int32),
                           np.ones((1, n), np.float16), bits=bits, group_size=-1,
                           checkpoint_format="gptq")
    assert scanned == []
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.full((k, n), -1.0))
