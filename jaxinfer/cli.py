"""The `jaxinfer` command line: generate, train, convert, quantize (train in `cli_train.py`, the
last two in `cli_checkpoints.py`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

from jaxinfer import cli_checkpoints, cli_train
from jaxinfer.cli_flags import flag_errors
from jaxinfer.cli_train import HELD_OUT, TRAIN_FLAGS
from jaxinfer.config import REMAT_MODES
from jaxinfer.train.train_config import RESUMABLE, TrainConfig

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


def _group_size(text: str) -> int:
    """argparse type: a quantization group size, an integer >= 1 or -1 (per channel)."""
    value = int(text)
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or -1 (per channel); got {text}")
    return value


# a byte-level BPE holds the 256 bytes and <|endoftext|> whatever size it is asked for
MIN_BPE_VOCAB = 257


def _vocab_size(text: str) -> int:
    """argparse type: a byte-level BPE's vocabulary size, an integer >= MIN_BPE_VOCAB."""
    value = int(text)
    if value < MIN_BPE_VOCAB:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= {MIN_BPE_VOCAB} (the 256 bytes and <|endoftext|>); got {text}")
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


# `jaxinfer generate` flags only the engine honours, with the values that leave them off (for the
# engine's sizes, their defaults): a static-batch model (Hyena) refuses any other value
ENGINE_FLAGS = {"prompts_file": None, "min_p": None, "repetition_penalty": 1.0, "stop": [],
                "n": 1, "first_finish": False, "kv_cache_dtype": "auto", "speculative_tokens": 0,
                "draft_model": None, "snapkv_budget": None, "hydragen": False,
                "max_batch": 64, "page_size": 16, "num_pages": None, "max_tokens_per_step": 512}
