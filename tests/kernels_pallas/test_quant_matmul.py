"""quant_matmul: every backend equals the dequantized float matmul (``reference.py``)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.quant_matmul import (MixedQuantizedWeight, QuantizedWeight, pack_planar,
                                         quant_matmul, unpack_planar)
from kernels_pallas.quant_matmul import weight as weight_module
from tests.kernels_pallas.quant_weights import random_mixed_weight, random_weight

# f32: the backends sum the same products in different orders (pallas: per group, scales late).
F32_RTOL, F32_ATOL = 1e-5, 1e-5
# bf16: outputs are rounded to bfloat16 (8 mantissa bits); the backends differ before rounding.
BF16_RTOL, BF16_ATOL = 2e-2, 2e-2


def test_reference_equals_numpy_dequantized_matmul():
    w, (q, scales, zeros, g_idx) = random_weight(128, 24, 4, 32, desc_act=True)
    x = np.random.default_rng(1).normal(size=(3, 128)).astype(np.float32)
    expect = x.astype(np.float64) @ (scales[g_idx] * (q - zeros[g_idx]))
    np.testing.assert_allclose(np.asarray(quant_matmul(jnp.asarray(x), w, backend="reference")),
                               expect, rtol=F32_RTOL, atol=F32_ATOL)


CASES = [  # (lead shape of x, K, N, bits, group_size, desc_act)
    ((5,), 256, 48, 4, 32, True),  # odd M, N not a power of two, act-order groups
    ((19,), 128, 160, 4, -1, False),  # per channel; pallas: 2 x 2 programs, M and N padded
    ((7,), 256, 32, 8, 64, False),
    ((1, 1), 256, 32, 2, 64, True),  # extra leading axis
    ((3,), 256, 32, 3, 128, False),  # 3-bit in 4-bit slots
]


# Every case in float32; bfloat16 activations on the int4 cases (the dtype path does not depend
# on the bit width, and interpret mode is slow on CPU).
BACKEND_CASES = [(backend, dtype, *case) for case in CASES for dtype in (jnp.float32, jnp.bfloat16)
                 for backend in ("xla", "pallas") if dtype == jnp.float32 or case[3] == 4]


@pytest.mark.parametrize("backend, dtype, lead, k, n, bits, group_size, desc_act", BACKEND_CASES)
def test_backends_match_reference(backend, dtype, lead, k, n, bits, group_size, desc_act):
    w, _ = random_weight(k, n, bits, group_size, desc_act=desc_act)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(*lead, k)), dtype)
    got = quant_matmul(x, w, backend=backend)
    want = quant_matmul(x, w, backend="reference")
    assert got.shape == (*lead, n) and got.dtype == dtype
    rtol, atol = (F32_RTOL, F32_ATOL) if dtype == jnp.float32 else (BF16_RTOL, BF16_ATOL)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=rtol, atol=atol)


def test_xla_backend_temp_memory_stays_one_dequantized_weight_at_large_m():
    # A per-group contraction kept [M, groups, N] float32 partial products: 256 MiB here, 2 GiB
    # for a 4096 x 4096 layer at M = 2048. The bound: the [K, N] float32 weight (4 MiB) and
    # room for one more such array (its int32 unpacking, should XLA not fuse the two).
    k, n, g, m = 1024, 1024, 32, 2048
    w = jax.eval_shape(lambda: QuantizedWeight(
        qweight=jnp.zeros((k // 8, n), jnp.int32), scales=jnp.zeros((k // g, n), jnp.float16),
        zeros=jnp.zeros((k // g, n), jnp.int32), perm=None, bits=4, group_size=g, shape=(k, n)))
    x = jax.ShapeDtypeStruct((m, k), jnp.float32)
    compiled = jax.jit(lambda x, w: quant_matmul(x, w, backend="xla")).lower(x, w).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 2 * k * n * 4


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas", "pallas_tpu"])
def test_empty_batch_gives_empty_output_on_every_backend(backend):
    w, _ = random_weight(1024, 128, 4, 128)  # a shape the TPU kernel tiles
    for lead in ((0,), (2, 0)):
        y = quant_matmul(jnp.ones((*lead, 1024), jnp.bfloat16), w, backend=backend)
        assert y.shape == (*lead, 128) and y.dtype == jnp.bfloat16


def test_pallas_explicit_blocks_loop_over_row_blocks_and_match_reference():
    # block_k=16 < K / vpw = 32: two row blocks per program, each inside one 128-row group.
    w, _ = random_weight(256, 64, 4, 128, desc_act=True, seed=3)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(9, 256)), jnp.float32)
    got = quant_matmul(x, w, backend="pallas", block_m=16, block_n=64, block_k=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(quant_matmul(x, w, backend="reference")),
                               rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_mixed_weight_matmul_equals_dequantized_float_matmul(backend):
    high = np.array([0, 1, 0, 0, 1, 0, 0, 0], bool)
    w, dense = random_mixed_weight(128, 24, 16, high)
    assert (w.high.bits, w.high.shape, w.low.bits, w.low.shape) == (4, (32, 24), 2, (96, 24))
    x = np.random.default_rng(1).normal(size=(2, 3, 128)).astype(np.float32)
    got = quant_matmul(jnp.asarray(x), w, backend=backend)
    assert got.shape == (2, 3, 24) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ dense, rtol=F32_RTOL,
                               atol=F32_ATOL)


def test_mixed_weight_with_no_high_groups_is_all_2bit_and_dequantizes_exactly():
    w, dense = random_mixed_weight(128, 8, 16, np.zeros(8, bool), seed=2)
    assert w.high is None and w.high_fraction == 0 and w.low.bits == 2
    np.testing.assert_allclose(np.asarray(w.dequantize()), dense, rtol=1e-6)


def test_bits_per_weight_counts_integers_scales_and_zeros():
    uniform, _ = random_weight(128, 8, 4, 32)
    assert uniform.bits_per_weight == 4 + (16 + 4) / 32
    mixed, _ = random_mixed_weight(128, 8, 16, np.array([1, 0, 0, 1, 0, 0, 0, 0], bool))
    assert mixed.high_fraction == 0.25
    assert mixed.bits_per_weight == 0.25 * (4 + 20 / 16) + 0.75 * (2 + 18 / 16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_planar_packing_round_trips_and_fills_slots_by_row_runs(bits):
    q = jnp.asarray(np.random.default_rng(bits).integers(0, 2 ** bits, (64, 8)), jnp.int32)
    packed = pack_planar(q, bits)
    slot = 4 if bits == 3 else bits
    vpw = 32 // slot
    assert packed.shape == (64 // vpw, 8) and packed.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(unpack_planar(packed, bits)), np.asarray(q))
    # Slot 1 of word row 0 holds row K / vpw (planar layout).
    words = np.asarray(packed).view(np.uint32)
    np.testing.assert_array_equal((words[0] >> slot) & (2 ** slot - 1), np.asarray(q)[64 // vpw])


def test_quant_matmul_rejects_bad_arguments():
    w, _ = random_weight(128, 32, 4, 32)
    x = jnp.ones((2, 128), jnp.float32)
    with pytest.raises(ValueError, match="in_features K=128"):
        quant_matmul(jnp.ones((2, 96)), w)
    with pytest.raises(TypeError, match="must be a QuantizedWeight or MixedQuantizedWeight"):
        quant_matmul(x, jnp.ones((128, 32)))
    with pytest.raises(ValueError, match="backend must be one of"):
        quant_matmul(x, w, backend="cuda")
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        quant_matmul(jnp.ones((2, 128), jnp.int32), w)
    with pytest.raises(ValueError, match="block_k must divide"):
        quant_matmul(x, w, backend="pallas", block_k=32)  # K / vpw = 16 packed rows


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5), "bits must be one of"),
    (dict(bits=4.0), "bits must be one of"),  # a float equal to a width is no width
    (dict(group_size=32.0), "group_size must be a positive int"),
    (dict(group_size=48), "group_size must divide K"),
    (dict(g_idx=np.zeros(128, np.int64)), "exactly group_size=32 rows"),
    (dict(scales=np.ones((3, 32))), "scales and zeros must be"),
    # a -1 used to be counted into group 0 by bincount: "got group sizes [16, 16, 16, 16]"
    (dict(g_idx=np.r_[np.full(32, -1), np.arange(96) // 32 + 1]),
     re.escape("g_idx must hold group indices in [0, 4) (K / group_size = 128 / 32); got "
               "values in [-1, 3]")),
    (dict(g_idx=np.arange(128) // 32 + 1), re.escape("got values in [1, 4]")),
    (dict(g_idx=np.zeros(128, np.float32)), "g_idx must be an integer array"),
    (dict(scales=np.ones((4, 32), np.int32)), "scales must be a float array; got int32"),
    # K = 0 or N = 0 used to divide by zero (K // K per channel) deep inside
    (dict(q=np.zeros((0, 32), np.int32), group_size=-1), re.escape(
        "weight must have K >= 1 (in_features) and N >= 1 (out_features); got shape [0, 32]")),
    (dict(q=np.zeros((128, 0), np.int32)), re.escape("got shape [128, 0]")),
])
def test_quantized_weight_rejects_bad_arguments(kwargs, message):
    args = dict(q=np.zeros((128, 32), np.int32), scales=np.ones((4, 32)),
                zeros=np.zeros((4, 32), np.int32), bits=4, group_size=32)
    with pytest.raises(ValueError, match=message):
        QuantizedWeight.from_ints(**{**args, **kwargs})


def test_quantized_weight_takes_numpy_integer_bits_and_group_size_as_plain_ints():
    q = np.random.default_rng(10).integers(0, 16, (64, 8))
    w = QuantizedWeight.from_ints(q, np.ones((2, 8)), np.zeros((2, 8), np.int32),
                                  bits=np.int64(4), group_size=np.int64(32))
    assert (w.bits, w.group_size) == (4, 32) and type(w.bits) is type(w.group_size) is int
    np.testing.assert_array_equal(np.asarray(w.unpack()), q)


def test_from_ints_takes_torch_tensors_bfloat16_scales_included():
    """A checkpoint read with torch gives bfloat16 scales, which numpy cannot hold: they come
    in through DLPack (as a copy), the int tensors through numpy."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    q, zeros = rng.integers(0, 16, (64, 8)), rng.integers(0, 16, (2, 8))
    scales = torch.tensor(rng.uniform(0.5, 2, (2, 8)), dtype=torch.float32).to(torch.bfloat16)
    want = QuantizedWeight.from_ints(q, jnp.asarray(scales.float().numpy(), jnp.bfloat16),
                                     zeros, bits=4, group_size=32)
    got = QuantizedWeight.from_ints(torch.tensor(q), scales, torch.tensor(zeros), bits=4,
                                    group_size=32)
    scales.zero_()  # a copy: a later in-place change to the tensor does not reach the weight
    assert got.scales.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(want.dequantize()))


