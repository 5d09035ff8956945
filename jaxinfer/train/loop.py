"""The training loop: jitted steps, periodic evaluation, orbax checkpoints, exact resume.

A run directory holds everything needed to continue: the model's config.json, the tokenizer, the
train settings, a data.json fingerprint of the token streams, orbax checkpoints of the full train
state and a metrics.jsonl loss log. Resuming checks that the settings, the model's architecture and
the data are the run's, restores the state of the latest checkpoint, drops log lines written after
it, and continues; since batches are a function of the data position, the loss curve is the
uninterrupted run's. A KeyboardInterrupt (Ctrl-C) saves a checkpoint at the last completed step
first and then propagates as `TrainingInterrupted`, so that a resume loses no step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.files import write_atomic, write_json
from jaxinfer.train.data import PackedDocuments, TokenWindows, split_documents
from jaxinfer.train.optimizer import make_optimizer_and_schedule
from jaxinfer.train.resume import (check_no_checkpoints, check_resume, data_fingerprint,
                                   restore_state)
from jaxinfer.train.run_files import (CHECKPOINTS_DIR, DATA_FILE, METRICS_FILE,
                                      MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE, read_history)
from jaxinfer.train.step import held_out_loss, takes_segment_ids, train_step_with_losses
from jaxinfer.train.train_config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS_DIR", "METRICS_FILE", "TRAIN_CONFIG_FILE", "CheckpointWriteError",
           "TrainConfig", "TrainResult", "TrainingInterrupted", "initial_state", "train"]

# jax re-raises an exception thrown while it compares a static argument with its cached one (the
# step's GraphDef, from a process's second train() on) as a ValueError whose message holds the
# original's formatted traceback, with neither __cause__ nor __context__ set: a Ctrl-C landing
# there shows only as a traceback ending the message with KeyboardInterrupt's line
_WRAPPED_INTERRUPT = re.compile(r"Traceback \(most recent call last\):\n(?:.*\n)*"
                                r"KeyboardInterrupt(?::.*)?\s*\Z")


class TrainingInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that stopped `train` after it saved the run's state: `step` is the step
    of the run's latest checkpoint in `run_dir`, where a resume continues (0: none, the run
    starts over). Caught as KeyboardInterrupt by code that knows nothing of it."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"training interrupted; {run_dir} continues from step {step}")
        self.step, self.run_dir = step, run_dir

    def __reduce__(self):  # BaseException's would call __init__ with the message alone
        return type(self), (self.step, self.run_dir)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk): the run resumes from its last complete
    checkpoint. Its own type, so that callers can tell it from other OSErrors (the CLI keeps
    orbax's background noise muted after it, and only after it)."""


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module  # the trained LlamaForCausalLM, MixtralForCausalLM or HyenaForCausalLM
    # one record per step: step, loss (the optimised loss), its parts (next_token_loss and the
    # model's auxiliary losses, unweighted), grad_norm, lr and (some) eval_loss
    history: list[dict]
    wall_seconds: float  # this invocation only


def _data_sources(train_tokens: np.ndarray, eval_tokens: np.ndarray, config: TrainConfig
                  ) -> tuple[TokenWindows | PackedDocuments, TokenWindows | PackedDocuments]:
    """The training batches and the held-out source: random windows, or packed documents when
    `config.document_separator` is set."""
    size = config.batch_size * config.grad_accum
    if config.document_separator is None:
        return (TokenWindows(train_tokens, config.seq_len, size, seed=config.seed),
                TokenWindows(eval_tokens, config.seq_len, config.batch_size))
    sep = config.document_separator
    documents = split_documents(train_tokens, sep)
    if len(documents) < 2:  # the separator is not the stream's (tokenize_corpus adds no EOS)
        raise ValueError(f"document_separator={sep} must end the documents of the training "
                         f"stream; it occurs {int(np.sum(np.asarray(train_tokens) == sep))} "
                         f"time(s) in its {len(train_tokens)} tokens, leaving "
                         f"{len(documents)} document(s)")
    return (PackedDocuments(documents, config.seq_len, size, seed=config.seed),
            PackedDocuments(split_documents(eval_tokens, sep), config.seq_len,
                            config.batch_size))