DEFAULT_PROMPT = "In the beginning"
# library parameter names in the errors of `jaxinfer generate` -> the flags that set them
# (SamplingParams' fields and the Engine's arguments; cli_flags.in_flag_terms); --snapkv-budget's
# bound on the engine's snapkv_window, which no flag sets, is checked before
# (_check_generate_args)
GENERATE_FLAG_NAMES = {"max_tokens": "--max-new-tokens", "temperature": "--temperature",
                       "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                       "repetition_penalty": "--repetition-penalty", "stop": "--stop",
                       "seed": "--seed", "n": "--n", "first_finish": "--first-finish",
                       "kv_dtype": "--kv-cache-dtype", "speculative_tokens": "--speculative-tokens",
                       "draft_model": "--draft-model",
                       "snapkv_budget": "--snapkv-budget", "max_batch": "--max-batch",
                       "page_size": "--page-size", "num_pages": "--num-pages",
                       "max_tokens_per_step": "--max-tokens-per-step"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each option's default after its help where it has one to
    show (not None, False or [], and not already told in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if (action.option_strings and not unset and action.default != argparse.SUPPRESS
                and "default" not in help_text):
            help_text += " (default: %(default)s)" if help_text else "default: %(default)s"
        return help_text


# --help of `jaxinfer train`'s training-loop flags, before their defaults (_train_help)
TRAIN_HELP = {"steps": "total optimizer steps; with --resume: extend the run to this many (the "
                       "learning-rate schedule follows the new total)",
              "batch_size": "sequences per micro-batch", "seq_len": "tokens per sequence",
              "grad_accum": "micro-batches averaged per optimizer step",
              "lr": "peak learning rate (linear warmup, then cosine decay)",
              "warmup": "warmup steps", "weight_decay": "AdamW weight decay",
              "eval_every": "steps between held-out evaluations",
              "checkpoint_every": "steps between checkpoints", "seed": "data and init seed"}


def _train_help(flag: str) -> str:
    """--help of a training-loop flag with TrainConfig's default (the parser's default is None,
    so that --resume can tell which flags were given: see cli_train) and what --resume does
    with it: a resumed run may change only the RESUMABLE settings."""
    field = TRAIN_FLAGS[flag]
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[field]
    on_resume = ("on --resume: the run's unless given" if field in RESUMABLE
                 else "--resume keeps the run's")
    return f"{TRAIN_HELP[flag]} (default: {default}; {on_resume})"


class _Parser(argparse.ArgumentParser):
    """The top-level parser, whose unrecognized arguments (a misspelt or abbreviated flag) the
    command's own parser reports, with the command's usage line, not the top-level one's."""

    commands: dict[str, argparse.ArgumentParser]  # set by _parser

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        args = sys.argv[1:] if args is None else list(args)
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            # the first token that is not an option names the command (the top level has no
            # options but -h): what comes before it is the top level's to refuse
            before = args[:args.index(parsed.command)]
            owner = self if any(a in before for a in unknown) else self.commands[parsed.command]
            owner.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a flag another one begins with (--max-tokens, --max-tokens-per-step)
    # must not silently set that other one; subparsers do not inherit it
    parser = _Parser(prog="jaxinfer", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, epilog=EXAMPLES[name], allow_abbrev=False,
                              formatter_class=_HelpFormatter)

    gen = add("generate", "continue a prompt")
    gen.add_argument("prompt", nargs="?", help=f"default: {DEFAULT_PROMPT!r}")
    gen.add_argument("--prompts-file", help="UTF-8 text file of prompts, one per line, served "
                     "together (instead of PROMPT)")
    gen.add_argument("--model", help="HF model directory (default: the embedded model)")
    gen.add_argument("--max-new-tokens", "--max-tokens", type=_positive_int, default=48,
                     help="tokens generated per sample (--max-tokens: vLLM's name)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=_positive_int, help="sample among the k likeliest tokens")
    gen.add_argument("--top-p", type=float,
                     help="sample among the likeliest tokens whose probabilities sum to p")
    gen.add_argument("--min-p", type=float,
                     help="drop tokens less likely than min-p times the likeliest one")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="a string that ends a completion (repeatable)")
    gen.add_argument("--n", type=_positive_int, default=1, help="samples per prompt")
    gen.add_argument("--first-finish", action="store_true",
                     help="with --n 2 or more: First Finish Search, return the shortest sample")
    gen.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed")
    gen.add_argument("--batch-size", type=_positive_int, default=1,
                     help="copies of the prompt decoded together")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                     help="the model's parameter and compute dtype")
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
    gen.add_argument("--speculative-tokens", type=_non_negative_int, default=0, metavar="GAMMA",
                     help="engine: tokens drafted per step and verified in one pass (from "
                     "--draft-model, else by prompt lookup); 0 = off")
    gen.add_argument("--draft-model", help="engine: HF model directory of a draft model that "
                     "shares the target's vocabulary")
    gen.add_argument("--snapkv-budget", type=_positive_int,
                     help="engine: compress each prompt's KV to this many tokens per head")
    gen.add_argument("--hydragen", action="store_true",
                     help="engine: batch the attention over shared prompt prefixes")

    tr = add("train", "train or fine-tune on a text corpus")
    tr.add_argument("--out", required=True, help="run directory (checkpoints, logs, final model)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    tr.add_argument("--corpus", help="UTF-8 text file (default on --resume: the run's corpus)")
    source = tr.add_mutually_exclusive_group()
    source.add_argument("--config", help="HF-style config.json for a model trained from scratch")
    source.add_argument("--init", help="HF model directory to fine-tune")
    tr.add_argument("--tokenizer", help="tokenizer.json or a directory holding one")
    tr.add_argument("--vocab-size", type=_vocab_size,
                    help="train a byte-level BPE of this size on the corpus")
    tr.add_argument("--held-out", type=_fraction,
                    help=f"fraction of tokens for evaluation (default {HELD_OUT})")
    tr.add_argument("--steps", type=_positive_int, help=_train_help("steps"))
    for flag, kind in (("--batch-size", _positive_int), ("--seq-len", _positive_int),
                       ("--grad-accum", _positive_int), ("--lr", float),
                       ("--warmup", _non_negative_int), ("--weight-decay", float),
                       ("--eval-every", _positive_int), ("--checkpoint-every", _positive_int),
                       ("--seed", _non_negative_int)):
        tr.add_argument(flag, type=kind, help=_train_help(flag[2:].replace("-", "_")))
    tr.add_argument("--remat", choices=REMAT_MODES,
                    help="recompute each layer's activations in the backward pass to save "
                         "memory (results are equal up to float rounding): full keeps each "
                         "layer's input, dots also its matmul outputs (default: the run's own on "
                         "--resume, else none)")
    tr.add_argument("--document-separator", type=int, metavar="TOKEN_ID",
                    help="pack documents: the token id that ends each document in the corpus "
                         "(e.g. 0, <|endoftext|> of the embedded tokenizer, which the corpus can "
                         "hold as text); rows then carry segment ids, so no token attends across "
                         "documents (--resume keeps the run's)")

    cv = add("convert", "rewrite an HF model directory (dtype, sharding)")
    cv.add_argument("src", help="HF model directory")
    cv.add_argument("dst", help="output directory (may be src: rewritten in place)")
    cv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the written weights' dtype")
    cv.add_argument("--shard-size-mb", type=_positive_finite,
                    help="split weights into shards of this size")

    qz = add("quantize", "GPTQ/RTN-quantize a model into an HF GPTQ checkpoint")
    qz.add_argument("model", help="HF model directory (float weights)")
    qz.add_argument("out", help="output directory (GPTQ checkpoint + tokenizer)")
    qz.add_argument("--method", default="gptq", choices=["gptq", "rtn"],
                    help="GPTQ (calibrated) or round to nearest")
    qz.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="weight bits")
    qz.add_argument("--group-size", type=_group_size, default=128,
                    help="weights per scale along each layer's in_features, which it must "
                         "divide; -1 = per channel")
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
    try:
        text = Path(args.prompts_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {args.prompts_file} is not UTF-8 text: {e}") from None
    except OSError as e:  # a missing file, a directory: said in the user's terms
        raise ValueError(f"--prompts-file {args.prompts_file} cannot be read "
                         f"({e.strerror or e})") from None
    texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt (no non-blank line)")
    return texts


def _check_generate_args(args: argparse.Namespace) -> None:
    """What the flags alone refuse, checked before a model is loaded (which can take long):
    flags that need another one, and what the engine would refuse naming one of its own
    arguments that no flag sets. SamplingParams checks the sampling flags (_sampling_params)."""
    from jaxinfer.generate.engine import DEFAULT_SNAPKV_WINDOW as window
    if args.first_finish and args.n < 2:
        raise ValueError(f"--first-finish needs --n >= 2: First Finish Search returns the "
                         f"shortest of the --n samples; got --n {args.n}")
    if args.draft_model is not None and args.speculative_tokens == 0:
        raise ValueError("--draft-model needs --speculative-tokens >= 1 (the tokens it guesses "
                         "per step); got --speculative-tokens 0")
    if args.snapkv_budget is not None and args.snapkv_budget < window:
        raise ValueError(f"--snapkv-budget must be at least {window}: SnapKV keeps a prompt's "
                         f"last {window} tokens (its observation window, whose attention picks "
                         f"the others); got {args.snapkv_budget}")
    if args.snapkv_budget is not None and args.max_tokens_per_step < window:
        raise ValueError(f"--max-tokens-per-step must be at least {window} with --snapkv-budget: "
                         f"SnapKV's observation window, a prompt's last {window} tokens, comes "
                         f"from one step; got {args.max_tokens_per_step}")


def _sampling_params(args: argparse.Namespace):
    """The engine's SamplingParams of the flags; built before the model is loaded, so that a bad
    sampling flag is refused first (a static batch takes the same checks)."""
    import jaxinfer

    return jaxinfer.SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop), seed=args.seed, n=args.n, first_finish=args.first_finish)


def _engine_runner(args: argparse.Namespace, params, model, tokenizer,
                   prompts: list[list[int]]):
    """prepare() -> (engine, run): a new engine per call, so the timed call does not find the
    untimed call's prompt pages in its prefix cache (the compiled steps are shared by every
    engine). The later engines take the first one's pool size: the shapes the untimed call
    compiled, also where free memory changed, and the pool sized (and logged) once."""
    import jaxinfer

    draft = (None if args.draft_model is None
             else jaxinfer.load_pretrained(Path(args.draft_model), dtype=args.dtype))

    num_pages = args.num_pages

    def prepare():
        nonlocal num_pages
        engine = jaxinfer.Engine(
            model, max_batch=args.max_batch, page_size=args.page_size, num_pages=num_pages,
            max_tokens_per_step=args.max_tokens_per_step, tokenizer=tokenizer,
            kv_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
            speculative_tokens=args.speculative_tokens, draft_model=draft,
            snapkv_budget=args.snapkv_budget, hydragen=args.hydragen)
        num_pages = engine.num_pages
        return engine, lambda: engine.generate(prompts, params)
    return prepare


def _static_batch_runner(args: argparse.Namespace, model, prompts: list[list[int]]):
    """prepare() -> (None, run) for a model without a paged KV cache (Hyena): one static batch
    through its own decode cache, which takes temperature, top-k and top-p only."""
    import jaxinfer

    given = [f"--{name.replace('_', '-')}" for name, off in ENGINE_FLAGS.items()
             if getattr(args, name) != off]
    if given:
        raise ValueError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} the serving "
                         f"engine, a model with a paged KV cache; {type(model).__name__} decodes "
                         f"one static batch")

    def run() -> list[list[int]]:
        out = jaxinfer.generate(model, prompts, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
        return [row[len(prompts[0]):] for row in out.tolist()]
    return lambda: (None, run)


def _generate(args: argparse.Namespace) -> int:
    """The `jaxinfer generate` command; library errors name the flags (GENERATE_FLAG_NAMES)."""
    with flag_errors(GENERATE_FLAG_NAMES):
        return _run_generate(args)


def _run_generate(args: argparse.Namespace) -> int:
    import jax

    import jaxinfer

    _check_generate_args(args)
    texts = _prompt_texts(args)
    params = _sampling_params(args)
    model_dir = Path(args.model) if args.model else jaxinfer.default_model_dir()
    model = jaxinfer.load_pretrained(model_dir, dtype=args.dtype)
    tokenizer = jaxinfer.load_tokenizer(model_dir)
    encoded = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    for line, ids in enumerate(encoded, 1):
        if not ids:
            raise ValueError(f"prompt {line} ({texts[line - 1]!r}) encodes to no tokens")
    prompts = [ids for ids in encoded for _ in range(args.batch_size)]
    if hasattr(model, "forward_paged"):
        prepare, how = _engine_runner(args, params, model, tokenizer, prompts), "engine"
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
    requests = f"{len(prompts)} request" + ("s" if len(prompts) > 1 else "")
    print(f"\n[{model_dir.name}: {total} tokens in {run_s:.3f} s = {total / run_s:.1f} tokens/s "
          f"({how}, {requests}, {jax.devices()[0].platform}; first call incl. "
          f"compile {compile_s:.1f} s)]", file=sys.stderr)
    if engine is not None and engine.num_draft_tokens:
        print(f"[speculative: {engine.num_accepted_tokens} of {engine.num_draft_tokens} drafted "
              f"tokens accepted ({engine.num_accepted_tokens / engine.num_draft_tokens:.0%})]",
              file=sys.stderr)
    return 0


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on the sys.stderr of each record's moment, not of its creation: the log
    lines go where the command's own messages go, also once a caller (a test) swapped
    sys.stderr."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it
        pass


@contextlib.contextmanager
def _logging_to_stderr():
    """The command's log records on stderr as "LEVEL name: message", jaxinfer's from INFO up and
    other libraries' from WARNING up; after it, the root logger's handlers and the levels as they
    were (the process may go on: a test, a notebook). The root's handlers are replaced, not added
    to, as logging.basicConfig(force=True) does: importing orbax has already given it absl's
    default handler, which a plain basicConfig keeps (and with it "INFO:name:message"). Those
    replaced include pytest's capture handlers: a test of a command reads its log lines from
    stderr (capsys), not caplog."""
    root, ours = logging.getLogger(), logging.getLogger("jaxinfer")
    handlers, root_level, our_level = root.handlers[:], root.level, ours.level
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for old in handlers:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for old in handlers:
            root.addHandler(old)
        root.setLevel(root_level)
        ours.setLevel(our_level)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"generate": _generate, "train": cli_train.train, "convert": cli_checkpoints.convert,
               "quantize": cli_checkpoints.quantize}[args.command]
    try:
        with _logging_to_stderr():
            return command(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: a missing path, a directory, ...
        print(f"jaxinfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
