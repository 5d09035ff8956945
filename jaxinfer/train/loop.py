"""The training loop: jitted steps, periodic evaluation, orbax checkpoints, exact resume.

A run directory holds everything needed to continue: the model's config.json, the tokenizer, the
train settings, orbax checkpoints of the full train state and a metrics.jsonl loss log. Resuming
restores the state of the latest checkpoint, drops log lines written after it, and continues; since
batches are a function of the data position, the loss curve is the uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.train.data import PackedDocuments, TokenWindows, split_documents
from jaxinfer.train.optimizer import learning_rate_schedule, make_optimizer
from jaxinfer.train.step import eval_step, train_step_with_losses

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
CHECKPOINTS_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches averaged per optimizer update
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    seed: int = 0
    # a token id (the tokenizer's EOS, say) that ends each document of the training and held-out
    # streams; set, whole documents are packed into rows with segment ids (PackedDocuments)
    # instead of random windows being cut across them
    document_separator: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("learning_rate", "clip_norm"):  # clip_norm 0 would zero every gradient
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        sep = self.document_separator
        if sep is not None and (not isinstance(sep, int) or isinstance(sep, bool) or sep < 0):
            raise ValueError(f"document_separator must be None or a token id >= 0; got {sep!r}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(path.read_text()))


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module  # the trained LlamaForCausalLM, MixtralForCausalLM or HyenaForCausalLM
    # one record per step: step, loss (the optimised loss), its parts (next_token_loss and the
    # model's auxiliary losses, unweighted), grad_norm, lr and (some) eval_loss
    history: list[dict]
    wall_seconds: float  # this invocation only


def _read_history(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def latest_checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the newest finished checkpoint in run_dir (None: none), creating nothing."""
    directory = Path(run_dir) / CHECKPOINTS_DIR
    return TrainStateCheckpointer(directory).latest_step() if directory.is_dir() else None


def check_no_checkpoints(run_dir: str | Path) -> None:
    """ValueError if run_dir holds a run's checkpoints: a fresh run there would skip saving every
    step up to the old run's last checkpoint (the manager keeps the newest step), and a later
    resume would restore the old run."""
    step = latest_checkpoint_step(run_dir)
    if step is not None:
        raise ValueError(f"{run_dir} already holds a run's checkpoints (step {step}); resume "
                         f"it, or train into a new directory")


def _data_sources(train_tokens: np.ndarray, eval_tokens: np.ndarray, config: TrainConfig):
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


def _as_pair(batch) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, segment ids or None) of a batch from either data source."""
    return batch if isinstance(batch, tuple) else (batch, None)


def train(model: nnx.Module, train_tokens: np.ndarray, eval_tokens: np.ndarray,
          config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `model` (not modified; the trained model is returned) on next-token prediction plus
    the model's auxiliary losses at its config's weights (jaxinfer.train.step.training_loss:
    Mixtral's router losses), in training mode with a per-step key from the state's RNG.

    Any causal LM with `forward(ids) -> (logits, cache)` and a `config.to_hf_config()` trains here
    (LlamaForCausalLM, MixtralForCausalLM, HyenaForCausalLM). With `config.document_separator`
    the streams' documents are packed into rows with segment ids (a model whose forward takes
    `segment_ids`: Llama, Mixtral).

    With `resume=True` and a checkpoint in run_dir, continue from it; `on_step` sees each record."""
    run_dir = Path(run_dir)
    if not resume:
        check_no_checkpoints(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.eval_every and len(eval_tokens) < config.seq_len + 2:
        raise ValueError(f"held-out set has {len(eval_tokens)} tokens; need more than "
                         f"seq_len + 1 = {config.seq_len + 1}")
    vocab = model.config.vocab_size
    for name, tokens in (("train_tokens", train_tokens), ("eval_tokens", eval_tokens)):
        if len(tokens) and not 0 <= int(np.min(tokens)) <= int(np.max(tokens)) < vocab:
            raise ValueError(f"{name} must lie in [0, {vocab}) (the model's vocab_size); got "
                             f"ids from {int(np.min(tokens))} to {int(np.max(tokens))}")
    data, eval_data = _data_sources(train_tokens, eval_tokens, config)
    (run_dir / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2) + "\n")
    config.save(run_dir / TRAIN_CONFIG_FILE)

    eval_set = [jax.tree.map(jnp.asarray, _as_pair(b))
                for b in eval_data.fixed_batches(config.eval_batches)]
    tx = make_optimizer(learning_rate=config.learning_rate, total_steps=config.steps,
                        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                        clip_norm=config.clip_norm)
    graphdef, params = nnx.split(model)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.int32(0),
        "rng": jax.random.key_data(jax.random.key(config.seed)),  # for stochastic layers
        "data_position": jnp.int32(0),
    }
    checkpointer = TrainStateCheckpointer(run_dir / CHECKPOINTS_DIR)
    if resume and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
        log.info("resumed from step %d in %s", int(state["step"]), run_dir)
    start_step = int(state["step"])
    history = _read_history(run_dir / METRICS_FILE, start_step)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))

    schedule = learning_rate_schedule(config.learning_rate, config.steps, config.warmup_steps)
    began = time.perf_counter()
    params, opt_state = state["params"], state["opt_state"]
    position, rng = int(state["data_position"]), state["rng"]
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               desc="train", disable=not progress, dynamic_ncols=True)
    metrics = (run_dir / METRICS_FILE).open("a")
    try:
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
                      "tokens": (step + 1) * config.batch_size * config.grad_accum * config.seq_len}
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                eval_loss = float(np.mean([eval_step(graphdef, params, *b) for b in eval_set]))
                record.update(eval_loss=eval_loss, eval_perplexity=math.exp(eval_loss))
            record["seconds"] = time.perf_counter() - step_began
            history.append(record)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", **(
                {"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                checkpointer.save(step + 1, {
                    "params": params, "opt_state": opt_state, "step": jnp.int32(step + 1),
                    "rng": rng, "data_position": jnp.int32(position)})
            if on_step is not None:
                on_step(record)
    finally:
        metrics.close()
        checkpointer.wait()
        checkpointer.close()
    return TrainResult(nnx.merge(graphdef, params), history, time.perf_counter() - began)
