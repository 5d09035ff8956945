"""FlashAttention forward for Hopper as a Mosaic GPU Pallas kernel (wgmma + TMA); the backward
reuses the Triton kernels of ``pallas_gpu.py``.

Algorithm. One ``plgpu.kernel`` with grid (q blocks, Hq, batch). A program (one CTA) owns
``num_consumers`` [block_q, D] query tiles, one per consumer warpgroup, and the K/V tiles of the
union ``[lo, hi)`` of their visited KV blocks (``tiling.block_visibility``: causal and window
bands skip every fully masked tile). Per KV block each consumer computes

  S = Q @ K^T        wgmma, Q and K^T tiles in shared memory, float32 accumulator in registers
  mask, online softmax in base 2 (float32 running max m and sum l, rescaled accumulator)
  O += P @ V         wgmma, P cast to the input dtype (registers on a GPU), V tile in shared memory

K^T and V tiles stream through ``num_stages`` shared-memory slots filled by TMA copies, each
signalling its slot's barrier, so up to num_stages blocks are in flight while one is computed:

* ``num_consumers`` 1: the single warpgroup issues the copies itself; the slot of block j is
  refilled with block j + num_stages once block j's two matmuls are done.
* ``num_consumers`` 2 (FlashAttention-3's warp specialization): a third warpgroup, with few
  registers, only issues copies; consumers arrive on a per-slot "consumed" barrier after their
  QK (K free) and PV (V free) matmuls, and the producer waits for both before refilling the slot.
  The two consumers share every K/V tile, halving shared-memory traffic per q row, and take
  turns on a schedule barrier so that one's softmax overlaps the other's matmuls.

Tiles of a consumer's band interior skip the in-tile mask; edges build it from iotas
(``tiling.tile_mask``). Each consumer writes its output tile and the float32 log-sum-exp of its
rows through shared memory with TMA stores.

Memory touched per program: its Q tiles once, the K/V tiles of its range once each; HBM traffic
is O(visited tiles x tile size); nothing of size T x S exists. K is handed to the kernel
transposed ([batch, Hkv, D, S], one XLA transpose per call) so that S = Q @ K^T is a plain
[block_q, D] x [D, block_k] wgmma: GPU interpret mode (jax 0.10) cannot simulate a transposed
shared-memory operand, and this way the interpreted kernel is the compiled one.

Shapes. wgmma and the 128-byte swizzle want 16-bit inputs (bfloat16 / float16; float32 is refused
at dispatch), D a multiple of 64 (D <= 128 is zero-padded to 64 or 128; wider heads are refused),
block_q 64 or 128 rows per consumer (64 is the default: 128 doubles each consumer's float32 S and
O tiles in registers, which at D = 128 likely spills) and block_k 64 or 128. T is zero-padded to a
multiple of num_consumers x block_q, S to one of block_k, and the padding masked. GQA reads the
shared KV head (h // groups) without repeating it.

Local windows narrow each program's KV range and are masked in the edge tiles like causal
(``tiling.tile_mask``); soft-cap applies cap * tanh(scores / cap) before the mask. Segment ids are
not supported (refused at dispatch with a ValueError; the Triton and XLA backends have them): their
per-row and per-column ids would have to be loaded into the wgmma register layouts, which the jax
0.10 GPU interpreter cannot simulate. Rows that see no key therefore cannot occur here.

Interpret mode (CPU): jax's GPU interpreter (``InterpretGPUParams``) simulates shared memory, TMA,
barriers, threads and wgmma, but (0.10.2) only with shared-memory operands, without
``layout_cast`` and without ``run_state``; so when interpreted P goes through a shared-memory tile,
P @ V goes to a fresh accumulator that is then added (the GPU accumulates in place), and layout
hints are skipped. Everything else, the pipeline and its barriers included, is the code that is
compiled for the GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.attention import pallas_gpu, tiling
from kernels_pallas.attention.pallas_gpu import LOG2E  # scores are kept in base 2
from kernels_pallas.attention.tiling import MASK_VALUE, MaskSpec

HEAD_DIMS = (64, 128)  # padded head dims the kernel takes (128-byte swizzled 16-bit rows)


@dataclasses.dataclass(frozen=True)
class _Config:
    spec: MaskSpec
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    stages: int  # shared-memory slots of the K/V pipeline (TMA copies in flight)
    consumers: int  # compute warpgroups per program; > 1 adds a TMA producer warpgroup
    t_pad: int
    s_pad: int
    groups: int
    interpret: bool

    @property
    def masked(self) -> bool:
        return tiling.may_mask(self.spec, self.t_pad, self.s_pad)


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernel runs at: 64 or 128 (ValueError above 128)."""
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"the pallas_mgpu backend supports head dims up to {HEAD_DIMS[-1]}; "
                     f"got D={head_dim}; use backend='pallas' or 'xla'")


