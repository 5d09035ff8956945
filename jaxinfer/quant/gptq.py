"""GPTQ (Frantar et al., ICLR 2023): one-shot second-order quantization of one linear layer.

Minimizes ``||X W - X W_hat||^2`` for a weight W [K, N] (Linear kernel layout [in, out]; the
paper's W is its transpose) given the layer Hessian ``H = 2 X^T X`` [K, K]. Input rows are
quantized one at a time in (optionally act-ordered) sequence; each row's rounding error is spread
over the not-yet-quantized rows through the upper Cholesky factor U of ``H^-1``:

1. dead inputs (H_ii = 0): H_ii = 1 and W[i] = 0;
2. act-order: perm = argsort(diag H, descending); permute W's rows and H;
3. relative dampening: H += damp * mean(diag H) * I;
4. U = upper Cholesky factor of H^-1 (row i / U_ii is row i's error-propagation vector). When the
   dampened H is not positive definite (fewer calibration tokens than inputs with damp = 0, say)
   the factor holds NaN, or factors on a pivot of rounding noise, and every weight after it is
   garbage (worse than rounding): that raises a ValueError asking for
   a larger damp, as AutoGPTQ does, rather than retrying with more dampening behind the caller's
   back (GPTQModel's choice), which would change the result the caller asked for;
5. blocks of ``block_size`` rows: within a block each row is quantized, ``e = (w - q) / U_ii``
   and the block's later rows get ``-= U[i, :] e``; after the block (lazy batch update) all
   later rows get ``-= U[block, :]^T E``;
6. grids: per channel (fit once up front), static groups (fit up front in original order,
   g_idx = k // G), or dynamic groups fit on the current error-updated rows when a group starts,
   consecutive in the permuted order (g_idx[perm[p]] = p // G). A group starting inside a block
   is fit on rows that include the block's earlier updates; AutoGPTQ fits it on its ``W``, which
   gets them only at the block's end. The integers match AutoGPTQ's (up to float rounding) when
   every group starts at a block start: per channel, static groups, or group_size a multiple of
   AutoGPTQ's block size (128).

Mixed 2/4-bit: each group is quantized on its own grid, so a per-group width is all it takes (the
grid of a 4-bit group has 16 levels, of a 2-bit group 4); the error feedback is unchanged.

Everything runs inside one ``jax.jit`` in float32 (fori_loops over blocks and rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfer.config_checks import is_int, is_real
from jaxinfer.quant.grid import check_finite_weight, fit_grid, fit_group_grids, quantize_to_grid
from jaxinfer.quant.mixed import check_mixed_args, group_bit_widths, packed_weight, packing_bits
from kernels_pallas.quant_matmul import MixedQuantizedWeight, QuantizedWeight, check_quant_params

_HI = lax.Precision.HIGHEST


def _effective_block(block_size: int, g: int, dynamic_groups: bool) -> int:
    """Dynamic groups must start inside a block and fit in it: block a multiple of G."""
    if not dynamic_groups:
        return block_size
    return g if g >= block_size else (block_size // g) * g


def _inverse_hessian_factor(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Upper U with U^T U = H^-1, for symmetric positive definite H [K, K], and whether H is
    numerically positive definite: every Cholesky pivot above K * eps of its own diagonal entry,
    L_ii^2 > K * eps * H_ii.

    L_ii^2 / H_ii is the part of input i's energy that the inputs before it do not explain; it
    does not change when an input is rescaled, so inputs of very different scales (outlier
    channels) are judged alike. A rank-deficient H (fewer tokens than inputs, no dampening)
    can still factor in float32, on a pivot made of rounding noise: measured <= 2.5e-5 of its
    diagonal (K = 64..1024, with and without act-order) against >= 1.9e-3 with only 8 tokens
    more than inputs. Its inverse then amplifies that noise and GPTQ does worse than rounding,
    so it counts as singular."""
    k = h.shape[0]
    eye = jnp.eye(k, dtype=h.dtype)
    chol = jnp.linalg.cholesky(h)
    chol_inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    h_inv = jnp.dot(chol_inv.T, chol_inv, precision=_HI)
    explained_floor = k * jnp.finfo(h.dtype).eps
    unexplained = jnp.diag(chol) ** 2 / jnp.diag(h)  # [K]; NaN where the factorization failed
    return jnp.linalg.cholesky(h_inv).T, jnp.min(unexplained) > explained_floor


def _act_order_perm(h, xp=jnp):
    """int [K]: rows of h [K, K] by decreasing Hessian diagonal (dead inputs count as 1, as step 1
    sets). ``xp`` is jnp inside the jitted GPTQ, numpy for the host-side group choice."""
    d = xp.diag(h)
    return xp.argsort(-xp.where(d == 0, 1.0, d), stable=True)


