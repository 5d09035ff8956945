"""Random quantized weights for the quant_matmul tests, with their integers for an oracle."""

import numpy as np

from kernels_pallas.quant_matmul import MixedQuantizedWeight, QuantizedWeight


def random_weight(k, n, bits, group_size, *, desc_act=False, seed=0):
    rng = np.random.default_rng(seed)
    g = k if group_size == -1 else group_size
    q = rng.integers(0, 2 ** bits, (k, n))
    zeros = rng.integers(0, 2 ** bits, (k // g, n))
    scales = rng.uniform(0.5, 1.5, (k // g, n)).astype(np.float32) / 2 ** bits
    g_idx = np.arange(k) // g
    if desc_act:
        g_idx = g_idx[rng.permutation(k)]
    return QuantizedWeight.from_ints(q, scales, zeros, bits=bits, group_size=group_size,
                                     g_idx=g_idx), (q, scales, zeros, g_idx)


def random_mixed_weight(k, n, group_size, high, *, seed=0):
    """Random mixed weight: groups in ``high`` (bool [groups]) hold 4-bit integers, the rest 2-bit;
    act-order-like scattered groups. Returns the weight and its float64 numpy dequantization."""
    rng = np.random.default_rng(seed)
    groups = k // group_size
    maxq = np.where(high, 16, 4)  # [groups]
    g_idx = (np.arange(k) // group_size)[rng.permutation(k)]
    q = rng.integers(0, maxq[g_idx][:, None], (k, n))
    zeros = rng.integers(0, maxq[:, None], (groups, n))
    scales = rng.uniform(0.5, 1.5, (groups, n)).astype(np.float32) / maxq[:, None]
    w = MixedQuantizedWeight.from_ints(q, scales, zeros, high, group_size=group_size, g_idx=g_idx)
    return w, scales[g_idx].astype(np.float64) * (q - zeros[g_idx])