SMEM_LIMIT = 227 * 1024  # shared memory one Hopper CTA may take (H100/H200)
SMEM_SLACK = 4096  # barriers, alignment and reduction scratch (~2.7 KiB measured by lowering)


def smem_bytes(head_dim: int, block_q: int, block_k: int, stages: int, consumers: int) -> int:
    """Shared memory of one compiled program: q/out tiles per consumer, K^T and V per slot, the
    float32 lse rows, and slack. Mosaic's own check fires only when the kernel is lowered; this
    one lets dispatch refuse an oversized pipeline with a message that says what to change."""
    tiles = consumers * block_q * head_dim + 2 * stages * block_k * head_dim  # 16-bit elements
    return 2 * tiles + 4 * consumers * block_q + SMEM_SLACK


def interpret_params():
    """GPU interpret mode's parameters: public ``plgpu.InterpretGPUParams`` where the jax version
    exports it, else the private class of jax 0.10."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls()


def flash_attention(q, k, v, *, spec: MaskSpec, scale: float, softcap: float | None,
                    blocks: tiling.BlockSizes, interpret: bool):
    """q [batch, T, Hq, D]; k, v [batch, S, Hkv, D] in bfloat16 / float16 -> (out [batch, T, Hq,
    D] in q.dtype, lse float32 [batch, T, Hq]); differentiable (Triton backward kernels).

    ``blocks.block_q`` / ``block_k`` / ``num_stages`` set the forward tiles and the pipeline depth
    (validated by ``checks.check_mgpu``); the ``*_bwd`` / ``*_dq`` tiles and warps go to the
    Triton backward."""
    bq, bk, cw = blocks.block_q, blocks.block_k, blocks.num_consumers
    t_pad = tiling.cdiv(spec.t, bq * cw) * bq * cw
    s_pad = tiling.cdiv(spec.s, bk) * bk
    stages = max(1, min(blocks.num_stages, s_pad // bk))  # no more slots than KV blocks
    need = smem_bytes(padded_head_dim(q.shape[3]), bq, bk, stages, cw)
    if need > SMEM_LIMIT:
        raise ValueError(f"backend='pallas_mgpu': block_q={bq}, block_k={bk}, num_stages={stages}, "
                         f"num_consumers={cw} at D={q.shape[3]} need {need} bytes of shared memory "
                         f"per program, over Hopper's {SMEM_LIMIT}; lower num_stages or block_k")
    cfg = _Config(spec, scale, softcap, bq, bk, stages, cw, t_pad, s_pad,
                  q.shape[2] // k.shape[2], interpret)
    return _attend(q, k, v, cfg, blocks)


def _kv_bounds(cfg: _Config) -> tuple[jax.Array, jax.Array]:
    """-> (int32 [2, t_pad // block_q]: per consumer's q block its fully visible KV blocks
    [full_lo, full_hi), which skip the in-tile mask; int32 [2, programs]: per program the union
    [lo, hi) of its consumers' visited KV blocks, which the producer loads and every consumer
    walks. Tiles of the union outside a consumer's own range are fully masked for it: correct,
    and none are wasted when block_k = num_consumers x block_q (the default)."""
    vis = tiling.block_visibility(cfg.spec, cfg.block_q, cfg.block_k, cfg.t_pad, cfg.s_pad)[0]
    full = tiling.full_visibility(cfg.spec, cfg.block_q, cfg.block_k, cfg.t_pad, cfg.s_pad)[0]
    lo, hi = tiling.loop_bounds(vis)  # [nq]
    full_lo, full_hi = tiling.loop_bounds(full)
    has_full = full.any(-1)  # rows without full tiles run their whole range masked
    full_lo, full_hi = jnp.where(has_full, full_lo, hi), jnp.where(has_full, full_hi, hi)
    # A q block of padding alone visits nothing (lo = hi = 0): it must not pull the union's start
    # back to block 0 (a local window would then stream every earlier KV block).
    lo_seen = jnp.where(hi > lo, lo, cfg.s_pad // cfg.block_k)
    union = jnp.stack([lo_seen.reshape(-1, cfg.consumers).min(-1),
                       hi.reshape(-1, cfg.consumers).max(-1)])  # [2, programs]
    # lo <= full_lo <= full_hi <= hi on the union, so the three loops tile it exactly
    full_lo = jnp.maximum(full_lo, jnp.repeat(union[0], cfg.consumers))
    return jnp.stack([full_lo, jnp.maximum(full_hi, full_lo)]), union


def _layout(x, layout, cfg: _Config):
    """A layout hint for the Mosaic GPU compiler (skipped when interpreted: no CPU rule)."""
    if cfg.interpret:
        return x
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.layout_cast(x, layout)


def _iota(shape, dim: int, cfg: _Config):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return _layout(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA, cfg)


def _program_q(cfg: _Config):
    """This program's q block pair. Causal programs run in reverse (longest KV range first): the
    blocks launched last are then the cheapest, which shortens the tail of the last wave."""
    i = lax.axis_index("q")
    if cfg.spec.causal:
        return jnp.int32(cfg.t_pad // (cfg.block_q * cfg.consumers) - 1) - i
    return i


def _consume(cfg: _Config, refs, wg, fetch, release, schedule=None):
    """One consumer warpgroup: its q tile against the program's KV tiles; writes out and lse.

    ``fetch(j, slot)`` (single-warpgroup programs; None otherwise) refills the slot with KV block j
    once block j - stages is done; ``release(slot, which)`` (a no-op there) tells the producer of
    warp-specialized programs that the slot's K (``which="k"``) or V (``"v"``) may be
    overwritten. ``schedule`` (warp-specialized programs) is the barrier the two consumers
    ping-pong on (FlashAttention-3): one runs its softmax while the tensor cores serve the other's
    matmuls. Both consumers walk the same number of KV blocks, so their arrivals pair up."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    (bounds_ref, union_ref, q_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, p_smem, lse_smem,
     q_bar, k_bar, v_bar) = refs
    bq, bk, stages, dtype = cfg.block_q, cfg.block_k, cfg.stages, q_ref.dtype
    i, h, b = _program_q(cfg), lax.axis_index("h"), lax.axis_index("b")
    row_block = i * cfg.consumers + wg  # this consumer's q block
    lo, hi = union_ref[0, i], union_ref[1, i]
    full_lo, full_hi = bounds_ref[0, row_block], bounds_ref[1, row_block]
    qo_smem, lse_smem, q_bar = qo_smem.at[wg], lse_smem.at[wg], q_bar.at[wg]
    p_smem = None if p_smem is None else p_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row_block * bq, bq), h], qo_smem, q_bar)
    plgpu.barrier_wait(q_bar)

    def pingpong():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    if schedule is not None:  # consumer 1 starts one phase behind consumer 0
        pl.when(wg == 1)(pingpong)

    def body(j, carry, masked: bool):
        acc, m, l = carry
        slot = lax.rem(j - lo, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot])
            if schedule is not None:  # wait for the other consumer's softmax to end
                pingpong()
            return acc_ref[...]  # waits for the wgmma

        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))  # [bq, bk]
        release(slot, "k")
        if cfg.softcap is None:
            s = s * (cfg.scale * LOG2E)
        else:  # cap * tanh(scaled / cap), in base 2
            s = jnp.tanh(s * (cfg.scale / cfg.softcap)) * (cfg.softcap * LOG2E)
        if masked:
            rows = _iota((bq, bk), 0, cfg) + row_block * bq
            cols = _iota((bq, bk), 1, cfg) + j * bk
            mask = tiling.tile_mask(cfg.spec, rows, cols, t_pad=cfg.t_pad, s_pad=cfg.s_pad)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        if masked and mask is not None:
            # A row with every score of the tile masked has m_new = MASK_VALUE and p = 1: the
            # next visible tile's alpha = 0 would wipe it, unless summing V rows overflowed.
            p = jnp.where(mask, p, 0.0)
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)  # wgmma takes one input dtype
        if schedule is not None:  # softmax done (pinned before the arrive): let the other go
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            plgpu.barrier_arrive(schedule)
        if p_smem is not None:
            p_smem[...] = p16
            plgpu.commit_smem()  # make the stores visible to the wgmma's async proxy
            p16 = p_smem
        plgpu.barrier_wait(v_bar.at[slot])
        if schedule is not None:  # the tensor cores are ours once the other's QK is issued
            plgpu.barrier_wait(schedule)

        if cfg.interpret:  # the interpreter has no run_state: a fresh accumulator, then add
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                return acc_ref[...]

            fresh = plgpu.ACC((bq, acc.shape[1]), jnp.float32)
            acc = acc + pl.run_scoped(pv, fresh)
        else:  # accumulate in place: no second [bq, D] float32 tile in registers
            acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p16, v_smem.at[slot]))(
                plgpu.ACC.init(acc))
        release(slot, "v")
        if fetch is not None:
            @pl.when(j + stages < hi)  # the slot's matmuls are done: refill it
            def _():
                fetch(j + stages, slot)

        return acc, m_new, l

    d = qo_smem.shape[-1]
    init = (_layout(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA, cfg),
            _layout(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1), cfg),
            _layout(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1), cfg))
    if cfg.masked:
        carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), init)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
        acc, m, l = lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)
    else:
        acc, m, l = lax.fori_loop(lo, hi, functools.partial(body, masked=False), init)
    if schedule is not None:  # ... and consumer 0 ends one phase after consumer 1
        pl.when(wg == 0)(pingpong)
    # Without segment ids every real row sees a key (itself, at least; l > 0); the guard keeps
    # padding rows finite.
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    qo_smem[...] = (acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])).astype(dtype)
    lse_smem[...] = jnp.where(seen, (m + jnp.log2(safe_l)) * (1.0 / LOG2E), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(row_block * bq, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(row_block * bq, bq)])
    plgpu.wait_smem_to_gmem(0)


