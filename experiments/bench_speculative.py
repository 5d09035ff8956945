"""Speculative decoding on the embedded model: acceptance rate and speedup versus gamma, with a
truncated draft model and with prompt lookup, against plain greedy `jaxinfer.generate`.

    python -m experiments.bench_speculative            # gamma 1, 2, 4, 8; 128 new tokens
    python -m experiments.bench_speculative --quick    # seconds on a CPU (plus compilation)

Greedy decoding throughout, so every speculative run must reproduce the baseline's tokens (the
table's `matches_greedy`). The draft model is the target's first `--draft-layers` decoder layers
with its embeddings, final norm and (tied) head: no training, and a cost ratio of about
draft_layers / layers. The prompt is the start of the embedded corpus sample. Each setting is
warmed up (compiled), then it and the baseline run alternately `--reps` times; the speedup is the
baseline's median time over the setting's, both measured in this process.

`memory_bound_speedup` = tokens_per_pass / (gamma * c + 1), with c the draft's share of the
target's parameters (0 for lookup): the speedup where a pass costs the bytes of its weights
whether it carries 1 or gamma + 1 tokens (decode on a GPU). On a CPU with a model this small a
pass of gamma + 1 tokens costs clearly more than one token, so the measured speedup is lower.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import jaxinfer
from experiments.common import (RESULTS, environment, parse_experiment_args, plot_curves,
                                print_table, spread_text, time_interleaved, write_json)
from jaxinfer.generate.speculative import speculative_generate


def truncated_draft(target, layers: int):
    """The target's first `layers` decoder layers, sharing its embeddings, norm and head."""
    draft = nnx.clone(target)
    draft.layers = nnx.List(list(draft.layers)[:layers])
    draft.config = dataclasses.replace(target.config, num_hidden_layers=layers)
    return draft


def parameter_count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=str(jaxinfer.default_model_dir()))
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--lookup-ngram", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "bench_speculative.json"))
    args = parse_experiment_args(parser)
    if args.quick:
        args.gammas, args.prompt_len, args.new_tokens, args.reps = [2], 16, 12, 1

    target = jaxinfer.load_pretrained(args.model)
    draft = truncated_draft(target, args.draft_layers)
    tokenizer = jaxinfer.load_tokenizer(args.model)
    text = Path(jaxinfer.assets.corpus_sample_path()).read_text()
    stream = np.array(tokenizer.encode(text[:20000]).ids, dtype=np.int32)
    prompt = stream[None, :args.prompt_len]  # [1, prompt_len]

    def baseline():
        return np.asarray(jax.block_until_ready(
            jaxinfer.generate(target, prompt, max_new_tokens=args.new_tokens)))

    base_out = baseline()
    # a decode pass is memory-bound at scale: its cost ~ parameters read, for 1 or gamma+1 tokens
    draft_cost = parameter_count(draft) / parameter_count(target)
    drafters = {f"draft model ({args.draft_layers} layer)": (dict(draft=draft), draft_cost),
                f"prompt lookup ({args.lookup_ngram}-gram)": (
                    dict(lookup_ngram=args.lookup_ngram), 0.0)}
    rows = []
    for name, (drafter, cost) in drafters.items():
        for gamma in args.gammas:
            def speculate(gamma=gamma, drafter=drafter):
                return speculative_generate(target, prompt, args.new_tokens, gamma=gamma,
                                            **drafter)

            # the warm-ups (compilation) here, the speculative one's output kept: greedy, every
            # call gives the same; then the two alternately, so that load drift on a shared
            # machine, rare within one adjacent pair, falls on both alike
            baseline()
            out = jax.block_until_ready(speculate())
            times = time_interleaved({"generate": baseline, "speculative": speculate},
                                     args.reps, warmup=0)
            base, median = (statistics.median(times[k]) for k in ("generate", "speculative"))
            rows.append({
                "drafter": name, "gamma": gamma, "generate_s": base, "speculative_s": median,
                "spread_s": spread_text(times["speculative"]), "speedup": base / median,
                "acceptance_rate": out.acceptance_rate, "tokens_per_pass": out.tokens_per_pass,
                "target_passes": int(out.target_passes.sum()),
                "memory_bound_speedup": out.tokens_per_pass / (gamma * cost + 1),
                "matches_greedy": bool(np.array_equal(np.asarray(out.tokens), base_out)),
            })
    print_table(rows, ["drafter", "gamma", "generate_s", "speculative_s", "spread_s", "speedup",
                       "acceptance_rate", "tokens_per_pass", "memory_bound_speedup",
                       "target_passes", "matches_greedy"])

    out = Path(args.out)  # its folder made by parse_experiment_args
    png = plot_curves({name: ([r["gamma"] for r in rows if r["drafter"] == name],
                              [r["speedup"] for r in rows if r["drafter"] == name])
                       for name in drafters},
                      xlabel="gamma (draft tokens per target pass)",
                      ylabel="speedup vs greedy generate", title="Speculative decoding, batch 1",
                      out=out.with_suffix(".png"))
    record = {"experiment": "bench_speculative", "quick": args.quick, **environment(),
              "model": Path(args.model).name, "settings": vars(args),
              "draft_parameter_ratio": draft_cost, "rows": rows,
              "png": str(png)}
    print(f"wrote {write_json(record, out)}")


if __name__ == "__main__":
    main()
