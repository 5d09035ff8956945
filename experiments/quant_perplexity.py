"""Held-out perplexity of the embedded model: float vs RTN vs GPTQ at 4/3/2 bits (and 8 on request).

    python -m experiments.quant_perplexity            # bits 4 3 2, group size 16
    python -m experiments.quant_perplexity --quick    # 4 bits, per channel: ~1 min on 2 cores

Text: the packaged KJV sample, tokenized and split by ``jaxinfer.train.data.split_held_out``: the
calibration chunks come from the head, the evaluation chunks from the held-out tail (never seen by
GPTQ). The embedded model was trained on this text, so the figures compare quantizers, not
generalization. Perplexity = exp(mean next-token negative log-likelihood) over the held-out chunks.
``bits_per_weight`` counts what an HF GPTQ checkpoint stores per weight: the integer plus a float16
scale and a packed zero per group. ``quantize_s`` is wall time of ``jaxinfer.quantize`` (compiles
included). The issue's claim: GPTQ beats RTN at every width.
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
    """Stored bits per quantized weight as an HF GPTQ checkpoint holds them: the integer plus a
    float16 scale and a packed zero per group and output column, over all quantized layers."""
    bits = weights = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedLinear):
            k, n = node.shape
            bits += k * n * node.bits + (k // node.group_size) * n * (16 + node.bits)
            weights += k * n
    return bits / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-size", type=int, default=16,
                        help="16 divides the embedded model's 256 and 688; -1 = per channel")
    parser.add_argument("--calibration-chunks", type=int, default=32)
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", type=float, default=0.1,
                        help="fraction at the end of the text reserved for evaluation")
    parser.add_argument("--out", default=str(RESULTS / "quant_perplexity.json"))
    args = parser.parse_args()
    if args.quick:
        args.bits, args.group_size = [4], -1
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
    for bits in args.bits:
        for method in ("rtn", "gptq"):
            began = time.perf_counter()
            quantized = jaxinfer.quantize(model, method=method, bits=bits,
                                          group_size=args.group_size, calibration=calibration)
            seconds = time.perf_counter() - began
            rows.append({"method": method, "bits": bits, "group_size": args.group_size,
                         "bits_per_weight": bits_per_weight(quantized),
                         "perplexity": perplexity(quantized, held), "quantize_s": seconds})
        rtn, gptq = rows[-2]["perplexity"], rows[-1]["perplexity"]
        rows[-1]["gptq_beats_rtn"] = gptq < rtn
    print_table(rows, ["method", "bits", "group_size", "bits_per_weight", "perplexity",
                       "quantize_s", "gptq_beats_rtn"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = {m: ([r["bits"] for r in rows if r["method"] == m],
                  [r["perplexity"] for r in rows if r["method"] == m]) for m in ("rtn", "gptq")}
    curves["float"] = (args.bits, [rows[0]["perplexity"]] * len(args.bits))
    png = plot_curves(curves, xlabel="bits per weight (integer)", ylabel="held-out perplexity",
                      title="embedded model, " + ("per-channel" if args.group_size == -1
                                                  else f"group size {args.group_size}"),
                      out=out.with_suffix(".png"))
    record = {"experiment": "quant_perplexity", "quick": args.quick, **environment(),
              "settings": vars(args), "calibration_shape": list(calibration.shape),
              "held_out_shape": list(held.shape), "rows": rows, "png": str(png)}
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