def _fwd_kernel(bounds_ref, union_ref, q_ref, kt_ref, v_ref, o_ref, lse_ref, *scratch,
                cfg: _Config):
    """One program: ``consumers`` q tiles (i * consumers + wg) of head h, batch b against the
    union of their visited K/V tiles; see the module docstring.

    q_ref/o_ref [batch, T_pad, Hq, D]; kt_ref [batch, Hkv, D, S_pad]; v_ref [batch, S_pad, Hkv, D];
    lse_ref [batch, Hq, T_pad]; bounds_ref int32 [2, T_pad // bq] and union_ref int32 [2, programs]
    from ``_kv_bounds`` (GMEM, read as scalars). Scratch: qo [consumers, bq, D] (q tiles, then the
    output tiles); k [stages, D, bk]; v [stages, bk, D]; p [consumers, bq, bk] (interpreted only)
    or None; lse [consumers, bq]; barriers: q one per consumer, k / v one per slot (TMA arrivals),
    k / v consumed one per slot (consumer arrivals) and the consumers' ping-pong barrier
    (warp-specialized only)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    (qo_smem, k_smem, v_smem, p_smem, lse_smem), (q_bar, k_bar, v_bar), consumed = scratch[:3]
    bk, stages = cfg.block_k, cfg.stages
    i, h, b = _program_q(cfg), lax.axis_index("h"), lax.axis_index("b")
    kv_h = lax.div(h, jnp.int32(cfg.groups))
    lo, hi = union_ref[0, i], union_ref[1, i]
    refs = (bounds_ref, union_ref, q_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, p_smem,
            lse_smem, q_bar, k_bar, v_bar)

    def fetch(j, slot):
        """Start the TMA copies of KV block j into ``slot``; each arrives on the slot's barrier."""
        plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_h, :, pl.ds(j * bk, bk)], k_smem.at[slot],
                                k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(j * bk, bk), kv_h], v_smem.at[slot],
                                v_bar.at[slot])

    def fill():
        for n in range(stages):
            @pl.when(lo + n < hi)
            def _():
                fetch(lo + n, n)

    if consumed is None:  # one warpgroup: it issues its own copies, refilling after each step
        fill()
        _consume(cfg, refs, 0, fetch, lambda slot, which: None)
        return

    (k_done, v_done), schedule = consumed, scratch[3]
    wg = lax.axis_index("wg")

    def release(slot, which):
        plgpu.barrier_arrive((k_done if which == "k" else v_done).at[slot])

    @pl.when(wg < cfg.consumers)
    def _():
        plgpu.set_max_registers(232, action="increase")  # 2 x 232 + 40 regs x 128 threads
        _consume(cfg, refs, wg, None, release, schedule)

    @pl.when(wg == cfg.consumers)
    def _():
        plgpu.set_max_registers(40, action="decrease")
        fill()

        @pl.loop(lo + stages, hi)
        def _(j):
            slot = lax.rem(j - lo, jnp.int32(stages))
            plgpu.barrier_wait(k_done.at[slot])  # both consumers are done with block j - stages
            plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_h, :, pl.ds(j * bk, bk)], k_smem.at[slot],
                                    k_bar.at[slot])
            plgpu.barrier_wait(v_done.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(j * bk, bk), kv_h], v_smem.at[slot],
                                    v_bar.at[slot])

        # Observe the consumers' last releases too: a barrier phase nobody waits for is harmless
        # on the GPU, but the interpreter checks that every phase is seen before deallocation.
        @pl.loop(jnp.maximum(lo, hi - stages), hi)
        def _(j):
            slot = lax.rem(j - lo, jnp.int32(stages))
            plgpu.barrier_wait(k_done.at[slot])
            plgpu.barrier_wait(v_done.at[slot])


