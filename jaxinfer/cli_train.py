"""`jaxinfer train`: train a model from scratch or fine-tune one on a text corpus, in a run
directory that `--resume` continues exactly. Everything that can refuse a run (flags, settings,
data, the corpus's length) is checked before a file is written; Ctrl-C saves the last step."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple, NoReturn

from jaxinfer.cli_flags import flag_errors

# `jaxinfer train` flags -> TrainConfig fields. The parser's defaults are None, so that `--resume`
# can tell which were given; a fresh run fills the rest from TrainConfig's defaults, and a resumed
# run takes its train_config.json with the given ones replaced (jaxinfer.train.train refuses
# changes outside jaxinfer.train.train_config.RESUMABLE).
TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len",
               "grad_accum": "grad_accum", "lr": "learning_rate", "warmup": "warmup_steps",
               "weight_decay": "weight_decay", "eval_every": "eval_every",
               "checkpoint_every": "checkpoint_every", "seed": "seed",
               "document_separator": "document_separator"}
# TrainConfig fields in the library's errors -> the flags that set them (cli_flags.flag_errors)
TRAIN_FLAG_NAMES = {field: f"--{flag.replace('_', '-')}" for flag, field in TRAIN_FLAGS.items()}
# flags that choose a run's data, tokenizer or model: --resume takes them from the run itself
RUN_FLAGS = ("held_out", "config", "init", "tokenizer", "vocab_size")
# model config fields that are run settings, not Hugging Face config keys: from_hf_config would
# drop them from a --config file without a word -> the flag that sets them (or None)
RUN_SETTING_KEYS = {"remat": "--remat", "attention_backend": None, "sequence_parallel": None,
                    "param_dtype": None, "moe_impl": None, "capacity_factor": None,
                    "fftconv_backend": None}
HELD_OUT = 0.05  # default fraction of the corpus kept for evaluation
TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer; run.json records its sha256


def _read_config(path: str | Path, name: str) -> dict:
    """The JSON object in the file at `path`; errors begin with `name` (how the user knows it)."""
    from jaxinfer.config import read_config_json

    try:
        return read_config_json(path)
    except OSError as e:  # a missing file, a directory: said in the user's terms
        raise ValueError(f"{name}: cannot be read ({e.strerror or e})") from None


def _model_config(hf: dict, name: str) -> tuple:
    """(model class, model config) of a config.json's values, dispatched on its model_type;
    errors begin with `name` (how the user knows the file), not with the "config.json" of
    from_hf_config's."""
    from jaxinfer.models.registry import model_classes

    config_class, model_class = model_classes(hf.get("model_type"), name)
    try:
        return model_class, config_class.from_hf_config(hf)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {str(e).removeprefix('config.json: ')}") from None


def _model_of_config(config_file: Path, seed: int):
    """A randomly initialised model (from `seed`) of the type and shape config_file describes."""
    from flax import nnx

    name = str(config_file)
    model_class, config = _model_config(_read_config(config_file, name), name)
    return model_class(config, rngs=nnx.Rngs(seed))


def _config_file(path: str) -> tuple:
    """(model class, model config) of a --config file, refusing jaxinfer's own run settings in
    it, which from_hf_config would otherwise drop without a word."""
    name = f"--config {path}"
    hf = _read_config(path, name)
    found = sorted(set(hf) & set(RUN_SETTING_KEYS))
    if found:
        got = [f"{key} (give it as {RUN_SETTING_KEYS[key]})" if RUN_SETTING_KEYS[key]
               else f"{key} (jaxinfer train does not set it)" for key in found]
        raise ValueError(f"{name}: run settings are not keys of a model's config.json; "
                         f"got {', '.join(got)}")
    return _model_config(hf, name)


def _with_remat(model, remat: str):
    """`model` with its config's remat set (Llama, Mixtral and Hyena all recompute layers)."""
    model.config = model.config.replace(remat=remat)
    return model


