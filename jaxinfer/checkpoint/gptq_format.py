"""HF GPTQ checkpoint tensors (AutoGPTQ / GPTQModel / transformers "gptq") <-> ``QuantizedWeight``.

Per linear layer with K = in_features, N = out_features, b = bits, G = group_size (-1 -> K):

* ``qweight`` int32 [K*b/32, N], packed along K as one LSB-first bit stream per column: value
  ``q[k, n]`` occupies stream bits ``[k*b, k*b + b)`` and word ``r`` holds stream bits
  ``[32r, 32r + 32)``. For b = 2, 4, 8 that is "word r holds q[r*32/b + j] in bits [bj, bj+b)";
  for b = 3 values straddle words (32 values per 3 words), exactly as AutoGPTQ packs them.
* ``qzeros`` int32 [K/G, N*b/32], packed along N the same way.
* ``scales`` float16 [K/G, N]; ``g_idx`` int32 [K] (group of each input row; non-monotone under
  desc_act without static groups).
* ``checkpoint_format`` "gptq" (v1) stores ``zero - 1``; "gptq_v2" stores the zero itself. v1
  cannot represent zero 0 (AutoGPTQ's writer lets the -1 spill into the neighbouring values), so
  writing v1 with a zero of 0 raises; reading v1 decodes ``stored + 1`` (up to 2**b, which v2
  cannot store: writing v2 with it raises).

Packing is numpy on the host: it runs once per tensor at load or save time.
"""

from __future__ import annotations

import numpy as np

from kernels_pallas.quant_matmul import SUPPORTED_BITS, QuantizedWeight

FORMATS = ("gptq", "gptq_v2")


def _check_bits(bits):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits!r}")


def _check_format(checkpoint_format):
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}; got {checkpoint_format!r}")


def pack_rows(q, bits: int) -> np.ndarray:
    """int [R, C] with values in [0, 2**bits) -> int32 [R*bits/32, C], bit stream along R."""
    _check_bits(bits)
    q = np.asarray(q)
    r, c = q.shape
    if (r * bits) % 32:
        raise ValueError(f"the packed axis length times bits must be a multiple of 32; got "
                         f"length {r} and bits={bits}")
    if q.size and (q.min() < 0 or q.max() >= 2 ** bits):
        raise ValueError(f"values must lie in [0, {2 ** bits}) for {bits}-bit packing; got "
                         f"[{q.min()}, {q.max()}]")
    # A run of 32 values fills exactly `bits` words, so pack per run of 32 values (zero-padding
    # the last run; its padding words are dropped again).
    vals = np.pad(q.astype(np.uint64), ((0, -r % 32), (0, 0))).reshape(-1, 32, c)  # [runs, 32, C]
    words = np.zeros((vals.shape[0], bits, c), np.uint64)  # [runs, bits, C]
    for t in range(32):
        offset = t * bits
        word, shift = divmod(offset, 32)
        words[:, word] |= (vals[:, t] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # straddles into the next word (3-bit)
            words[:, word + 1] |= vals[:, t] >> np.uint64(32 - shift)
    return words.reshape(-1, c)[:r * bits // 32].astype(np.uint32).view(np.int32)


def unpack_rows(packed, bits: int) -> np.ndarray:
    """int32 [R*bits/32, C] -> int32 [R, C] (inverse of ``pack_rows``; logical shifts)."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.int32 or packed.ndim != 2 or (packed.shape[0] * 32) % bits:
        raise ValueError(f"packed must be int32 [R*bits/32, C] (rows*32 a multiple of bits="
                         f"{bits}); got {packed.dtype} {list(packed.shape)}")
    n_words, c = packed.shape
    words = packed.view(np.uint32).astype(np.uint64)
    words = np.pad(words, ((0, -n_words % bits), (0, 0))).reshape(-1, bits, c)  # [runs, bits, C]
    mask = np.uint64(2 ** bits - 1)
    vals = np.zeros((words.shape[0], 32, c), np.uint64)
    for t in range(32):
        word, shift = divmod(t * bits, 32)
        v = words[:, word] >> np.uint64(shift)
        if shift + bits > 32:
            v |= words[:, word + 1] << np.uint64(32 - shift)
        vals[:, t] = v & mask
    return vals.reshape(-1, c)[:n_words * 32 // bits].astype(np.int32)


def pack_cols(q, bits: int) -> np.ndarray:
    """int [R, C] -> int32 [R, C*bits/32], bit stream along C (qzeros)."""
    return np.ascontiguousarray(pack_rows(np.asarray(q).T, bits).T)


def unpack_cols(packed, bits: int) -> np.ndarray:
    return np.ascontiguousarray(unpack_rows(np.ascontiguousarray(np.asarray(packed).T), bits).T)


def to_gptq_tensors(w: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """``QuantizedWeight`` -> {"qweight", "qzeros", "scales" (float16), "g_idx"} numpy arrays."""
    _check_format(checkpoint_format)
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"w must be a QuantizedWeight; got {type(w).__name__}")
    zeros = np.asarray(w.zeros).astype(np.int64)
    if checkpoint_format == "gptq":
        if zeros.size and zeros.min() < 1:
            raise ValueError("checkpoint_format 'gptq' (v1) stores zero - 1 and cannot represent "
                             "a zero point of 0; write checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    elif zeros.size and zeros.max() >= 2 ** w.bits:
        raise ValueError(f"checkpoint_format 'gptq_v2' stores the zero point in {w.bits} bits and "
                         f"cannot represent a zero point of {2 ** w.bits} (read from a v1 "
                         f"checkpoint, which stores zero - 1); write checkpoint_format='gptq'")
    return {
        "qweight": pack_rows(np.asarray(w.unpack()), w.bits),
        "qzeros": pack_cols(zeros, w.bits),
        "scales": np.asarray(w.scales).astype(np.float16),
        "g_idx": np.asarray(w.g_idx).astype(np.int32),
    }


def from_gptq_tensors(qweight, qzeros, scales, g_idx=None, *, bits: int, group_size: int,
                      checkpoint_format: str = "gptq") -> QuantizedWeight:
    """HF GPTQ tensors of one layer -> ``QuantizedWeight`` (repacked to the kernel layout).

    ``g_idx`` None means ``k // group_size``. ``group_size`` -1 means one group of K rows.
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    qweight, qzeros, scales = np.asarray(qweight), np.asarray(qzeros), np.asarray(scales)
    q = unpack_rows(qweight, bits)  # [K, N]
    k, n = q.shape
    groups = 1 if group_size == -1 else k // group_size
    if scales.shape != (groups, n):
        raise ValueError(f"scales must be [groups, N] = [{groups}, {n}] for K={k}, "
                         f"group_size={group_size}; got {list(scales.shape)}")
    if qzeros.shape != (groups, n * bits // 32):
        raise ValueError(f"qzeros must be [groups, N*bits/32] = [{groups}, {n * bits // 32}]; "
                         f"got {list(qzeros.shape)}")
    zeros = unpack_cols(qzeros, bits)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    if g_idx is not None:
        g_idx = np.asarray(g_idx)
        if np.array_equal(g_idx, np.arange(k) // (k // groups)):
            g_idx = None
    # q and zeros were unpacked under a `bits` mask (v1 zeros + 1: at most 2**bits), so they
    # are in range by construction: skip from_ints' scan of the whole weight.
    return QuantizedWeight.from_ints(q, scales, zeros, bits=bits, group_size=group_size,
                                     g_idx=g_idx, check_range=False)
