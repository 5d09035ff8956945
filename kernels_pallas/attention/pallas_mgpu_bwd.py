"""FlashAttention backward for Hopper as Mosaic GPU Pallas kernels (wgmma + TMA), for the forward
of ``pallas_mgpu.py``.

Algorithm (FlashAttention-2/3). The forward saves O and the float32 log-sum-exp; the backward
recomputes the probabilities tile by tile, P = exp2(S * scale * log2(e) - lse * log2(e)), and
never builds a T x S array:

* preprocess (XLA): delta = rowsum(dO * O) - d_lse, float32 [batch, Hq, T] (the lse cotangent
  enters here, so gradients through a returned lse are exact).
* dK/dV kernel, grid (KV blocks / consumers, Hkv, batch). Each compute warpgroup of a program
  holds one [block_k, D] K and V tile in shared memory and its float32 dK, dV accumulators in
  registers; it walks the ``groups`` query heads of its KV head and, per head, the q blocks
  ``[lo, hi)`` that see it (``tiling``'s block visibility, transposed: causal and window bands
  skip every fully masked tile). Per q block:

    S^T  = K @ Q^T                    wgmma [bk, D] x [D, bq]
    P^T  = exp2(S^T - lse)            (scaled, soft-capped, masked in edge tiles)
    dV  += P^T @ dO                   wgmma, P^T a register operand
    dP^T = V @ dO^T                   wgmma [bk, D] x [D, bq]
    dS^T = P^T * (dP^T - delta)       (times 1 - tanh^2 under soft-cap)
    dK  += dS^T @ Q                   wgmma, dS^T a register operand

  GQA gradients are summed over the group inside the program: K/V are never repeated and no
  per-query-head dK/dV is written. The q, dO tiles and their lse, delta rows stream through
  ``num_stages_bwd`` shared-memory slots filled by TMA copies (two barriers per slot: q + lse,
  dO + delta).
* dQ kernel, grid (q blocks / consumers, Hq, batch). Each compute warpgroup holds its q, dO
  tiles and lse, delta rows and streams the K/V tiles of its visited KV blocks (the forward's
  loop bounds) through the same kind of pipeline: S = Q @ K^T, dP = dO @ V^T, dS as above,
  dQ += dS @ K. Causal programs run in reverse, longest first, as in the forward. (Accumulating
  dQ with atomics from the dK/dV kernel, FlashAttention-3's way, needs TMA reduce-adds, which jax
  0.10's GPU interpreter refuses; two kernels recompute S and dP twice but are testable on a
  CPU.)

Pipelines (``_pipeline``), as the forward's. ``num_consumers_bwd`` 1: the one warpgroup issues
the copies and refills a slot with step n + stages once step n's matmuls are done. 2
(FlashAttention-3's warp specialization): a program has two compute warpgroups, each with its own
resident tiles (its own KV block in dK/dV, its own q block in dQ) and a third, TMA producer
warpgroup with few registers; both consumers read every streamed tile (halving shared-memory
traffic per resident row), arrive on the slot's "consumed" barrier after their step, and the
producer refills the slot once both have. Consumers walk the union of their visited ranges; a
tile outside one's own range is fully masked for it.

Tiles of a band interior skip the in-tile mask; edge tiles build it from iotas
(``tiling.tile_mask``). Outputs go out through shared memory with TMA stores, dK scaled by the
softmax scale, dQ likewise.

Memory touched: dK/dV programs read their K/V tile once and, per group head, the q/dO tiles and
lse/delta rows of their visited q blocks; dQ programs read their q/dO tile once and the visited
K/V tiles. HBM traffic is O(visited tiles x tile size).

Shapes. As the forward: bfloat16/float16, D zero-padded to 64 or 128, tiles of 64 or 128 rows
(``checks.check_mgpu``); T is zero-padded to a multiple of both kernels' block_q and S of their
block_k. Padded rows have zero q and dO and lse +inf (P = 0); padded keys are masked.

Interpreted vs compiled (jax 0.10's GPU interpreter: wgmma only on shared-memory operands, no
transposed operands, no ``run_state``, no ``layout_cast`` / ``plgpu.load``). Compiled, the
transposed operands Q^T, dO^T (dK/dV) and K^T, V^T (dQ) are ``plgpu.transpose_ref`` views of the
streamed tiles (wgmma reads 16-bit B operands in either major order, so no extra copies or HBM
traffic); interpreted, the consumer writes the transposed tile into a scratch tile first. P^T,
dS^T and dS are register operands compiled and go through a scratch tile interpreted; the dK,
dV, dQ matmuls accumulate in place compiled and into a fresh accumulator that is then added
interpreted; lse/delta rows are read with ``plgpu.load`` into the wgmma row/column layout compiled
and with a plain ref read interpreted; layout hints are skipped interpreted. The TMA pipeline,
its barriers, the loop bounds, masks and arithmetic are the same code in both. Transposing a K/V
tile through ``transpose_ref`` (rather than handing XLA-transposed arrays, as the forward does
for K) is therefore not exercised by the interpreter: a GPU run is its first test.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.attention import pallas_mgpu, tiling
from kernels_pallas.attention.pallas_mgpu import LOG2E, interpret_params
from kernels_pallas.attention.tiling import MASK_VALUE, MaskSpec

@dataclasses.dataclass(frozen=True)
class _Config:
    spec: MaskSpec
    scale: float
    softcap: float | None
    block_q: int  # dK/dV kernel: streamed q rows per step
    block_k: int  # dK/dV kernel: KV rows per program
    block_q_dq: int  # dQ kernel: q rows per program
    block_k_dq: int  # dQ kernel: streamed KV rows per step
    stages: int  # shared-memory slots of each kernel's TMA pipeline
    consumers: int  # compute warpgroups per program; 2 adds a TMA producer warpgroup
    t_pad: int
    s_pad: int
    groups: int
    interpret: bool

    @property
    def masked(self) -> bool:
        return tiling.may_mask(self.spec, self.t_pad, self.s_pad)


@dataclasses.dataclass(frozen=True)
class _Static:
    """flash_attention's static arguments, one hashable nondiff argument of the custom VJP."""
    spec: MaskSpec
    scale: float
    softcap: float | None
    blocks: tiling.BlockSizes
    interpret: bool


