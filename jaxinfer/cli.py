"""The `jaxinfer` command line: generate, train, convert, quantize (the last two in
`cli_checkpoints.py`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

from jaxinfer import cli_checkpoints
from jaxinfer.config import REMAT_MODES

EXAMPLES = {
    "generate": """examples:
  jaxinfer generate "In the beginning"                      # the embedded default model
  jaxinfer generate "And God said" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
  jaxinfer generate "Hello" --model path/to/hf_dir --dtype bfloat16
  jaxinfer generate --prompts-file prompts.txt --n 4 --temperature 0.8 --stop "."
  jaxinfer generate "And God said" --speculative-tokens 4              # prompt-lookup drafts
  jaxinfer generate "Hello" --model big_dir --draft-model small_dir --speculative-tokens 4
  jaxinfer generate "Hello" --kv-cache-dtype int8 --snapkv-budget 256   # smaller KV cache
engine options (and engine sizes other than the defaults) need a model with a paged KV cache
(the Llama family, Mixtral); Hyena decodes one static batch with temperature, top-k and top-p only
and refuses the rest
""",
    "train": """examples:
  jaxinfer train --corpus kjv.txt --config small.json --vocab-size 4096 --out runs/kjv
  jaxinfer train --out runs/kjv --resume                   # continue a killed run exactly
  jaxinfer train --out runs/kjv --resume --remat full      # ... recomputing layers: less memory
  jaxinfer train --corpus more.txt --init path/to/hf_dir --steps 200 --out runs/finetune
settings not given take jaxinfer.train.TrainConfig's defaults
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


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, page sizes, step counts)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (seeds, warmup steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text}")
    return value