def _forward(q, k, v, cfg: _Config):
    """Padded q [batch, T_pad, Hq, D], k, v [batch, S_pad, Hkv, D] -> (out like q, lse float32
    [batch, Hq, T_pad])."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    batch, _, hq, d = q.shape
    bq, bk, stages, cw = cfg.block_q, cfg.block_k, cfg.stages, cfg.consumers
    kt = jnp.transpose(k, (0, 2, 3, 1))  # [batch, Hkv, D, S_pad]
    # 128-byte swizzled (8, 64) tiles: the shared-memory layout wgmma and TMA share.
    smem = functools.partial(plgpu.SMEM, dtype=q.dtype, transforms=(
        plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    buffers = [smem((cw, bq, d)), smem((stages, d, bk)), smem((stages, bk, d)),
               smem((cw, bq, bk)) if cfg.interpret else None,
               plgpu.SMEM((cw, bq), jnp.float32)]
    barriers = [plgpu.Barrier(num_barriers=cw), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages)]
    specialized = cw > 1
    consumed = ((plgpu.Barrier(num_arrivals=cw, num_barriers=stages),) * 2 if specialized
                else None)
    schedule = plgpu.Barrier(num_arrivals=cw) if specialized else None

    def entry(bounds_ref, union_ref, q_ref, kt_ref, v_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *scratch: _fwd_kernel(bounds_ref, union_ref, q_ref, kt_ref, v_ref, o_ref,
                                         lse_ref, *scratch, cfg=cfg),
            buffers, barriers, consumed, schedule,
            collective_axes="wg" if specialized else ())

    out_types = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, hq, cfg.t_pad), jnp.float32)]
    kernel = plgpu.kernel(
        entry,
        out_type=out_types,
        grid=(cfg.t_pad // (bq * cw), hq, batch),
        grid_names=("q", "h", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"num_threads": cw + 1, "thread_name": "wg"} if specialized else {}),
        **({"interpret": interpret_params()} if cfg.interpret else {}),
    )
    return kernel(*_kv_bounds(cfg), q, kt, v)


def _pad_forward(q, k, v, cfg: _Config):
    """Unpadded inputs -> (out [batch, T, Hq, D], lse float32 [batch, T, Hq])."""
    d = q.shape[-1]
    d_pad = padded_head_dim(d)
    qp = tiling.pad_to(tiling.pad_to(q, 1, cfg.t_pad), 3, d_pad)
    kp = tiling.pad_to(tiling.pad_to(k, 1, cfg.s_pad), 3, d_pad)
    vp = tiling.pad_to(tiling.pad_to(v, 1, cfg.s_pad), 3, d_pad)
    out, lse = _forward(qp, kp, vp, cfg)
    return out[:, :cfg.spec.t, :, :d], jnp.swapaxes(lse, 1, 2)[:, :cfg.spec.t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attend(q, k, v, cfg: _Config, blocks: tiling.BlockSizes):
    return _pad_forward(q, k, v, cfg)


def _attend_fwd(q, k, v, cfg, blocks):
    out, lse = _pad_forward(q, k, v, cfg)
    return (out, lse), (q, k, v, out, lse)


def _attend_bwd(cfg, blocks, res, cts):
    """The Triton dq and dk/dv kernels of ``pallas_gpu`` on this forward's O and LSE, with
    pallas_gpu's own padding (T, S to its block multiples; D to a power of two)."""
    q, k, v, out, lse = res
    d_out, d_lse = cts  # [batch, T, Hq, D], [batch, T, Hq]
    spec, d = cfg.spec, q.shape[-1]
    t_cap = tiling.next_power_of_2(max(spec.t, tiling.PALLAS_MIN_BLOCK))
    s_cap = tiling.next_power_of_2(max(spec.s, tiling.PALLAS_MIN_BLOCK))
    bq_dq, bk_dq = blocks.dq
    tb = dataclasses.replace(  # shrunk to short sequences, as pallas_gpu.flash_attention does
        blocks, block_q_bwd=min(blocks.block_q_bwd, t_cap),
        block_k_bwd=min(blocks.block_k_bwd, s_cap), block_q_dq=min(bq_dq, t_cap),
        block_k_dq=min(bk_dq, s_cap))
    q_mult, k_mult = max(tb.block_q_bwd, tb.block_q_dq), max(tb.block_k_bwd, tb.block_k_dq)
    t_pad, s_pad = tiling.cdiv(spec.t, q_mult) * q_mult, tiling.cdiv(spec.s, k_mult) * k_mult
    d_pad = tiling.padded_head_dim(d)
    tcfg = pallas_gpu._Config(spec, cfg.scale, cfg.softcap, tb, t_pad, s_pad, cfg.groups,
                              cfg.interpret)

    def pad(x, n):  # [batch, n0, H, D] -> [batch, n, H, D_pad]
        return tiling.pad_to(tiling.pad_to(x, 1, n), 3, d_pad)

    # Padded rows: zero dO and zero q make their recomputed gradients vanish; lse 0 keeps them
    # finite.
    lse_p = jnp.swapaxes(tiling.pad_to(lse, 1, t_pad), 1, 2)  # [batch, Hq, T_pad]
    d_lse_p = jnp.swapaxes(tiling.pad_to(d_lse, 1, t_pad), 1, 2)
    dq, dk, dv = pallas_gpu._backward(pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), None, None,
                                      pad(out, t_pad), lse_p, pad(d_out.astype(q.dtype), t_pad),
                                      d_lse_p, tcfg)
    return dq[:, :spec.t, :, :d], dk[:, :spec.s, :, :d], dv[:, :spec.s, :, :d]


_attend.defvjp(_attend_fwd, _attend_bwd)