def _run_record(run: Path, corpus_given: bool) -> dict:
    """The run's run.json (corpus, held_out, init, remat, tokenizer_sha256), checked for what
    --resume needs."""
    from jaxinfer.config import read_config_json
    from jaxinfer.train.run_files import RUN_FILE

    meta = read_config_json(run / RUN_FILE)
    missing = [key for key in ("held_out",) + (() if corpus_given else ("corpus",))
               if key not in meta]
    if missing:
        raise ValueError(f"{run / RUN_FILE} lacks {missing}"
                         + ("; give --corpus" if "corpus" in missing else ""))
    return meta




class _Run(NamedTuple):
    """What `_resumed_run` and `_fresh_run` settle before the corpus is tokenized."""

    config: object  # jaxinfer.train.TrainConfig
    corpus: str  # the corpus file to read
    held_out: float
    tokenizer: object  # tokenizers.Tokenizer
    model: object
    write_run_files: object  # () -> None: called once train() has accepted the run
    recorded_corpus: str | None  # a resumed run's corpus, as its run.json records it
    tokenizer_sha256: str | None  # a resumed run's tokenizer.json hash, as run.json records it


def _resumed_run(args: argparse.Namespace, run: Path) -> _Run:
    """The run in `run` with the given flags applied; its settings are checked here, before the
    corpus is read, so that a changed one is refused as such. write_run_files records a changed
    --remat (and a missing tokenizer hash) in its run.json."""
    import jaxinfer
    from jaxinfer.train import TrainConfig
    from jaxinfer.train.resume import check_resume, latest_checkpoint_step
    from jaxinfer.files import write_json
    from jaxinfer.train.run_files import RUN_FILE, TRAIN_CONFIG_FILE

    if not (run / TRAIN_CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run} holds no run to resume ({TRAIN_CONFIG_FILE} missing)")
    fixed = [f"--{k.replace('_', '-')}" for k in RUN_FLAGS if getattr(args, k) is not None]
    if fixed:
        raise ValueError(f"--resume continues the run in {run} on its own held-out split, "
                         f"tokenizer and model; {', '.join(fixed)} cannot change them")
    saved = TrainConfig.load(run / TRAIN_CONFIG_FILE)  # its errors name the file's keys
    given = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()
             if getattr(args, flag) is not None}
    with flag_errors(TRAIN_FLAG_NAMES):
        config = dataclasses.replace(saved, **given)
    _refuse_changed_settings(run, saved, config)
    with flag_errors(TRAIN_FLAG_NAMES):  # --steps below the run's step
        check_resume(run, config)  # jaxinfer.train.train checks it again, with the model and data
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

    def write_run_files() -> None:
        # the next plain --resume keeps this remat; a run begun before run.json recorded its
        # tokenizer's hash gets it (train() found the tokens, so the tokenizer, unchanged)
        record = {**meta, "remat": remat, "tokenizer_sha256": _tokenizer_sha256(run)}
        if record != meta:
            write_json(run / RUN_FILE, record)
    return _Run(config, args.corpus or meta["corpus"], meta["held_out"],
                jaxinfer.load_tokenizer(run), model, write_run_files, meta.get("corpus"),
                meta.get("tokenizer_sha256"))


def _refuse_changed_settings(run: Path, saved, config) -> None:
    """ValueError in flag terms when `config` changes one of the resumed run's `saved` settings
    that a flag sets outside RESUMABLE (check_resume's check, which names TrainConfig's fields);
    --remat, a model setting, may change too."""
    from jaxinfer.train.train_config import RESUMABLE

    changes = [f"{TRAIN_FLAG_NAMES[field]}: {getattr(saved, field)!r} -> "
               f"{getattr(config, field)!r}" for field in TRAIN_FLAGS.values()
               if field not in RESUMABLE and getattr(saved, field) != getattr(config, field)]
    if changes:
        may_change = [TRAIN_FLAG_NAMES[field] for field in RESUMABLE]
        raise ValueError(f"--resume continues the run in {run} with its settings; only "
                         f"{', '.join(may_change)} and --remat may change; got other values "
                         f"for {'; '.join(changes)}")


