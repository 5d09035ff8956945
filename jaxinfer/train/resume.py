"""Resuming a run: which checkpoint there is, whether a config, a model and data may continue it,
and restoring the train state with an error that names the parameters when the model is not the
run's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.config import HYENA_MODEL_TYPE, read_config_json
from jaxinfer.train.run_files import (CHECKPOINTS_DIR, DATA_FILE, MODEL_CONFIG_FILE,
                                      TRAIN_CONFIG_FILE)
from jaxinfer.train.train_config import RESUMABLE, TrainConfig

_MISMATCHES_SHOWN = 3  # parameters named in a shape-mismatch error
# config.json keys that are run settings, not architecture, per model_type: HyenaConfig writes its
# compute dtype, which a resume may change as Llama's and Mixtral's (whose config.json holds only
# the storage dtype, as torch_dtype; Hyena's storage dtype is param_dtype, compared)
_RUN_SETTING_KEYS = {HYENA_MODEL_TYPE: ("dtype",)}


def latest_checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the newest finished checkpoint in run_dir (None: none), creating nothing."""
    directory = Path(run_dir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return None
    checkpointer = TrainStateCheckpointer(directory)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def check_no_checkpoints(run_dir: str | Path) -> None:
    """ValueError if run_dir holds a run's checkpoints: a fresh run there would skip saving every
    step up to the old run's last checkpoint (the manager keeps the newest step), and a later
    resume would restore the old run."""
    step = latest_checkpoint_step(run_dir)
    if step is not None:
        raise ValueError(f"{run_dir} already holds a run's checkpoints (step {step}); resume "
                         f"it, or train into a new directory")


def data_fingerprint(train_tokens: np.ndarray, eval_tokens: np.ndarray) -> dict:
    """{"train_tokens": {"length", "sha256"}, "eval_tokens": ...}: what a run trains and
    evaluates on, saved as its data.json so that a resume on other data is refused. The hash is
    of the token ids as little-endian int32 (ids lie in the vocabulary), so int32 and int64
    arrays of the same ids agree."""
    return {name: {"length": int(len(tokens)), "sha256": hashlib.sha256(
                np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()}
            for name, tokens in (("train_tokens", train_tokens), ("eval_tokens", eval_tokens))}


def data_changes(run_dir: Path, fingerprint: dict) -> list[str]:
    """How `fingerprint` (`data_fingerprint`) differs from the run's data.json, as
    'train_tokens: 4000 tokens (sha256 1a2b3c4d...) -> ...' lines; empty when they agree or the
    run has no data.json (one begun before it was written)."""
    path = run_dir / DATA_FILE
    if not path.exists():
        return []
    saved = read_config_json(path)

    def described(entry: dict | None) -> str:
        if not isinstance(entry, dict):
            return "none recorded"
        return f"{entry.get('length')} tokens (sha256 {str(entry.get('sha256'))[:12]}...)"
    return [f"{name}: {described(saved.get(name))} -> {described(fingerprint[name])}"
            for name in fingerprint if saved.get(name) != fingerprint[name]]


def _flat(hf: dict) -> dict:
    """A config.json dict with nested dicts' keys spelled 'outer.inner', so that a change names
    the field (rope_parameters.rope_theta), and values as JSON gives them back (tuples as
    lists)."""
    flat = {}
    for key, value in json.loads(json.dumps(hf)).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def model_config_changes(run_dir: Path, hf_config: dict) -> list[str]:
    """How a model's config.json dict (`config.to_hf_config()`: its architecture, without run
    settings such as remat or attention_backend; Hyena's compute dtype, which it writes, is
    skipped here) differs from the run's config.json, as 'name: saved -> given' lines; empty
    when they agree or the run has none."""
    path = run_dir / MODEL_CONFIG_FILE
    if not path.exists():
        return []
    saved, given = _flat(read_config_json(path)), _flat(hf_config)
    for key in _RUN_SETTING_KEYS.get(given.get("model_type"), ()):
        saved.pop(key, None)
        given.pop(key, None)
    missing = "(absent)"
    return [f"{key}: {saved.get(key, missing)!r} -> {given.get(key, missing)!r}"
            for key in sorted(set(saved) | set(given), key=lambda k: (k not in saved, k))
            if saved.get(key, missing) != given.get(key, missing)]


def check_resume(run_dir: Path, config: TrainConfig, *, hf_config: dict | None = None,
                 fingerprint: dict | None = None) -> None:
    """ValueError unless `config` may continue the run in run_dir: equal to its saved
    train_config.json outside RESUMABLE, and `steps` not below its latest checkpoint's step;
    given, the model's `hf_config` must equal its config.json (`model_config_changes`) and the
    data's `fingerprint` its data.json (`data_changes`)."""
    saved_file = run_dir / TRAIN_CONFIG_FILE
    if saved_file.exists():
        changes = config.changes_on_resume(TrainConfig.load(saved_file))
        if changes:
            raise ValueError(f"a resumed run keeps its settings ({saved_file}) except "
                             f"{', '.join(RESUMABLE)}; got other values for "
                             f"{'; '.join(changes)}")
    if hf_config is not None:
        changes = model_config_changes(run_dir, hf_config)
        if changes:
            raise ValueError(f"a resumed run keeps its model's architecture "
                             f"({run_dir / MODEL_CONFIG_FILE}); the model differs in "
                             f"{'; '.join(changes)}")
    if fingerprint is not None:
        changes = data_changes(run_dir, fingerprint)
        if changes:
            raise ValueError(f"a resumed run trains and evaluates on the data it began with "
                             f"({run_dir / DATA_FILE}); got other data: {'; '.join(changes)}")
    step = latest_checkpoint_step(run_dir)
    if step is not None and config.steps < step:
        raise ValueError(f"steps must be at least the run's current step {step} (its latest "
                         f"checkpoint in {run_dir}); got {config.steps}")


def _param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'path.to.param' -> shape for the leaves under tree["params"] (arrays or orbax metadata)."""
    shapes = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree["params"])[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys]
        shapes[".".join(p for p in parts if p != "value")] = tuple(leaf.shape)
    return shapes


def _param_mismatches(checkpointer: TrainStateCheckpointer, step: int, state: dict) -> list[str]:
    """How the model's parameters differ from those the checkpoint at `step` stores (empty when
    they agree or its metadata cannot be read: the restore then reports what it finds)."""
    try:
        stored = _param_shapes(checkpointer.stored_tree(step))
    except Exception:  # noqa: BLE001 - a diagnosis only
        return []
    wanted = _param_shapes(state)
    problems = [f"{name}: checkpoint {list(stored[name])}, model {list(shape)}"
                for name, shape in wanted.items() if name in stored and stored[name] != shape]
    problems += [f"{name}: only in the model" for name in wanted if name not in stored]
    problems += [f"{name}: only in the checkpoint" for name in stored if name not in wanted]
    return problems


def restore_state(checkpointer: TrainStateCheckpointer, state: dict, step: int) -> dict:
    """`state` (params, opt_state, ...) restored from the checkpoint at `step`; ValueError naming
    the parameters whose shapes differ, checked before reading, when the model is not the
    run's."""
    problems = _param_mismatches(checkpointer, step, state)
    if problems:
        more = len(problems) - _MISMATCHES_SHOWN
        raise ValueError(
            f"the model does not match the run's checkpoint {checkpointer.directory / str(step)}"
            f": {'; '.join(problems[:_MISMATCHES_SHOWN])}"
            + (f" (and {more} more)" if more > 0 else ""))
    return checkpointer.restore(state, step)