@pytest.mark.parametrize("field, value, message", [
    # 17 would carry into the neighbouring slot; -1 would set every slot of its word to 15.
    ("q", 17, r"q must hold integers in \[0, 16\) for bits=4; got values in \[0, 17\]"),
    ("q", -1, r"q must hold integers in \[0, 16\) for bits=4; got values in \[-1, 15\]"),
    ("zeros", 99, r"zeros must hold integers in \[0, 16\] for bits=4 .*got values in \[0, 99\]"),
    ("zeros", -1, r"zeros must hold integers in \[0, 16\]"),
])
def test_from_ints_rejects_integers_outside_their_slots(field, value, message):
    args = dict(q=np.full((64, 4), 15, np.int32), scales=np.ones((2, 4)),
                zeros=np.zeros((2, 4), np.int32), bits=4, group_size=32)
    args["q"][:, 1] = 0
    args[field] = args[field].copy()
    args[field][0, 0] = value
    with pytest.raises(ValueError, match=message):
        QuantizedWeight.from_ints(**args)


def test_from_ints_takes_gptq_v1_zero_of_two_to_the_bits_and_trusts_traced_ints():
    q = np.arange(64 * 4).reshape(64, 4) % 16
    zeros = np.full((2, 4), 16, np.int32)  # a GPTQ v1 checkpoint decodes stored 15 to 16
    w = QuantizedWeight.from_ints(q, np.ones((2, 4)), zeros, bits=4, group_size=32)
    np.testing.assert_array_equal(np.asarray(w.dequantize()), q - 16.0)
    # Under jit the values are unknown: no check (and no concretization error).
    packed = jax.jit(lambda q: QuantizedWeight.from_ints(
        q, jnp.ones((2, 4)), jnp.zeros((2, 4), jnp.int32), bits=4, group_size=32).qweight)(q)
    np.testing.assert_array_equal(np.asarray(unpack_planar(packed, 4)), q)


