"""Tokens/s of `jaxinfer.generate` against `transformers` `generate` on the same model and inputs.

    python -m experiments.bench_generate            # batch sizes 1, 8, 32; 32-token prompts, 128 new
    python -m experiments.bench_generate --quick    # seconds on a CPU

Both run greedy decoding of exactly `new_tokens` tokens in float32 on the default JAX / PyTorch
device of the machine. Each setting is warmed up (jax compiles) and then timed `--reps` times; the
table shows the median and the spread (min-max) and the jaxinfer / transformers ratio of medians.
The JSON is rewritten after every batch size.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax
import numpy as np

import jaxinfer
from experiments.common import (RESULTS, environment, parse_experiment_args, print_table,
                                spread_text, time_calls, write_json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=str(jaxinfer.default_model_dir()))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "bench_generate.json"))
    args = parse_experiment_args(parser)
    if args.quick:
        args.batch_sizes, args.prompt_len, args.new_tokens, args.reps = [2], 8, 8, 1

    import torch
    import transformers

    model = jaxinfer.load_pretrained(args.model)
    # The peer runs where PyTorch's fast device is, as jax does: CUDA when there is one.
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    hf_model.to(torch_device).eval()
    tokenizer = jaxinfer.load_tokenizer(args.model)
    text = Path(jaxinfer.assets.corpus_sample_path()).read_text()
    stream = np.array(tokenizer.encode(text[:20000]).ids, dtype=np.int32)

    rows = []
    record = {"experiment": "bench_generate", "quick": args.quick, **environment(),
              "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
              "torch_device": torch_device,
              "transformers_version": transformers.__version__, "model": Path(args.model).name,
              "settings": vars(args), "rows": rows}
    for batch in args.batch_sizes:
        starts = np.linspace(0, len(stream) - args.prompt_len - 1, batch).astype(int)
        ids = np.stack([stream[s:s + args.prompt_len] for s in starts])  # [batch, prompt_len]
        torch_ids = torch.from_numpy(ids.astype(np.int64)).to(torch_device)

        def run_jax():
            return np.asarray(jax.block_until_ready(
                jaxinfer.generate(model, ids, max_new_tokens=args.new_tokens)))

        def run_torch():
            with torch.no_grad():
                return hf_model.generate(torch_ids, attention_mask=torch.ones_like(torch_ids),
                                         do_sample=False, max_new_tokens=args.new_tokens,
                                         min_new_tokens=args.new_tokens, pad_token_id=0).cpu().numpy()

        # one warm-up each: compilation for jax, allocator and thread-pool start-up for torch
        jax_times = time_calls(run_jax, (), args.reps)
        torch_times = time_calls(run_torch, (), args.reps)
        agree = float(np.mean(run_jax()[:, args.prompt_len:] == run_torch()[:, args.prompt_len:]))
        tokens = batch * args.new_tokens
        jax_med, torch_med = statistics.median(jax_times), statistics.median(torch_times)
        rows.append({
            "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "jaxinfer_tok_s": tokens / jax_med,
            "jaxinfer_spread_s": spread_text(jax_times),
            "transformers_tok_s": tokens / torch_med,
            "transformers_spread_s": spread_text(torch_times),
            "ratio": torch_med / jax_med, "greedy_token_agreement": agree,
        })
        write_json(record, args.out)  # a run killed by a timeout keeps the batches it finished
    print_table(rows, ["batch", "prompt_len", "new_tokens", "jaxinfer_tok_s", "transformers_tok_s",
                       "ratio", "jaxinfer_spread_s", "transformers_spread_s",
                       "greedy_token_agreement"])
    print(f"wrote {write_json(record, args.out)}")


if __name__ == "__main__":
    main()
