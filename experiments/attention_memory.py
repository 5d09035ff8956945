"""Compiled scratch memory of attention versus sequence length: flash (linear) against reference.

    python -m experiments.attention_memory            # S = 512 .. 16K
    python -m experiments.attention_memory --quick    # seconds: S = 512, 2048 (no Pallas on a CPU)

For each backend of ``kernels_pallas.flash_attention`` (and ``jax.nn.dot_product_attention``'s XLA
implementation as a peer) the script compiles the forward pass and forward+backward
(``jax.grad``) at each S without running them, and reads XLA's
``compile().memory_analysis().temp_size_in_bytes``: the scratch the program needs besides its
inputs and outputs. Flash attention never holds the T x S scores, so its temp bytes must grow
about linearly: quadrupling S may grow them by at most ~4.5x (checked and printed). The reference
materializes the scores (16x when S quadruples).

On CPU the Pallas backend runs its kernels in interpret mode: its numbers measure the
interpreter's XLA program (whole-array copies of the kernel's state), not what the GPU kernel
uses; they are reported and flagged, and meaningful only on a GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.common import RESULTS, environment, parse_experiment_args, print_table, write_json
from kernels_pallas import flash_attention

LINEAR_LIMIT = 4.5  # the most temp bytes may grow when S quadruples, for a linear-memory backend
MIB = 2 ** 20


def _attention(backend: str, causal: bool):
    if backend == "jax_nn_xla":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="xla")
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend)


def temp_bytes(fn, *shapes) -> int:
    compiled = jax.jit(fn).lower(*shapes).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def measure(backend: str, s: int, args) -> dict:
    dtype = jnp.dtype(args.dtype)
    q = jax.ShapeDtypeStruct((args.batch, s, args.heads, args.head_dim), dtype)
    kv = jax.ShapeDtypeStruct((args.batch, s, args.kv_heads, args.head_dim), dtype)
    attend = _attention(backend, args.causal)

    def fwd_bwd(q, k, v):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return {"backend": backend, "S": s, "fwd_temp_bytes": temp_bytes(attend, q, kv, kv),
            "fwd_bwd_temp_bytes": temp_bytes(fwd_bwd, q, kv, kv)}


def add_growth(rows: list[dict]) -> None:
    """Growth of temp bytes from S/4 to S, per backend (None where S/4 was not measured)."""
    by_key = {(r["backend"], r["S"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["backend"], r["S"] // 4)) if r["S"] % 4 == 0 else None
        for kind in ("fwd", "fwd_bwd"):
            prev = base and base[f"{kind}_temp_bytes"]
            r[f"{kind}_growth_x4"] = r[f"{kind}_temp_bytes"] / prev if prev else None
        r["fwd_temp_MiB"] = r["fwd_temp_bytes"] / MIB
        r["fwd_bwd_temp_MiB"] = r["fwd_bwd_temp_bytes"] / MIB


def plot_loglog(curves, *, xlabel, ylabel, title, out) -> Path:
    """``common.plot_curves`` with log axes: linear and quadratic growth read as slopes 1 and 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", linestyle="--" if "+" in label else "-", label=label)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--backends", nargs="+",
                        default=["reference", "xla", "pallas", "jax_nn_xla"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--full", dest="causal", action="store_false",
                        help="full (non-causal) attention; causal by default")
    parser.add_argument("--out", default=str(RESULTS / "attention_memory.json"))
    args = parse_experiment_args(parser)
    platform = jax.default_backend()
    if args.dtype is None:
        args.dtype = "float32" if platform == "cpu" else "bfloat16"
    if args.quick:
        args.seq_lens, args.heads, args.kv_heads = [512, 2048], 2, 2
        if platform != "gpu":  # interpret-mode Pallas: half the compile time, no kernel figures
            args.backends = [b for b in args.backends if b != "pallas"]

    rows = [measure(b, s, args) for b in args.backends for s in args.seq_lens]
    add_growth(rows)
    print_table(rows, ["backend", "S", "fwd_temp_MiB", "fwd_growth_x4", "fwd_bwd_temp_MiB",
                       "fwd_bwd_growth_x4"])

    linear = ["xla"] + (["pallas"] if platform == "gpu" else [])
    checks = {}
    for backend in linear:
        growth = [r[f"{kind}_growth_x4"] for r in rows if r["backend"] == backend
                  for kind in ("fwd", "fwd_bwd") if r[f"{kind}_growth_x4"] is not None]
        if growth:
            checks[backend] = {"max_growth_x4": max(growth), "limit": LINEAR_LIMIT,
                               "linear": max(growth) <= LINEAR_LIMIT}
            verdict = "PASS" if checks[backend]["linear"] else "FAIL"
            print(f"{backend}: temp bytes grow at most {max(growth):.2f}x when S quadruples "
                  f"(limit {LINEAR_LIMIT}x): {verdict}")
    note = None
    if platform != "gpu" and "pallas" in args.backends:
        note = ("pallas ran in interpret mode on this CPU: its temp bytes are the interpreter's "
                "XLA program, not the GPU kernel's; only GPU numbers say anything about the kernel")
        print(f"note: {note}")

    out = Path(args.out)  # its folder made by parse_experiment_args
    curves = {f"{b} {kind.replace('_', '+')}": (
        [r["S"] for r in rows if r["backend"] == b],
        [r[f"{kind}_temp_MiB"] for r in rows if r["backend"] == b])
        for b in args.backends for kind in ("fwd", "fwd_bwd")}
    png = plot_loglog(curves, xlabel="sequence length S", ylabel="compiled temp MiB",
                      title=f"attention scratch memory ({args.dtype}, D={args.head_dim})",
                      out=out.with_suffix(".png"))
    record = {"experiment": "attention_memory", "quick": args.quick, **environment(),
              "settings": vars(args), "rows": rows, "linear_checks": checks, "note": note,
              "png": str(png)}
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