def _positive_finite(text: str) -> float:
    """argparse type: a finite number > 0 (sizes)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a float in (0, 1), as jaxinfer.train.split_held_out takes."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1); got {text}")
    return value


# `jaxinfer train` flags -> TrainConfig fields. The parser's defaults are None, so that `--resume`
# can tell which were given; a fresh run fills the rest from TrainConfig's defaults, and a resumed
# run takes its train_config.json with the given ones replaced (jaxinfer.train.train refuses
# changes outside jaxinfer.train.train_config.RESUMABLE).
TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len",
               "grad_accum": "grad_accum", "lr": "learning_rate", "warmup": "warmup_steps",
               "weight_decay": "weight_decay", "eval_every": "eval_every",
               "checkpoint_every": "checkpoint_every", "seed": "seed",
               "document_separator": "document_separator"}
# flags that choose a run's data, tokenizer or model: --resume takes them from the run itself
RUN_FLAGS = ("held_out", "config", "init", "tokenizer", "vocab_size")
# LlamaConfig fields that are run settings, not Hugging Face config keys: LlamaConfig.from_hf_config
# would drop them from a --config file without a word -> the flag that sets them (or None)
RUN_SETTING_KEYS = {"remat": "--remat", "attention_backend": None, "sequence_parallel": None,
                    "param_dtype": None}
HELD_OUT = 0.05  # default fraction of the corpus kept for evaluation
# `jaxinfer generate` flags only the engine honours, with the values that leave them off (for the
# engine's sizes, their defaults): a static-batch model (Hyena) refuses any other value
ENGINE_FLAGS = {"prompts_file": None, "min_p": None, "repetition_penalty": 1.0, "stop": [],
                "n": 1, "first_finish": False, "kv_cache_dtype": "auto", "speculative_tokens": 0,
                "draft_model": None, "snapkv_budget": None, "hydragen": False,
                "max_batch": 64, "page_size": 16, "num_pages": None, "max_tokens_per_step": 512}
DEFAULT_PROMPT = "In the beginning"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    gen = sub.add_parser("generate", help="continue a prompt", epilog=EXAMPLES["generate"],
                         formatter_class=fmt)
    gen.add_argument("prompt", nargs="?", help=f"default: {DEFAULT_PROMPT!r}")
    gen.add_argument("--prompts-file", help="UTF-8 text file of prompts, one per line, served "
                     "together (instead of PROMPT)")
    gen.add_argument("--model", help="HF model directory (default: the embedded model)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=_positive_int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="a string that ends a completion (repeatable)")
    gen.add_argument("--n", type=_positive_int, default=1, help="samples per prompt")
    gen.add_argument("--first-finish", action="store_true",
                     help="with --n: First Finish Search, return the shortest sample")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=_positive_int, default=1,
                     help="copies of the prompt decoded together")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--max-batch", type=_positive_int, default=ENGINE_FLAGS["max_batch"],
                     help="engine: sequences in flight")
    gen.add_argument("--page-size", type=_positive_int, default=ENGINE_FLAGS["page_size"],
                     help="engine: tokens per KV page")
    gen.add_argument("--num-pages", type=_positive_int,
                     help="engine: KV pages (default: sized from memory)")
    gen.add_argument("--max-tokens-per-step", type=_positive_int,
                     default=ENGINE_FLAGS["max_tokens_per_step"],
                     help="engine: token budget of one step (decodes + prompt chunks)")
    gen.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                     help="engine: KV pages in the model's dtype or int8 (per-head scales)")
    gen.add_argument("--speculative-tokens", type=int, default=0, metavar="GAMMA",
                     help="engine: tokens drafted per step and verified in one pass (from "
                     "--draft-model, else by prompt lookup); 0 = off")
    gen.add_argument("--draft-model", help="engine: HF model directory of a draft model that "
                     "shares the target's vocabulary")
    gen.add_argument("--snapkv-budget", type=_positive_int,
                     help="engine: compress each prompt's KV to this many tokens per head")
    gen.add_argument("--hydragen", action="store_true",
                     help="engine: batch the attention over shared prompt prefixes")

    tr = sub.add_parser("train", help="train or fine-tune on a text corpus",
                        epilog=EXAMPLES["train"], formatter_class=fmt)
    tr.add_argument("--out", required=True, help="run directory (checkpoints, logs, final model)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    tr.add_argument("--corpus", help="UTF-8 text file (default on --resume: the run's corpus)")
    source = tr.add_mutually_exclusive_group()
    source.add_argument("--config", help="HF-style config.json for a model trained from scratch")
    source.add_argument("--init", help="HF model directory to fine-tune")
    tr.add_argument("--tokenizer", help="tokenizer.json or a directory holding one")
    tr.add_argument("--vocab-size", type=int,
                    help="train a byte-level BPE of this size on the corpus")
    tr.add_argument("--held-out", type=_fraction,
                    help=f"fraction of tokens for evaluation (default {HELD_OUT})")
    tr.add_argument("--steps", type=_positive_int,
                    help="total optimizer steps; with --resume: extend the run to this many (the "
                         "learning-rate schedule follows the new total)")
    for flag, kind in (("--batch-size", _positive_int), ("--seq-len", _positive_int),
                       ("--grad-accum", _positive_int), ("--lr", float),
                       ("--warmup", _non_negative_int), ("--weight-decay", float),
                       ("--eval-every", _positive_int), ("--checkpoint-every", _positive_int),
                       ("--seed", _non_negative_int)):
        tr.add_argument(flag, type=kind)
    tr.add_argument("--remat", choices=REMAT_MODES,
                    help="recompute decoder-layer activations in the backward pass to save "
                         "memory (Llama, Mixtral; results are equal up to float rounding): full "
                         "keeps each layer's input, dots also its projections (default: the "
                         "run's own on --resume, else none)")
    tr.add_argument("--document-separator", type=int, metavar="TOKEN_ID",
                    help="pack documents: the token id that ends each document in the corpus "
                         "(e.g. 0, <|endoftext|> of the embedded tokenizer, which the corpus can "
                         "hold as text); rows then carry segment ids, so no token attends across "
                         "documents")

    cv = sub.add_parser("convert", help="rewrite an HF model directory (dtype, sharding)",
                        epilog=EXAMPLES["convert"], formatter_class=fmt)
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cv.add_argument("--shard-size-mb", type=_positive_finite,
                    help="split weights into shards of this size")

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
    qz.add_argument("--n-samples", type=_positive_int, default=32,
                    help="calibration chunks (fewer, with a warning, if the text is short)")
    qz.add_argument("--seq-len", type=_positive_int, default=128,
                    help="tokens per calibration chunk")
    qz.add_argument("--held-out", type=_fraction, default=0.05,
                    help="fraction at the end of the text never used for calibration")
    qz.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"],
                    help="default: gptq (v1) unless a zero point is 0")
    return parser


def _prompt_texts(args: argparse.Namespace) -> list[str]:
    """The prompts to serve: PROMPT, or the non-blank lines of --prompts-file."""
    if args.prompts_file is None:
        return [DEFAULT_PROMPT if args.prompt is None else args.prompt]
    if args.prompt is not None:
        raise ValueError("give PROMPT or --prompts-file, not both")
    texts = [line for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    if not texts:
        raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt (no non-blank line)")
    return texts


def _engine_runner(args: argparse.Namespace, model, tokenizer, prompts: list[list[int]]):
    """prepare() -> (engine, run): a new engine per call, so the timed call does not find the
    untimed call's prompt pages in its prefix cache (the compiled steps are shared by every
    engine)."""
    import jaxinfer

    params = jaxinfer.SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop), seed=args.seed, n=args.n, first_finish=args.first_finish)
    draft = (None if args.draft_model is None
             else jaxinfer.load_pretrained(Path(args.draft_model), dtype=args.dtype))

    def prepare():
        engine = jaxinfer.Engine(
            model, max_batch=args.max_batch, page_size=args.page_size, num_pages=args.num_pages,
            max_tokens_per_step=args.max_tokens_per_step, tokenizer=tokenizer,
            kv_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
            speculative_tokens=args.speculative_tokens, draft_model=draft,
            snapkv_budget=args.snapkv_budget, hydragen=args.hydragen)
        return engine, lambda: engine.generate(prompts, params)
    return prepare


def _static_batch_runner(args: argparse.Namespace, model, prompts: list[list[int]]):
    """prepare() -> (None, run) for a model without a paged KV cache (Hyena): one static batch
    through its own decode cache, which takes temperature, top-k and top-p only."""
    import jaxinfer

    given = [f"--{name.replace('_', '-')}" for name, off in ENGINE_FLAGS.items()
             if getattr(args, name) != off]
    if given:
        raise ValueError(f"{', '.join(given)} need the serving engine, a model with a paged KV "
                         f"cache; {type(model).__name__} decodes one static batch")

    def run() -> list[list[int]]:
        out = jaxinfer.generate(model, prompts, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
        return [row[len(prompts[0]):] for row in out.tolist()]
    return lambda: (None, run)


def _generate(args: argparse.Namespace) -> int:
    import jax

    import jaxinfer

    model_dir = Path(args.model) if args.model else jaxinfer.default_model_dir()
    model = jaxinfer.load_pretrained(model_dir, dtype=args.dtype)
    tokenizer = jaxinfer.load_tokenizer(model_dir)
    texts = _prompt_texts(args)
    encoded = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    for line, ids in enumerate(encoded, 1):
        if not ids:
            raise ValueError(f"prompt {line} ({texts[line - 1]!r}) encodes to no tokens")
    prompts = [ids for ids in encoded for _ in range(args.batch_size)]
    if hasattr(model, "forward_paged"):
        prepare, how = _engine_runner(args, model, tokenizer, prompts), "engine"
    else:
        prepare, how = _static_batch_runner(args, model, prompts), "static batch"
    t0 = time.perf_counter()
    prepare()[1]()  # compiles what this workload needs
    compile_s = time.perf_counter() - t0
    engine, run = prepare()
    t0 = time.perf_counter()
    outputs = run()
    run_s = time.perf_counter() - t0
    listed = args.n > 1 and not args.first_finish  # n samples per request: a list of lists
    for i, text in enumerate(texts):
        samples = outputs[i * args.batch_size] if listed else [outputs[i * args.batch_size]]
        for j, sample in enumerate(samples):
            if len(texts) > 1 or len(samples) > 1:
                print(f"--- prompt {i + 1}" + (f", sample {j + 1}" if listed else "") + " ---")
            print(text + tokenizer.decode([t for t in sample
                                           if t not in model.config.eos_token_id]))
    total = sum(len(t) for o in outputs for t in (o if listed else [o]))
    print(f"\n[{model_dir.name}: {total} tokens in {run_s:.3f} s = {total / run_s:.1f} tokens/s "
          f"({how}, {len(prompts)} requests, {jax.devices()[0].platform}; first call incl. "
          f"compile {compile_s:.1f} s)]", file=sys.stderr)
    if engine is not None and engine.num_draft_tokens:
        print(f"[speculative: {engine.num_accepted_tokens} of {engine.num_draft_tokens} drafted "
              f"tokens accepted ({engine.num_accepted_tokens / engine.num_draft_tokens:.0%})]",
              file=sys.stderr)
    return 0


def _model_of_config(config_file: Path, seed: int):
    """A randomly initialised model (from `seed`) of the type and shape config_file describes."""
    from flax import nnx

    import jaxinfer
    from jaxinfer.config import HYENA_MODEL_TYPE, read_config_json

    rngs = nnx.Rngs(seed)
    hf = read_config_json(config_file)
    if hf.get("model_type") == "mixtral":
        return jaxinfer.MixtralForCausalLM(jaxinfer.MixtralConfig.from_hf_config(hf), rngs=rngs)
    if hf.get("model_type") == HYENA_MODEL_TYPE:
        return jaxinfer.HyenaForCausalLM(jaxinfer.HyenaConfig.from_hf_config(hf), rngs=rngs)
    return jaxinfer.LlamaForCausalLM(jaxinfer.LlamaConfig.from_hf_config(hf), rngs=rngs)


def _config_file(path: str):
    """The LlamaConfig of a --config file, refusing jaxinfer's own run settings in it, which
    LlamaConfig.from_hf_config would otherwise drop without a word."""
    import jaxinfer
    from jaxinfer.config import read_config_json

    hf = read_config_json(path)
    found = sorted(set(hf) & set(RUN_SETTING_KEYS))
    if found:
        got = [f"{key} (give it as {RUN_SETTING_KEYS[key]})" if RUN_SETTING_KEYS[key]
               else f"{key} (jaxinfer train does not set it)" for key in found]
        raise ValueError(f"--config {path}: run settings are not keys of a model's config.json; "
                         f"got {', '.join(got)}")
    return jaxinfer.LlamaConfig.from_hf_config(hf)


def _with_remat(model, remat: str):
    """`model` with its config's remat set (Llama, Mixtral); a model without remat (Hyena) is
    left as it is for "none", an error otherwise."""
    if not hasattr(model.config, "remat"):
        if remat != "none":
            raise ValueError(f"--remat {remat} needs a model that recomputes decoder layers "
                             f"(Llama, Mixtral); {type(model).__name__} has no remat")
        return model
    model.config = model.config.replace(remat=remat)
    return model


def _run_record(run: Path, corpus_given: bool) -> dict:
    """The run's run.json (corpus, held_out, init, remat), checked for what --resume needs."""
    from jaxinfer.config import read_config_json
    from jaxinfer.train.run_files import RUN_FILE

    meta = read_config_json(run / RUN_FILE)
    missing = [key for key in ("held_out",) + (() if corpus_given else ("corpus",))
               if key not in meta]
    if missing:
        raise ValueError(f"{run / RUN_FILE} lacks {missing}"
                         + ("; give --corpus" if "corpus" in missing else ""))
    return meta


