"""``QuantizedWeight``: a [K, N] weight stored as packed integers with per-group scales and zeros.

Dequantization: ``W[k, n] = scales[g, n] * (q[k, n] - zeros[g, n])`` with ``g`` the group of input
row ``k``. This is the *kernel-native* layout; the HF GPTQ checkpoint layout lives in
``jaxinfer.checkpoint.gptq_format`` and is converted once at load time.

Layout (why it differs from GPTQ's):

* Rows are stored in *storage order*: sorted by group (``perm``), so that every group is a
  contiguous run of ``group_size`` rows even under act-order (desc_act), as vLLM does at load time.
  Row ``i`` of storage holds original input row ``perm[i]``; the matmul gathers ``x[..., perm]``.
* ``qweight`` int32 ``[K / vpw, N]`` is *planar*: with ``Kw = K / vpw`` (``vpw = 32 // slot_bits``
  values per word), slot ``j`` of word ``(r, n)`` (bits ``[j*slot_bits, (j+1)*slot_bits)``) holds
  storage row ``j * Kw + r``. Extracting one slot from a tile of words thus yields a contiguous
  run of rows, so a kernel needs no in-register interleave and reads contiguous slices of x.
* 3-bit values use 4-bit slots (no memory saving over 4 bits); 2, 4 and 8 bits are dense.
* ``zeros`` are unpacked int32 ``[groups, N]`` (``1/G`` of the weight count; not worth packing
  for the kernels), ``scales`` keep their dtype (float16 from checkpoints, float32 from the
  quantizers) and are applied in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.validation import is_int

SUPPORTED_BITS = (2, 3, 4, 8)


def slot_bits(bits: int) -> int:
    """Bits per storage slot: 3-bit values are stored in 4-bit slots."""
    return 4 if bits == 3 else bits


def values_per_word(bits: int) -> int:
    return 32 // slot_bits(bits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Packed [K, N] weight; see the module docstring for the layout.

    Fields (pytree leaves): qweight int32 [K / vpw, N]; scales float [groups, N];
    zeros int32 [groups, N]; perm int32 [K] or None (None: storage order is the original order).
    Static metadata: bits, group_size (the resolved group size; K for per-channel), shape (K, N).
    """

    qweight: jax.Array
    scales: jax.Array
    zeros: jax.Array
    perm: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def in_features(self) -> int:
        return self.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[1]

    @property
    def num_groups(self) -> int:
        return self.shape[0] // self.group_size

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight as an HF GPTQ checkpoint holds them: the ``bits``-bit integer
        plus, per group and output column, a float16 scale and a ``bits``-bit zero. Not counted:
        the act-order row index (int32 [K], like GPTQ's ``g_idx``: ``32 / N`` bits per weight)."""
        return self.bits + (16 + self.bits) / self.group_size

    @property
    def g_idx(self) -> jax.Array:
        """int32 [K]: the group of each ORIGINAL input row (GPTQ's ``g_idx``)."""
        k = self.shape[0]
        sorted_groups = jnp.arange(k, dtype=jnp.int32) // self.group_size
        if self.perm is None:
            return sorted_groups
        return jnp.zeros((k,), jnp.int32).at[self.perm].set(sorted_groups)

    @classmethod
    def from_ints(cls, q, scales, zeros, *, bits: int, group_size: int, g_idx=None,
                  check_range: bool = True):
        """Build from unpacked integers in ORIGINAL row order.

        Args:
          q: int [K, N] (an integer dtype), values in [0, 2**bits).
          scales: float [groups, N]. zeros: int [groups, N] (an integer dtype), values in
            [0, 2**bits] (GPTQ v2 and the quantizers give [0, 2**bits); a GPTQ v1 checkpoint
            stores zero - 1 and so decodes to [1, 2**bits]).
          bits: 2, 3, 4 or 8. group_size: rows per group; -1 means per channel (one group of K).
          g_idx: int [K] group of each row, or None for ``k // group_size``. After a stable sort
            by group every group must be exactly ``group_size`` consecutive rows (true of GPTQ,
            with or without act-order).
          check_range: range-check concrete q and zeros (on the host, in numpy). Pass False
            only for integers in range by construction (bit fields unpacked under a mask, parts
            a caller has checked already): the check reads the whole of q once.

        q and zeros must have an integer dtype (a float would be truncated, a NaN has no
        integer). Out-of-range q would spill into the neighbouring slots of its packed word
        (corrupting other rows), so concrete q and zeros are range-checked unless
        ``check_range=False``; traced ones (under jit) are trusted.
        """
        q, zeros = _as_array(q), _as_array(zeros)
        check_int_dtype("q", q)
        check_int_dtype("zeros", zeros)
        check_quant_params(q.shape, bits, group_size)
        bits, group_size = int(bits), int(group_size)  # static metadata: plain ints
        k, n = q.shape
        g = k if group_size == -1 else group_size
        groups = k // g
        scales = _as_array(scales)
        if not jnp.issubdtype(scales.dtype, jnp.floating):  # an int scale would truncate
            raise ValueError(f"scales must be a float array; got {scales.dtype}")
        scales = jnp.asarray(scales)
        if scales.shape != (groups, n) or zeros.shape != (groups, n):
            raise ValueError(f"scales and zeros must be [groups, N] = [{groups}, {n}]; got scales "
                             f"{list(scales.shape)} and zeros {list(zeros.shape)}")
        if check_range:  # before jnp.asarray: the host sees the values as given (no int32 wrap)
            check_int_range("q", q, 2 ** bits, bits=bits)
            check_int_range("zeros", zeros, 2 ** bits, bits=bits, inclusive=True,
                            note=" (GPTQ v2 stores [0, 2**bits); v1 decodes to [1, 2**bits])")
        q, zeros = jnp.asarray(q), jnp.asarray(zeros)
        perm = None
        if g_idx is not None:  # host-side: g_idx must be concrete (not traced)
            g_idx = _as_array(g_idx)
            check_int_dtype("g_idx", g_idx)
            if g_idx.shape != (k,):
                raise ValueError(f"g_idx must be [K] = [{k}]; got {list(g_idx.shape)}")
            lo, hi = int(np.min(g_idx)), int(np.max(g_idx))  # before bincount, which clips
            if lo < 0 or hi >= groups:
                raise ValueError(f"g_idx must hold group indices in [0, {groups}) (K / "
                                 f"group_size = {k} / {g}); got values in [{lo}, {hi}]")
            g_idx = jnp.asarray(g_idx).astype(jnp.int32)
            order = jnp.argsort(g_idx, stable=True).astype(jnp.int32)
            if not bool(jnp.array_equal(g_idx[order], jnp.arange(k) // g)):
                sizes = jnp.bincount(g_idx, length=groups)
                raise ValueError(f"g_idx must assign exactly group_size={g} rows to each of the "
                                 f"{groups} groups; got group sizes {sizes.tolist()[:8]}...")
            if not bool(jnp.array_equal(order, jnp.arange(k))):
                perm = order
                q = q[perm]
        return cls(qweight=pack_planar(q, bits), scales=scales,
                   zeros=zeros.astype(jnp.int32), perm=perm, bits=bits, group_size=g,
                   shape=(k, n))

    def unpack_storage(self) -> jax.Array:
        """int32 [K, N] integers in storage (group-sorted) order."""
        return unpack_planar(self.qweight, self.bits)

    def unpack(self) -> jax.Array:
        """int32 [K, N] integers in original row order."""
        q = self.unpack_storage()
        if self.perm is None:
            return q
        return jnp.zeros_like(q).at[self.perm].set(q)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[K, N] weight in original row order, computed in float32 and cast to ``dtype``."""
        return _dequantize(self, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(w: QuantizedWeight, dtype) -> jax.Array:
    q = w.unpack_storage()  # [K, N] storage order
    groups = jnp.arange(w.shape[0]) // w.group_size
    out = (q - w.zeros[groups]).astype(jnp.float32) * w.scales[groups].astype(jnp.float32)
    if w.perm is not None:
        out = jnp.zeros_like(out).at[w.perm].set(out)
    return out.astype(dtype)


def _as_array(x):
    """x as an array with a dtype: a jax or numpy array (a tracer included) as it is, anything
    else (a list, a torch tensor) through numpy, or, for a dtype numpy lacks (a torch bfloat16
    tensor), through DLPack: copied, so that an in-place change to x later leaves it alone."""
    if isinstance(x, (jax.Array, np.ndarray)):
        return x
    try:
        return np.asarray(x)
    except TypeError:
        if not hasattr(x, "__dlpack__"):
            raise
        # from_dlpack(copy=True) still aliases a CPU tensor's memory here (jax 0.10.2)
        return jnp.array(jnp.from_dlpack(x), copy=True)


def check_int_dtype(name: str, x) -> None:
    """Refuse an array ``x`` (a tracer included) whose dtype is not an integer type: a
    ValueError, as every op's wrong dtype (``kernels_pallas.validation``)."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array; got {x.dtype}")


def check_int_range(name: str, x, high: int, *, bits: int, inclusive: bool = False,
                    note: str = "") -> None:
    """Refuse a concrete integer array ``x`` with values outside [0, high) (or [0, high] if
    ``inclusive``); a traced one (under jit) is trusted.

    Host-side numpy (one read of x; a jax array is copied to the host): a jitted min/max would
    compile once per shape and cost more than the scan it replaces."""
    if isinstance(x, jax.core.Tracer):
        return
    x = np.asarray(x)
    if not x.size:
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > high or (hi == high and not inclusive):
        interval = f"[0, {high}]" if inclusive else f"[0, {high})"
        raise ValueError(f"{name} must hold integers in {interval} for bits={bits}{note}; got "
                         f"values in [{lo}, {hi}]")


def check_quant_params(shape, bits, group_size) -> None:
    """Validate a [K, N] shape against bits and group size, each a Python or numpy int (public
    boundaries call this)."""
    if not is_int(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits!r}")
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D [K, N]; got shape {list(shape)}")
    k, n = shape
    if k == 0 or n == 0:
        raise ValueError(f"weight must have K >= 1 (in_features) and N >= 1 (out_features); "
                         f"got shape {list(shape)}")
    if not is_int(group_size) or (group_size != -1 and group_size <= 0):
        raise ValueError(
            f"group_size must be a positive int or -1 (per channel); got {group_size!r}")
    if group_size != -1 and k % group_size:
        raise ValueError(f"group_size must divide K (in_features); got group_size={group_size} "
                         f"and K={k}")
    vpw = values_per_word(bits)
    if k % vpw:
        raise ValueError(f"K (in_features) must be a multiple of {vpw} for {bits}-bit packing; "
                         f"got K={k}")


@functools.partial(jax.jit, static_argnames="bits")
def pack_planar(q: jax.Array, bits: int) -> jax.Array:
    """int [K, N] -> int32 [K / vpw, N]: slot j of word (r, n) holds q[j * K/vpw + r, n]."""
    sb, vpw = slot_bits(bits), values_per_word(bits)
    k, n = q.shape
    slabs = q.astype(jnp.uint32).reshape(vpw, k // vpw, n)  # [vpw, Kw, N]
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * sb)[:, None, None]
    words = jnp.sum(slabs << shifts, axis=0, dtype=jnp.uint32)  # slots are disjoint: sum == OR
    return jax.lax.bitcast_convert_type(words, jnp.int32)


@functools.partial(jax.jit, static_argnames="bits")
def unpack_planar(qweight: jax.Array, bits: int) -> jax.Array:
    """int32 [K / vpw, N] -> int32 [K, N] (inverse of ``pack_planar``)."""
    sb, vpw = slot_bits(bits), values_per_word(bits)
    words = jax.lax.bitcast_convert_type(qweight, jnp.uint32)
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * sb)[:, None, None]
    slabs = (words[None] >> shifts) & jnp.uint32((1 << sb) - 1)  # [vpw, Kw, N]
    return slabs.reshape(-1, qweight.shape[1]).astype(jnp.int32)


def dot_precision(dtype) -> jax.lax.Precision | None:
    """The kernels' in-tile dot precision for x of ``dtype``: HIGHEST for float32 (Triton's IEEE
    input precision, Mosaic's fp32 contract precision; Triton's default is TF32, which rounds x
    to 10 mantissa bits), the default for 16-bit x (exact in one pass against the small
    integers ``q - z``)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def tiled_operands(x: jax.Array, w: QuantizedWeight, block_m: int, block_n: int):
    """The kernels' operands: x [M, K] in storage order with M padded to block_m, and qweight,
    scales, zeros with N padded to block_n (zero scales: padded columns contribute nothing and
    are sliced off). Returns (x [M_pad, K], qweight, scales, zeros)."""
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1, unique_indices=True)
    m, n = x.shape[0], w.shape[1]
    x = jnp.pad(x, ((0, -m % block_m), (0, 0)))
    pad = ((0, 0), (0, -n % block_n))
    return x, jnp.pad(w.qweight, pad), jnp.pad(w.scales, pad), jnp.pad(w.zeros, pad)