def test_range_check_runs_in_numpy_on_the_host_and_sees_values_as_given():
    # a jitted min/max compiled per weight shape and moved numpy weights to the device first;
    # the host check makes no device call at all (a jitted one trips the guard)
    q = np.random.default_rng(0).integers(0, 16, (256, 64)).astype(np.int32)
    with jax.transfer_guard("disallow"):
        weight_module.check_int_range("q", q, 16, bits=4)
        with pytest.raises(ValueError, match=r"got values in \[1, 16\]"):
            weight_module.check_int_range("q", np.where(q == 0, 16, q), 16, bits=4)
    # int64 beyond int32 (x64 off): jnp.asarray would wrap 2**32 + 5 to 5 before a device check
    wide = np.full((64, 4), 2 ** 32 + 5, np.int64)
    with pytest.raises(ValueError, match=r"got values in \[4294967301, 4294967301\]"):
        QuantizedWeight.from_ints(wide, np.ones((2, 4)), np.zeros((2, 4), np.int32), bits=4,
                                  group_size=32)


@pytest.mark.parametrize("field, value, dtype", [
    ("q", np.nan, "float32"),  # used to fail in int() with "cannot convert float NaN to integer"
    ("q", -0.5, "float32"),  # used to truncate to 0 and pass
    ("zeros", np.nan, "float32"),
    ("q", True, "bool"),
])
@pytest.mark.parametrize("mixed", [False, True])
def test_from_ints_refuses_non_integer_q_and_zeros(field, value, dtype, mixed):
    arrays = dict(q=np.zeros((128, 8), np.int32), zeros=np.zeros((8, 8), np.int32))
    arrays[field] = np.zeros(arrays[field].shape, dtype)
    arrays[field][0, 0] = value
    with pytest.raises(ValueError, match=f"{field} must be an integer array; got {dtype}"):
        if mixed:
            MixedQuantizedWeight.from_ints(arrays["q"], np.ones((8, 8)), arrays["zeros"],
                                           np.array([1, 0, 0, 0, 0, 0, 0, 0], bool),
                                           group_size=16)
        else:
            QuantizedWeight.from_ints(arrays["q"], np.ones((8, 8)), arrays["zeros"], bits=4,
                                      group_size=16)