def _resumed_run(args: argparse.Namespace, run: Path):
    """(config, corpus, held_out, tokenizer, model, write_run_files) of the run in `run`, the
    given flags applied; write_run_files records a changed --remat in its run.json."""
    import jaxinfer
    from jaxinfer.train import TrainConfig
    from jaxinfer.train.resume import latest_checkpoint_step
    from jaxinfer.train.run_files import RUN_FILE, TRAIN_CONFIG_FILE, write_json

    if not (run / TRAIN_CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run} holds no run to resume ({TRAIN_CONFIG_FILE} missing)")
    fixed = [f"--{k.replace('_', '-')}" for k in RUN_FLAGS if getattr(args, k) is not None]
    if fixed:
        raise ValueError(f"--resume continues the run in {run} on its own held-out split, "
                         f"tokenizer and model; {', '.join(fixed)} cannot change them")
    # jaxinfer.train.train refuses changes to the settings a resumed run must keep
    config = dataclasses.replace(TrainConfig.load(run / TRAIN_CONFIG_FILE), **{
        field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()
        if getattr(args, flag) is not None})
    meta = _run_record(run, corpus_given=bool(args.corpus))
    remat = args.remat or meta.get("remat", "none")
    # a model of the run's shape, whose weights the checkpoint replaces; killed before its
    # first checkpoint, the run starts again from exactly the model it started from
    init = meta.get("init")
    if latest_checkpoint_step(run) is None and init is not None:
        model = jaxinfer.load_pretrained(init)
    else:
        model = _model_of_config(run / "config.json", config.seed)
    model = _with_remat(model, remat)

    def write_run_files() -> None:  # the next plain --resume keeps this remat
        if remat != meta.get("remat", "none"):
            write_json(run / RUN_FILE, {**meta, "remat": remat})
    corpus = args.corpus or meta["corpus"]
    return (config, corpus, meta["held_out"], jaxinfer.load_tokenizer(run), model,
            write_run_files)


