"""The `jaxinfer` command line: generate, train, convert, quantize."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXAMPLES = {
    "generate": """examples:
  jaxinfer generate "In the beginning"                      # the embedded default model
  jaxinfer generate "And God said" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
  jaxinfer generate "Hello" --model path/to/hf_dir --dtype bfloat16
""",
    "train": """examples:
  jaxinfer train --corpus kjv.txt --config small.json --vocab-size 4096 --out runs/kjv
  jaxinfer train --out runs/kjv --resume                   # continue a killed run exactly
  jaxinfer train --corpus more.txt --init path/to/hf_dir --steps 200 --out runs/finetune
""",
    "convert": """examples:
  jaxinfer convert path/to/hf_dir out_dir --dtype bfloat16
  jaxinfer convert path/to/hf_dir out_dir --shard-size-mb 500   # sharded safetensors + index
""",
    "quantize": """examples:
  jaxinfer quantize path/to/hf_dir out_dir --method gptq --bits 4 --group-size 128
  jaxinfer quantize path/to/hf_dir out_dir --bits 3 --calibration my_text.txt --n-samples 128
  jaxinfer quantize path/to/hf_dir out_dir --method rtn --bits 8 --group-size -1
""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    gen = sub.add_parser("generate", help="continue a prompt", epilog=EXAMPLES["generate"],
                         formatter_class=fmt)
    gen.add_argument("prompt", nargs="?", default="In the beginning")
    gen.add_argument("--model", help="HF model directory (default: the embedded model)")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=1, help="copies of the prompt decoded together")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--max-batch", type=int, default=64, help="engine: sequences in flight")
    gen.add_argument("--page-size", type=int, default=16, help="engine: tokens per KV page")
    gen.add_argument("--num-pages", type=int, help="engine: KV pages (default: sized from memory)")
    gen.add_argument("--max-tokens-per-step", type=int, default=512,
                     help="engine: token budget of one step (decodes + prompt chunks)")

    tr = sub.add_parser("train", help="train or fine-tune on a text corpus", epilog=EXAMPLES["train"],
                        formatter_class=fmt)
    tr.add_argument("--out", required=True, help="run directory (checkpoints, logs, final model)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    tr.add_argument("--corpus", help="UTF-8 text file (default on --resume: the run's corpus)")
    source = tr.add_mutually_exclusive_group()
    source.add_argument("--config", help="HF-style config.json for a model trained from scratch")
    source.add_argument("--init", help="HF model directory to fine-tune")
    tr.add_argument("--tokenizer", help="tokenizer.json or a directory holding one")
    tr.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the corpus")
    tr.add_argument("--held-out", type=float, default=0.05, help="fraction of tokens for evaluation")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--warmup", type=int, default=100)
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--checkpoint-every", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)

    cv = sub.add_parser("convert", help="rewrite an HF model directory (dtype, sharding)",
                        epilog=EXAMPLES["convert"], formatter_class=fmt)
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cv.add_argument("--shard-size-mb", type=float, help="split weights into shards of this size")

    qz = sub.add_parser("quantize", help="GPTQ/RTN-quantize a model into an HF GPTQ checkpoint",
                        epilog=EXAMPLES["quantize"], formatter_class=fmt)
    qz.add_argument("model", help="HF model directory (float weights)")
    qz.add_argument("out", help="output directory (GPTQ checkpoint + tokenizer)")
    qz.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    qz.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    qz.add_argument("--group-size", type=int, default=128, help="-1 = per channel")
    qz.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ desc_act")
    qz.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                    help="symmetric grid")
    qz.add_argument("--damp", type=float, default=0.01, help="GPTQ relative Hessian dampening")
    qz.add_argument("--calibration", help="UTF-8 text file (default: the embedded KJV sample)")
    qz.add_argument("--n-samples", type=int, default=32, help="calibration chunks")
    qz.add_argument("--seq-len", type=int, default=128, help="tokens per calibration chunk")
    qz.add_argument("--held-out", type=float, default=0.05,
                    help="fraction at the end of the text never used for calibration")
    qz.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"],
                    help="default: gptq (v1) unless a zero point is 0")
    return parser


