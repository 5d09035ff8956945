"""Orbax checkpoints of the whole training state.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; `latest_step` only ever sees finished ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

_ITEM = "default"  # the name orbax gives a manager's single item: <step>/default


class TrainStateCheckpointer:
    """Save and restore a train-state pytree (params, optimizer state, step, RNG, data position)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
        self.directory = Path(directory).absolute()
        self._max_to_keep = max_to_keep
        # the handler of the manager's one item ("default") registered up front, so that its
        # metadata can be read before any save or restore (stored_tree)
        handler = ocp.StandardCheckpointHandler()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_ITEM, ocp.args.StandardSave, handler)
        registry.add(_ITEM, ocp.args.StandardRestore, handler)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep),
            handler_registry=registry)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def sync_with_disk(self) -> None:
        """Re-read the finished checkpoints from disk and delete all but the newest max_to_keep.
        For after a save stopped inside the manager (a KeyboardInterrupt): its write may have
        finished in the background without the manager recording the step or pruning old ones.
        Call it with no save in flight (after `wait`)."""
        self._manager.reload()
        steps = sorted(self._manager.all_steps())
        keep = len(steps) if self._max_to_keep is None else self._max_to_keep
        for step in steps[:max(len(steps) - keep, 0)]:
            self._manager.delete(step)

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restore into the structure, shapes and dtypes of `target` (a live or abstract state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def stored_tree(self, step: int) -> Any:
        """The state saved at `step` as orbax metadata leaves (each with .shape and .dtype),
        read without restoring anything."""
        return self._manager.metadata(step).item_metadata.tree

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
