"""Resuming a run: which checkpoint there is, whether a config may continue it, and restoring the
train state with an error that names the parameters when the model is not the run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxinfer.checkpoint.train_state import TrainStateCheckpointer
from jaxinfer.train.run_files import CHECKPOINTS_DIR, TRAIN_CONFIG_FILE
from jaxinfer.train.train_config import RESUMABLE, TrainConfig

_MISMATCHES_SHOWN = 3  # parameters named in a shape-mismatch error


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


def check_resume(run_dir: Path, config: TrainConfig) -> None:
    """ValueError unless `config` may continue the run in run_dir: equal to its saved
    train_config.json outside RESUMABLE, and `steps` not below its latest checkpoint's step."""
    saved_file = run_dir / TRAIN_CONFIG_FILE
    if saved_file.exists():
        changes = config.changes_on_resume(TrainConfig.load(saved_file))
        if changes:
            raise ValueError(f"a resumed run keeps its settings ({saved_file}) except "
                             f"{', '.join(RESUMABLE)}; got other values for "
                             f"{'; '.join(changes)}")
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