def _fresh_run(args: argparse.Namespace, run: Path) -> _Run:
    """A new run in `run`; write_run_files writes its tokenizer and run.json. What the flags and
    the --config file alone refuse is refused before a tokenizer is trained for nothing."""
    from flax import nnx

    import jaxinfer
    from jaxinfer.tokenizer import train_bpe
    from jaxinfer.train import TrainConfig
    from jaxinfer.train.loop import check_model_fits
    from jaxinfer.train.resume import check_no_checkpoints
    from jaxinfer.files import write_json
    from jaxinfer.train.run_files import RUN_FILE

    if not args.corpus:
        raise ValueError("--corpus is required unless --resume is given")
    check_no_checkpoints(run)  # before a tokenizer is trained for nothing
    held_out = HELD_OUT if args.held_out is None else args.held_out
    with flag_errors(TRAIN_FLAG_NAMES):
        config = TrainConfig(**{field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()
                                if getattr(args, flag) is not None})
    given = args.tokenizer or args.init  # the tokenizer's source, when not trained here
    if given and args.vocab_size is not None:
        # that tokenizer fixes the vocabulary: ignoring the size asked for would give a model
        # of another size without a word
        source = "--tokenizer" if args.tokenizer else "--init"
        raise ValueError(f"--vocab-size trains a new tokenizer, but {source} {given} gives one "
                         f"(and its vocabulary size): give one of {source} and --vocab-size")
    if not given and args.vocab_size is None:
        raise ValueError("give --tokenizer, --init or --vocab-size to choose a tokenizer")
    if args.init:
        init = str(Path(args.init).absolute())
        model = jaxinfer.load_pretrained(init)
        model_class, model_config = type(model), model.config
    elif args.config:
        init = None
        model_class, model_config = _config_file(args.config)
    else:
        raise ValueError("give --config (train from scratch) or --init (fine-tune)")
    with flag_errors(TRAIN_FLAG_NAMES):
        check_model_fits(model_class, model_config, config)
    if given:
        tokenizer = jaxinfer.load_tokenizer(given)
    else:
        text = _corpus_text(args.corpus)  # an empty one is refused before the tokenizer
        print(f"training a byte-level BPE tokenizer with {args.vocab_size} tokens ...")
        tokenizer = train_bpe(text.splitlines(), args.vocab_size, progress=True)
    if args.init:
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but "
                             f"the model in {args.init} embeds only "
                             f"{model.config.vocab_size}")
    else:
        model = model_class(model_config.replace(vocab_size=tokenizer.get_vocab_size()),
                            rngs=nnx.Rngs(config.seed))
    remat = args.remat or "none"
    model = _with_remat(model, remat)
    record = {"corpus": str(Path(args.corpus).absolute()), "held_out": held_out, "init": init,
              "remat": remat}

    def write_run_files() -> None:
        run.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(run / TOKENIZER_FILE))
        write_json(run / RUN_FILE, {**record, "tokenizer_sha256": _tokenizer_sha256(run)})
    return _Run(config, args.corpus, held_out, tokenizer, model, write_run_files, None, None)


def _corpus_text(path: str) -> str:
    """The corpus file's text; ValueError naming it when it holds nothing to train on."""
    from jaxinfer.train.data import read_corpus

    text = read_corpus(path)
    if not text.strip():
        raise ValueError(f"corpus {path} is empty: nothing to train on")
    return text


