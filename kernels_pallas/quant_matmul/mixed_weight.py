"""``MixedQuantizedWeight``: a [K, N] weight whose row groups are stored at 4 or 2 bits.

Mixed 2/4-bit quantization (Li et al., "Fast 2-bit LLM on GPUs", arXiv 2311.16442) keeps the few
most sensitive groups (runs of ``group_size`` input rows) at 4 bits and the rest at 2 bits.

Layout (why): the 4-bit groups' rows and the 2-bit groups' rows are two ordinary, dense
``QuantizedWeight`` parts, ``high`` [K_high, N] and ``low`` [K_low, N], each packed in whole int32
words of its own width (K_high a multiple of 8, K_low of 16), so every load of either part is a
full aligned word and every ``quant_matmul`` backend (the Pallas kernel included) runs on each
part unchanged. Storage order is the high part's rows, then the low part's; ``perm`` [K] maps
storage row ``i`` to its original input row, so ``x @ W == x[..., perm[:K_high]] @ high +
x[..., perm[K_high:]] @ low``: one gather of x, then two quantized matmuls. The parts' own
``perm`` is None (any act-order is folded into the mixed ``perm``). A part with no groups is None.
The Pallas kernel on GPU further needs each part's word rows (K_part / vpw) and the group size to
share a power-of-two divisor >= 16 (e.g. groups of 128 and an even number of 2-bit groups);
``quant_matmul`` says so when a part misses it (the xla backend takes any part).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.quant_matmul.weight import QuantizedWeight, check_int_dtype

MIXED_BITS = (2, 4)  # (low, high): the bit widths of a mixed weight's two parts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixedQuantizedWeight:
    """[K, N] weight with 4-bit and 2-bit row groups; see the module docstring for the layout.

    Fields (pytree leaves): high, low: ``QuantizedWeight`` [K_high, N] (4-bit) and [K_low, N]
    (2-bit) or None when empty; perm int32 [K]: storage row i (high rows, then low rows) holds
    original input row perm[i]. Static: shape (K, N).
    """

    high: QuantizedWeight | None
    low: QuantizedWeight | None
    perm: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def parts(self) -> tuple[QuantizedWeight, ...]:
        """The non-empty parts in storage order (high, then low)."""
        return tuple(p for p in (self.high, self.low) if p is not None)

    @property
    def in_features(self) -> int:
        return self.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[1]

    @property
    def group_size(self) -> int:
        return self.parts[0].group_size

    @property
    def num_groups(self) -> int:
        return self.shape[0] // self.group_size

    @property
    def high_fraction(self) -> float:
        """Fraction of the groups stored at 4 bits."""
        return 0.0 if self.high is None else self.high.num_groups / self.num_groups

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per weight: each part's ``QuantizedWeight.bits_per_weight`` (integer
        plus float16 scale and packed zero per group and column) weighted by its rows. Not counted:
        ``perm`` (int32 [K], ``32 / N`` bits per weight, like GPTQ's ``g_idx``)."""
        return sum(p.bits_per_weight * p.shape[0] for p in self.parts) / self.shape[0]

    @classmethod
    def from_ints(cls, q, scales, zeros, high, *, group_size: int,
                  g_idx=None) -> "MixedQuantizedWeight":
        """Build from unpacked integers in ORIGINAL row order (host-side: inputs are concrete).

        Args:
          q: int [K, N] (an integer dtype); rows of 4-bit groups in [0, 16), of 2-bit groups in
            [0, 4).
          scales: float [groups, N]. zeros: int [groups, N]; of 4-bit groups in [0, 16], of
            2-bit groups in [0, 4].
          high: bool [groups]: which groups are 4-bit.
          group_size: rows per group (a positive divisor of K; no per-channel form).
          g_idx: int [K] group of each row, or None for ``k // group_size``; every group must
            have exactly ``group_size`` rows (true of GPTQ, with or without act-order).
        """
        # Host-side row selection in numpy: no device op compiled per part shape.
        q, scales, zeros = np.asarray(q), np.asarray(scales), np.asarray(zeros)
        check_int_dtype("q", q)
        check_int_dtype("zeros", zeros)
        k, n = q.shape
        groups = k // group_size
        high = np.asarray(high, bool)
        if high.shape != (groups,):
            raise ValueError(f"high must be a bool mask [groups] = [{groups}]; got "
                             f"{list(high.shape)}")
        g_idx = np.arange(k) // group_size if g_idx is None else np.asarray(g_idx)
        if g_idx.size and (not np.issubdtype(g_idx.dtype, np.integer) or g_idx.min() < 0
                           or g_idx.max() >= groups):  # bincount refuses or counts them
            raise ValueError(f"g_idx must hold integer group indices in [0, {groups}); got "
                             f"{g_idx.dtype} values in [{g_idx.min()}, {g_idx.max()}]")
        sizes = np.bincount(g_idx, minlength=groups)
        if g_idx.shape != (k,) or sizes.shape != (groups,) or (sizes != group_size).any():
            raise ValueError(f"g_idx must be [K] = [{k}] assigning exactly group_size="
                             f"{group_size} rows to each of the {groups} groups; got shape "
                             f"{list(g_idx.shape)} and group sizes {sizes.tolist()[:8]}...")
        order = np.argsort(g_idx, kind="stable")  # group-sorted rows
        row_high = high[g_idx[order]]
        low_bits, high_bits = MIXED_BITS

        def part(rows, mask, bits):
            if not mask.any():
                return None
            # _check_part_range below has checked these rows and zeros at their width
            return QuantizedWeight.from_ints(q[rows], scales[mask], zeros[mask], bits=bits,
                                             group_size=group_size, check_range=False)

        high_rows, low_rows = order[row_high], order[~row_high]
        for bits, rows, mask in ((high_bits, high_rows, high), (low_bits, low_rows, ~high)):
            _check_part_range(bits, q[rows], zeros[mask])
        return cls(high=part(high_rows, high, high_bits), low=part(low_rows, ~high, low_bits),
                   perm=jnp.asarray(np.concatenate([high_rows, low_rows]), jnp.int32),
                   shape=(k, n))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[K, N] weight in original row order, computed in float32 and cast to ``dtype``."""
        return _dequantize(self, jnp.dtype(dtype))


def _check_part_range(bits: int, q: np.ndarray, zeros: np.ndarray) -> None:
    """The rows and zeros of the ``bits``-bit groups must fit their slots: q in [0, 2**bits),
    zeros in [0, 2**bits] (as ``QuantizedWeight.from_ints`` takes them)."""
    if q.size and (q.min() < 0 or q.max() >= 2 ** bits):
        raise ValueError(f"q rows of the {bits}-bit groups must hold integers in [0, {2 ** bits});"
                         f" got values in [{q.min()}, {q.max()}]")
    if zeros.size and (zeros.min() < 0 or zeros.max() > 2 ** bits):
        raise ValueError(f"zeros of the {bits}-bit groups must hold integers in [0, {2 ** bits}] "
                         f"(GPTQ v2 stores [0, 2**bits); v1 decodes to [1, 2**bits]); got values "
                         f"in [{zeros.min()}, {zeros.max()}]")


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(w: MixedQuantizedWeight, dtype) -> jax.Array:
    stored = jnp.concatenate([p.dequantize(jnp.float32) for p in w.parts])  # [K, N] storage
    return jnp.zeros_like(stored).at[w.perm].set(stored).astype(dtype)