def test_check_range_false_trusts_the_integers_and_mixed_parts_are_checked_once(monkeypatch):
    # check_range=False skips the scan (for integers in range by construction)
    q = np.full((64, 4), 3, np.int32)
    w = QuantizedWeight.from_ints(q, np.ones((2, 4)), np.full((2, 4), 5, np.int32), bits=2,
                                  group_size=32, check_range=False)
    np.testing.assert_array_equal(np.asarray(w.unpack()), q)
    with pytest.raises(ValueError, match=r"q must hold integers in \[0, 4\)"):
        QuantizedWeight.from_ints(q + 1, np.ones((2, 4)), np.zeros((2, 4), np.int32), bits=2,
                                  group_size=32)
    # MixedQuantizedWeight checks each part at its width; the parts are not scanned again
    calls = []
    monkeypatch.setattr(weight_module, "check_int_range", lambda *a, **k: calls.append(a[0]))
    random_mixed_weight(128, 8, 16, np.array([1, 0, 0, 0, 0, 0, 0, 0], bool))
    assert calls == []


@pytest.mark.parametrize("field, row, value, message", [
    ("q", 0, 4, r"q rows of the 2-bit groups must hold integers in \[0, 4\); got values in "
                r"\[0, 4\]"),
    ("q", 16, 16, r"q rows of the 4-bit groups must hold integers in \[0, 16\)"),
    ("zeros", 0, 5, r"zeros of the 2-bit groups must hold integers in \[0, 4\]"),
])
def test_mixed_from_ints_rejects_integers_outside_their_groups_width(field, row, value, message):
    high = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)  # rows 16..31 are the 4-bit group
    q, zeros = np.zeros((128, 8), np.int32), np.zeros((8, 8), np.int32)
    {"q": q, "zeros": zeros}[field][row, 0] = value
    with pytest.raises(ValueError, match=message):
        MixedQuantizedWeight.from_ints(q, np.ones((8, 8)), zeros, high, group_size=16)