@functools.partial(jax.jit, static_argnames=("group_size", "block_size", "static_groups"))
def _gptq(w, h, damp, group_bits, sym, act_order, *, group_size, block_size, static_groups):
    # group_bits f32 [groups]: each group's width (groups in g_idx numbering).
    k, n = w.shape
    g = k if group_size == -1 else group_size
    n_groups = k // g
    dynamic = group_size != -1 and not static_groups
    bs = _effective_block(block_size, g, dynamic)
    kp = -(-k // bs) * bs

    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    if not dynamic:  # grids fit up front, original row order
        fixed_scales, fixed_zeros = fit_group_grids(w, group_bits, group_size, sym)  # [groups, N]
    perm = jnp.where(act_order, _act_order_perm(h), jnp.arange(k))
    w = w[perm]
    h = h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
    u, well_posed = _inverse_hessian_factor(h)  # [K, K] upper

    # Pad to whole blocks: padded rows are zero weights with an identity factor, so they quantize
    # exactly (zero is on every grid) and propagate nothing.
    w = jnp.pad(w, ((0, kp - k), (0, 0)))
    u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
        jnp.concatenate([jnp.zeros((k,)), jnp.ones((kp - k,))]))
    # Group of each permuted position, for grids fit up front.
    pos_group = jnp.pad(perm // g, (0, kp - k), mode="edge")

    def quantize_block(b, carry):
        w, q_all, scales, zeros = carry
        i1 = b * bs
        w1 = lax.dynamic_slice(w, (i1, 0), (bs, n))  # [bs, N]
        u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))  # [bs, bs]

        def quantize_row(i, c):
            w1, q1, err1, scale, zero, scales, zeros = c
            gi = (i1 + i) // g if dynamic else pos_group[i1 + i]
            bits = group_bits[gi]  # padded rows index past the end: clamped, and they are zero
            if dynamic:  # on w1, this block's updated rows (AutoGPTQ: stale W; see step 6)
                def refit(_):
                    s, z = fit_grid(lax.dynamic_slice(w1, (i, 0), (g, n)), bits, sym)
                    return s, z, scales.at[gi].set(s), zeros.at[gi].set(z)
                scale, zero, scales, zeros = lax.cond(
                    i % g == 0, refit, lambda _: (scale, zero, scales, zeros), None)
            else:
                scale, zero = fixed_scales[gi], fixed_zeros[gi]
            row = w1[i]  # [N]
            q = quantize_to_grid(row, scale, zero, bits)
            err = (row - scale * (q - zero)) / u1[i, i]
            w1 = w1 - u1[i][:, None] * err[None, :]  # U is upper: rows < i untouched
            return (w1, q1.at[i].set(q), err1.at[i].set(err), scale, zero, scales, zeros)

        init = (w1, jnp.zeros((bs, n), jnp.float32), jnp.zeros((bs, n), jnp.float32),
                jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32), scales, zeros)
        _, q1, err1, _, _, scales, zeros = lax.fori_loop(0, bs, quantize_row, init)
        q_all = lax.dynamic_update_slice(q_all, q1, (i1, 0))
        # Lazy batch update of all later rows (rows of this block are final in q1 already).
        u_rows = lax.dynamic_slice(u, (i1, 0), (bs, kp))  # [bs, Kp]
        w = w - jnp.dot(u_rows.T, err1, precision=_HI)
        return w, q_all, scales, zeros

    groups_p = kp // g if dynamic else 1
    carry = (w, jnp.zeros((kp, n), jnp.float32), jnp.ones((groups_p, n), jnp.float32),
             jnp.zeros((groups_p, n), jnp.float32))
    w_final, q_perm, scales, zeros = lax.fori_loop(0, kp // bs, quantize_block, carry)
    # False when H is numerically singular or the factor or the error feedback went non-finite:
    # the integers are then garbage (NaN), or worse than rounding (a noise pivot).
    finite = well_posed & jnp.isfinite(u).all() & jnp.isfinite(w_final).all()

    q = jnp.zeros((k, n), jnp.int32).at[perm].set(q_perm[:k].astype(jnp.int32))
    if dynamic:
        scales, zeros = scales[:n_groups], zeros[:n_groups]
        g_idx = jnp.zeros((k,), jnp.int32).at[perm].set(jnp.arange(k, dtype=jnp.int32) // g)
    else:
        scales, zeros = fixed_scales, fixed_zeros
        g_idx = jnp.arange(k, dtype=jnp.int32) // g
    return q, scales, zeros.astype(jnp.int32), g_idx, finite


def check_damp(damp) -> float:
    """GPTQ's relative dampening as a float: a finite real number >= 0, given as a Python or
    NumPy number or a 0-d real array (``jnp.float32(0.01)``, ``np.array(0.01)``); bools,
    strings, complex numbers and arrays with axes raise, as does a NaN or an infinity (which
    would read as a singular Hessian)."""
    value = None
    if is_real(damp):
        value = float(damp)
    elif not isinstance(damp, (str, bytes)) and np.ndim(damp) == 0:  # a jax, NumPy or torch one
        try:
            dtype = np.asarray(damp).dtype
        except (TypeError, ValueError, RuntimeError):
            dtype = None
        if dtype is not None and (jnp.issubdtype(dtype, jnp.integer)  # bool is neither
                                  or jnp.issubdtype(dtype, jnp.floating)):
            value = float(damp)
    if value is None or not 0 <= value < float("inf"):
        raise ValueError(f"damp must be a finite number >= 0; got {damp!r}")
    return value


def gptq_quantize_layer(w, hessian, bits: int | tuple[int, int] = 4, group_size: int = 128,
                        sym: bool = True, act_order: bool = False, damp: float = 0.01,
                        block_size: int = 128, static_groups: bool = False, *,
                        high_fraction: float | None = None,
                        criterion: str | None = None) -> QuantizedWeight | MixedQuantizedWeight:
    """GPTQ-quantize one weight.

    Args:
      w: [K, N] float weight (Linear kernel layout: [in, out]).
      hessian: [K, K] from ``hessian_from_activations`` / ``accumulate_hessian`` on the layer's
        inputs (any positive scale).
      bits: 2, 3, 4 or 8; or the pair (2, 4) for mixed 2/4-bit groups (``jaxinfer.quant.mixed``):
        each group is quantized on its own grid at its own width.
      group_size: rows per group, -1 for per channel (not with mixed bits); must divide K.
      sym: symmetric grid (zero at the middle) or asymmetric.
      act_order: quantize rows in order of decreasing Hessian diagonal (GPTQ's desc_act).
      damp: relative dampening, a fraction of mean(diag H), finite and >= 0 (a number or a
        0-d real array, see `check_damp`). A Hessian that stays singular after dampening
        raises ValueError, as does a weight holding NaN or Inf.
        block_size: lazy-update block (a Python or NumPy int).
      static_groups: fit group grids up front in original order (g_idx = k // G even with
        act_order), instead of on the error-updated weights as groups start.
      high_fraction: mixed bits only: fraction of groups kept at 4 bits (default 0.25).
      criterion: mixed bits only: "range" (default) or "hessian" picks the 4-bit groups, among
        GPTQ's groups (runs of act order when act_order and not static_groups).

    Returns:
      ``QuantizedWeight`` (its ``g_idx`` is GPTQ's; act-ordered groups are stored sorted), or a
      ``MixedQuantizedWeight`` for mixed bits.
    """
    w, hessian = jnp.asarray(w), jnp.asarray(hessian)
    mixed = check_mixed_args(bits, group_size, high_fraction, criterion)
    check_quant_params(w.shape, packing_bits(bits), group_size)
    check_finite_weight(w)
    k = w.shape[0]
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}]; got {list(hessian.shape)}")
    damp = check_damp(damp)
    if not is_int(block_size) or block_size <= 0:  # a Python or NumPy int, as bits
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    block_size = int(block_size)
    act_grouped = act_order and group_size != -1 and not static_groups
    # Mixed widths are chosen among the groups GPTQ forms: runs of its quantization order.
    w_g, h_g = w, hessian
    if mixed and act_grouped:  # host-side: no device gather compiled per layer shape
        w_g, h_g = np.asarray(w), np.asarray(hessian)
        order = _act_order_perm(h_g, np)
        w_g, h_g = w_g[order], h_g[order][:, order]
    group_bits, high = group_bit_widths(w_g, bits, group_size, sym=bool(sym),
                                        high_fraction=high_fraction, criterion=criterion,
                                        hessian=h_g)
    # group_bits, sym and act_order are traced so that they share one compilation per shape.
    q, scales, zeros, g_idx, finite = _gptq(
        w, hessian, jnp.float32(damp), jnp.asarray(group_bits), jnp.bool_(sym),
        jnp.bool_(act_order), group_size=group_size, block_size=block_size,
        static_groups=bool(static_groups))
    if not finite:
        raise ValueError(f"hessian [{k}, {k}] with damp={damp!r} is singular or nearly so (a "
                         f"Cholesky pivot at rounding-noise level, or a non-finite factor; or "
                         f"the weight or hessian holds NaN/inf): calibrate on more tokens than "
                         f"the {k} inputs, or use a larger damp such as 0.01")
    return packed_weight(q, scales, zeros, bits=bits, group_size=group_size, high=high,
                         g_idx=g_idx if act_grouped else None)