def _split_corpus(args: argparse.Namespace, spec: _Run):
    """(train tokens, held-out tokens) of the run's corpus; ValueError naming the corpus (and, on
    a fresh run, the flags to change) when it is too short for one window in each part."""
    from jaxinfer.train import split_held_out, tokenize_corpus

    tokens = tokenize_corpus(_corpus_text(spec.corpus), spec.tokenizer)
    window = spec.config.seq_len + 1
    short = f"corpus {spec.corpus} is too short: its {len(tokens)} tokens"
    if len(tokens) < 2 * window:
        raise ValueError(f"{short} must give the training and the held-out part one window of "
                         f"--seq-len + 1 = {window} tokens each"
                         + ("" if args.resume else "; give a longer corpus or a smaller --seq-len"))
    train_tokens, eval_tokens = split_held_out(tokens, spec.held_out,
                                               separator=spec.config.document_separator)
    for part, got, flag in (("training", train_tokens, "a smaller --held-out"),
                            ("held-out", eval_tokens, "a larger --held-out")):
        if len(got) < window:
            raise ValueError(f"{short} leave {len(got)} for the {part} part (held-out fraction "
                             f"{spec.held_out}), under one window of --seq-len + 1 = {window}"
                             + ("" if args.resume else f"; give a longer corpus, a smaller "
                                                       f"--seq-len or {flag}"))
    return train_tokens, eval_tokens


def _tokenizer_sha256(run: Path) -> str:
    """The sha256 of the run's tokenizer.json, as its run.json records it."""
    return hashlib.sha256((run / TOKENIZER_FILE).read_bytes()).hexdigest()


def _resumed_split(args: argparse.Namespace, run: Path, spec: _Run):
    """`_split_corpus` of a resumed run, refused as other data (`_refuse_other_data`) when its
    tokens are not those it began with. A split that fails counts as such when the run recorded
    its data: the run's own tokens split under the same settings (--resume changes neither
    --held-out nor --document-separator), so the user learns that the data changed, not why
    the other data do not split."""
    from jaxinfer.train.resume import data_changes, data_fingerprint
    from jaxinfer.train.run_files import DATA_FILE

    try:
        train_tokens, eval_tokens = _split_corpus(args, spec)
    except ValueError as e:
        if not (run / DATA_FILE).exists():
            raise
        _refuse_other_data(args, run, spec, [f"the run's held-out split fails on them ({e})"])
    changes = data_changes(run, data_fingerprint(train_tokens, eval_tokens))
    if changes:
        _refuse_other_data(args, run, spec, changes)
    return train_tokens, eval_tokens


def _refuse_other_data(args: argparse.Namespace, run: Path, spec: _Run,
                       changes: list[str]) -> NoReturn:
    """ValueError naming what changed (the given corpus, the run's corpus or its
    tokenizer.json) when a resumed run's tokens are not those it began with."""
    recorded = spec.tokenizer_sha256
    if recorded is not None and recorded != _tokenizer_sha256(run):
        given = f"its {run / TOKENIZER_FILE}, changed since,"
    elif args.corpus:
        given = f"--corpus {args.corpus}"
    elif recorded is None:  # a run begun before run.json recorded its tokenizer
        given = f"its corpus {spec.corpus} or its {run / TOKENIZER_FILE}, changed since,"
    else:
        given = f"its corpus {spec.corpus}, changed since,"
    raise ValueError(f"--resume continues the run in {run} on the data it began with (corpus "
                     f"{spec.recorded_corpus}); {given} gives other tokens: "
                     f"{'; '.join(changes)}")


@contextlib.contextmanager
def _quiet_checkpoint_noise():
    """Mute what orbax's background save threads print when a save fails (absl and asyncio
    error logs with tracebacks, and 'Event loop is closed' from tensorstore's callbacks): the
    failure reaches the command as one CheckpointWriteError naming the checkpoint directory.
    After that failure alone the mute stays, since the failed save's futures log again when
    they are collected, as the process exits; any other way out restores the loggers' levels
    and sys.unraisablehook."""
    from jaxinfer.train import CheckpointWriteError

    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    previous_hook = sys.unraisablehook

    def restore() -> None:
        sys.unraisablehook = previous_hook
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

    def unraisable(info) -> None:
        if not (isinstance(info.exc_value, RuntimeError)
                and str(info.exc_value) == "Event loop is closed"):
            previous_hook(info)
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.unraisablehook = unraisable
    try:
        yield
    except CheckpointWriteError:  # a failed save: stay muted (see above)
        raise
    except BaseException:  # a refused run, an interrupt (its saves have finished), a bug
        restore()
        raise
    restore()