def test_mixed_from_ints_rejects_group_indices_outside_the_groups():
    """A -1 in g_idx is refused by name (numpy's bincount raised its own error on it)."""
    q, zeros = np.zeros((128, 8), np.int32), np.zeros((8, 8), np.int32)
    g_idx = np.arange(128) // 16
    g_idx[0] = -1
    with pytest.raises(ValueError, match=re.escape("g_idx must hold integer group indices in "
                                                   "[0, 8); got int64 values in [-1, 7]")):
        MixedQuantizedWeight.from_ints(q, np.ones((8, 8)), zeros, np.ones(8, bool),
                                       group_size=16, g_idx=g_idx)


# every backend: "auto" resolves to xla on CPU, and a bad block must not wait for a GPU to fail
@pytest.mark.parametrize("backend", ["auto", "reference", "xla", "pallas", "pallas_tpu"])
@pytest.mark.parametrize("block", [dict(block_m=-8), dict(block_n=-128), dict(block_k=0),
                                   dict(block_m=True), dict(block_k=16.0), dict(block_n="big")])
def test_every_backend_rejects_non_positive_or_non_integer_blocks(backend, block):
    w, _ = random_weight(1024, 128, 4, 128)
    name, value = next(iter(block.items()))
    with pytest.raises(ValueError, match=f"{name} must be None or a positive int; got {value!r}"):
        quant_matmul(jnp.ones((2, 1024)), w, backend=backend, **block)


def test_pallas_takes_numpy_integer_blocks():
    w, _ = random_weight(128, 32, 4, 32)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 128)), jnp.float32)
    got = quant_matmul(x, w, backend="pallas", block_m=np.int64(16), block_n=np.int32(32),
                       block_k=np.int64(16))
    np.testing.assert_allclose(np.asarray(got), np.asarray(quant_matmul(x, w, backend="reference")),
                               rtol=F32_RTOL, atol=F32_ATOL)


def test_pallas_kernel_lowers_to_triton_for_cuda():
    # No GPU here: exporting for the cuda platform runs the Pallas -> Triton IR lowering, which
    # catches shapes and ops Triton rejects (Triton -> PTX compilation still needs a GPU).
    from jax import export

    from kernels_pallas.quant_matmul import pallas_gpu
    w, _ = random_weight(256, 64, 4, 32, desc_act=True)
    x = jnp.ones((5, 256), jnp.bfloat16)
    def fn(x, w):
        return pallas_gpu.quant_matmul(x, w, block_m=16, block_n=64, block_k=16, interpret=False)

    triton = "__gpu$xla.gpu.triton"
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(triton)])(x, w)
    assert triton in exported.mlir_module()


def _custom_call_bodies(lowered, target: str) -> list:
    """The ``backend_config`` dicts of ``lowered``'s custom calls to ``target``."""
    from jax._src.lib.mlir import ir
    bodies = []

    def walk(op):
        for region in op.regions:
            for block in region:
                for inner in block:
                    attrs = inner.attributes
                    if (inner.name == "stablehlo.custom_call"
                            and ir.StringAttr(attrs["call_target_name"]).value == target):
                        bodies.append(attrs)
                    walk(inner)

    walk(lowered.compiler_ir().operation)
    return bodies