def _generate(args: argparse.Namespace) -> int:
    import jax

    import jaxinfer

    model_dir = Path(args.model) if args.model else jaxinfer.default_model_dir()
    model = jaxinfer.load_pretrained(model_dir, dtype=args.dtype)
    tokenizer = jaxinfer.load_tokenizer(model_dir)
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    prompts = [prompt_ids] * args.batch_size
    if hasattr(model, "forward_paged"):
        params = jaxinfer.SamplingParams(max_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k,
                                         top_p=args.top_p, seed=args.seed)
        engine = jaxinfer.Engine(model, max_batch=args.max_batch, page_size=args.page_size,
                                 num_pages=args.num_pages,
                                 max_tokens_per_step=args.max_tokens_per_step,
                                 tokenizer=tokenizer)
        run, how = (lambda: engine.generate(prompts, params)), "engine"
    else:  # no paged KV cache (Hyena): one static batch with the model's own decode cache
        def run() -> list[list[int]]:
            out = jaxinfer.generate(model, prompts, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed)
            return [row[len(prompt_ids):] for row in out.tolist()]
        how = "static batch"
    t0 = time.perf_counter()
    run()  # compiles what this workload needs
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = run()
    run_s = time.perf_counter() - t0
    new = [t for t in outputs[0] if t not in model.config.eos_token_id]
    print(args.prompt + tokenizer.decode(new))
    total = sum(len(o) for o in outputs)
    print(f"\n[{model_dir.name}: {total} tokens in {run_s:.3f} s = {total / run_s:.1f} tokens/s "
          f"({how}, {args.batch_size} requests, {jax.devices()[0].platform}; first call incl. "
          f"compile {compile_s:.1f} s)]", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    import numpy as np
    from flax import nnx

    import jaxinfer
    from jaxinfer.train import TrainConfig, split_held_out, tokenize_corpus, train
    from jaxinfer.train.data import read_corpus
    from jaxinfer.train.loop import TRAIN_CONFIG_FILE
    from jaxinfer.tokenizer import train_bpe

    run = Path(args.out)
    if args.resume:
        if not (run / TRAIN_CONFIG_FILE).exists():
            raise FileNotFoundError(f"{run} holds no run to resume ({TRAIN_CONFIG_FILE} missing)")
        config = TrainConfig.load(run / TRAIN_CONFIG_FILE)
        meta = json.loads((run / "run.json").read_text())
        corpus = args.corpus or meta["corpus"]
        tokenizer = jaxinfer.load_tokenizer(run)
        model_config = jaxinfer.LlamaConfig.from_json_file(run / "config.json")
        model = jaxinfer.LlamaForCausalLM(model_config, rngs=nnx.Rngs(0))  # replaced by the checkpoint
        held_out = meta["held_out"]
    else:
        if not args.corpus:
            raise ValueError("--corpus is required unless --resume is given")
        corpus, held_out = args.corpus, args.held_out
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             grad_accum=args.grad_accum, learning_rate=args.lr,
                             warmup_steps=args.warmup, weight_decay=args.weight_decay,
                             eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                             seed=args.seed)
        if args.tokenizer or args.init:
            tokenizer = jaxinfer.load_tokenizer(args.tokenizer or args.init)
        elif args.vocab_size:
            print(f"training a byte-level BPE tokenizer with {args.vocab_size} tokens ...")
            tokenizer = train_bpe(read_corpus(corpus).splitlines(), args.vocab_size)
        else:
            raise ValueError("give --tokenizer, --init or --vocab-size to choose a tokenizer")
        if args.init:
            model = jaxinfer.load_pretrained(args.init)
        elif args.config:
            model_config = jaxinfer.LlamaConfig.from_json_file(args.config).replace(
                vocab_size=tokenizer.get_vocab_size())
            model = jaxinfer.LlamaForCausalLM(model_config, rngs=nnx.Rngs(args.seed))
        else:
            raise ValueError("give --config (train from scratch) or --init (fine-tune)")
        run.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(run / "tokenizer.json"))
        (run / "run.json").write_text(json.dumps(
            {"corpus": str(Path(corpus).absolute()), "held_out": held_out}, indent=2) + "\n")

    tokens = tokenize_corpus(read_corpus(corpus), tokenizer)
    train_tokens, eval_tokens = split_held_out(tokens, held_out)
    n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    print(f"{n_params / 1e6:.2f}M parameters; {len(train_tokens):,} train and "
          f"{len(eval_tokens):,} held-out tokens; {config.steps} steps of "
          f"{config.batch_size * config.grad_accum}x{config.seq_len} tokens")
    result = train(model, train_tokens, eval_tokens, config, run, resume=args.resume)
    out = jaxinfer.save_pretrained(result.model, run / "model", tokenizer=tokenizer)
    last = result.history[-1]
    evals = [r for r in result.history if "eval_loss" in r]
    summary = {"steps": last["step"], "final_train_loss": last["loss"],
               "held_out_loss": evals[-1]["eval_loss"] if evals else None,
               "held_out_perplexity": evals[-1]["eval_perplexity"] if evals else None,
               "wall_seconds_this_invocation": result.wall_seconds,
               "parameters": n_params, "train_tokens": int(len(train_tokens)),
               "held_out_tokens": int(len(eval_tokens))}
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"model written to {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import shutil

    import jaxinfer

    model = jaxinfer.load_pretrained(args.src, dtype=args.dtype)
    shard = None if args.shard_size_mb is None else int(args.shard_size_mb * 2**20)
    out = jaxinfer.save_pretrained(model, args.dst, max_shard_bytes=shard)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(args.src) / extra).exists():
            shutil.copy(Path(args.src) / extra, out / extra)
    print(f"wrote {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import shutil

    import jaxinfer
    from jaxinfer.quant import token_chunks
    from jaxinfer.train.data import read_corpus, split_held_out, tokenize_corpus

    model = jaxinfer.load_pretrained(args.model)
    calibration = None
    if args.method == "gptq":
        tokenizer = jaxinfer.load_tokenizer(args.model)
        text_file = args.calibration or jaxinfer.assets.corpus_sample_path()
        tokens, _ = split_held_out(tokenize_corpus(read_corpus(text_file), tokenizer),
                                   args.held_out)
        calibration = token_chunks(tokens, args.seq_len, args.n_samples)
        print(f"calibration: {calibration.shape[0]} x {args.seq_len} tokens from {text_file}")
    t0 = time.perf_counter()
    quantized = jaxinfer.quantize(model, method=args.method, bits=args.bits,
                                  group_size=args.group_size, act_order=args.act_order,
                                  sym=args.sym, calibration=calibration, damp=args.damp)
    seconds = time.perf_counter() - t0
    out = jaxinfer.save_pretrained(quantized, args.out, checkpoint_format=args.checkpoint_format)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(args.model) / extra).exists():
            shutil.copy(Path(args.model) / extra, out / extra)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{args.method} {args.bits}-bit (group size {args.group_size}) in {seconds:.1f} s; "
          f"wrote {out} ({size / 2**20:.2f} MiB of safetensors)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxinfer").setLevel(logging.INFO)
    command = {"generate": _generate, "train": _train, "convert": _convert,
               "quantize": _quantize}[args.command]
    try:
        return command(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxinfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
