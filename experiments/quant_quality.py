"""Loss and KL to the float model after RTN and GPTQ quantization of the embedded model.

    python -m experiments.quant_quality                    # bits 4/3/2, per-channel and group 16
    python -m experiments.quant_quality --quick            # seconds: 4 bits, per channel only

Text: 128-token chunks of the packaged KJV sample. Calibration uses the first chunks and evaluation
the last ones (disjoint); the model saw this text in training, so the figures compare quantizers,
not generalization. KL(float || quantized) per token is the sensitive metric: this small model's
loss barely moves even when weights carry ~30% relative error.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from experiments.common import RESULTS, environment, parse_experiment_args, print_table, write_json

SEQ = 128


@nnx.jit
def model_log_probs(model, ids):
    """The model's next-token log-probabilities [batch, seq, vocab] of ids [batch, seq]."""
    return jax.nn.log_softmax(model(ids), axis=-1)


def loss_and_kl(model, ids, reference_log_probs) -> tuple[float, float]:
    """(mean next-token loss of ids [batch, seq], mean KL(reference || model) per position), the
    reference being another model's ``model_log_probs`` of the same ids; quant_perplexity uses
    the same metric."""
    log_probs = model_log_probs(model, ids)
    loss = -jnp.mean(jnp.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], axis=-1))
    kl = jnp.mean(jnp.sum(jnp.exp(reference_log_probs) * (reference_log_probs - log_probs), -1))
    return float(loss), float(kl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[-1, 16])
    parser.add_argument("--calibration-chunks", type=int, default=32)
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "quant_quality.json"))
    args = parse_experiment_args(parser)
    if args.quick:
        args.bits, args.group_sizes, args.calibration_chunks, args.eval_chunks = [4], [-1], 4, 4

    model_dir = jaxinfer.default_model_dir()
    model, tok = jaxinfer.load_pretrained(model_dir), jaxinfer.load_tokenizer(model_dir)
    ids = np.asarray(tok.encode(jaxinfer.assets.corpus_sample_path().read_text()).ids, np.int32)
    chunks = ids[: len(ids) // SEQ * SEQ].reshape(-1, SEQ)
    calibration = chunks[: args.calibration_chunks]
    held = jnp.asarray(chunks[-args.eval_chunks:])
    reference = model_log_probs(model, held)
    float_loss, _ = loss_and_kl(model, held, reference)

    rows = [{"method": "float", "bits": 32, "group_size": None, "loss": float_loss, "kl": 0.0}]
    for group_size in args.group_sizes:
        for bits in args.bits:
            for method in ("rtn", "gptq"):
                began = time.perf_counter()
                quantized = jaxinfer.quantize(model, method=method, bits=bits,
                                              group_size=group_size, calibration=calibration)
                seconds = time.perf_counter() - began
                loss, kl = loss_and_kl(quantized, held, reference)
                rows.append({"method": method, "bits": bits, "group_size": group_size,
                             "loss": loss, "kl": kl, "quantize_s": seconds})
    print_table(rows, ["method", "bits", "group_size", "loss", "kl", "quantize_s"])
    record = {"experiment": "quant_quality", "quick": args.quick, **environment(),
              "settings": vars(args), "seq_len": SEQ, "rows": rows}
    print(f"wrote {write_json(record, args.out)}")


if __name__ == "__main__":
    main()
