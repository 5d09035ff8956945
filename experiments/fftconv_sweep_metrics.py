"""The work and accuracy columns of ``bench_fftconv``'s sweeps, computed, not timed: what a
Monarch plan, a freq_sparsity or an overlap-save blocking leaves of the Pallas kernel's DFT work
(real-matmul MFLOP per batch row and channel, from ``monarch.KernelGeometry``), and the error
frequency sparsity costs on a random and on a Hyena filter."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import fftconv
from kernels_pallas.fftconv import MonarchPlan, blocked, filters, monarch


def plan_label(plan: MonarchPlan) -> str:
    """A plan's name in the tables, e.g. "order3_r2c", "order3_outer4"."""
    return (f"order{plan.order}" + ("_r2c" if plan.r2c else "")
            + (f"_outer{plan.outer}" if plan.outer > 1 else ""))


def partial_work(n: int, taps: int, backend: str, blocking: bool = True) -> dict:
    """The transforms a causal filter of ``taps`` taps costs at length n on ``backend`` ("xla"
    or "pallas", whose rules differ): with the automatic overlap-save rule
    (``blocked.choose_blocking``) or unblocked (one transform: at the exact linear size
    ``monarch.linear_fft_size`` on xla, at M on pallas). The block FFT size S (or that one
    transform's size), the number of blocks, the transformed samples blocks * S per (batch row, channel), and
    the Pallas kernel's plan and real-matmul MFLOP for them (its plan by size,
    ``KernelGeometry.real_macs``, times the outer step's residues); ``blocked``: whether it
    blocks (popped by the caller)."""
    m = (monarch.linear_fft_size(n, *blocked.back_and_ahead(taps, 0)) if backend == "xla"
         else monarch.fft_size(n))
    choice = blocked.choose_blocking(n, taps, 0, 0.0, backend) if blocking else None
    size, blocks = (m, 1) if choice is None else (choice.fft_size, choice.blocks)
    full = choice is not None
    plan = monarch.choose_plan(size, full)
    geo = plan.geometry(size, full)
    flops = 2 * geo.real_macs(geo.factors[-1]) * monarch.outer_residues(plan.outer) * blocks
    return {"block_fft": size, "blocks": blocks, "fft_samples": size * blocks,
            "plan": plan_label(plan), "kernel_mflop": flops / 1e6,
            "lowers": geo.lowers_to_triton, "blocked": full}


def pallas_kernel_work(n: int, freq_sparsity: float, plan: MonarchPlan | None = None) -> dict:
    """What a plan (None: the one by size) and freq_sparsity leave of the Pallas kernel's DFT work
    at length n: the plan's name, the kept spectrum columns Nk of N_last and the real-matmul MFLOP
    per (batch row, channel) (``KernelGeometry.real_macs``, times the outer step's Q/2 + 1 inner
    convolutions; the Nk-wide matmuls are what sparsity shrinks); ``lowers``: whether Triton can
    compile it."""
    m = monarch.fft_size(n)
    plan = monarch.choose_plan(m) if plan is None else plan
    geo = plan.geometry(m)
    n_last = geo.factors[-1]
    nk = n_last if plan.outer > 1 else len(monarch.frequency_columns(
        geo.size, filters.keep_frequencies(m, freq_sparsity), geo.factors))
    flops = 2 * geo.real_macs(nk) * monarch.outer_residues(plan.outer)
    return {"plan": plan_label(plan), "kernel_cols": f"{nk}/{n_last}",
            "kernel_mflop": flops / 1e6, "lowers": geo.lowers_to_triton}


def hyena_filter(channels: int, n: int) -> jax.Array:
    """[channels, n] float32: a freshly initialized Hyena implicit filter with HyenaConfig's
    filter defaults (sine FFN times exponential decay), seed 0."""
    # imported here, not at the top: importing jaxinfer costs --quick (which skips this) seconds
    from flax import nnx

    from jaxinfer.config import HyenaConfig
    from jaxinfer.models.hyena_filter import ImplicitFilter

    c = HyenaConfig(vocab_size=1, hidden_size=channels, intermediate_size=1, num_hidden_layers=1,
                    max_position_embeddings=n)
    return ImplicitFilter(channels, l_max=n, emb_dim=c.filter_emb_dim, hidden=c.filter_hidden_size,
                          inner_layers=c.filter_inner_layers, sine_freq=c.filter_sine_freq,
                          decay_fast=c.filter_decay_fast, decay_slow=c.filter_decay_slow,
                          decay_target=c.filter_decay_target, squash_lambda=c.filter_squash,
                          rngs=nnx.Rngs(0))(n)


def add_sparsity_errors(rows: list[dict], inputs: tuple, hyena: bool) -> None:
    """rel_err_random and, if `hyena`, rel_err_hyena (|y_s - y_0| / |y_0|, xla backend) on each
    freq_sparsity row: the accuracy side of the trade, on the timed random filter and on a Hyena
    filter."""
    u, k = inputs[:2]
    taps_by_name = {"random": k}
    if hyena:
        taps_by_name["hyena"] = hyena_filter(k.shape[0], u.shape[-1])
    errors: dict[float, dict[str, float]] = {}
    for name, taps in taps_by_name.items():
        exact = fftconv(u, taps, backend="xla")
        for s in sorted({r["value"] for r in rows}):
            y = fftconv(u, taps, backend="xla", freq_sparsity=s)
            errors.setdefault(s, {})[f"rel_err_{name}"] = float(
                jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact))
    for r in rows:
        r.update(errors[r["value"]])