def _fresh_run(args: argparse.Namespace, run: Path):
    """(config, corpus, held_out, tokenizer, model, write_run_files) of a new run in `run`;
    write_run_files writes its tokenizer and run.json."""
    from flax import nnx

    import jaxinfer
    from jaxinfer.tokenizer import train_bpe
    from jaxinfer.train import TrainConfig
    from jaxinfer.train.data import read_corpus
    from jaxinfer.train.resume import check_no_checkpoints
    from jaxinfer.train.run_files import RUN_FILE, write_json

    if not args.corpus:
        raise ValueError("--corpus is required unless --resume is given")
    check_no_checkpoints(run)  # before a tokenizer is trained for nothing
    held_out = HELD_OUT if args.held_out is None else args.held_out
    config = TrainConfig(**{field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()
                            if getattr(args, flag) is not None})
    if args.tokenizer or args.init:
        tokenizer = jaxinfer.load_tokenizer(args.tokenizer or args.init)
    elif args.vocab_size:
        print(f"training a byte-level BPE tokenizer with {args.vocab_size} tokens ...")
        tokenizer = train_bpe(read_corpus(args.corpus).splitlines(), args.vocab_size,
                              progress=True)
    else:
        raise ValueError("give --tokenizer, --init or --vocab-size to choose a tokenizer")
    if args.init:
        init = str(Path(args.init).absolute())
        model = jaxinfer.load_pretrained(init)
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but "
                             f"the model in {args.init} embeds only "
                             f"{model.config.vocab_size}")
    elif args.config:
        init = None
        model_config = _config_file(args.config).replace(vocab_size=tokenizer.get_vocab_size())
        model = jaxinfer.LlamaForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
    else:
        raise ValueError("give --config (train from scratch) or --init (fine-tune)")
    remat = args.remat or "none"
    model = _with_remat(model, remat)
    record = {"corpus": str(Path(args.corpus).absolute()), "held_out": held_out, "init": init,
              "remat": remat}

    def write_run_files() -> None:
        run.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(run / "tokenizer.json"))
        write_json(run / RUN_FILE, record)
    return config, args.corpus, held_out, tokenizer, model, write_run_files


