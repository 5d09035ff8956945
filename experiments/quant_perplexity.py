"""Held-out perplexity of the embedded model: float vs RTN vs GPTQ at 4/3/2 bits (and 8 on request)
and mixed 2/4 bits (a fraction of each layer's groups at 4 bits, the rest at 2).

    python -m experiments.quant_perplexity            # bits 4 3 2 and mixed 2/4, group size 16
    python -m experiments.quant_perplexity --quick    # mixed 2/4 only: ~1 min on 2 cores

Text: the packaged KJV sample, tokenized and split by ``jaxinfer.train.data.split_held_out``: the
calibration chunks come from the head, the evaluation chunks from the held-out tail (never seen by
GPTQ). The embedded model was trained on this text, so the figures compare quantizers, not
generalization. Perplexity = exp(mean next-token negative log-likelihood) over the held-out chunks.
``bits_per_weight`` counts what an HF GPTQ checkpoint stores per weight: the integer plus a float16
scale and a packed zero per group (for mixed 2/4, the average over both widths; see
``QuantizedWeight.bits_per_weight``). Mixed rows choose the 4-bit groups by weight range (the
default criterion) for both methods. ``quantize_s`` is wall time of ``jaxinfer.quantize`` (compiles
included). The issue's claim: GPTQ beats RTN at every width, mixed 2/4 included.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from experiments.common import RESULTS, environment, plot_curves, print_table, write_json
from jaxinfer.models.layers import QuantizedLinear
from jaxinfer.quant import token_chunks
from jaxinfer.train.data import read_corpus, split_held_out, tokenize_corpus

EVAL_BATCH = 8


@nnx.jit
def _nll_sum(model, ids):
    """Summed next-token negative log-likelihood of ids [batch, seq] (float32)."""
    log_probs = jax.nn.log_softmax(model(ids).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], axis=-1)
    return -jnp.sum(picked)


def perplexity(model, chunks: np.ndarray) -> float:
    """exp(mean next-token NLL) over chunks [n, seq], in batches of EVAL_BATCH."""
    total = 0.0
    for i in range(0, len(chunks), EVAL_BATCH):
        total += float(_nll_sum(model, jnp.asarray(chunks[i:i + EVAL_BATCH])))
    return float(np.exp(total / (chunks.shape[0] * (chunks.shape[1] - 1))))


def bits_per_weight(model) -> float:
    """Stored bits per quantized weight (``QuantizedWeight.bits_per_weight``) over all quantized
    layers. A mixed layer's two parts are ``QuantizedLinear`` children, so counting
    ``QuantizedLinear`` nodes counts every stored weight once."""
    bits = weights = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedLinear):
            k, n = node.shape
            bits += k * n * node.weight.bits_per_weight
            weights += k * n
    return bits / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-size", type=int, default=16,
                        help="16 divides the embedded model's 256 and 688; -1 = per channel")
    parser.add_argument("--mixed-fraction", type=float, default=0.25,
                        help="fraction of groups kept at 4 bits in the mixed 2/4 rows")
    parser.add_argument("--mixed-group-size", type=int, default=16,
                        help="group size of the mixed 2/4 rows (they need groups)")
    parser.add_argument("--calibration-chunks", type=int, default=32)
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", type=float, default=0.1,
                        help="fraction at the end of the text reserved for evaluation")
    parser.add_argument("--out", default=str(RESULTS / "quant_perplexity.json"))
    args = parser.parse_args()
    if args.quick:
        args.bits = []  # the mixed 2/4 rows only: one GPTQ run, as long as the uniform rows
        args.calibration_chunks, args.eval_chunks, args.seq_len = 2, 4, 64

    model_dir = jaxinfer.default_model_dir()
    model, tok = jaxinfer.load_pretrained(model_dir), jaxinfer.load_tokenizer(model_dir)
    tokens = tokenize_corpus(read_corpus(jaxinfer.assets.corpus_sample_path()), tok)
    head, tail = split_held_out(tokens, args.held_out)
    calibration = token_chunks(head, args.seq_len, args.calibration_chunks)
    held = token_chunks(tail, args.seq_len, args.eval_chunks)
    print(f"calibration {calibration.shape}, held-out {held.shape} tokens")

    rows = [{"method": "float", "bits": 32, "group_size": None, "bits_per_weight": 32.0,
             "perplexity": perplexity(model, held)}]
    # (bits label, jaxinfer.quantize arguments): the uniform widths, then mixed 2/4.
    settings = [(bits, dict(bits=bits, group_size=args.group_size)) for bits in args.bits]
    settings.append(("2/4", dict(bits=(2, 4), group_size=args.mixed_group_size,
                                 high_fraction=args.mixed_fraction)))
    for label, quant_kw in settings:
        for method in ("rtn", "gptq"):
            began = time.perf_counter()
            quantized = jaxinfer.quantize(model, method=method, calibration=calibration,
                                          **quant_kw)
            seconds = time.perf_counter() - began
            rows.append({"method": method, "bits": label, "group_size": quant_kw["group_size"],
                         "high_fraction": quant_kw.get("high_fraction"),
                         "bits_per_weight": bits_per_weight(quantized),
                         "perplexity": perplexity(quantized, held), "quantize_s": seconds})
        rtn, gptq = rows[-2]["perplexity"], rows[-1]["perplexity"]
        rows[-1]["gptq_beats_rtn"] = gptq < rtn
    print_table(rows, ["method", "bits", "group_size", "high_fraction", "bits_per_weight",
                       "perplexity", "quantize_s", "gptq_beats_rtn"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = {}
    for m in ("rtn", "gptq"):
        points = sorted((r["bits_per_weight"], r["perplexity"]) for r in rows if r["method"] == m)
        curves[m] = ([b for b, _ in points], [p for _, p in points])
    widths = [r["bits_per_weight"] for r in rows[1:]]
    curves["float"] = ([min(widths), max(widths)], [rows[0]["perplexity"]] * 2)
    groups = "per-channel" if args.group_size == -1 else f"group size {args.group_size}"
    png = plot_curves(curves, xlabel="stored bits per weight (integers, scales, zeros)",
                      ylabel="held-out perplexity",
                      title="embedded model" + (f", {groups}" if args.bits else "")
                      + f"\nmixed 2/4: {args.mixed_fraction:.0%} of groups at 4 bits, group size "
                      f"{args.mixed_group_size}",
                      out=out.with_suffix(".png"))
    record = {"experiment": "quant_perplexity", "quick": args.quick, **environment(),
              "settings": vars(args), "calibration_shape": list(calibration.shape),
              "held_out_shape": list(held.shape), "rows": rows, "png": str(png)}
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