def train(args: argparse.Namespace) -> int:
    """The `jaxinfer train` command: 0 when done, 130 when interrupted (Ctrl-C)."""
    import numpy as np
    from flax import nnx

    import jaxinfer
    from jaxinfer.train import TrainingInterrupted
    from jaxinfer.train import train as train_model
    from jaxinfer.train.run_files import TRAIN_CONFIG_FILE

    run = Path(args.out)
    hint = f"continue with `jaxinfer train --out {run} --resume`"
    try:
        spec = _resumed_run(args, run) if args.resume else _fresh_run(args, run)
        train_tokens, eval_tokens = (_resumed_split(args, run, spec) if args.resume
                                     else _split_corpus(args, spec))
        config, model = spec.config, spec.model
        n_params = sum(int(np.prod(v.shape))
                       for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        print(f"{n_params / 1e6:.2f}M parameters; {len(train_tokens):,} train and "
              f"{len(eval_tokens):,} held-out tokens; {config.steps} steps of "
              f"{config.batch_size * config.grad_accum}x{config.seq_len} tokens")
        # the run's files are written once train() has accepted the run: a refused one
        # changes none
        with _quiet_checkpoint_noise(), flag_errors(TRAIN_FLAG_NAMES):
            result = train_model(model, train_tokens, eval_tokens, config, run,
                                 resume=args.resume, on_start=spec.write_run_files)
    except TrainingInterrupted as e:
        print(f"interrupted at step {e.step}; {hint}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        resumable = (run / TRAIN_CONFIG_FILE).exists()
        print("interrupted" + (f"; {hint} (from its last complete checkpoint)" if resumable
                               else ""), file=sys.stderr)
        return 130
    out = jaxinfer.save_pretrained(result.model, run / "model", tokenizer=spec.tokenizer)
    _write_summary(run, result, config.steps, n_params, train_tokens, eval_tokens)
    print(f"model written to {out}")
    return 0


def _write_summary(run: Path, result, steps: int, n_params: int, train_tokens,
                   eval_tokens) -> None:
    """summary.json of the run, finished at `steps`, printed as well. A resume with nothing left
    to do has only its metrics.jsonl's records: when that file was lost, the losses are those of
    the run's earlier summary.json at this step, or null (said on stderr)."""
    from jaxinfer.config import read_config_json
    from jaxinfer.files import write_json
    from jaxinfer.train.run_files import METRICS_FILE

    names = ("final_train_loss", "held_out_loss", "held_out_perplexity")
    if result.history:
        last = result.history[-1]
        evals = [r for r in result.history if "eval_loss" in r]
        steps = last["step"]
        losses = {"final_train_loss": last["loss"],
                  "held_out_loss": evals[-1]["eval_loss"] if evals else None,
                  "held_out_perplexity": evals[-1]["eval_perplexity"] if evals else None}
    else:
        try:
            earlier = read_config_json(run / "summary.json")
        except (OSError, ValueError):  # none, or damaged: nothing to keep
            earlier = {}
        losses = {name: earlier.get(name) if earlier.get("steps") == steps else None
                  for name in names}
        if losses["final_train_loss"] is None:
            print(f"{run / METRICS_FILE} has no record of the run's steps: summary.json's "
                  f"losses are unknown", file=sys.stderr)
    summary = {"steps": steps, **losses,
               "wall_seconds_this_invocation": result.wall_seconds,
               "parameters": n_params, "train_tokens": int(len(train_tokens)),
               "held_out_tokens": int(len(eval_tokens))}
    write_json(run / "summary.json", summary)
    print(json.dumps(summary, indent=2))