def _train(args: argparse.Namespace) -> int:
    import numpy as np
    from flax import nnx

    import jaxinfer
    from jaxinfer.train import split_held_out, tokenize_corpus, train
    from jaxinfer.train.data import read_corpus
    from jaxinfer.train.run_files import write_json

    run = Path(args.out)
    config, corpus, held_out, tokenizer, model, write_run_files = (
        _resumed_run(args, run) if args.resume else _fresh_run(args, run))
    tokens = tokenize_corpus(read_corpus(corpus), tokenizer)
    train_tokens, eval_tokens = split_held_out(tokens, held_out,
                                               separator=config.document_separator)
    n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    print(f"{n_params / 1e6:.2f}M parameters; {len(train_tokens):,} train and "
          f"{len(eval_tokens):,} held-out tokens; {config.steps} steps of "
          f"{config.batch_size * config.grad_accum}x{config.seq_len} tokens")
    # the run's files are written once train() has accepted the run: a refused one changes none
    result = train(model, train_tokens, eval_tokens, config, run, resume=args.resume,
                   on_start=write_run_files)
    out = jaxinfer.save_pretrained(result.model, run / "model", tokenizer=tokenizer)
    last = result.history[-1]
    evals = [r for r in result.history if "eval_loss" in r]
    summary = {"steps": last["step"], "final_train_loss": last["loss"],
               "held_out_loss": evals[-1]["eval_loss"] if evals else None,
               "held_out_perplexity": evals[-1]["eval_perplexity"] if evals else None,
               "wall_seconds_this_invocation": result.wall_seconds,
               "parameters": n_params, "train_tokens": int(len(train_tokens)),
               "held_out_tokens": int(len(eval_tokens))}
    write_json(run / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"model written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxinfer").setLevel(logging.INFO)
    command = {"generate": _generate, "train": _train, "convert": cli_checkpoints.convert,
               "quantize": cli_checkpoints.quantize}[args.command]
    try:
        return command(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: a missing path, a directory, ...
        print(f"jaxinfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