def flash_attention(q, k, v, *, spec: MaskSpec, scale: float, softcap: float | None,
                    blocks: tiling.BlockSizes, interpret: bool):
    """``pallas_mgpu.flash_attention`` (same signature, same forward kernel) whose gradient runs
    this module's Mosaic GPU backward instead of the Triton one.

    q [batch, T, Hq, D]; k, v [batch, S, Hkv, D] bfloat16 / float16 -> (out [batch, T, Hq, D],
    lse float32 [batch, T, Hq]). Raises ValueError when a backward program would need more
    shared memory than a Hopper CTA has (``smem_bytes``), before anything is traced."""
    cfg = _config(spec, scale, softcap, blocks, q.shape[2] // k.shape[2], interpret)
    for kernel, need in smem_bytes(cfg, q.shape[3]).items():
        if need > pallas_mgpu.SMEM_LIMIT:
            raise ValueError(
                f"backend='pallas_mgpu' with the Mosaic GPU backward: its {kernel} kernel at "
                f"D={q.shape[3]} needs {need} bytes of shared memory per program "
                f"(num_stages_bwd={blocks.num_stages_bwd}, num_consumers_bwd={cfg.consumers}), "
                f"over Hopper's {pallas_mgpu.SMEM_LIMIT}; lower num_stages_bwd or the tiles")
    return _attend(q, k, v, _Static(spec, scale, softcap, blocks, interpret))


def smem_bytes(cfg: _Config, head_dim: int) -> dict[str, int]:
    """Shared memory of one compiled program of each kernel: two resident 16-bit [rows, D] tiles
    per consumer (K, V in dk/dv; q, dO in dq), two streamed ones per slot, the float32 lse and
    delta rows, and the forward's slack for barriers and alignment (Mosaic's own count, when
    lowered, is 2-3 KiB lower)."""
    d, cw = pallas_mgpu.padded_head_dim(head_dim), cfg.consumers
    dkv_stages, dq_stages = _dkv_stages(cfg), _dq_stages(cfg)
    tiles = {"dk/dv": (cw * cfg.block_k + dkv_stages * cfg.block_q) * 2 * d,
             "dq": (cw * cfg.block_q_dq + dq_stages * cfg.block_k_dq) * 2 * d}
    f32_rows = {"dk/dv": dkv_stages * cfg.block_q, "dq": cw * cfg.block_q_dq}
    return {k: 2 * tiles[k] + 8 * f32_rows[k] + pallas_mgpu.SMEM_SLACK for k in tiles}


def _forward(q, k, v, st: _Static):
    """pallas_mgpu's forward kernel (its own VJP is never reached from here)."""
    return pallas_mgpu.flash_attention(q, k, v, spec=st.spec, scale=st.scale, softcap=st.softcap,
                                       blocks=st.blocks, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend(q, k, v, st: _Static):
    return _forward(q, k, v, st)


def _attend_fwd(q, k, v, st: _Static):
    out, lse = _forward(q, k, v, st)
    return (out, lse), (q, k, v, out, lse)


def _attend_bwd(st: _Static, res, cts):
    q, k, v, out, lse = res
    d_out, d_lse = cts  # [batch, T, Hq, D], [batch, T, Hq]
    return backward(q, k, v, out, lse, d_out, d_lse, spec=st.spec, scale=st.scale,
                    softcap=st.softcap, blocks=st.blocks, interpret=st.interpret)


_attend.defvjp(_attend_fwd, _attend_bwd)


def backward(q, k, v, out, lse, d_out, d_lse, *, spec: MaskSpec, scale: float,
             softcap: float | None, blocks: tiling.BlockSizes, interpret: bool):
    """Gradients of attention given the forward's residuals.

    q, out, d_out [batch, T, Hq, D]; k, v [batch, S, Hkv, D]; lse, d_lse float32 [batch, T, Hq]
    (natural log, as ``flash_attention`` returns it) -> (dq, dk, dv) like q, k, v.
    Tiles: the dK/dV kernel's (block_q_bwd x block_k_bwd), the dQ kernel's ``blocks.dq``, each
    64 or 128 (``checks.check_mgpu``); both pipelines ``num_stages_bwd`` deep, with
    ``num_consumers_bwd`` compute warpgroups per program."""
    cfg = _config(spec, scale, softcap, blocks, q.shape[2] // k.shape[2], interpret)
    t_pad, s_pad, d = cfg.t_pad, cfg.s_pad, q.shape[-1]
    d_pad = pallas_mgpu.padded_head_dim(d)

    def pad(x, n):  # [batch, n0, H, D] -> [batch, n, H, D_pad]
        return tiling.pad_to(tiling.pad_to(x, 1, n), 3, d_pad)

    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1) - d_lse
    delta = jnp.swapaxes(tiling.pad_to(delta, 1, t_pad), 1, 2)  # [batch, Hq, T_pad]
    # Base 2 for the kernels; padded rows get +inf, which makes their probabilities exactly 0.
    lse2 = jnp.swapaxes(tiling.pad_to(lse * LOG2E, 1, t_pad), 1, 2)  # [batch, Hq, T_pad]
    lse2 = jnp.where(jnp.arange(t_pad) < spec.t, lse2, jnp.inf)
    qp, dop = pad(q, t_pad), pad(d_out.astype(q.dtype), t_pad)
    kp, vp = pad(k, s_pad), pad(v, s_pad)
    dq = _dq_call(qp, dop, lse2, delta, kp, vp, cfg)
    dk, dv = _dkv_call(qp, dop, lse2, delta, kp, vp, cfg)
    return dq[:, :spec.t, :, :d], dk[:, :spec.s, :, :d], dv[:, :spec.s, :, :d]


def _config(spec: MaskSpec, scale: float, softcap: float | None, blocks: tiling.BlockSizes,
            groups: int, interpret: bool) -> _Config:
    """The kernels' static configuration: T padded to a multiple of both kernels' q rows per
    program, S of their KV rows (powers of two: the larger multiple is one of the smaller)."""
    (bq_dq, bk_dq), cw = blocks.dq, blocks.num_consumers_bwd
    q_mult, k_mult = max(blocks.block_q_bwd, cw * bq_dq), max(cw * blocks.block_k_bwd, bk_dq)
    return _Config(spec, scale, softcap, blocks.block_q_bwd, blocks.block_k_bwd, bq_dq, bk_dq,
                   max(1, blocks.num_stages_bwd), cw, tiling.cdiv(spec.t, q_mult) * q_mult,
                   tiling.cdiv(spec.s, k_mult) * k_mult, groups, interpret)


def _dkv_stages(cfg: _Config) -> int:
    """The dk/dv pipeline's slots: no more than its programs' longest walk."""
    return min(cfg.stages, cfg.groups * (cfg.t_pad // cfg.block_q))


def _dq_stages(cfg: _Config) -> int:
    """The dq pipeline's slots: no more than its programs' longest walk."""
    return min(cfg.stages, cfg.s_pad // cfg.block_k_dq)


def _pipeline(cfg: _Config, steps, fetch, consume, consumed) -> None:
    """Run a program's TMA pipeline of ``steps`` steps through ``cfg.stages`` slots.

    ``fetch(n, slot)`` issues step n's copies into ``slot``; ``consume(wg, done)`` runs compute
    warpgroup wg, which calls ``done(n, slot)`` once step n's matmuls have read the slot. One
    warpgroup (``consumed`` None) refills the slot itself there. Two (FlashAttention-3's warp
    specialization) arrive on the slot's ``consumed`` barrier instead, and a third, producer
    warpgroup with few registers waits for both arrivals before refilling it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    stages = cfg.stages

    def fill():
        for n in range(stages):
            pl.when(n < steps)(functools.partial(fetch, jnp.int32(n), n))

    if consumed is None:
        def refill(n, slot):
            pl.when(n + stages < steps)(lambda: fetch(n + stages, slot))

        fill()
        consume(0, refill)
        return

    wg = lax.axis_index("wg")

    @pl.when(wg < cfg.consumers)
    def _():
        plgpu.set_max_registers(232, action="increase")  # 2 x 232 + 40 regs x 128 threads
        consume(wg, lambda n, slot: plgpu.barrier_arrive(consumed.at[slot]))

    @pl.when(wg == cfg.consumers)
    def _():
        plgpu.set_max_registers(40, action="decrease")
        fill()

        @pl.loop(jnp.int32(stages), steps)
        def _(n):
            slot = lax.rem(n, jnp.int32(stages))
            plgpu.barrier_wait(consumed.at[slot])  # every consumer is done with step n - stages
            fetch(n, slot)

        # Observe the last releases too: the interpreter checks that every barrier phase is
        # seen before deallocation (harmless on the GPU).
        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _(n):
            plgpu.barrier_wait(consumed.at[lax.rem(n, jnp.int32(stages))])


# --- wgmma helpers: the one place where the interpreted and compiled kernels differ -------------

def _mma(a, b, shape: tuple[int, int]):
    """a @ b into a fresh float32 accumulator [M, N] (waits for the wgmma)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _mma_add(acc, a, b, cfg: _Config):
    """acc + a @ b: in place compiled; interpreted (no run_state) a fresh accumulator, added."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if cfg.interpret:
        return acc + _mma(a, b, acc.shape)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def _mma_add_and_mma(acc, a, b, shape: tuple[int, int], c, d, cfg: _Config):
    """(acc + a @ b, c @ d into a fresh [M, N] accumulator). Compiled, both wgmmas are issued
    before one wait (as jax's attention_mgpu backward does); interpreted, one after the other."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if cfg.interpret:
        return _mma_add(acc, a, b, cfg), _mma(c, d, shape)

    def run(refs):
        plgpu.wgmma(refs[0], a, b)
        plgpu.wgmma(refs[1], c, d)

    fresh = pallas_mgpu._layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA, cfg)
    return pl.run_state(run)((plgpu.ACC.init(acc), plgpu.ACC.init(fresh)))


def _transposed(ref, scratch, cfg: _Config):
    """The [n, m] view of an [m, n] shared-memory tile as a wgmma B operand: a transposed view
    compiled; interpreted, the transposed tile written into ``scratch`` [n, m]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if not cfg.interpret:
        return plgpu.transpose_ref(ref, (1, 0))
    scratch[...] = ref[...].T
    return scratch


def _a_operand(x, scratch, cfg: _Config):
    """A 16-bit register tile as a wgmma A operand: itself compiled; through ``scratch``
    interpreted."""
    if not cfg.interpret:
        return x
    scratch[...] = x
    return scratch


def _row_vector(ref, axis: int, cfg: _Config):
    """A float32 [n] shared-memory row (lse or delta) in the layout of a wgmma tile reduced over
    ``axis``, ready to broadcast along it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if cfg.interpret:
        return ref[...]
    layout = plgpu.Layout.WGMMA.reduce(axis)
    if _load_takes_index():
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _load_takes_index() -> bool:
    """Whether ``plgpu.load`` still requires the index beside the ref: jax 0.10 does; jax 0.11
    deprecates it and later releases drop it (``load(src, *, layout=None, optimized=True)``)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    idx = inspect.signature(plgpu.load).parameters.get("idx")
    return idx is not None and idx.default is inspect.Parameter.empty


def _probs(raw, lse_b, rows, cols, cfg: _Config, masked: bool):
    """raw q.k float32 tile, lse (base 2) broadcast to it, row and column index tiles (None when
    unmasked) -> (P = exp2(scores - lse), tanh(raw scale / cap) or None)."""
    if cfg.softcap is None:
        s, th = raw * (cfg.scale * LOG2E), None
    else:
        th = jnp.tanh(raw * (cfg.scale / cfg.softcap))
        s = th * (cfg.softcap * LOG2E)
    if masked:
        mask = tiling.tile_mask(cfg.spec, rows, cols, t_pad=cfg.t_pad, s_pad=cfg.s_pad)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
    return jnp.exp2(s - lse_b), th


def _capped(p, th):
    """P times the soft-cap's derivative 1 - tanh^2 (P without a cap). Formed as soon as P is, so
    that the tanh tile dies before the matmuls: one float32 score tile fewer in registers."""
    return p if th is None else p * (1.0 - th * th)


def _grad_scores(pd, dp, delta_b):
    """dS = P * (dP - delta) * (1 - tanh^2), from pd = ``_capped(P, tanh)``."""
    return pd * (dp - delta_b)


# --- dK/dV -------------------------------------------------------------------------------------

def _dkv_kernel(rows_ref, union_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref,
                dv_ref, smem, bars, *, cfg: _Config):
    """One program: KV blocks p * consumers + wg of KV head kh, batch b, one per consumer wg;
    see the module docstring.

    q_ref/do_ref [batch, T_pad, Hq, D]; lse_ref (base 2)/delta_ref [batch, Hq, T_pad]; k_ref/v_ref
    and dk_ref/dv_ref [batch, S_pad, Hkv, D]; rows_ref int32 [2, S_pad // bk] and union_ref int32
    [2, programs] from ``tiling.program_bounds`` (q-block ranges). Scratch: k, v [consumers, bk,
    D]; q, do [stages, bq, D]; lse, delta [stages, bq]; interpreted only t [consumers, D, bq]
    (Q^T, dO^T) and p [consumers, bk, bq] (P^T, dS^T). Barriers: kv per consumer, q + lse and
    do + delta per slot (2 TMA arrivals each), consumed per slot (one arrival per consumer; None
    with one)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, t_smem, p_smem = smem
    kv_bar, q_bar, do_bar, consumed = bars
    bq, bk, stages, dtype = cfg.block_q, cfg.block_k, cfg.stages, q_ref.dtype
    p, kh, b = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
    lo, hi = union_ref[0, p], union_ref[1, p]
    per_head = hi - lo
    steps = per_head * cfg.groups  # (group head, q block) pairs, head-major

    def fetch(n, slot):
        """TMA copies of step n (head kh * groups + n // per_head, q block lo + n % per_head)."""
        h = kh * cfg.groups + lax.div(n, per_head)
        rows = pl.ds((lo + lax.rem(n, per_head)) * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], do_bar.at[slot])

    def consume(wg, done):
        j = p * cfg.consumers + wg  # this consumer's KV block
        k_s, v_s, kv_rows = k_smem.at[wg], v_smem.at[wg], pl.ds(j * bk, bk)
        t_s = None if t_smem is None else t_smem.at[wg]
        p_s = None if p_smem is None else p_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[b, kv_rows, kh], k_s, kv_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, kv_rows, kh], v_s, kv_bar.at[wg])
        plgpu.barrier_wait(kv_bar.at[wg])

        def step(i, carry, g, masked: bool):
            dk, dv = carry  # float32 [bk, D]
            n = g * per_head + i - lo
            slot = lax.rem(n, jnp.int32(stages))
            q_s, do_s = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_bar.at[slot])
            s_t = _mma(k_s, _transposed(q_s, t_s, cfg), (bk, bq))  # [bk, bq]
            lse = _row_vector(lse_smem.at[slot], 0, cfg)  # [bq]
            rows = cols = None
            if masked:  # S^T: q rows along dim 1, keys along dim 0
                rows = pallas_mgpu._iota((bk, bq), 1, cfg) + i * bq
                cols = pallas_mgpu._iota((bk, bq), 0, cfg) + j * bk
            p_t, th = _probs(s_t, lax.broadcast_in_dim(lse, s_t.shape, [1]), rows, cols, cfg,
                             masked)
            p16_t, pd_t = p_t.astype(dtype), _capped(p_t, th)
            plgpu.barrier_wait(do_bar.at[slot])
            dv, dp_t = _mma_add_and_mma(dv, _a_operand(p16_t, p_s, cfg), do_s,
                                        (bk, bq), v_s, _transposed(do_s, t_s, cfg), cfg)
            delta = _row_vector(delta_smem.at[slot], 0, cfg)
            ds_t = _grad_scores(pd_t, dp_t, lax.broadcast_in_dim(delta, s_t.shape, [1]))
            dk = _mma_add(dk, _a_operand(ds_t.astype(dtype), p_s, cfg), q_s, cfg)
            done(n, slot)
            return dk, dv

        def head(g, carry):
            return tiling.banded_loop(lo, rows_ref[0, j], rows_ref[1, j], hi,
                                      functools.partial(step, g=g), carry, cfg.masked)

        zeros = pallas_mgpu._layout(jnp.zeros((bk, k_s.shape[-1]), jnp.float32),
                                    plgpu.Layout.WGMMA, cfg)
        dk, dv = lax.fori_loop(0, cfg.groups, head, (zeros, zeros))
        k_s[...] = (dk * cfg.scale).astype(dtype)  # K and V are no longer read: stage dK, dV
        v_s[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_s, dk_ref.at[b, kv_rows, kh])
        plgpu.copy_smem_to_gmem(v_s, dv_ref.at[b, kv_rows, kh])
        plgpu.wait_smem_to_gmem(0)

    _pipeline(cfg, steps, fetch, consume, consumed)


def _dkv_call(q, do, lse2, delta, k, v, cfg: _Config):
    """Padded inputs -> (dk, dv) [batch, S_pad, Hkv, D_pad] in k.dtype."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    batch, _, hkv, d = k.shape
    bq, bk, cw = cfg.block_q, cfg.block_k, cfg.consumers
    cfg = dataclasses.replace(cfg, stages=_dkv_stages(cfg))
    vis = tiling.block_visibility(cfg.spec, bq, bk, cfg.t_pad, cfg.s_pad)[0]
    full = tiling.full_visibility(cfg.spec, bq, bk, cfg.t_pad, cfg.s_pad)[0]
    smem, f32 = _smem_factory(q.dtype), functools.partial(plgpu.SMEM, dtype=jnp.float32)
    stages, interpreted = cfg.stages, cfg.interpret
    scratch = ([smem((cw, bk, d)), smem((cw, bk, d)), smem((stages, bq, d)),
                smem((stages, bq, d)), f32((stages, bq)), f32((stages, bq)),
                smem((cw, d, bq)) if interpreted else None,
                smem((cw, bk, bq)) if interpreted else None],
               [plgpu.Barrier(num_arrivals=2, num_barriers=cw),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=cw, num_barriers=stages) if cw > 1 else None])
    out = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _launch(functools.partial(_dkv_kernel, cfg=cfg), out, scratch,
                   (cfg.s_pad // (bk * cw), hkv, batch), ("kv", "h", "b"), cfg)(
                       *tiling.program_bounds(vis.T, full.T, cw), q, do, lse2, delta, k, v)


# --- dQ ----------------------------------------------------------------------------------------

def _dq_kernel(rows_ref, union_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref,
               smem, bars, *, cfg: _Config):
    """One program: q blocks p * consumers + wg of head h, batch b, one per consumer wg; see the
    module docstring.

    Refs as in ``_dkv_kernel``, dq_ref like q_ref; rows_ref int32 [2, T_pad // bq] and union_ref
    [2, programs] are KV-block ranges. Scratch: q, do [consumers, bq, D]; lse, delta [consumers,
    bq]; k, v [stages, bk, D]; interpreted only t [consumers, D, bk] (K^T, V^T) and p [consumers,
    bq, bk] (dS). Barriers: q per consumer (4 TMA arrivals: q, do, lse, delta); k and v per slot;
    consumed per slot (one arrival per consumer; None with one)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, t_smem, p_smem = smem
    q_bar, k_bar, v_bar, consumed = bars
    bq, bk, stages, dtype = cfg.block_q_dq, cfg.block_k_dq, cfg.stages, q_ref.dtype
    p, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    if cfg.spec.causal:  # longest KV ranges first: the last wave is the cheapest
        p = jnp.int32(cfg.t_pad // (bq * cfg.consumers) - 1) - p
    kh = lax.div(h, jnp.int32(cfg.groups))
    lo, hi = union_ref[0, p], union_ref[1, p]

    def fetch(n, slot):
        cols = pl.ds((lo + n) * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kh], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kh], v_smem.at[slot], v_bar.at[slot])

    def consume(wg, done):
        i = p * cfg.consumers + wg  # this consumer's q block
        rows, q_s, do_s = pl.ds(i * bq, bq), q_smem.at[wg], do_smem.at[wg]
        t_s = None if t_smem is None else t_smem.at[wg]
        p_s = None if p_smem is None else p_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_s, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[wg], q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        lse = _row_vector(lse_smem.at[wg], 1, cfg)  # [bq], base 2
        delta = _row_vector(delta_smem.at[wg], 1, cfg)

        def step(jj, dq, masked: bool):
            n = jj - lo
            slot = lax.rem(n, jnp.int32(stages))
            k_s, v_s = k_smem.at[slot], v_smem.at[slot]
            plgpu.barrier_wait(k_bar.at[slot])
            s = _mma(q_s, _transposed(k_s, t_s, cfg), (bq, bk))  # [bq, bk]
            rows_i = cols_i = None
            if masked:
                rows_i = pallas_mgpu._iota((bq, bk), 0, cfg) + i * bq
                cols_i = pallas_mgpu._iota((bq, bk), 1, cfg) + jj * bk
            pr, th = _probs(s, lax.broadcast_in_dim(lse, s.shape, [0]), rows_i, cols_i, cfg,
                            masked)
            pd = _capped(pr, th)
            plgpu.barrier_wait(v_bar.at[slot])
            dp = _mma(do_s, _transposed(v_s, t_s, cfg), (bq, bk))
            ds = _grad_scores(pd, dp, lax.broadcast_in_dim(delta, s.shape, [0]))
            dq = _mma_add(dq, _a_operand(ds.astype(dtype), p_s, cfg), k_s, cfg)
            done(n, slot)
            return dq

        zeros = pallas_mgpu._layout(jnp.zeros((bq, q_s.shape[-1]), jnp.float32),
                                    plgpu.Layout.WGMMA, cfg)
        dq = tiling.banded_loop(lo, rows_ref[0, i], rows_ref[1, i], hi, step, zeros, cfg.masked)
        q_s[...] = (dq * cfg.scale).astype(dtype)  # q is no longer read: stage dQ
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_s, dq_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    _pipeline(cfg, hi - lo, fetch, consume, consumed)


def _dq_call(q, do, lse2, delta, k, v, cfg: _Config):
    """Padded inputs -> dq [batch, T_pad, Hq, D_pad] in q.dtype."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    batch, _, hq, d = q.shape
    bq, bk, cw = cfg.block_q_dq, cfg.block_k_dq, cfg.consumers
    cfg = dataclasses.replace(cfg, stages=_dq_stages(cfg))
    vis = tiling.block_visibility(cfg.spec, bq, bk, cfg.t_pad, cfg.s_pad)[0]
    full = tiling.full_visibility(cfg.spec, bq, bk, cfg.t_pad, cfg.s_pad)[0]
    smem, f32 = _smem_factory(q.dtype), functools.partial(plgpu.SMEM, dtype=jnp.float32)
    stages, interpreted = cfg.stages, cfg.interpret
    scratch = ([smem((cw, bq, d)), smem((cw, bq, d)), f32((cw, bq)), f32((cw, bq)),
                smem((stages, bk, d)), smem((stages, bk, d)),
                smem((cw, d, bk)) if interpreted else None,
                smem((cw, bq, bk)) if interpreted else None],
               [plgpu.Barrier(num_arrivals=4, num_barriers=cw),
                plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_arrivals=cw, num_barriers=stages) if cw > 1 else None])
    out = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    return _launch(functools.partial(_dq_kernel, cfg=cfg), out, scratch,
                   (cfg.t_pad // (bq * cw), hq, batch), ("q", "h", "b"), cfg)(
                       *tiling.program_bounds(vis, full, cw), q, do, lse2, delta, k, v)[0]


# --- launch ------------------------------------------------------------------------------------

def _smem_factory(dtype):
    """16-bit shared-memory tiles in 128-byte swizzled (8, 64) tiles, as wgmma and TMA want."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return functools.partial(plgpu.SMEM, dtype=dtype, transforms=(
        plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _launch(body, out_types, scratch, grid, grid_names, cfg: _Config):
    """A ``plgpu.kernel`` running ``body(*inputs, *outputs, smem, barriers)`` on one warpgroup,
    or on ``consumers`` + 1 (thread axis "wg") sharing the scratch."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    buffers, barriers = scratch
    specialized = cfg.consumers > 1

    def entry(*refs):
        pl.run_scoped(lambda smem, bars: body(*refs, smem, bars), buffers, barriers,
                      collective_axes="wg" if specialized else ())

    return plgpu.kernel(
        entry, out_type=out_types, grid=grid, grid_names=grid_names,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"num_threads": cfg.consumers + 1, "thread_name": "wg"} if specialized else {}),
        **({"interpret": interpret_params()} if cfg.interpret else {}))