def _as_pair(batch: np.ndarray | tuple[np.ndarray, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, segment ids or None) of a batch from either data source."""
    return batch if isinstance(batch, tuple) else (batch, None)


def check_model_fits(model_class: type, model_config, config: TrainConfig) -> None:
    """ValueError for a run the model cannot train, decided by the model's class and config
    alone (so the CLI asks before it trains a tokenizer): windows longer than the model's
    context, packed documents for a model whose forward takes no segment ids."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and config.seq_len > context:
        raise ValueError(f"seq_len must be at most the model's max_position_embeddings "
                         f"({context}); got {config.seq_len}")
    # takes_segment_ids reads forward's signature, which the class has as its instances do
    if config.document_separator is not None and not takes_segment_ids(model_class):
        raise ValueError(f"document_separator={config.document_separator} packs documents, "
                         f"which needs a model whose forward takes segment_ids (Llama, "
                         f"Mixtral); {model_class.__name__} does not: leave document_separator "
                         f"None")


def _check_inputs(model: nnx.Module, train_tokens: np.ndarray, eval_tokens: np.ndarray,
                  config: TrainConfig) -> None:
    """ValueError for a run that cannot train as asked: what check_model_fits refuses, streams
    shorter than one window, token ids outside the vocabulary."""
    check_model_fits(type(model), model.config, config)
    for name, tokens in (("train_tokens", train_tokens), ("eval_tokens (held-out)", eval_tokens)):
        if len(tokens) < config.seq_len + 1:
            raise ValueError(f"{name} has {len(tokens)} tokens; need at least one window of "
                             f"seq_len + 1 = {config.seq_len + 1}")
    vocab = model.config.vocab_size
    for name, tokens in (("train_tokens", train_tokens), ("eval_tokens", eval_tokens)):
        if len(tokens) and not 0 <= int(np.min(tokens)) <= int(np.max(tokens)) < vocab:
            raise ValueError(f"{name} must lie in [0, {vocab}) (the model's vocab_size); got "
                             f"ids from {int(np.min(tokens))} to {int(np.max(tokens))}")


def _optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimizer and the learning-rate schedule it follows (cached: equal configs
    share them, and so the compiled step)."""
    return make_optimizer_and_schedule(
        learning_rate=config.learning_rate, total_steps=config.steps,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        clip_norm=config.clip_norm)


def initial_state(model: nnx.Module, config: TrainConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, state): the model's structure and the train state a fresh run starts from,
    {"params", "opt_state", "step", "rng" (key data for stochastic layers), "data_position"}:
    what each checkpoint holds."""
    graphdef, params = nnx.split(model)
    return graphdef, {
        "params": params,
        "opt_state": _optimizer(config)[0].init(params),
        "step": jnp.int32(0),
        "rng": jax.random.key_data(jax.random.key(config.seed)),
        "data_position": jnp.int32(0),
    }


def train(model: nnx.Module, train_tokens: np.ndarray, eval_tokens: np.ndarray,
          config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          on_step: Callable[[dict], None] | None = None,
          on_start: Callable[[], None] | None = None) -> TrainResult:
    """Train `model` (not modified; the trained model is returned) on next-token prediction plus
    the model's auxiliary losses at its config's weights (jaxinfer.train.step.training_loss:
    Mixtral's router losses), in training mode with a per-step key from the state's RNG.

    Any causal LM with `forward(ids) -> (logits, cache)` and a `config.to_hf_config()` trains here
    (LlamaForCausalLM, MixtralForCausalLM, HyenaForCausalLM). With `config.document_separator`
    the streams' documents are packed into rows with segment ids (a model whose forward takes
    `segment_ids`: Llama, Mixtral).

    With `resume=True` and a checkpoint in run_dir, continue from it: `config` must equal the
    run's train_config.json but for steps, eval_every and checkpoint_every (train_config's
    RESUMABLE), `steps` may not be below the checkpoint's step and the model must have the
    run's shapes. A larger `steps` stretches the cosine schedule over the new total, so the
    learning rate can jump up at the resume. The model's architecture (its config's
    to_hf_config(): run settings such as remat may change) must be the run's config.json, and
    train_tokens and eval_tokens those the run began with (data.json: their lengths and sha256).
    ValueError for a run that cannot go on is raised before a file is written. `on_start` is
    called once the run has passed every check, before train() writes its files (the CLI records
    its run there); `on_step` sees each record.

    A KeyboardInterrupt during the steps saves a checkpoint of the last completed step (unless
    one is saved there) and raises `TrainingInterrupted` (a KeyboardInterrupt) naming it; a
    second one during that save stops it, and orbax's atomic save (a temporary directory renamed
    when complete) leaves the run's previous checkpoint as it was. A checkpoint that cannot be
    written (a full disk) is a CheckpointWriteError (an OSError) naming the checkpoint
    directory."""
    run_dir = Path(run_dir)
    _check_inputs(model, train_tokens, eval_tokens, config)
    fingerprint = data_fingerprint(train_tokens, eval_tokens)
    hf_config = model.config.to_hf_config()
    if resume:
        check_resume(run_dir, config, hf_config=hf_config, fingerprint=fingerprint)
    else:
        check_no_checkpoints(run_dir)
    data, eval_data = _data_sources(train_tokens, eval_tokens, config)
    eval_set = [jax.tree.map(jnp.asarray, _as_pair(b))
                for b in eval_data.fixed_batches(config.eval_batches)]
    tx, schedule = _optimizer(config)
    graphdef, state = initial_state(model, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = TrainStateCheckpointer(run_dir / CHECKPOINTS_DIR)
    try:
        latest = checkpointer.latest_step() if resume else None
        history = []
        # both can refuse the run, so both come before any file: a model of another shape or a
        # damaged metrics log changes none
        if latest is not None:
            state = restore_state(checkpointer, state, latest)
            history = read_history(run_dir / METRICS_FILE, int(state["step"]))
            log.info("resumed from step %d in %s", latest, run_dir)
        if on_start is not None:
            on_start()
        write_json(run_dir / MODEL_CONFIG_FILE, hf_config)
        write_json(run_dir / DATA_FILE, fingerprint)
        config.save(run_dir / TRAIN_CONFIG_FILE)
        write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
        began = time.perf_counter()
        params = _run_steps(graphdef, tx, schedule, state, data, eval_set, config, run_dir,
                            checkpointer, history, progress, on_step)
    finally:
        _wait(checkpointer)
        checkpointer.close()
    return TrainResult(nnx.merge(graphdef, params), history, time.perf_counter() - began)


def _save(checkpointer: TrainStateCheckpointer, done: tuple) -> None:
    """Save `done` = (step, params, opt_state, rng, data position) as the checkpoint of its step;
    a failure (orbax raises what tensorstore reports, a ValueError for a full disk) is a
    CheckpointWriteError naming the checkpoint directory."""
    step, params, opt_state, rng, position = done
    try:
        checkpointer.save(step, {"params": params, "opt_state": opt_state,
                                 "step": jnp.int32(step), "rng": rng,
                                 "data_position": jnp.int32(position)})
    except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
        raise _save_error(checkpointer, e) from e


def _wait(checkpointer: TrainStateCheckpointer) -> None:
    """Wait for the checkpoint being saved in the background; its failure as `_save`'s."""
    try:
        checkpointer.wait()
    except Exception as e:  # noqa: BLE001 - as in _save
        raise _save_error(checkpointer, e) from e


def _sync_with_disk(checkpointer: TrainStateCheckpointer) -> None:
    """The checkpointer's steps re-read from disk and pruned (its sync_with_disk); a failure as
    `_save`'s."""
    try:
        checkpointer.sync_with_disk()
    except Exception as e:  # noqa: BLE001 - as in _save
        raise _save_error(checkpointer, e) from e


def _save_error(checkpointer: TrainStateCheckpointer, error: Exception
                ) -> CheckpointWriteError:
    """What a failed checkpoint save becomes (a disk-full ValueError from orbax, say)."""
    return CheckpointWriteError(f"could not write a checkpoint in {checkpointer.directory} (is "
                                f"the disk full?); the run resumes from its last complete "
                                f"checkpoint: {error}")


def _append(metrics, record: dict) -> None:
    """`record` as the metrics log's next line; a failure (a full disk) names the file."""
    try:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    except OSError as e:
        raise OSError(f"could not append to {metrics.name}: {e}") from e


def _save_on_interrupt(checkpointer: TrainStateCheckpointer, done: tuple,
                       run_dir: Path) -> TrainingInterrupted:
    """After a KeyboardInterrupt: let a save in flight finish, save `done` unless its step is
    saved already (or is 0: nothing to keep), and return the TrainingInterrupted to raise, which
    names the step a resume continues from. A failed save is logged; the run then continues
    from its previous checkpoint. A second KeyboardInterrupt here propagates as it is.

    Which steps are saved is read from disk after the wait: an interrupt inside the manager's
    save can land after its write began but before the manager recorded the step or pruned the
    old ones, and the write then finishes on its own."""
    try:
        _wait(checkpointer)
        _sync_with_disk(checkpointer)
        if done[0] > 0 and checkpointer.latest_step() != done[0]:
            log.info("interrupted: saving the checkpoint of step %d in %s", done[0], run_dir)
            _save(checkpointer, done)
            _wait(checkpointer)
    except OSError as e:
        log.error("interrupted, and the checkpoint of step %d could not be saved: %s",
                  done[0], e)
    return TrainingInterrupted(checkpointer.latest_step() or 0, run_dir)


def _run_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, state: dict, data: TokenWindows | PackedDocuments,
               eval_set: list, config: TrainConfig, run_dir: Path,
               checkpointer: TrainStateCheckpointer, history: list[dict], progress: bool,
               on_step: Callable[[dict], None] | None) -> nnx.State:
    """The steps from state["step"] to config.steps: each record appended to `history` and to
    the metrics log, checkpoints saved as configured. Returns the final params. A
    KeyboardInterrupt saves the last completed step (`_save_on_interrupt`) and becomes
    TrainingInterrupted."""
    params, opt_state = state["params"], state["opt_state"]
    position, rng = int(state["data_position"]), state["rng"]
    start_step = int(state["step"])
    # the state after the last step whose record is in the metrics log, replaced in one
    # assignment, so that an interrupt anywhere finds a consistent one to save
    done = (start_step, params, opt_state, rng, position)
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               desc="train", disable=not progress, dynamic_ncols=True)
    try:
        with (run_dir / METRICS_FILE).open("a") as metrics:
            for step in bar:
                step_began = time.perf_counter()
                batches, segment_ids = (None if x is None else jnp.asarray(x).reshape(
                    config.grad_accum, config.batch_size, config.seq_len + 1)
                    for x in _as_pair(data.batch(position)))
                rng, step_key = jax.random.split(jax.random.wrap_key_data(rng))
                rng = jax.random.key_data(rng)
                out = train_step_with_losses(graphdef, tx, params, opt_state, batches, step_key,
                                             segment_ids=segment_ids)
                params, opt_state = out.params, out.opt_state
                position += 1
                record = {"step": step + 1, "loss": float(out.loss),
                          **{name: float(value) for name, value in out.losses.items()},
                          "grad_norm": float(out.grad_norm), "lr": float(schedule(step)),
                          "tokens": (step + 1) * config.batch_size * config.grad_accum
                          * config.seq_len}
                if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                    eval_loss = held_out_loss(graphdef, params, eval_set)
                    record.update(eval_loss=eval_loss, eval_perplexity=math.exp(eval_loss))
                record["seconds"] = time.perf_counter() - step_began
                history.append(record)
                _append(metrics, record)
                done = (step + 1, params, opt_state, rng, position)
                bar.set_postfix(loss=f"{record['loss']:.3f}", **(
                    {"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                    _save(checkpointer, done)
                if on_step is not None:
                    on_step(record)
    except (KeyboardInterrupt, ValueError) as e:
        if not _is_interrupt(e):
            raise
        bar.close()
        raise _save_on_interrupt(checkpointer, done, run_dir) from None
    return params


def _is_interrupt(error: BaseException) -> bool:
    """Whether `error` is a KeyboardInterrupt or one that jax wrapped: a ValueError caused by
    one, or the ValueError it raises for an exception in a static argument's __eq__, which
    carries the interrupt only in its message (_WRAPPED_INTERRUPT)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt) or (
                isinstance(error, ValueError) and _WRAPPED_INTERRUPT.search(str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False