def _triton_dot_lines(x, w) -> list[str]:
    """The ``tt.dot`` lines of the Triton module ``pallas_gpu.quant_matmul`` lowers to for cuda.

    Lowering for cuda needs no GPU; the Triton module travels as MLIR bytecode, read back here in
    a context with the Triton dialect."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton.lowering import _new_ir_context

    from kernels_pallas.quant_matmul import pallas_gpu

    def fn(x, w):  # unjitted: traced afresh, so a patched dot_precision is seen
        return pallas_gpu.quant_matmul.__wrapped__(x, w, block_m=16, block_n=64, block_k=16,
                                                   interpret=False)

    with jax.default_matmul_precision("default"):  # as users run it (conftest sets "highest")
        lowered = jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",))
    [config] = _custom_call_bodies(lowered, "__gpu$xla.gpu.triton")
    triton_ir = ir.StringAttr(ir.DictAttr(config["mhlo.backend_config"])["ir"]).value_bytes
    module = str(ir.Module.parse(triton_ir, context=_new_ir_context()))
    return [line for line in module.splitlines() if "tt.dot" in line]


@pytest.mark.parametrize("kernel_precision", ["ours", "default"])
def test_pallas_gpu_dot_is_not_tf32_for_float32_x(monkeypatch, kernel_precision):
    # Triton's default dot rounds float32 inputs to TF32 (10 mantissa bits): |error| ~ 1e-3
    # relative, far outside F32_RTOL, so the GPU kernel would disagree with xla and reference.
    # IEEE, Triton's default attribute, is not printed; the positive control (the same kernel
    # with the dot's precision left at its default) shows what a TF32 dot looks like, so that a
    # renamed attribute cannot let the check pass vacuously. (16-bit x is exact in one pass;
    # Triton ignores the attribute for it.)
    from kernels_pallas.quant_matmul import pallas_gpu
    if kernel_precision == "default":
        monkeypatch.setattr(pallas_gpu, "dot_precision", lambda dtype: None)
    w, _ = random_weight(256, 64, 4, 32)
    dots = _triton_dot_lines(jax.ShapeDtypeStruct((5, 256), jnp.float32), w)
    assert len(dots) == 8  # one per 4-bit slot of the single row block
    tf32 = [line for line in dots if "tf32" in line]
    assert len(tf32) == (8 if kernel_precision == "default" else 0), dots[0]


@pytest.mark.parametrize("dtype, fp32", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_pallas_tpu_dot_runs_full_float32_passes_for_float32_x(dtype, fp32):
    # The Mosaic module travels base64-encoded in tpu_custom_call's config; its precision
    # attribute is stored as text.
    import base64
    import json

    from jax._src.lib.mlir import ir

    from kernels_pallas.quant_matmul import pallas_tpu
    w, _ = random_weight(2048, 256, 4, 128)
    x = jax.ShapeDtypeStruct((1, 2048), dtype)

    def fn(x, w):
        return pallas_tpu.quant_matmul(x, w, block_m=8, block_n=128, block_k=128, interpret=False)

    with jax.default_matmul_precision("default"):  # as users run it (conftest sets "highest")
        lowered = jax.jit(fn).trace(x, w).lower(lowering_platforms=("tpu",))
    [config] = _custom_call_bodies(lowered, "tpu_custom_call")
    body = json.loads(ir.StringAttr(config["backend_config"]).value)["custom_call_config"]["body"]
    assert (b"#tpu.contract_precision<fp32>" in base64.b64decode(body)) == fp32


TPU_CASES = [  # (M, K, N, bits, group_size, desc_act): K / vpw and the group share 128 rows
    (5, 1024, 200, 8, 128, True),  # 2 sequential K steps, odd M and N padded, act-order groups
    (3, 1024, 128, 4, -1, False),  # per channel: one group spans K / vpw
]
# float32 sums of K = 1024 products in another order: |error| ~ sqrt(K) eps sum|x w| ~ 1e-4 here
TPU_ATOL = 1e-4


@pytest.mark.parametrize("m, k, n, bits, group_size, desc_act", TPU_CASES)
def test_tpu_kernel_matches_reference_in_interpret_mode(m, k, n, bits, group_size, desc_act):
    w, _ = random_weight(k, n, bits, group_size, desc_act=desc_act, seed=5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(m, k)), jnp.float32)
    got = quant_matmul(x, w, backend="pallas_tpu")
    np.testing.assert_allclose(np.asarray(got), np.asarray(quant_matmul(x, w, backend="reference")),
                               rtol=F32_RTOL, atol=TPU_ATOL)


def test_tpu_kernel_lowers_to_mosaic_and_rejects_groups_it_cannot_tile():
    """Exporting for TPU runs the Pallas -> Mosaic lowering, which checks the block rules."""
    from jax import export

    from kernels_pallas.quant_matmul import pallas_tpu
    w, _ = random_weight(2048, 256, 4, 128, desc_act=True)
    x = jnp.ones((1, 2048), jnp.bfloat16)  # decode: M = 1 padded to 8

    def fn(x, w):
        return pallas_tpu.quant_matmul(x, w, block_m=8, block_n=128, block_k=128, interpret=False)

    exported = export.export(jax.jit(fn), platforms=["tpu"])(x, w)
    assert "tpu_custom_call" in exported.mlir_module()
    assert pallas_tpu.default_block_k(kw=256, group_size=128) == 128
    assert pallas_tpu.default_block_k(kw=64, group_size=1024) == 64  # the group spans Kw
    assert pallas_tpu.default_block_k(kw=256, group_size=32) is None
    small_groups, _ = random_weight(1024, 32, 4, 32)  # Kw = 128 rows, groups of 32
    with pytest.raises(ValueError, match="share a multiple of 128"):
        quant_matmul(jnp.ones((2, 1024)), small_groups, backend="pallas_tpu")
